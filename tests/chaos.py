"""A TCP chaos proxy the tests control: pass bytes through, hold them (a hung Redis), or swallow replies."""

from __future__ import annotations

import asyncio
import contextlib
from enum import Enum

from tests.rig import free_port


class Mode(Enum):
    """What happens to bytes crossing the proxy, decided per chunk: a mode change hits live connections."""

    PASS = "pass"
    # Requests and replies are held, never delivered: to the client, a server that hangs.
    HOLD = "hold"
    # Requests reach the server, replies are dropped: the command runs, the client never learns it did.
    SWALLOW_REPLIES = "swallow_replies"


class ChaosProxy:
    """Listens on a free loopback port and relays to `target_port` according to `mode`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.mode = Mode.PASS
        # Seconds each chunk of replies waits before it is relayed (in PASS mode): a slow Redis.
        self.reply_delay = 0.0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """A redis:// URL through this proxy (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def reset_all(self) -> None:
        """Cut every relayed connection, as a network partition that ends in RSTs would."""
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop listening and cut everything; bounded."""
        if self._server is not None:
            self._server.close()
        await self.reset_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers.update((client_w, server_w))
        up = asyncio.create_task(self._pipe(client_r, server_w, reply=False))
        down = asyncio.create_task(self._pipe(server_r, client_w, reply=True))
        self._tasks.update((up, down))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.wait({up, down})
            self._tasks.difference_update((up, down))
            for writer in (client_w, server_w):
                self._writers.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, reply: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.mode is Mode.HOLD:
                    continue
                if self.mode is Mode.SWALLOW_REPLIES and reply:
                    continue
                if reply and self.reply_delay:
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()
