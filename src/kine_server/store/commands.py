"""The write commands: every request that must go through the one writer, in one table.

etcd turns each write into an InternalRaftRequest with one field per kind of request, and its
applier has one case per field; this table is that, for kine-server. Each `Command` names the
field that carries it in workers.proto's `Command` and `Result` (the request in one, the
response in the other, under the same name) and the `WriteSide` method that carries it out.
The gRPC services submit commands to their `Store`; in the writer's process the method runs
there and then, and a `--workers` front-end sends the request to the writer process, which
finds the method here by the field's name (process/channel.py, process/link.py).

Adding a write: a `WriteSide` method, an entry here, and a field of that name in both proto
messages (tests/test_commands.py checks the three agree).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message

from kine_server.auth.permissions import Caller
from kine_server.pb import workers_pb2
from kine_server.store.local import WriteSide

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True, slots=True)
class Command(Generic[Req, Resp]):
    """One kind of write: its proto field's name, and the WriteSide method that applies it."""

    name: str
    #: Carries the request out; given who made it (None: the server itself, or no check).
    apply: Callable[[WriteSide, Req, Caller | None], Awaitable[Resp]]


PUT = Command("put", WriteSide.put)
DELETE_RANGE = Command("delete_range", WriteSide.delete_range)
TXN = Command("txn", WriteSide.txn)
COMPACT = Command("compact", WriteSide.compact)
LEASE_GRANT = Command("lease_grant", WriteSide.lease_grant)
LEASE_REVOKE = Command("lease_revoke", WriteSide.lease_revoke)
LEASE_KEEP_ALIVE = Command("lease_keep_alive", WriteSide.lease_keep_alive)
ALARM = Command("alarm", WriteSide.alarm)
DEFRAGMENT = Command("defragment", WriteSide.defragment)
AUTH_CHANGE = Command("auth_change", WriteSide.auth_change)
#: Not a write, but what only the writing process knows (Maintenance.Status).
WRITE_STATUS = Command("status", WriteSide.write_status)

#: Every command by its field name.
COMMANDS: dict[str, Command[Any, Any]] = {
    command.name: command
    for command in (
        PUT,
        DELETE_RANGE,
        TXN,
        COMPACT,
        LEASE_GRANT,
        LEASE_REVOKE,
        LEASE_KEEP_ALIVE,
        ALARM,
        DEFRAGMENT,
        AUTH_CHANGE,
        WRITE_STATUS,
    )
}

#: Each command's field number in workers.Command and in workers.Result, from the generated
#: descriptors (never copied by hand).
COMMAND_FIELDS = {
    name: workers_pb2.Command.DESCRIPTOR.fields_by_name[name].number for name in COMMANDS
}
RESULT_FIELDS = {
    name: workers_pb2.Result.DESCRIPTOR.fields_by_name[name].number for name in COMMANDS
}


class Writes(Protocol):
    """Where a process's commands are carried out: its own WriteSide (one process, or the
    writer process), or the writer process over its socket (a `--workers` front-end)."""

    async def start(self) -> None: ...

    async def stop(self, timeout: float | None = None) -> None:
        """Stop; the commands still queued get `timeout` seconds (None: as long as they take)."""

    async def submit(
        self, command: Command[Req, Resp], request: Req, caller: Caller | None = None
    ) -> Resp:
        """Carry out `command` for `caller` (who made it, and the auth state generation its
        permissions were checked at; the writer checks again if that has changed); etcd's
        response, or its error raised as an EtcdError."""
        ...


class LocalWrites:
    """Commands carried out by this process's own WriteSide."""

    def __init__(self, side: WriteSide) -> None:
        self.side = side

    async def start(self) -> None:
        await self.side.start()

    async def stop(self, timeout: float | None = None) -> None:
        await self.side.stop(timeout)

    async def submit(
        self, command: Command[Req, Resp], request: Req, caller: Caller | None = None
    ) -> Resp:
        return await command.apply(self.side, request, caller)
