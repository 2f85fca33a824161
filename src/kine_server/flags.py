"""kine's flag names (and etcd's where etcd users expect them), each also read from
KINE_<FLAG> in the environment: the table, its syntax checks, and the Config it fills.

Every value is checked as it is read, so a bad one ends the process at once with one line that
names the flag or the variable; durations are Go's syntax, as kine's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kine_server import __version__, addresses
from kine_server.auth.tokens import make_tokens
from kine_server.config import Config, parse_urls
from kine_server.durations import format_duration, parse_duration


@dataclass(frozen=True)
class Flag:
    name: str
    field: str
    help: str
    parse: Callable[[str], Any] = str
    show: Callable[[Any], str] = str

    @property
    def env(self) -> str:
        return "KINE_" + self.name.upper().replace("-", "_")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def _percent(text: str) -> int:
    value = _non_negative_int(text)
    if value > 100:
        raise ValueError(f"must be a percentage from 0 to 100, got {value}")
    return value


def _url_list(text: str) -> str:
    parse_urls(text)
    return text


def _metrics_address(text: str) -> str:
    if text.strip() not in ("", "0"):
        addresses.parse(text)
    return text


def _one_metrics_url(text: str) -> str:
    if "," in text:
        raise ValueError("one URL only (kine-server serves metrics on one listener)")
    return _metrics_address(text)


def _log_format(text: str) -> str:
    if text not in ("plain", "json"):
        raise ValueError("must be plain or json")
    return text


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _auth_token(text: str) -> str:
    make_tokens(text)  # refused here, in one line, if etcd would refuse it
    return text


def _seconds_or_duration(text: str) -> float:
    """etcd's --auth-token-ttl is a number of seconds; kine's habit is a Go duration."""
    value = float(text) if text.strip().isdigit() else parse_duration(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _bcrypt_cost(text: str) -> int:
    value = int(text)
    if not 4 <= value <= 31:
        raise ValueError(f"must be from 4 to 31, got {value}")
    return value


FLAGS = [
    Flag(
        "endpoint",
        "endpoint",
        "Storage DSN: sqlite://PATH, postgres://user:pass@host:port/db?sslmode=... or "
        "mysql://user:pass@host:port/db (kine's mysql://user:pass@tcp(host:port)/db too; "
        "the database is created if missing)",
    ),
    Flag(
        "listen-address",
        "listen_address",
        "Address to serve etcd's gRPC API on: HOST:PORT, :PORT (every interface), [IPv6]:PORT, "
        "http(s)://HOST:PORT or unix://PATH; several, comma-separated, as --listen-client-urls",
        _url_list,
    ),
    Flag(
        "listen-client-urls",
        "listen_address",
        "etcd's name for --listen-address, with several comma-separated URLs, each its own "
        "port of the same server (http:// plaintext, https:// TLS)",
        _url_list,
    ),
    Flag(
        "advertise-client-urls",
        "advertise_client_urls",
        "Comma-separated URLs MemberList reports to clients (default: the listen URLs, an "
        "every-interface host replaced by this host's address on its default route)",
        _url_list,
    ),
    Flag("name", "name", "Member name reported by MemberList (default: the host name)"),
    Flag("server-cert-file", "server_cert_file", "Serve TLS with this certificate (PEM)"),
    Flag("server-key-file", "server_key_file", "Private key of --server-cert-file (PEM)"),
    Flag(
        "trusted-ca-file",
        "trusted_ca_file",
        "Require client certificates signed by this CA (mutual TLS; needs --server-cert-file)",
    ),
    Flag(
        "auth-token",
        "auth_token",
        "Tokens Authenticate issues, as etcd: simple, or "
        "jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256|ES256|...[,ttl=DURATION]",
        _auth_token,
    ),
    Flag(
        "auth-token-ttl",
        "auth_token_ttl",
        "How long a simple token stays valid after its last use (seconds, as etcd, or a Go "
        "duration)",
        _seconds_or_duration,
        format_duration,
    ),
    Flag(
        "bcrypt-cost",
        "bcrypt_cost",
        "Cost of the bcrypt hashes of users' passwords (4 to 31, as etcd)",
        _bcrypt_cost,
    ),
    Flag("ca-file", "ca_file", "PostgreSQL/MySQL: verify the server's certificate against this CA"),
    Flag("cert-file", "cert_file", "PostgreSQL/MySQL: client certificate (PEM)"),
    Flag("key-file", "key_file", "PostgreSQL/MySQL: private key of --cert-file (PEM)"),
    Flag("skip-verify", "skip_verify", "PostgreSQL/MySQL: use TLS without verifying the server", _bool),
    Flag(
        "max-request-bytes",
        "max_request_bytes",
        "Largest write request accepted, in bytes (as etcd)",
        _positive_int,
    ),
    Flag(
        "max-txn-ops",
        "max_txn_ops",
        "Most operations allowed in one Txn branch (as etcd)",
        _positive_int,
    ),
    Flag(
        "quota-backend-bytes",
        "quota_backend_bytes",
        "Refuse writes (NOSPACE alarm) once the database would grow past this size (0: no quota)",
        _non_negative_int,
    ),
    Flag(
        "emulated-etcd-version",
        "emulated_etcd_version",
        "etcd version reported by Maintenance.Status",
    ),
    Flag(
        "watch-progress-notify-interval",
        "watch_progress_notify_interval",
        "Interval of progress notifications to idle watches that asked for them (Go duration)",
        parse_duration,
        format_duration,
    ),
    Flag(
        "metrics-bind-address",
        "metrics_bind_address",
        "Serve Prometheus /metrics, /health and /readyz on HOST:PORT or :PORT (0 disables; TLS "
        "as the gRPC listener unless an http:// or https:// URL says otherwise)",
        _metrics_address,
    ),
    Flag(
        "listen-metrics-urls",
        "metrics_bind_address",
        "etcd's name for --metrics-bind-address (one URL)",
        _one_metrics_url,
    ),
    Flag(
        "listen-gateway-urls",
        "listen_gateway_urls",
        "Serve etcd's HTTP/JSON gateway (POST /v3/kv/range, ...) on this URL: http://HOST:PORT, "
        "or https://HOST:PORT with the gRPC listener's TLS and client certificates "
        "(empty: not served)",
    ),
    Flag(
        "poll-interval",
        "poll_interval",
        "How often to look for other instances' writes when no notification came (Go duration)",
        parse_duration,
        format_duration,
    ),
    Flag(
        "poll-batch-size",
        "poll_batch_size",
        "Most rows read per poll of other instances' writes",
        _positive_int,
    ),
    Flag(
        "compact-interval",
        "compact_interval",
        "Time between compactions of old history (Go duration; 0 disables; the Compact RPC "
        "works either way)",
        parse_duration,
        format_duration,
    ),
    Flag(
        "compact-interval-jitter",
        "compact_interval_jitter",
        "Randomise each compaction interval by up to this many percent either way",
        _percent,
    ),
    Flag(
        "compact-min-retain",
        "compact_min_retain",
        "Newest revisions periodic compaction never removes",
        _non_negative_int,
    ),
    Flag(
        "compact-batch-size",
        "compact_batch_size",
        "Revisions removed per compaction transaction",
        _positive_int,
    ),
    Flag(
        "compact-timeout",
        "compact_timeout",
        "Time limit of one compaction batch (Go duration)",
        parse_duration,
        format_duration,
    ),
    Flag(
        "datastore-timeout",
        "datastore_timeout",
        "PostgreSQL/MySQL: time limit of connecting, of waiting for a pooled connection and of "
        "each "
        "statement; a request to a database that stops answering fails with UNAVAILABLE after "
        "about this long (Go duration)",
        _positive_duration,
        format_duration,
    ),
    Flag(
        "datastore-connect-timeout",
        "datastore_connect_timeout",
        "PostgreSQL/MySQL: how long start-up keeps retrying a database it cannot reach, with "
        "backoff, "
        "before giving up (Go duration)",
        _positive_duration,
        format_duration,
    ),
    Flag(
        "shutdown-grace",
        "shutdown_grace",
        "On SIGTERM, how long in-flight requests and queued writes get to finish before they are "
        "cut off (Go duration; keep it below the container runtime's stop timeout)",
        _positive_duration,
        format_duration,
    ),
    Flag(
        "workers",
        "workers",
        "Processes serving clients, all sharing the port; writes go to one writer process "
        "(0: one per available core; 1: everything in one process)",
        _non_negative_int,
    ),
    Flag("debug", "debug", "Log at debug level", _bool),
    Flag("log-format", "log_format", "Log line format: plain or json", _log_format),
    Flag(
        "slow-sql-threshold",
        "slow_sql_threshold",
        "Log database transactions slower than this (Go duration; 0 disables)",
        parse_duration,
        format_duration,
    ),
]


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kine-server",
        description="An etcd v3 API server that keeps its data in SQLite, PostgreSQL or MySQL/MariaDB.",
        epilog="Every flag can also be set as KINE_<FLAG>, e.g. KINE_ENDPOINT or KINE_LISTEN_ADDRESS; "
        "a flag on the command line wins over the environment.",
    )
    for flag in FLAGS:
        default = getattr(defaults, flag.field)
        shown = flag.show(default)
        if flag.name in ("debug", "skip-verify"):
            parser.add_argument(
                f"--{flag.name}",
                action="store_const",
                const="true",
                default=None,
                help=f"{flag.help} [env {flag.env}]",
            )
            continue
        if flag.field != flag.name.replace("-", "_") or not shown or "(default" in flag.help:
            shown = ""  # an alias (its flag shows the default), or nothing to show
        parser.add_argument(
            f"--{flag.name}",
            metavar="VALUE",
            default=None,
            help=f"{flag.help}{f' (default {shown})' if shown else ''} [env {flag.env}]",
        )
    parser.add_argument("--version", action="version", version=f"kine-server {__version__}")
    return parser


def load_config(argv: Sequence[str], environ: dict[str, str]) -> Config:
    """Flags over environment over defaults; a bad value raises ValueError naming the flag."""
    config = Config()
    args = vars(build_parser(config).parse_args(argv))
    given: dict[str, tuple[bool, str, str]] = {}  # field: (from argv, source, raw text)
    for flag in FLAGS:
        raw = args[flag.name.replace("-", "_")]
        source, on_command_line = f"--{flag.name}", raw is not None
        if raw is None:
            raw, source = environ.get(flag.env), flag.env
        if raw is None:
            continue
        try:
            value = flag.parse(raw)
        except ValueError as exc:
            raise ValueError(f"invalid {source} {raw!r}: {exc}") from None
        earlier = given.get(flag.field)
        if earlier is not None and earlier[0] == on_command_line and earlier[2] != raw:
            raise ValueError(f"{earlier[1]} and {source} are the same setting: give one")
        if earlier is not None and earlier[0] and not on_command_line:
            continue  # an alias on the command line wins over this one's environment variable
        given[flag.field] = (on_command_line, source, raw)
        setattr(config, flag.field, value)
    return config


def aliases(field: str, value: str) -> list[str]:
    """Command-line arguments that set `field` to `value` whichever of its flags (kine's or
    etcd's name) the rest of a command line uses: for the --workers front-ends' commands."""
    return [arg for flag in FLAGS if flag.field == field for arg in (f"--{flag.name}", value)]
