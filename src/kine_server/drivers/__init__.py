"""Database drivers behind one interface; `open_driver` picks one from a kine-style DSN."""

from __future__ import annotations

from kine_server.drivers.base import Driver, DriverError

DEFAULT_ENDPOINT = "sqlite://./db/state.db"


class EndpointError(ValueError):
    """The --endpoint value is not a DSN this server understands."""


def make_driver(endpoint: str) -> Driver:
    """A driver for `sqlite://PATH` or `postgres://user:pass@host:port/db?...` (not yet opened)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise EndpointError(
            f"invalid --endpoint {endpoint!r}: expected sqlite://PATH or postgres://user@host/db"
        )
    if scheme == "sqlite":
        from kine_server.drivers.sqlite import SQLiteDriver

        path = rest.split("?", 1)[0]
        if not path:
            raise EndpointError(f"invalid --endpoint {endpoint!r}: no SQLite file path")
        return SQLiteDriver(path)
    if scheme in ("postgres", "postgresql"):
        from kine_server.drivers.postgres import PostgresDriver

        if not rest.split("/", 1)[0]:
            raise EndpointError(f"invalid --endpoint {endpoint!r}: no PostgreSQL host")
        return PostgresDriver(endpoint)
    raise EndpointError(
        f"invalid --endpoint {endpoint!r}: unsupported scheme {scheme!r} (use sqlite or postgres)"
    )


__all__ = ["DEFAULT_ENDPOINT", "Driver", "DriverError", "EndpointError", "make_driver"]
