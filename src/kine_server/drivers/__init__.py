"""Database drivers behind one interface; `open_driver` picks one from a kine-style DSN."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from kine_server.drivers.base import Driver, DriverError

DEFAULT_ENDPOINT = "sqlite://./db/state.db"


class EndpointError(ValueError):
    """The --endpoint value is not a DSN this server understands."""


@dataclass(frozen=True)
class DatabaseTLS:
    """TLS to PostgreSQL or MySQL from --ca-file/--cert-file/--key-file/--skip-verify (kine's flags)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    skip_verify: bool = False

    def context(self) -> ssl.SSLContext | None:
        """None when no flag is set: then the DSN's sslmode decides, as libpq would."""
        if not (self.ca_file or self.cert_file or self.key_file or self.skip_verify):
            return None
        try:
            context = ssl.create_default_context(cafile=self.ca_file or None)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise EndpointError(f"cannot use the database TLS files: {exc}") from exc
        if self.skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def make_driver(
    endpoint: str,
    tls: DatabaseTLS | None = None,
    timeout: float | None = None,
    read_only: bool = False,
    readers: int | None = None,
) -> Driver:
    """A driver for `sqlite://PATH`, `postgres://user:pass@host:port/db?...` or
    `mysql://user:pass@host:port/db` (kine's `mysql://user:pass@tcp(host:port)/db` too), not
    yet opened; `timeout` bounds every PostgreSQL and MySQL wait (--datastore-timeout; None:
    the driver's default);
    `read_only` is a `--workers` front-end's: reads only, beside the writer process; `readers`
    the most reader connections (None: the driver's default)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise EndpointError(
            f"invalid --endpoint {endpoint!r}: expected sqlite://PATH, postgres://user@host/db "
            "or mysql://user@host/db"
        )
    if scheme == "sqlite":
        from kine_server.drivers.sqlite import SQLiteDriver

        path = rest.split("?", 1)[0]
        if not path:
            raise EndpointError(f"invalid --endpoint {endpoint!r}: no SQLite file path")
        return SQLiteDriver(path, readers=readers, read_only=read_only)
    if scheme in ("postgres", "postgresql"):
        from kine_server.drivers.postgres import DEFAULT_TIMEOUT, PostgresDriver

        if not rest.split("/", 1)[0]:
            raise EndpointError(f"invalid --endpoint {endpoint!r}: no PostgreSQL host")
        try:
            return PostgresDriver(
                endpoint,
                timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
                ssl=tls.context() if tls else None,
                read_only=read_only,
                pool_size=readers,
            )
        except ValueError as exc:  # the servers it names, target_session_attrs, connect_timeout
            raise EndpointError(str(exc)) from exc
    if scheme == "mysql":
        from kine_server.drivers.mysql import DEFAULT_TIMEOUT as MYSQL_TIMEOUT
        from kine_server.drivers.mysql import MySQLDriver
        from kine_server.drivers.mysql_dsn import DSNError

        try:
            return MySQLDriver(
                endpoint,
                timeout=MYSQL_TIMEOUT if timeout is None else timeout,
                ssl=tls.context() if tls else None,
                read_only=read_only,
                pool_size=readers,
            )
        except DSNError as exc:
            raise EndpointError(f"invalid --endpoint {endpoint!r}: {exc}") from exc
    raise EndpointError(
        f"invalid --endpoint {endpoint!r}: unsupported scheme {scheme!r} "
        "(use sqlite, postgres or mysql)"
    )


__all__ = [
    "DEFAULT_ENDPOINT",
    "DatabaseTLS",
    "Driver",
    "DriverError",
    "EndpointError",
    "make_driver",
]
