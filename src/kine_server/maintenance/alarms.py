"""etcd's alarms, kept as etcd keeps them: a set of raised (member id, alarm type) pairs.

Maintenance.Alarm ACTIVATE records a pair and answers it (raised now or already), DEACTIVATE
removes one and answers it if it was raised, GET lists them all (alarm NONE) or those of one
type; the member id is whatever the client names, etcd checks it against nothing. While any
NOSPACE alarm is raised, whoever raised it, writes that add data are refused; while any CORRUPT
alarm is raised, every write is (reads go on), as etcd's capped and corrupt appliers do.

The pairs are rows of kine_alarm, so every instance sharing the database sees the same ones.
Each process that writes keeps a copy for the checks on its hot path, read again after each of
its own alarm requests and every few seconds (another instance's show within that time).
"""

from __future__ import annotations

import hashlib
import logging

from kine_server import errors
from kine_server.drivers.base import Driver
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.writer import Writer
from kine_server.pb import rpc_pb2

log = logging.getLogger(__name__)

Alarm = tuple[int, int]
"""(member id, alarm type): one raised alarm."""


def member_id(cluster_id: int, name: str) -> int:
    """A stable member id: the same store served under the same name keeps its id across restarts."""
    digest = hashlib.sha256(f"{cluster_id}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF or 1


def answer(alarms: list[Alarm]) -> list[rpc_pb2.AlarmMember]:
    """Alarms as an AlarmResponse lists them (the type may be one this proto does not name)."""
    return [rpc_pb2.AlarmMember(memberID=member, alarm=kind) for member, kind in alarms]  # type: ignore[arg-type]


async def raised(driver: Driver) -> list[Alarm]:
    """The alarms raised now, read from the database: any process can list them (a `--workers`
    front-end serving Maintenance.Status too, which has no copy of its own)."""
    with errors.database_errors():
        async with driver.read() as tx:
            return sorted(await tx.alarms())


def status_error(alarm: Alarm) -> str:
    """An alarm as etcd's Maintenance.Status lists it in `errors`: the AlarmMember's String(),
    Go's compact text form, each field that is not zero as `name:value ` (etcd 3.5's
    server/etcdserver/api/v3rpc/maintenance.go Status appends one per raised alarm, as 3.4's
    does): `memberID:5 alarm:CORRUPT `, `alarm:NOSPACE ` for member 0."""
    member, kind = alarm
    text = f"memberID:{member} " if member else ""
    return text + (f"alarm:{_name(kind)} " if kind else "")


class Alarms:
    """The alarms of the store, and this process's copy of them for the write checks."""

    def __init__(self, driver: Driver, writer: Writer) -> None:
        self._driver = driver
        self._writer = writer
        #: This server's member id, whose alarm the quota raises (set by WriteSide.start).
        self.member_id = 0
        self.raised: frozenset[Alarm] = frozenset()

    @property
    def nospace(self) -> bool:
        return any(kind == rpc_pb2.NOSPACE for _, kind in self.raised)

    @property
    def corrupt(self) -> bool:
        return any(kind == rpc_pb2.CORRUPT for _, kind in self.raised)

    def check_write(self) -> None:
        """Refuse any write while a CORRUPT alarm is raised."""
        if self.corrupt:
            raise errors.Corrupt()

    async def refresh(self) -> None:
        """Read the alarms again: another instance (or process) may have changed them."""
        with errors.database_errors():
            async with self._driver.read() as tx:
                self.raised = frozenset(await tx.alarms())

    async def request(self, req: rpc_pb2.AlarmRequest) -> list[rpc_pb2.AlarmMember]:
        """Carry out an Alarm request; the alarms its answer lists."""
        pair = (req.memberID, int(req.alarm))
        if req.action == rpc_pb2.AlarmRequest.GET:
            await self.refresh()
            listed = [a for a in self.raised if req.alarm in (rpc_pb2.NONE, a[1])]
            return answer(sorted(listed))
        if req.action == rpc_pb2.AlarmRequest.ACTIVATE:
            if req.alarm == rpc_pb2.NONE:  # etcd 3.5 ignores it (3.4 crashed)
                return []
            await self.activate(*pair)
            return answer([pair])
        if req.action == rpc_pb2.AlarmRequest.DEACTIVATE:
            return answer([pair]) if await self.deactivate(*pair) else []
        return []

    async def activate(self, member: int, kind: int) -> bool:
        """Raise the alarm; False if it was raised already."""
        raised = await self._change(member, kind, True)
        if raised:
            log.warning("alarm raised: %s from member %x", _name(kind), member)
        return raised

    async def deactivate(self, member: int, kind: int) -> bool:
        """Clear the alarm; False if it was not raised."""
        cleared = await self._change(member, kind, False)
        if cleared:
            log.warning("alarm disarmed: %s from member %x", _name(kind), member)
        return cleared

    async def _change(self, member: int, kind: int, raise_it: bool) -> bool:
        async def write(applier: Applier) -> tuple[bool, list[Alarm]]:
            tx = applier.write_tx
            changed = await (tx.raise_alarm if raise_it else tx.clear_alarm)(member, kind)
            return changed, await tx.alarms()

        changed, raised = await self._writer.submit(write)
        self.raised = frozenset(raised)
        return bool(changed)


def _name(kind: int) -> str:
    return rpc_pb2.AlarmType.Name(kind) if kind in rpc_pb2.AlarmType.values() else str(kind)
