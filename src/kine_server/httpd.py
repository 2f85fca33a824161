"""A small HTTP/1.1 server on asyncio: what the metrics listener and the JSON gateway share.

Only what those two need: requests with a Content-Length or chunked body, keep-alive, responses
with a Content-Length or streamed in chunks, TLS. Connections are counted (TLS handshakes
included) and one past the limit is closed at once, so a flood costs no file descriptors that
gRPC or the database need, and is logged once per flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from kine_server import addresses
from kine_server.addresses import Address

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
#: A request's head (and a TLS handshake) must arrive within this time; so must the next
#: request on a kept-alive connection.
REQUEST_TIMEOUT_SECONDS = 10.0
#: The longest request line plus headers.
MAX_HEAD_BYTES = 64 * 1024
ACCEPT_RETRY_SECONDS = 0.5
REFUSAL_QUIET_SECONDS = 60.0
READ_SIZE = 64 * 1024
#: How long a refused request's unread body is drained before the connection closes.
LINGER_SECONDS = 2.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(Exception):
    """The request cannot be parsed, or its body is too large: answered with `status`, and the
    connection closed (what follows on it cannot be trusted to start a request)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Request:
    """One request's head, and its body read on demand (once, whole or as it arrives)."""

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        max_body: int,
    ) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.version = version
        #: Header names in lower case; a repeated header keeps its last value.
        self.headers = headers
        self._reader = reader
        self._max_body = max_body
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._remaining = 0 if self._chunked else _content_length(headers)
        if self._remaining > max_body:
            raise BadRequest(413, f"request body of {self._remaining} bytes is too large")
        self._body_done = not self._chunked and self._remaining == 0

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"

    @property
    def body_consumed(self) -> bool:
        return self._body_done

    async def body(self) -> bytes:
        """The whole body, within REQUEST_TIMEOUT_SECONDS."""
        parts: list[bytes] = []
        async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
            async for part in self.chunks():
                parts.append(part)
        return b"".join(parts)

    async def chunks(self, total_limit: bool = True) -> AsyncIterator[bytes]:
        """The body as it arrives: for a streaming client (a watch written to over time).
        Without `total_limit` only each chunk is limited: the caller limits what it buffers."""
        total = 0
        while not self._body_done:
            if self._chunked:
                part = await self._next_chunk()
            else:
                part = await self._reader.read(min(READ_SIZE, self._remaining))
                if not part:
                    raise BadRequest(400, "the body ended early")
                self._remaining -= len(part)
                self._body_done = self._remaining == 0
            total += len(part)
            if total_limit and total > self._max_body:
                raise BadRequest(413, "request body is too large")
            if part:
                yield part

    async def _next_chunk(self) -> bytes:
        line = await self._reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest(400, "malformed chunk size") from None
        if size < 0 or size > self._max_body:
            raise BadRequest(413, "request body is too large")
        if size == 0:
            while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailers: ignored
                pass
            self._body_done = True
            return b""
        data = await self._reader.readexactly(size)
        if await self._reader.readexactly(2) != b"\r\n":
            raise BadRequest(400, "malformed chunk")
        return data

    async def wait_closed(self) -> None:
        """Return when the client closes the connection (after the body: a client that went away
        from a streamed response). Anything it sends meanwhile is discarded."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while await self._reader.read(READ_SIZE):
                pass


def _content_length(headers: dict[str, str]) -> int:
    text = headers.get("content-length", "0").strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is True
        raise BadRequest(400, "malformed Content-Length")
    return int(text)


class Response:
    """How a handler answers: `send` a whole body, or `start` a chunked stream, `write` its
    chunks and `end` it."""

    def __init__(self, writer: asyncio.StreamWriter, headers: Iterable[tuple[str, str]]) -> None:
        self._writer = writer
        self._extra = list(headers)
        self.started = False
        self.close_after = False
        self._streaming = False

    def _head(self, status: int, content_type: str, framing: str) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        lines += [f"{name}: {value}" for name, value in self._extra]
        lines += [f"Content-Type: {content_type}", framing]
        if self.close_after:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, status: int, content_type: str, body: bytes) -> None:
        self.started = True
        self._writer.write(self._head(status, content_type, f"Content-Length: {len(body)}") + body)
        await self._writer.drain()

    async def start(self, status: int, content_type: str) -> None:
        self.started = self._streaming = True
        self._writer.write(self._head(status, content_type, "Transfer-Encoding: chunked"))
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        """One chunk, sent now (drained: a client that does not read slows its own stream)."""
        if data:
            self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self._writer.drain()

    async def end(self) -> None:
        if self._streaming:
            self._streaming = False
            self._writer.write(b"0\r\n\r\n")
            await self._writer.drain()


Handler = Callable[[Request, Response], Awaitable[None]]


class HttpListener:
    """Serves `handler` on `address` (its scheme is the caller's business: `ssl_context`
    decides TLS)."""

    def __init__(
        self,
        name: str,
        address: Address,
        handler: Handler,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int,
        max_body: int,
        headers: Iterable[tuple[str, str]] = (),
        reuse_port: bool = False,
        keep_alive: bool = True,
    ) -> None:
        self._name = name
        self._address = address
        self._handler = handler
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._max_body = max_body
        self._headers = list(headers)
        self._reuse_port = reuse_port
        #: False: one request per connection, closed after the response (probes that read
        #: until the connection closes, as the metrics listener always allowed).
        self._keep_alive = keep_alive
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._last_refusal = -REFUSAL_QUIET_SECONDS
        self.port = 0

    @property
    def address(self) -> Address:
        """Where it listens: the port bound once `bind` ran."""
        return self._address.with_port(self.port) if self.port else self._address

    async def start(self) -> None:
        """Bind, listen and accept (OSError, ValueError if the address cannot be served)."""
        self.bind()
        self.accept()

    def bind(self) -> None:
        """Bind and listen: from here a client's connection waits in the backlog until
        `accept` (so a listener can be opened before what it serves is ready)."""
        listener = addresses.bind(self._address, reuse_port=self._reuse_port)
        try:
            listener.listen(LISTEN_BACKLOG)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]

    def accept(self) -> None:
        assert self._listener is not None, "bind() first"
        self._acceptor = asyncio.create_task(self._accept(self._listener))

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.cancel()
            for task in self._connections:
                task.cancel()
            await asyncio.gather(self._acceptor, *self._connections, return_exceptions=True)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: let connections end first
                self._refused(f"cannot accept connections: {exc.strerror}")
                await asyncio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            if len(self._connections) >= self._max_connections:
                conn.close()
                self._refused(f"more than {self._max_connections} connections at once")
                continue
            task = asyncio.create_task(self._connection(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _refused(self, why: str) -> None:
        """One warning per flood: none again until REFUSAL_QUIET_SECONDS pass without refusals."""
        now = time.monotonic()
        if now - self._last_refusal > REFUSAL_QUIET_SECONDS:
            log.warning("%s listener: %s; closing new connections", self._name, why)
        self._last_refusal = now

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=REQUEST_TIMEOUT_SECONDS if self._ssl else None,
            )
        except (OSError, TimeoutError):  # ssl.SSLError included: a refused handshake
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            while await self._exchange(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; True if the connection may carry another."""
        async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    raise
                return False  # closed between requests
        response = Response(writer, self._headers)
        try:
            request = _parse(head, reader, self._max_body)
            response.close_after = not (self._keep_alive and request.keep_alive)
            await self._handler(request, response)
            await response.end()
            if not request.body_consumed:
                return False  # what is left of its body is not the next request
        except BadRequest as exc:
            if not response.started:
                response.close_after = True
                await response.send(exc.status, "text/plain; charset=utf-8", f"{exc}\n".encode())
                await _linger(reader, writer)
            return False
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            raise  # the connection is gone or too slow: it is closed
        except Exception:
            # A bug of a handler: logged with its trace, answered 500 if nothing was sent yet,
            # and the connection closed; the listener and every other connection go on.
            log.exception("%s listener: request failed", self._name)
            if not response.started:
                response.close_after = True
                await response.send(500, "text/plain; charset=utf-8", b"internal error\n")
            return False
        return not response.close_after


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After refusing a request whose body the client is still sending: read and drop what
    comes for a moment before closing. Closing a socket with unread data resets it, and the
    client, busy sending, would see the reset instead of the answer (nginx's lingering close)."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(READ_SIZE):
                pass


def _parse(head: bytes, reader: asyncio.StreamReader, max_body: int) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(400, "malformed header")
        headers[name.strip().lower()] = value.strip()
    return Request(parts[0], parts[1], parts[2], headers, reader, max_body)
