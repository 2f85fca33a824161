"""A TCP proxy on 127.0.0.1 that injects network faults between kine-server and its database.

The proxy runs its own asyncio loop in a daemon thread, so it keeps (or keeps not) forwarding
whatever the test's own loop is doing, and can be driven from sync and async tests alike::

    with FaultProxy(postgres.port) as proxy:
        dsn = proxy.dsn(postgres_dsn)      # the same DSN, through the proxy
        proxy.set_mode(Mode.BLACKHOLE)     # connections stay open, nothing gets through
        proxy.set_mode(Mode.FORWARD)       # what was held back now flows, in order

Modes, for connections open at the switch and for new ones alike:

- FORWARD: bytes are copied both ways as they come.
- BLACKHOLE: nothing is read from either side any more, so nothing is forwarded, yet every socket
  stays open: to a client this looks like a partition or a stalled server (the kernel still
  acknowledges what was sent; only the application never answers). One side closing or
  resetting its connection is not passed on either: a machine that vanishes says nothing. New
  connections are accepted and held the same way. Switching back to FORWARD delivers the held
  bytes (and closes), as TCP would once a partition heals.
- RESET: every connection is closed with a TCP RST on both sides, and new ones are reset as soon
  as they are accepted.
- SLOW: every chunk is forwarded only after `latency` seconds (per direction, in order), the next
  read only then: a slow link, its throughput one chunk per `latency`.
- DELAY: every chunk is forwarded `latency` seconds after it came, reading going on meanwhile: a
  link that far away, with bandwidth to spare (a standby in another data centre).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import urllib.parse
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self

CHUNK = 64 * 1024


class Mode(enum.Enum):
    FORWARD = "forward"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    SLOW = "slow"
    DELAY = "delay"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0, then drop the socket without a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _deliver(sink: asyncio.StreamWriter, data: bytes) -> None:
    """DELAY's delivery of one chunk (b"": the close) once its time has come, unless the link
    was reset meanwhile: what was on its way is lost with it."""
    if sink.is_closing():
        return
    with contextlib.suppress(OSError):
        if data:
            sink.write(data)
        elif sink.can_write_eof():
            sink.write_eof()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class FaultProxy:
    """Listens on a free loopback port and forwards to `target_host:target_port`."""

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", latency: float = 0.05
    ) -> None:
        self.target = (target_host, target_port)
        self.latency = latency
        self.port = 0
        self.mode = Mode.FORWARD
        #: Connections accepted since start, and those reset by RESET mode.
        self.accepted = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing: asyncio.Event | None = None

    # -- control, from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        """Close the listener and reset every connection; idempotent."""
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def set_mode(self, mode: Mode, latency: float | None = None) -> None:
        """Switch modes; returns once the switch took effect (RESET: every connection is reset)."""
        self._call(self._set_mode(mode, latency))

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        parts = urllib.parse.urlsplit(dsn)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}{at}127.0.0.1:{self.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the proxy, on its own loop ------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        links, self._links = list(self._links), set()
        for link in links:
            link.reset()
        await asyncio.gather(*(t for link in links for t in link.tasks), return_exceptions=True)

    async def _set_mode(self, mode: Mode, latency: float | None) -> None:
        assert self._flowing is not None
        if latency is not None:
            self.latency = latency
        self.mode = mode
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if mode is Mode.RESET:
            for link in list(self._links):
                self.resets += 1
                link.reset()
            self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        if self.mode is Mode.RESET:
            self.resets += 1
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        link.tasks = [task] if (task := asyncio.current_task()) is not None else []
        try:
            await self._flowing.wait()  # a blackhole holds new connections too
            up_reader, link.upstream = await asyncio.open_connection(*self.target)
        except (OSError, asyncio.CancelledError):
            self._links.discard(link)
            _reset(writer)
            return
        if link not in self._links:  # reset while connecting upstream
            _reset(link.upstream)
            return
        link.tasks = [
            asyncio.create_task(self._pump(reader, link.upstream, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                try:
                    data = await source.read(CHUNK)
                except (OSError, asyncio.IncompleteReadError):
                    await self._flowing.wait()  # a partition hides a reset too
                    raise
                if self.mode is Mode.SLOW:
                    await asyncio.sleep(self.latency)
                # Read just before a blackhole: hold it too, data or the other side's FIN.
                await self._flowing.wait()
                if self.mode is Mode.DELAY:
                    # In order: call_at runs callbacks of equal delay in the order they came.
                    self._loop.call_at(self._loop.time() + self.latency, _deliver, sink, data)
                    if not data:
                        await asyncio.sleep(self.latency)  # what is on its way first
                        break
                    continue
                if not data:
                    break
                sink.write(data)
                await sink.drain()
            # One side closed: pass the close on, as a FIN.
            with contextlib.suppress(OSError):
                sink.write_eof()
        except (OSError, asyncio.IncompleteReadError):
            link.reset()
            self._links.discard(link)
        except asyncio.CancelledError:
            return
        if all(t.done() or t is asyncio.current_task() for t in link.tasks):
            with contextlib.suppress(OSError):
                link.client.close()
                if link.upstream is not None:
                    link.upstream.close()
            self._links.discard(link)
