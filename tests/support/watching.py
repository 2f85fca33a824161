"""Driving a Watch stream from a test: send requests, read responses with a deadline."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kine_server.pb import rpc_pb2 as pb
from tests.support.client import Client, normalized


class WatchStream:
    """One bidirectional Watch call."""

    def __init__(self, client: Client) -> None:
        self.call: Any = client.watch.Watch()
        # Cancelling a pending read() would cancel the whole call, so one task reads into a queue.
        self.responses: asyncio.Queue[pb.WatchResponse | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self.responses.put_nowait(None)

    async def send(self, request: pb.WatchRequest) -> None:
        await self.call.write(request)

    async def create(self, key: bytes, end: bytes = b"", **options: object) -> None:
        create = pb.WatchCreateRequest(key=key, range_end=end, **options)  # type: ignore[arg-type]
        await self.send(pb.WatchRequest(create_request=create))

    async def cancel(self, watch_id: int) -> None:
        await self.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id)))

    async def progress(self) -> None:
        await self.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    async def read(self, timeout: float = 5.0) -> pb.WatchResponse | None:
        """The next response, or None if none comes within `timeout`."""
        try:
            return await asyncio.wait_for(self.responses.get(), timeout)
        except TimeoutError:
            return None

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class WatchRecorder:
    """Records a watch conversation as text lines, for comparing two servers."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.stream = WatchStream(client)
        self.transcript: list[str] = []

    async def expect(self, count: int, timeout: float = 5.0) -> list[pb.WatchResponse]:
        """Read `count` responses. Their order is kept per watch id, but responses of different
        watches are sorted by id: etcd itself sends those in no fixed order."""
        responses = []
        for _ in range(count):
            response = await self.stream.read(timeout)
            if response is None:
                break
            responses.append(response)
        ordered = sorted(responses, key=lambda r: r.watch_id)
        self.transcript += [f"watch <- {normalized(r)}" for r in ordered]
        if len(responses) < count:
            self.transcript.append("watch <- (nothing)")
        return responses

    async def expect_silence(self) -> None:
        """Nothing is due: the answer to a progress request is the next response. etcd sends it
        after every event already due on the stream, and kine-server's progress never gets ahead
        of its events, so an event that should not be there shows up before it, however late
        (a fixed wait for "nothing" missed any event slower than the wait)."""
        await self.stream.progress()
        response = await self.stream.read()
        self.transcript.append(
            "watch <- (nothing)" if response is None else f"watch <- {normalized(response)}"
        )

    async def kv(self, method: str, request: Any) -> Any:
        response = await getattr(self.client.kv, method)(request)
        self.transcript.append(f"kv.{method} -> revision {response.header.revision}")
        return response
