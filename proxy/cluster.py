"""Multi-key Redis work that runs unchanged on one node and on a Redis Cluster.

The backend's keys carry no hash tags, so a team's payload and its ETag, or its two billing hashes, land in
different slots of a Cluster, where one command or script may only touch one slot. On a Cluster an MGET is
split per slot (redis-py's mget_nonatomic) and a script runs once per slot group, all pipelined: one round
trip per node. On one node every key is in "slot 0": one MGET, one script call, exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import DataError, NoScriptError

# What the app's Redis key holds: the one-node client (plain or Sentinel's master) or the Cluster client.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster
# One script call: its keys (all in one slot on a Cluster) and its arguments.
ScriptCall: TypeAlias = tuple[Sequence[str], Sequence[str | int]]
# Keys per MGET in `mget_many`: a cycle stays one or two round trips without stalling Redis on one command.
MGET_CHUNK = 1000


def _slot(key: str) -> int:
    return key_slot(key.encode())


def _one_slot(key: str) -> int:
    return 0


def slot_of(client: RedisClient) -> Callable[[str], int]:
    """The hash slot of a key on a Cluster; 0 for every key on one node, so callers group into one call."""
    return _slot if isinstance(client, RedisCluster) else _one_slot


def hash_tagged(name: str, key: str) -> str:
    """`name` with a hash tag that puts it in `key`'s slot (for a key that must live beside `key`)."""
    # Redis hashes only the part between the first "{" and the next "}" when it is not empty.
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    hashed = key[start + 1 : end] if start >= 0 and end > start + 1 else key
    tagged = f"{name}:{{{hashed}}}"
    if _slot(tagged) != _slot(key):  # only a key with a "}" but no hash tag of its own gets here
        raise DataError(f"cannot give {name!r} the slot of {key!r}")
    return tagged


async def mget(client: RedisClient, keys: Sequence[str]) -> list[bytes | None]:
    """MGET; on a Cluster one per slot, pipelined (not atomic across slots, which no caller needs)."""
    if isinstance(client, RedisCluster):
        return cast(list[bytes | None], await client.mget_nonatomic(keys))
    return cast(list[bytes | None], await client.mget(keys))


async def mget_many(client: RedisClient, keys: Sequence[str]) -> list[bytes | None]:
    """`mget` of any number of keys: chunks of MGET_CHUNK pipelined in one round trip on one node."""
    if len(keys) <= MGET_CHUNK or isinstance(client, RedisCluster):
        # A Cluster splits the keys by slot and pipelines the MGETs itself.
        return await mget(client, keys)
    async with client.pipeline(transaction=False) as pipe:
        for start in range(0, len(keys), MGET_CHUNK):
            pipe.mget(keys[start : start + MGET_CHUNK])
        chunks = cast(list[list[bytes | None]], await pipe.execute())
    return [value for chunk in chunks for value in chunk]


async def run_script(client: RedisClient, script: AsyncScript, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run `script` once per call and return the replies in order; raises the first call's error, if any.

    On one node the calls run one after the other (callers group all they can into each). On a Cluster they
    are pipelined, one round trip per node; a node that does not know the script (NOSCRIPT: restarted, or a
    replica promoted) gets it with SCRIPT LOAD and only the calls it refused are sent again, so no call runs
    twice.
    """
    if not isinstance(client, RedisCluster):
        return [await script(keys=keys, args=args, client=client) for keys, args in calls]
    replies: list[Any] = [None] * len(calls)
    todo: Sequence[int] = range(len(calls))
    for attempt in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for i in todo:
                keys, args = calls[i]
                # EVALSHA is refused by the pipeline's method (redis-py cannot load a script mid-pipeline);
                # the raw command is routed by its keys like any other.
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            for i, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
        if not todo or attempt:
            break
        await client.script_load(script.script)  # on every primary
    error = next((reply for reply in replies if isinstance(reply, Exception)), None)
    if error is not None:
        raise error
    return replies
