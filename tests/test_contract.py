"""The Redis contract against values django-redis really wrote, and against hostile values in Redis."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import tracemalloc
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import zstandard

from examples.legacy_backend.compressor import ZSTD_MAGIC
from proxy import contract as contract_module
from proxy.contract import DecodeError, RedisContract, library_from_user_agent
from proxy.settings import RedisLayout
from tests.backend_writer import BackendWriter, team_record

CONTRACT = RedisContract(RedisLayout())
TOKEN = "phc_contract_test"
TEAM_ID = 42


def flags(count: int) -> list[dict[str, Any]]:
    """Flag definitions shaped like PostHog's, `count` of them."""
    return [
        {
            "id": i,
            "key": f"flag-{i}",
            "active": True,
            "filters": {"groups": [{"properties": [], "rollout_percentage": 50, "variant": None}]},
            "ensure_experience_continuity": False,
        }
        for i in range(count)
    ]


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client that reads and writes bytes, with no django-redis in between."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def writer(redis_url: str) -> Iterator[BackendWriter]:
    """The backend's writer (django-redis, zstd compressor)."""
    with BackendWriter(redis_url) as backend:
        yield backend


@pytest.fixture
def zlib_writer(redis_url: str) -> Iterator[BackendWriter]:
    """The older deployments' writer (django-redis, zlib compressor)."""
    with BackendWriter(redis_url, compressor="zlib") as backend:
        yield backend


def read(raw: redis.Redis, key: str) -> bytes | None:
    """The bytes stored at key, typed."""
    value = raw.get(key)
    assert value is None or isinstance(value, bytes)
    return value


# --- keys ---------------------------------------------------------------------------------------------


def test_keys_are_the_ones_django_redis_writes(writer: BackendWriter, raw: redis.Redis) -> None:
    writer.set_team(TOKEN, team_record(TEAM_ID, TOKEN))
    writer.set_definitions(TEAM_ID, flags(1))

    assert set(raw.keys()) == {
        CONTRACT.team_key(TOKEN).encode(),
        CONTRACT.payload_key(TEAM_ID).encode(),
        CONTRACT.etag_key(TEAM_ID).encode(),
    }


def test_key_formats_are_posthogs() -> None:
    assert CONTRACT.team_key("phc_x") == "posthog:1:team_token:phc_x"
    assert CONTRACT.payload_key(7) == "posthog:1:cache/teams/7/feature_flags/flags_with_cohorts.json"
    assert CONTRACT.etag_key(7) == "posthog:1:cache/teams/7/feature_flags/flags_with_cohorts.json:etag"
    assert CONTRACT.billing_keys(7, "posthog-go") == (
        "posthog:local_evaluation_requests:7",
        "posthog:local_evaluation_requests:sdk:7:posthog-go",
    )


# --- round trips through django-redis ----------------------------------------------------------------


def test_small_payload_round_trips_uncompressed(writer: BackendWriter, raw: redis.Redis) -> None:
    json_text, etag = writer.set_definitions(TEAM_ID, [], {"0": "company"}, {})

    stored = read(raw, CONTRACT.payload_key(TEAM_ID))
    assert stored is not None
    assert stored.startswith(b"\x80")  # a bare pickle: under the compressor's 512 bytes
    assert CONTRACT.decode_text(stored) == json_text
    assert CONTRACT.decode_text(read(raw, CONTRACT.etag_key(TEAM_ID))) == etag


def test_large_payload_round_trips_through_zstd(writer: BackendWriter, raw: redis.Redis) -> None:
    json_text, etag = writer.set_definitions(TEAM_ID, flags(30_000), {"0": "company", "1": "instance"})

    stored = read(raw, CONTRACT.payload_key(TEAM_ID))
    assert stored is not None
    assert stored.startswith(ZSTD_MAGIC)
    assert len(json_text) > 5_000_000
    assert CONTRACT.decode_text(stored) == json_text
    assert json.loads(json_text)["flags"][29_999]["key"] == "flag-29999"
    assert CONTRACT.decode_text(read(raw, CONTRACT.etag_key(TEAM_ID))) == etag


def test_non_ascii_payload_round_trips(writer: BackendWriter, raw: redis.Redis) -> None:
    cohorts = {"1": {"name": "Zürich 🚀 users", "properties": {}}}
    json_text, _ = writer.set_definitions(TEAM_ID, flags(2), cohorts=cohorts)

    assert CONTRACT.decode_text(read(raw, CONTRACT.payload_key(TEAM_ID))) == json_text


def test_zlib_writer_round_trips(zlib_writer: BackendWriter, raw: redis.Redis) -> None:
    json_text, etag = zlib_writer.set_definitions(TEAM_ID, flags(50))

    stored = read(raw, CONTRACT.payload_key(TEAM_ID))
    assert stored is not None
    assert stored[:1] == b"\x78"
    assert CONTRACT.decode_text(stored) == json_text
    # The zlib compressor's threshold is 15 bytes, so the older writer compressed the ETag too.
    stored_etag = read(raw, CONTRACT.etag_key(TEAM_ID))
    assert stored_etag is not None
    assert stored_etag[:1] == b"\x78"
    assert CONTRACT.decode_text(stored_etag) == etag


def test_team_record_is_json_text(writer: BackendWriter, raw: redis.Redis) -> None:
    team = team_record(TEAM_ID, TOKEN, secret_api_token="phs_secret", secret_api_token_backup=None)
    writer.set_team(TOKEN, team)

    text = CONTRACT.decode_text(read(raw, CONTRACT.team_key(TOKEN)))
    assert text == json.dumps(team)
    assert json.loads(text)["secret_api_token"] == "phs_secret"


def test_deleted_team_is_absent(writer: BackendWriter, raw: redis.Redis) -> None:
    writer.set_team(TOKEN, team_record(TEAM_ID, TOKEN))
    writer.delete_team(TOKEN)

    assert CONTRACT.decode_text(read(raw, CONTRACT.team_key(TOKEN))) is None


@pytest.mark.parametrize("compressor", ["zstd", "zlib"])
def test_missing_marker_is_a_miss(redis_url: str, raw: redis.Redis, compressor: Any) -> None:
    with BackendWriter(redis_url, compressor=compressor) as backend:
        backend.set_definitions(TEAM_ID, flags(1))
        backend.set_missing(TEAM_ID)

    stored = read(raw, CONTRACT.payload_key(TEAM_ID))
    assert stored is not None
    assert CONTRACT.decode_text(stored) is None
    assert read(raw, CONTRACT.etag_key(TEAM_ID)) is None


def test_payload_without_etag(writer: BackendWriter, raw: redis.Redis) -> None:
    writer.set_definitions(TEAM_ID, flags(1))
    json_text = writer.set_payload_without_etag(TEAM_ID, flags(3))

    assert CONTRACT.decode_text(read(raw, CONTRACT.payload_key(TEAM_ID))) == json_text
    assert read(raw, CONTRACT.etag_key(TEAM_ID)) is None


def test_absent_key_is_none(raw: redis.Redis) -> None:
    assert CONTRACT.decode_text(read(raw, CONTRACT.payload_key(TEAM_ID))) is None


def test_plain_json_text_is_accepted_as_is(raw: redis.Redis) -> None:
    for text in ('{"flags": [], "cohorts": {}}', '[{"key": "a"}]'):
        raw.set(CONTRACT.payload_key(TEAM_ID), text.encode())
        assert CONTRACT.decode_text(read(raw, CONTRACT.payload_key(TEAM_ID))) == text


def test_an_int_stored_by_django_redis_is_no_text(writer: BackendWriter, raw: redis.Redis) -> None:
    """django-redis stores an int unpickled and reads it back as an int, which the backend's readers take
    for no payload, ETag or team at all: served as its digits here, found by a reviewer."""
    writer.cache.set("counter", -12345)
    assert writer.cache.get("counter") == -12345

    with pytest.raises(DecodeError, match="an integer stored unpickled"):
        CONTRACT.decode_text(read(raw, "posthog:1:counter"))


_STRINGS: list[str | bytes] = ["text", "", "ünïcödé", b"utf-8 bytes", "x" * 300_000]


@pytest.mark.parametrize(
    ("protocol", "value"),
    # bytes before protocol 3 pickle as a call to _codecs.encode, refused with the hostile values below.
    [(p, v) for p in range(pickle.HIGHEST_PROTOCOL + 1) for v in _STRINGS if p >= 3 or isinstance(v, str)],
)
def test_every_protocol_of_a_pickled_string(protocol: int, value: str | bytes) -> None:
    expected = value.decode() if isinstance(value, bytes) else value

    assert CONTRACT.decode_text(pickle.dumps(value, protocol)) == expected


# --- hostile values -----------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this runs a shell command (the classic pickle RCE)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


class _Text(str):
    """A str subclass: it pickles as a global plus a call, never as a bare string."""

    __slots__ = ()


def _hostile_pickles(marker: Path) -> dict[str, bytes]:
    command = f"touch {marker}"
    code = command.encode()
    return {
        **{f"reduce-protocol-{p}": pickle.dumps(_Exploit(command), p) for p in (0, 1, 2, 3, 4, 5)},
        # GLOBAL opcode written by hand, protocol 0: cos\nsystem\n ... REDUCE.
        "global-opcode": b"cos\nsystem\n(V" + code + b"\ntR.",
        # A legitimate string first, then the code: one string opcode only.
        "string-then-stack-global": (
            b"\x80\x04\x8c\x03abc\x94\x8c\x05posix\x8c\x06system\x93\x8c"
            + bytes([len(code)])
            + code
            + b"\x85R."
        ),
        "dict": pickle.dumps({"flags": []}, 5),
        "list": pickle.dumps(["a"], 5),
        "tuple": pickle.dumps(("a",), 5),
        "int": pickle.dumps(12345, 5),
        "none": pickle.dumps(None, 5),
        "bytes-protocol-2": pickle.dumps(b"abc", 2),
        "str-subclass": pickle.dumps(_Text("x"), 5),
        "two-strings": b"\x80\x05\x8c\x01a\x94\x8c\x01b\x94.",
        "data-after-stop": pickle.dumps("ok", 5) + b"junk",
        "memo-before-string": b"\x80\x05\x94\x8c\x01a.",
        "proto-after-string": b"\x80\x05\x8c\x01a\x80\x05.",
    }


def _stored_forms(payload: bytes) -> dict[str, bytes]:
    return {
        "raw": payload,
        "zstd": zstandard.ZstdCompressor(level=3).compress(payload),
        "zlib": zlib.compress(payload, 6),
    }


@pytest.mark.parametrize("form", ["raw", "zstd", "zlib"])
def test_hostile_pickles_are_refused_and_never_run(raw: redis.Redis, tmp_path: Path, form: str) -> None:
    marker = tmp_path / f"PWNED_{uuid.uuid4().hex}"
    for name, payload in _hostile_pickles(marker).items():
        raw.set(CONTRACT.payload_key(TEAM_ID), _stored_forms(payload)[form])

        with pytest.raises(DecodeError):
            CONTRACT.decode_text(read(raw, CONTRACT.payload_key(TEAM_ID)))
        assert not marker.exists(), name


def test_the_hostile_pickle_is_live(tmp_path: Path) -> None:
    # Control for the test above: the same bytes do run a command when unpickled.
    marker = tmp_path / f"PWNED_{uuid.uuid4().hex}"
    pickle.loads(_hostile_pickles(marker)["reduce-protocol-5"])

    assert marker.exists()


# --- decompression bombs ------------------------------------------------------------------------------

BOMB_BYTES = 200 * 1024 * 1024
_CHUNK = bytes(1024 * 1024)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """200 MiB of zeros, compressed chunk by chunk so the test never holds the 200 MiB itself."""
    with_size = zstandard.ZstdCompressor(level=1).compressobj(size=BOMB_BYTES)
    without_size = zstandard.ZstdCompressor(level=1, write_content_size=False).compressobj()
    deflate = zlib.compressobj(9)
    parts: dict[str, list[bytes]] = {"zstd-with-size": [], "zstd-without-size": [], "zlib": []}
    for _ in range(BOMB_BYTES // len(_CHUNK)):
        parts["zstd-with-size"].append(with_size.compress(_CHUNK))
        parts["zstd-without-size"].append(without_size.compress(_CHUNK))
        parts["zlib"].append(deflate.compress(_CHUNK))
    parts["zstd-with-size"].append(with_size.flush())
    parts["zstd-without-size"].append(without_size.flush())
    parts["zlib"].append(deflate.flush())
    found = {name: b"".join(chunks) for name, chunks in parts.items()}
    # A header that lies: declares 100 bytes (same 4-byte field) for 200 MiB of content.
    frame = found["zstd-with-size"]
    assert zstandard.get_frame_parameters(frame).content_size == BOMB_BYTES
    descriptor = frame[4]
    # Frame header descriptor: a 4-byte content size field, after a window descriptor byte.
    assert descriptor >> 6 == 2
    assert not descriptor & 0x20
    found["zstd-lying-size"] = frame[:6] + struct.pack("<I", 100) + frame[10:]
    # posthog/caching/test/test_zstd_compressor.py: sizes that cannot be allocated or overflow.
    found["zstd-unallocatable-size"] = ZSTD_MAGIC + b"\xe0" + struct.pack("<Q", 1 << 62)
    found["zstd-overflowing-size"] = ZSTD_MAGIC + b"\xe0" + struct.pack("<Q", (1 << 63) + 1)
    return found


@pytest.mark.parametrize(
    "name",
    [
        "zstd-with-size",
        "zstd-without-size",
        "zlib",
        "zstd-lying-size",
        "zstd-unallocatable-size",
        "zstd-overflowing-size",
    ],
)
def test_decompression_bomb_is_refused_quickly_in_bounded_memory(
    raw: redis.Redis, bombs: dict[str, bytes], name: str
) -> None:
    small = RedisContract(RedisLayout(max_decoded_bytes=1024 * 1024))
    raw.set(CONTRACT.payload_key(TEAM_ID), bombs[name])
    stored = read(raw, CONTRACT.payload_key(TEAM_ID))

    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DecodeError):
            small.decode_text(stored)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 8 * 1024 * 1024

    # The default cap (64 MiB) refuses it too.
    with pytest.raises(DecodeError):
        CONTRACT.decode_text(stored)


def test_value_at_the_cap_is_accepted_and_over_it_refused() -> None:
    small = RedisContract(RedisLayout(max_decoded_bytes=4096))
    fits = pickle.dumps("a" * 4000, 5)
    over = pickle.dumps("a" * 5000, 5)

    for form in ("raw", "zstd", "zlib"):
        assert small.decode_text(_stored_forms(fits)[form]) == "a" * 4000
        with pytest.raises(DecodeError):
            small.decode_text(_stored_forms(over)[form])


@pytest.mark.parametrize("form", ["raw", "zstd", "zlib"])
def test_a_value_of_exactly_the_cap_is_read_and_one_byte_more_is_refused(form: str) -> None:
    """The cap is exact in every stored form (found by mutation testing: a zstd frame declaring one byte
    over the cap, and a zlib stream inflating to one byte over it, were read)."""
    cap = 4096
    small = RedisContract(RedisLayout(max_decoded_bytes=cap))

    def pickled(size: int) -> tuple[str, bytes]:
        # The text whose pickle is exactly `size` bytes, and that pickle.
        text = next("a" * n for n in range(size, 0, -1) if len(pickle.dumps("a" * n, 5)) == size)
        return text, pickle.dumps(text, 5)

    text, at_cap = pickled(cap)
    assert small.decode_text(_stored_forms(at_cap)[form]) == text
    _, over = pickled(cap + 1)
    with pytest.raises(DecodeError):
        small.decode_text(_stored_forms(over)[form])


# --- garbage ------------------------------------------------------------------------------------------

_GOOD = pickle.dumps("hello world " * 100, 5)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x01\x02garbage", id="garbage"),
        pytest.param(b"__missing__", id="unpickled-text"),
        pytest.param(_GOOD[:-1], id="pickle-without-stop"),
        pytest.param(_GOOD[: len(_GOOD) // 2], id="truncated-pickle"),
        pytest.param(b"\x80\x05\x8c\xff" + b"a" * 10, id="string-longer-than-data"),
        pytest.param(ZSTD_MAGIC, id="zstd-magic-only"),
        pytest.param(zstandard.compress(_GOOD)[:20], id="truncated-zstd"),
        pytest.param(zstandard.compress(_GOOD) + b"junk", id="data-after-zstd-frame"),
        pytest.param(ZSTD_MAGIC + b"\x00" * 40, id="garbage-zstd"),
        pytest.param(zlib.compress(_GOOD)[:20], id="truncated-zlib"),
        pytest.param(zlib.compress(_GOOD) + b"junk", id="data-after-zlib-stream"),
        pytest.param(b"\x78\x9c" + b"\xff" * 40, id="garbage-zlib"),
        pytest.param(zstandard.compress(b'{"flags": []}'), id="compressed-unpickled-json"),
        pytest.param(zstandard.compress(b""), id="compressed-nothing"),
        pytest.param(b'{"flags": "\xff"}', id="json-not-utf8"),
        # What pickle.loads refuses (the backend's reader): a protocol it does not know, a frame past the end.
        pytest.param(b"\x80\x63" + _GOOD[2:], id="unknown-protocol"),
        pytest.param(
            _GOOD[:3] + (len(_GOOD) - 10).to_bytes(8, "little") + _GOOD[11:], id="frame-past-the-end"
        ),
    ],
)
def test_garbage_is_refused(value: bytes) -> None:
    with pytest.raises(DecodeError):
        CONTRACT.decode_text(value)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_invalid_utf8_in_pickled_bytes_is_refused(protocol: int) -> None:
    with pytest.raises(DecodeError):
        CONTRACT.decode_text(pickle.dumps(b'{"a": "\xff\xfe"}', protocol))


def test_lone_surrogate_in_pickled_str_is_refused() -> None:
    # pickle carries it (surrogatepass), but it can never be served as UTF-8.
    with pytest.raises(DecodeError):
        CONTRACT.decode_text(pickle.dumps('{"a": "\ud800"}', 5))


# --- billing library ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_agent", "library"),
    [
        ("posthog-python/7.4.0", "posthog-python"),
        ("posthog-python/3.0.0 (Linux; Python 3.11)", "posthog-python"),
        ("posthog-node/3.1.0", "posthog-node"),
        ("posthog-go/1.0.0", "posthog-go"),
        ("posthog-ruby/2.3.0", "posthog-ruby"),
        ("posthog-php/3.0.0", "posthog-php"),
        ("posthog-java/1.2.0", "posthog-java"),
        ("posthog-dotnet/1.0.0", "posthog-dotnet"),
        ("posthog-elixir/0.2.0", "posthog-elixir"),
        ("posthog-server/3.2.1 (Android SDK)", "posthog-server"),
        ("posthog-js/1.88.0", "posthog-js"),
        ("posthog-android/3.0.0", "posthog-android"),
        ("posthog-ios/3.1.0", "posthog-ios"),
        ("posthog-react-native/2.0.0", "posthog-react-native"),
        ("posthog-flutter/2.0.0", "posthog-flutter"),
        # Parsed by the reference's UserAgentInfo, but not a variant of its billing Library enum.
        ("posthog-rs/0.10.0", "other"),
        ("posthog-custom/1.0 Chrome/91.0 Safari/537.36", "other"),
        ("posthog-python", "other"),
        ("posthog-python/", "other"),
        ("posthog-/1.0.0", "other"),
        ("Posthog-python/7.4.0", "other"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/91.0", "posthog-js"),
        ("Mozilla/5.0 (X11; Linux x86_64; rv:89.0) Gecko/20100101 Firefox/89.0", "posthog-js"),
        ("curl/7.68.0", "other"),
        ("python-requests/2.28.0", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_library_from_user_agent(user_agent: str | None, library: str) -> None:
    assert library_from_user_agent(user_agent) == library
    assert library_from_user_agent(user_agent) == library  # and again, from the cache


def test_library_cache_stays_bounded() -> None:
    for n in range(10_000):
        assert library_from_user_agent(f"posthog-go/{n}") == "posthog-go"

    assert len(contract_module._LIBRARY_CACHE) <= contract_module._LIBRARY_CACHE_SIZE
