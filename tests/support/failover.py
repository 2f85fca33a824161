"""PostgreSQL failover under load: a primary with a streaming standby, and the clients' view of it.

`ReplicatedPostgres` starts a primary and a standby cloned from it with `pg_basebackup -R`, the
standby synchronous (`synchronous_standby_names = '*'`: a commit is acknowledged once the standby
has flushed it) or asynchronous. `Workload` drives a kine-server the way kube-apiserver would
while the primary is lost: writers putting unique keys, recording each acknowledged revision and
when every request was sent and answered; one watch on their prefix for the whole run; a lease
kept alive with a key attached. `Workload.verdict()` then checks what must hold after the
failover and returns the figures a report quotes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import asyncpg
import grpc

from kine_server.pb import rpc_pb2 as pb
from tests.support.client import Client
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.postgres import DB_USER, ThrowawayPostgres
from tests.support.watching import WatchStream
from tests.test_pg_faults import eventually

#: Far longer than any request should take: a failure with DEADLINE_EXCEEDED is a hang.
DEADLINE = 30.0


class ReplicatedPostgres:
    """A primary and a standby streaming from it, each a ThrowawayPostgres on its own port.

    Failover after failover, as an HA manager (Patroni, say) runs them: `kill_primary`, then
    `promote_standby`; `rebuild_standby` clones a new standby from the new
    primary onto the lost one's port (so a DSN naming both ports stays right); `settle` waits
    until it streams and, for a synchronous pair, then makes the primary wait for it at every
    commit (`synchronous_standby_names`, set on the primary only once its standby streams: a
    promoted standby must not wait for a standby it does not have yet).
    """

    def __init__(self, synchronous: bool = True, replication_latency: float = 0.0) -> None:
        self.synchronous = synchronous
        self.servers = [ThrowawayPostgres(), ThrowawayPostgres()]
        self.primary_slot = 0
        #: The first standby streams through a proxy that delays every chunk by this much each
        #: way (a standby a network away, not on loopback; bandwidth to spare); 0: straight.
        self.replication_latency = replication_latency
        self._replication: FaultProxy | None = None

    @property
    def primary(self) -> ThrowawayPostgres:
        return self.servers[self.primary_slot]

    @property
    def standby(self) -> ThrowawayPostgres:
        return self.servers[1 - self.primary_slot]

    def start(self) -> None:
        if self.primary.external:
            raise RuntimeError("needs throwaway servers: unset KINE_TEST_PG_DSN")
        self.primary.start()
        try:
            via = 0
            if self.replication_latency:
                self._replication = FaultProxy(self.primary.port)
                self._replication.start()
                via = self._replication.port
            self.servers[1] = ThrowawayPostgres(clone_of=self.primary, clone_via=via)
            self.standby.start()
            if self._replication is not None:
                self._replication.set_mode(Mode.DELAY, self.replication_latency)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            self.standby.stop()
        finally:
            self.primary.stop()
            if self._replication is not None:
                self._replication.stop()

    @property
    def ports(self) -> list[int]:
        """Each slot's port, the first server's first; they never change."""
        return [server.port for server in self.servers]

    def dsn(self, database: str, ports: list[int] | None = None, attrs: str = "") -> str:
        """A DSN naming both servers (through `ports` in their place: proxies)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports or self.ports)
        query = f"?target_session_attrs={attrs}" if attrs else ""
        return f"postgres://{DB_USER}@{hosts}/{database}{query}"

    def kill_primary(self) -> None:
        """Kill the primary (-9), as its machine's end would: a standby streaming through a
        delaying proxy loses what the proxy still held (the network dropped it), as it would
        lose what was on the wire (blocking: run it in a thread)."""
        if self._replication is not None:
            self._replication.set_mode(Mode.RESET)
        self.primary.kill()

    def promote_standby(self) -> None:
        """The standby becomes the primary (blocking: run it in a thread)."""
        self.standby.promote()
        self.primary_slot = 1 - self.primary_slot

    def rebuild_standby(self) -> None:
        """A new standby of the primary, on the port of the server lost at the last failover."""
        lost = self.standby
        port = lost.port
        lost.stop()
        self.servers[1 - self.primary_slot] = ThrowawayPostgres(port=port, clone_of=self.primary)
        self.standby.start()

    async def settle(self, timeout: float = 60.0) -> None:
        """Until the standby streams; a synchronous pair's primary then waits for it."""
        conn = await asyncpg.connect(self.primary.dsn, timeout=10)
        try:
            await self._until(conn, "async", timeout)
            if self.synchronous:
                await conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                await conn.execute("SELECT pg_reload_conf()")
                await self._until(conn, "sync", timeout)
        finally:
            await conn.close()

    @staticmethod
    async def _until(conn: asyncpg.Connection, wanted: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = await conn.fetch("SELECT state, sync_state FROM pg_stat_replication")
            if any(s["state"] == "streaming" and s["sync_state"] == wanted for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"standby not streaming ({wanted}) in time: {states}")
            await asyncio.sleep(0.1)

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


@dataclass
class Verdict:
    """What a run of failovers showed (`Workload.verdict`); the caller asserts on it."""

    acknowledged: int
    #: Acknowledged writes not stored at their acknowledged revision; and the lowest of their
    #: revisions (0: none lost).
    lost: int
    lowest_lost: int
    #: The highest revision acknowledged before the last fault that survived.
    highest_kept: int
    #: Per failover: seconds from the fault, and from the promotion, to the first write
    #: acknowledged among those sent after the fault.
    resumed: list[tuple[float, float]]
    watch_events: int
    watch_missing: int
    watch_repeated: int
    watch_out_of_order: int
    lease_kept: bool
    failures: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        back = ", ".join(f"{fault:.1f}s/{promoted:.1f}s" for fault, promoted in self.resumed)
        return (
            f"{self.acknowledged} writes acknowledged, {self.lost} lost; writes back after the "
            f"fault/the promotion: {back}; watch: {self.watch_events} events, "
            f"{self.watch_missing} missing, {self.watch_repeated} repeated, "
            f"{self.watch_out_of_order} out of order; lease kept: {self.lease_kept}; "
            f"failures: {self.failures}"
        )


def end_of(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Workload:
    """Writers, a watch and a kept-alive lease on one kine-server, for the length of a failover."""

    def __init__(self, client: Client, prefix: bytes, writers: int = 8, lease_ttl: int = 20):
        self.client = client
        self.prefix = prefix
        self.writers = writers
        self.lease_ttl = lease_ttl
        self.acked: dict[bytes, int] = {}
        #: (sent, answered, revision) of every acknowledged Put, by time.monotonic().
        self.answered: list[tuple[float, float, int]] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.lease_id = 0
        #: TTLs the keep-alives answered; 0 would mean the lease expired.
        self.keepalive_ttls: list[int] = []
        self.watch_events: list[tuple[int, bytes]] = []
        self._watch: WatchStream | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        grant = await self.client.lease.LeaseGrant(
            pb.LeaseGrantRequest(TTL=self.lease_ttl), timeout=DEADLINE
        )
        self.lease_id = grant.ID
        await self.client.kv.Put(
            pb.PutRequest(key=b"/lease-holder", value=b"x", lease=self.lease_id), timeout=DEADLINE
        )
        self._watch = WatchStream(self.client)
        await self._watch.create(self.prefix, end_of(self.prefix))
        created = await self._watch.read(DEADLINE)
        assert created is not None and created.created
        self._tasks = [asyncio.create_task(self._write(n)) for n in range(self.writers)]
        self._tasks.append(asyncio.create_task(self._keep_alive()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watch is not None:
            await self._watch.close()

    async def _write(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            key = self.prefix + b"%02d/%06d" % (n, i)
            i += 1
            sent = time.monotonic()
            try:
                response = await self.client.kv.Put(
                    pb.PutRequest(key=key, value=b"v"), timeout=DEADLINE
                )
            except grpc.aio.AioRpcError as exc:
                self.failures[exc.code().name] += 1
                await asyncio.sleep(0.05)
                continue
            self.acked[key] = response.header.revision
            self.answered.append((sent, time.monotonic(), response.header.revision))

    async def _keep_alive(self) -> None:
        """One keep-alive a second, on a stream opened again whenever it breaks."""
        while not self._stop.is_set():
            call = self.client.lease.LeaseKeepAlive()
            try:
                while not self._stop.is_set():
                    await call.write(pb.LeaseKeepAliveRequest(ID=self.lease_id))
                    response = await asyncio.wait_for(call.read(), DEADLINE)
                    self.keepalive_ttls.append(response.TTL)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 1.0)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                name = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "TIMEOUT"
                self.failures[f"keepalive {name}"] += 1
                await asyncio.sleep(0.2)
            finally:
                call.cancel()

    def resumed(self, fault: float) -> float:
        """When the first Put sent after `fault` was acknowledged."""
        after = [answered for sent, answered, _ in self.answered if sent >= fault]
        assert after, "no write was acknowledged after the fault"
        return min(after)

    async def verdict(self, failovers: list[tuple[float, float]]) -> Verdict:
        """What the run showed, given each failover's (fault, promotion) times: acknowledged
        writes not stored at their revision, the watch's events against the stored writes
        (each exactly once, in revision order), the lease, and how soon writes came back."""
        listing = await eventually(
            lambda: self.client.kv.Range(
                pb.RangeRequest(key=self.prefix, range_end=end_of(self.prefix), keys_only=True),
                timeout=DEADLINE,
            )
        )
        stored = {kv.key: kv.mod_revision for kv in listing.kvs}
        lost = {k: r for k, r in self.acked.items() if stored.get(k) != r}
        last_fault = failovers[-1][0]
        lost_revisions = set(lost.values())
        kept = [r for sent, _, r in self.answered if sent < last_fault and r not in lost_revisions]
        await self._drain_watch(listing.header.revision)
        seen = collections.Counter(self.watch_events)
        revisions = [r for r, _ in self.watch_events]
        alive = await eventually(
            lambda: self.client.lease.LeaseTimeToLive(
                pb.LeaseTimeToLiveRequest(ID=self.lease_id, keys=True), timeout=DEADLINE
            )
        )
        lease_kept = (
            alive.TTL > 0 and b"/lease-holder" in alive.keys and 0 not in self.keepalive_ttls
        )
        return Verdict(
            acknowledged=len(self.acked),
            lost=len(lost),
            lowest_lost=min(lost.values(), default=0),
            highest_kept=max(kept, default=0),
            resumed=[
                (self.resumed(fault) - fault, self.resumed(fault) - promoted)
                for fault, promoted in failovers
            ],
            watch_events=len(self.watch_events),
            watch_missing=len({(r, k) for k, r in stored.items()} - set(seen)),
            watch_repeated=sum(count - 1 for count in seen.values()),
            watch_out_of_order=sum(1 for a, b in itertools.pairwise(revisions) if b < a),
            lease_kept=lease_kept,
            failures=dict(self.failures),
        )

    async def _drain_watch(self, until: int) -> None:
        """Read the watch up to a progress response at `until` or later (etcd's end marker:
        it comes once everything up to its revision has been sent)."""
        assert self._watch is not None
        await self._watch.progress()
        while True:
            response = await self._watch.read(timeout=DEADLINE)
            assert response is not None, "the watch ended or went quiet"
            assert not response.canceled, f"the watch was cancelled: {response}"
            if response.watch_id == -1:
                if response.header.revision >= until:
                    return
                await asyncio.sleep(0.2)
                await self._watch.progress()
                continue
            self.watch_events += [(e.kv.mod_revision, e.kv.key) for e in response.events]
