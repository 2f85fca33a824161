"""The one definition of the store's tables, indexes and schema migrations, and its DDL per dialect.

Every driver creates the same tables: columns of abstract types (dialect.ColumnType), each
dialect naming its own type; the indexes, partial ones included, with INCLUDE columns where the
database has them and a covering index of its own where it has not. `ddl(dialect)` renders the
CREATE statements, `migrations(dialect)` the steps from each older schema version; the generic
layer (transactions.create_schema) runs them, in whatever transaction and lock the driver holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from kine_server.drivers.base import SCHEMA_VERSION
from kine_server.drivers.dialect import ColumnType, Conflict, Dialect

INT64 = ColumnType.INT64
INT32 = ColumnType.INT32
NAME = ColumnType.NAME
KEY_BYTES = ColumnType.KEY_BYTES
BYTES = ColumnType.BYTES


@dataclass(frozen=True)
class Column:
    name: str
    type: ColumnType
    nullable: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    #: Empty: no primary key (SQLite then keys the table by its rowid, PostgreSQL by none).
    primary_key: tuple[str, ...] = ()


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    columns: tuple[str, ...]
    unique: bool = False
    #: Columns carried in the index's leaves, not its key (PostgreSQL's INCLUDE): a dialect
    #: without INCLUDE leaves them out and makes the index that `covers` this one instead.
    include: tuple[str, ...] = ()
    #: Only rows matching this (a partial index); a dialect without partial indexes indexes all.
    where: str = ""
    #: The name of an index whose INCLUDE columns this one stands in for: made only by a dialect
    #: without INCLUDE.
    covers: str = ""


#: The newest-row predicate of sql._visible: the partial indexes below match it word for word.
LIVE = "next_revision IS NULL AND version > 0"

TABLES = (
    Table("kine_meta", (Column("name", NAME), Column("value", INT64)), primary_key=("name",)),
    # One row per change of a key (see base.py).
    Table(
        "kine_kv",
        (
            Column("key", KEY_BYTES),
            Column("create_revision", INT64),
            Column("mod_revision", INT64),
            Column("version", INT64),
            Column("value", BYTES),
            Column("lease", INT64),
            Column("sub", INT32),
            Column("next_revision", INT64, nullable=True),
        ),
    ),
    Table(
        "kine_lease",
        (Column("id", INT64), Column("ttl", INT64), Column("expires_at", INT64)),
        primary_key=("id",),
    ),
    Table(
        "kine_alarm",
        (Column("member_id", INT64), Column("alarm", INT32)),
        primary_key=("member_id", "alarm"),
    ),
    Table(
        "kine_auth",
        (Column("kind", NAME), Column("name", KEY_BYTES), Column("value", BYTES)),
        primary_key=("kind", "name"),
    ),
)

INDEXES = (
    Index("kine_lease_expiry", "kine_lease", ("expires_at",)),
    Index("kine_kv_lease", "kine_kv", ("lease",), where=LIVE),
    # Reads at a past revision (every page of a paginated LIST after the first) test
    # next_revision and version of every row of the range: in the index, not by a lookup of
    # each row.
    Index(
        "kine_kv_key_rev_sub",
        "kine_kv",
        ("key", "mod_revision", "sub"),
        unique=True,
        include=("next_revision", "version"),
    ),
    Index(
        "kine_kv_key_state",
        "kine_kv",
        ("key", "mod_revision", "next_revision", "version"),
        covers="kine_kv_key_rev_sub",
    ),
    Index("kine_kv_rev_sub", "kine_kv", ("mod_revision", "sub"), unique=True),
    Index("kine_kv_live", "kine_kv", ("key",), where=LIVE),
    Index("kine_kv_next", "kine_kv", ("next_revision",), where="next_revision IS NOT NULL"),
)


def create_table(dialect: Dialect, table: Table) -> str:
    """The table's DDL; with its indexes where the dialect declares them there
    (Dialect.inline_indexes), the unique ones first, each kind in INDEXES' order: InnoDB
    clusters a table without a primary key by its first unique index over NOT NULL columns."""
    single = table.primary_key[0] if len(table.primary_key) == 1 else None
    lines = []
    for column in table.columns:
        line = f"{column.name} {dialect.types[column.type]}"
        if column.name == single:
            # In the column, not as a table constraint: SQLite's `id INTEGER PRIMARY KEY` is
            # then the rowid itself.
            line += " PRIMARY KEY"
        elif not column.nullable:
            line += " NOT NULL"
        lines.append(line)
    if len(table.primary_key) > 1:
        lines.append(f"PRIMARY KEY ({', '.join(table.primary_key)})")
    if dialect.inline_indexes:
        for index in sorted(INDEXES, key=lambda index: not index.unique):
            if index.table == table.name and _made(dialect, index):
                unique = "UNIQUE " if index.unique else ""
                lines.append(f"{unique}INDEX {index.name} ({', '.join(index.columns)})")
    body = ",\n    ".join(lines)
    return dialect.render(f"CREATE TABLE IF NOT EXISTS {table.name} (\n    {body}\n)")


def _made(dialect: Dialect, index: Index) -> bool:
    """Whether this dialect makes the index (see Index.covers, Dialect.skip_indexes)."""
    return not (index.covers and dialect.include_columns) and index.name not in dialect.skip_indexes


def create_index(dialect: Dialect, index: Index) -> str | None:
    """The index's DDL, or None where this dialect does not make it (see Index.covers) or
    declares it in its table's CREATE TABLE (Dialect.inline_indexes)."""
    if not _made(dialect, index) or dialect.inline_indexes:
        return None
    unique = "UNIQUE " if index.unique else ""
    text = (
        f"CREATE {unique}INDEX IF NOT EXISTS {index.name} ON {index.table} "
        f"({', '.join(index.columns)})"
    )
    if index.include and dialect.include_columns:
        text += f" INCLUDE ({', '.join(index.include)})"
    if index.where and dialect.partial_indexes:
        text += f" WHERE {index.where}"
    return dialect.render(text)


def ddl(dialect: Dialect) -> list[str]:
    """Every table and index, created where missing."""
    tables = [create_table(dialect, table) for table in TABLES]
    indexes = [create_index(dialect, index) for index in INDEXES]
    return tables + [text for text in indexes if text is not None]


def migrations(dialect: Dialect) -> dict[int, list[str]]:
    """The statements that bring a store of schema version N (the key) to N + 1, rendered."""

    def add_meta(name: str, value: int) -> str:
        insert = f"INSERT INTO kine_meta (name, value) VALUES ('{name}', {value})"
        return dialect.insert(insert, Conflict(("name",)))

    def version(n: int) -> str:
        return f"UPDATE kine_meta SET value = {n} WHERE name = 'schema_version'"

    steps = {
        # (key, mod_revision) stops being unique (see base.SCHEMA_VERSION), and a store that was
        # never compacted says so the way etcd does.
        1: [
            dialect.drop_index("kine_kv_key_rev", "kine_kv"),
            "UPDATE kine_meta SET value = -1 WHERE name = 'compact_revision' AND value = 0",
            add_meta("lease_served_until", 0),
            version(2),
        ],
        # The one NOSPACE flag becomes a row of kine_alarm. It did not say which instance raised
        # it, so it becomes member 0's (what `etcdctl alarm disarm` clears as well).
        2: [
            "INSERT INTO kine_alarm (member_id, alarm) "
            "SELECT 0, 1 FROM kine_meta WHERE name = 'alarm_nospace' AND value <> 0",
            "DELETE FROM kine_meta WHERE name = 'alarm_nospace'",
            version(3),
        ],
        # The auth store (its table is created with the others): auth off, at etcd's first auth
        # revision.
        3: [
            add_meta("auth_enabled", 0),
            add_meta("auth_revision", 1),
            add_meta("auth_generation", 0),
            version(4),
        ],
    }
    return {n: [dialect.render(text) for text in texts] for n, texts in steps.items()}


def seed_meta(cluster_id: int) -> list[tuple[str, int]]:
    """Rows a new store starts with: etcd's first revision is 1, nothing compacted."""
    return [
        ("schema_version", SCHEMA_VERSION),
        ("revision", 1),
        ("compact_revision", -1),
        ("compacted_through", 0),
        ("cluster_id", cluster_id),
        ("lease_served_until", 0),
        ("auth_enabled", 0),
        ("auth_revision", 1),
        ("auth_generation", 0),
    ]
