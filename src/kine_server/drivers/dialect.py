"""What one SQL database spells its own way, and how a statement written once becomes its text.

The statements (sql.py) and the table definition (schema.py) are written once, in the SQL that
SQLite, PostgreSQL and MySQL/MariaDB share, with `?` placeholders and a few `{words}` where the
databases disagree. A `Dialect` is the whole of what differs between them as far as statement
text goes: the placeholder, those words (an index hint among them), the conflict clauses of
INSERT, the type names, which index features exist, which optional statements (UPDATE ...
RETURNING) work, and any statement it must spell entirely its own way (`overrides`). Nothing
here runs a statement; a dialect module (sqlite.py, postgres.py, mysql.py) builds one `Dialect`
and `sql.Statements` renders every statement with it once, when the driver is made.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any


class ColumnType(enum.Enum):
    """The abstract column types of schema.py; each dialect names its own type for each."""

    #: A 64-bit signed integer (revisions, lease ids, deadlines in milliseconds).
    INT64 = "int64"
    #: A 32-bit signed integer is enough (sub, alarm type).
    INT32 = "int32"
    #: A short name that is part of a key (meta names, auth record kinds).
    NAME = "name"
    #: A byte string that is indexed and ordered byte by byte (etcd keys, auth names).
    KEY_BYTES = "key_bytes"
    #: A byte string that is only stored (values): may be large, never indexed.
    BYTES = "bytes"


@dataclass(frozen=True)
class Conflict:
    """An INSERT's answer to a row whose unique `columns` exist already: do nothing
    (`update` empty), or set the `update` columns to the values the INSERT brought."""

    columns: tuple[str, ...]
    update: tuple[str, ...] = ()


def on_conflict(insert: str, conflict: Conflict) -> str:
    """SQLite's and PostgreSQL's spelling (SQL:2003 has MERGE; neither needs it here)."""
    target = f" ({', '.join(conflict.columns)})" if conflict.columns else ""
    if not conflict.update:
        return f"{insert} ON CONFLICT{target} DO NOTHING"
    sets = ", ".join(f"{column} = excluded.{column}" for column in conflict.update)
    return f"{insert} ON CONFLICT{target} DO UPDATE SET {sets}"


def drop_index_if_exists(index: str, table: str) -> str:
    """SQLite's and PostgreSQL's spelling: an index name is unique in the schema. (MySQL names
    the table, `DROP INDEX name ON table`, and only MariaDB has IF EXISTS there.)"""
    return f"DROP INDEX IF EXISTS {index}"


def question_mark(_: int) -> str:
    """SQLite's (and the DB-API qmark style's) placeholder."""
    return "?"


def dollar(n: int) -> str:
    """PostgreSQL's numbered placeholder."""
    return f"${n}"


_PLACEHOLDER = re.compile(r"\?")


def column_types(
    int64: str = "BIGINT",
    int32: str = "INTEGER",
    name: str = "TEXT",
    key_bytes: str = "BLOB",
    value_bytes: str = "BLOB",
) -> dict[ColumnType, str]:
    """A name for each ColumnType: the common ones unless the database spells a type its own way
    (MySQL: VARCHAR(n) names, VARBINARY(n) keys, LONGBLOB values)."""
    return {
        ColumnType.INT64: int64,
        ColumnType.INT32: int32,
        ColumnType.NAME: name,
        ColumnType.KEY_BYTES: key_bytes,
        ColumnType.BYTES: value_bytes,
    }


@dataclass(frozen=True, eq=False)
class Dialect:
    """The spellings of one database, used by the generic layer only (a database's own
    connection code never looks at them). The defaults are the SQL most databases share; the
    optional features (INCLUDE, partial indexes, UPDATE ... RETURNING) default to absent, so a
    new dialect takes the fallback paths until it says it has them."""

    #: "sqlite", "postgres": for messages.
    name: str
    #: The database's clock in milliseconds since the epoch, as a BIGINT: lease deadlines are
    #: the database's, so every instance on one database agrees on them whatever its own clock.
    now_ms: str
    #: A subquery of the ids passed as one parameter (any number of them in one statement, so
    #: the statement is prepared once), and how that parameter is made from the ids.
    id_list: str
    encode_ids: Callable[[list[int]], Any]
    #: The name of each ColumnType (see column_types).
    types: Mapping[ColumnType, str]
    #: A subquery of the keys passed as one parameter, as `id_list` is of ids, and how that
    #: parameter is made; None: a batch's newest rows are read a statement per key (where a
    #: statement costs no round trip, as on SQLite, that is as quick).
    key_list: str | None = None
    encode_keys: Callable[[list[bytes]], Any] = list
    #: The n-th (from 1) placeholder: "?", "$n", "%s".
    placeholder: Callable[[int], str] = question_mark
    #: A two-argument maximum (SQLite says max).
    greatest: str = "GREATEST"
    #: The type name of CAST(? AS ...) to a 64-bit integer (MySQL says SIGNED).
    int64_cast: str = "BIGINT"
    #: Written after `kine_kv` in the statements that read rows by key (a range, a count, the
    #: rows a DeleteRange deletes): "" where the planner can be trusted to walk the key index.
    #: InnoDB's statistics lag a growing table by up to 10% of its rows (and ten seconds), and
    #: with them MariaDB read a LIST's range through the next_revision index (its `IS NULL`
    #: looked selective) and a lookup per row: twice the CPU per LIST.
    by_key: str = ""
    #: The suffix of a SELECT that locks the rows it reads until commit; "" where the writer's
    #: BEGIN already holds a lock over the whole database (SQLite's BEGIN IMMEDIATE).
    for_update: str = " FOR UPDATE"
    #: CREATE INDEX ... INCLUDE (...) exists (PostgreSQL 11+): a covering index without the
    #: columns in its key. Without it, schema.py's `covers` indexes are made instead.
    include_columns: bool = False
    #: CREATE INDEX ... WHERE exists (SQLite, PostgreSQL; not MySQL/MariaDB). Without it a
    #: partial index is made over every row: larger, still correct.
    partial_indexes: bool = False
    #: UPDATE ... RETURNING exists (SQLite 3.35+, PostgreSQL; not MySQL, nor MariaDB 10.x).
    #: Without it a renewal reads the renewable leases FOR UPDATE first, then updates them.
    update_returning: bool = False
    #: Indexes are declared in CREATE TABLE, not by CREATE INDEX IF NOT EXISTS (which MySQL 8
    #: lacks). Also where the database clusters a table without a primary key by its first
    #: unique index (InnoDB): then it exists before the first row, instead of a hidden row id.
    inline_indexes: bool = False
    #: Indexes of schema.INDEXES this database is better without (MySQL: those its clustered
    #: index already serves; each index costs every write and every plan).
    skip_indexes: Collection[str] = ()
    #: What a literal `%` becomes: "%%" where the driver formats parameters into the text
    #: (pyformat: MySQL's drivers), so that a `%` of the SQL itself is not read as one.
    percent: str = "%"
    #: The longest key the database can index, if it has a limit (see base.ReadTx).
    max_key_bytes: int | None = None
    #: A statement run with the new revision (as text) after each commit's revision is set,
    #: that wakes other instances' pollers (PostgreSQL's pg_notify); None if there is none.
    notify_commit: str | None = None
    #: An INSERT (`INSERT INTO t (cols) VALUES ...` or `... SELECT ...`) with its conflict clause.
    insert_on_conflict: Callable[[str, Conflict], str] = on_conflict
    #: DROP INDEX of a migration step, given the index and its table.
    drop_index: Callable[[str, str], str] = drop_index_if_exists
    #: Statements of sql.Statements (by attribute name) this database must spell its own way,
    #: given as templates like the shared ones (placeholders and words are rendered the same).
    overrides: Mapping[str, str] = field(default_factory=dict)
    #: Identifiers the database reserves (MySQL: `key`), quoted with `quote` wherever the shared
    #: text names them: the shared text writes identifiers in lower case and keywords in upper
    #: case, so only whole lower-case words are quoted.
    reserved: Collection[str] = ()
    quote: str = '"'

    def render(self, template: str) -> str:
        """`template` in this dialect: its words filled in, identifiers quoted, placeholders
        numbered. Done once per statement shape (sql.Statements caches the text)."""
        text = template.format(
            greatest=self.greatest,
            now_ms=self.now_ms,
            id_list=self.id_list,
            key_list=self.key_list or "",
            int64_cast=self.int64_cast,
            for_update=self.for_update,
            by_key=self.by_key,
        )
        if self.percent != "%":
            text = text.replace("%", self.percent)
        for word in self.reserved:
            text = re.sub(rf"\b{re.escape(word)}\b", f"{self.quote}{word}{self.quote}", text)
        if self.placeholder is question_mark:
            return text
        counter = iter(range(1, text.count("?") + 1))
        return _PLACEHOLDER.sub(lambda _: self.placeholder(next(counter)), text)

    def insert(self, insert: str, conflict: Conflict) -> str:
        """`insert` with this dialect's clause for `conflict` (still a template: see render)."""
        return self.insert_on_conflict(insert, conflict)
