"""The write commands' table, the WriteSide methods and workers.proto agree with each other.

A command a front-end sends is found by its field's name in the writer process: a field without
an entry, an entry without a field, or a method that takes or answers another message than the
field holds would fail only when that command is first sent with `--workers`.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing

from kine_server.auth.permissions import Caller
from kine_server.pb import workers_pb2
from kine_server.store.commands import COMMAND_FIELDS, COMMANDS, RESULT_FIELDS
from kine_server.store.local import WriteSide


def oneof_fields(message: type, oneof: str) -> dict[str, type]:
    """The fields of `message`'s oneof, by name, each with its message class."""
    fields = message.DESCRIPTOR.oneofs_by_name[oneof].fields  # type: ignore[attr-defined]
    return {field.name: field.message_type._concrete_class for field in fields}


def test_every_command_field_has_an_entry_and_every_entry_a_field() -> None:
    requests = oneof_fields(workers_pb2.Command, "op")
    responses = oneof_fields(workers_pb2.Result, "outcome")
    del responses["error"]
    assert set(COMMANDS) == set(requests) == set(responses)


def test_each_method_takes_the_request_and_answers_the_response_of_its_fields() -> None:
    requests = oneof_fields(workers_pb2.Command, "op")
    responses = oneof_fields(workers_pb2.Result, "outcome")
    for name, command in COMMANDS.items():
        method = command.apply
        assert getattr(WriteSide, method.__name__) is method, name
        hints = typing.get_type_hints(method)
        request, caller = [p for p in inspect.signature(method).parameters if p != "self"]
        assert hints[request] is requests[name], name
        assert hints[caller] == Caller | None, name
        answer = hints["return"]  # an async method's response, or a method's Awaitable of it
        if typing.get_origin(answer) is collections.abc.Awaitable:
            (answer,) = typing.get_args(answer)
        assert answer is responses[name], name


def test_field_numbers_come_from_the_descriptors() -> None:
    for name in COMMANDS:
        assert COMMAND_FIELDS[name] == workers_pb2.Command.DESCRIPTOR.fields_by_name[name].number
        assert RESULT_FIELDS[name] == workers_pb2.Result.DESCRIPTOR.fields_by_name[name].number
