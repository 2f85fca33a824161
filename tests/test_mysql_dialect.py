"""The MySQL dialect's text and DSN forms, without a server: what the MariaDB tests (marked
`mysql`, see conftest.py) run is checked there; here, what a MySQL 8 server would be sent too."""

from __future__ import annotations

import pytest

from kine_server.drivers import EndpointError, make_driver, mysql, sql
from kine_server.drivers.dialect import Conflict
from kine_server.drivers.mysql_dsn import DSNError, MySQLEndpoint, parse


def test_kines_dsn_form_and_the_url_form_name_the_same_database() -> None:
    kine = parse("mysql://k3s:s3cr@t:x@tcp(db.example:3307)/kubernetes")
    assert kine == MySQLEndpoint("db.example", 3307, "k3s", "s3cr@t:x", "kubernetes")
    url = parse("mysql://k3s:s3cr%40t%3Ax@db.example:3307/kubernetes")
    assert url == kine
    assert parse(kine.url()) == kine


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "mysql://root@tcp(127.0.0.1)/",
            MySQLEndpoint("127.0.0.1", 3306, "root", "", "kubernetes"),
        ),
        ("mysql://u:p@/db", MySQLEndpoint("127.0.0.1", 3306, "u", "p", "db")),
        ("mysql://u:p@tcp([::1]:3306)/db", MySQLEndpoint("::1", 3306, "u", "p", "db")),
        (
            "mysql://u@unix(/run/mysqld/mysqld.sock)/db",
            MySQLEndpoint("", 0, "u", "", "db", socket="/run/mysqld/mysqld.sock"),
        ),
        (
            "mysql://u@unix(/run/mysqld/mysqld.sock)",
            MySQLEndpoint("", 0, "u", "", "kubernetes", socket="/run/mysqld/mysqld.sock"),
        ),
        (
            "mysql://u:p@db:3306?tls=skip-verify",
            MySQLEndpoint("db", 3306, "u", "p", "kubernetes", tls="skip-verify"),
        ),
    ],
)
def test_dsn_forms(dsn: str, expected: MySQLEndpoint) -> None:
    assert parse(dsn) == expected


@pytest.mark.parametrize(
    "dsn", ["mysql://u@db:99999/x", "mysql://u@tcp(db:1/x", "mysql://u@db/x?tls=custom"]
)
def test_malformed_dsns_are_refused_with_the_reason(dsn: str) -> None:
    with pytest.raises(DSNError):
        parse(dsn)
    with pytest.raises(EndpointError, match="invalid --endpoint"):
        make_driver(dsn)


def test_the_location_never_names_the_password() -> None:
    driver = make_driver("mysql://kine:hunter2@tcp(db:3306)/k8s")
    assert driver.location == "mysql db:3306/k8s" and "hunter2" not in driver.location


def test_statements_are_mysqls() -> None:
    statements = sql.Statements(mysql.DIALECT)
    text, params = statements.range(b"a", b"b", 5, 10, True)
    assert "`key` >= %s AND `key` < %s" in text and "LIMIT %s" in text and "?" not in text
    assert params == [b"a", b"b", 5, 5, 10]
    assert "JSON_TABLE(%s, '$[*]'" in statements.renewable_leases
    assert statements.renewable_leases.endswith(" FOR UPDATE")
    assert "LEAD(mod_revision) OVER (PARTITION BY `key`" in statements.link_history
    # "Do nothing" without INSERT IGNORE, which would also hide a value that does not fit.
    assert statements.raise_alarm.endswith("ON DUPLICATE KEY UPDATE member_id = member_id")
    assert statements.put_auth_record.endswith("ON DUPLICATE KEY UPDATE value = VALUES(value)")
    assert "IGNORE" not in statements.insert_lease


def test_the_ddl_declares_indexes_in_create_table_first_unique_first() -> None:
    ddl = sql.Statements(mysql.DIALECT).schema
    assert not [text for text in ddl if text.startswith(("CREATE INDEX", "CREATE UNIQUE"))]
    kv = next(text for text in ddl if "TABLE IF NOT EXISTS kine_kv" in text)
    assert "`key` VARBINARY(3000) NOT NULL" in kv and "value LONGBLOB NOT NULL" in kv
    indexes = [line.strip() for line in kv.splitlines() if "INDEX" in line]
    # InnoDB clusters a table without a primary key by its first unique NOT NULL index.
    assert indexes[0] == "UNIQUE INDEX kine_kv_key_rev_sub (`key`, mod_revision, sub),"
    assert " WHERE " not in kv and "INCLUDE" not in kv


def test_a_literal_percent_survives_pyformat() -> None:
    assert mysql.DIALECT.render("SELECT '100%' WHERE a = ?") == "SELECT '100%%' WHERE a = %s"
    assert mysql.on_duplicate_key("INSERT INTO t (a, b) VALUES (?, ?)", Conflict(())).endswith(
        "UPDATE a = a"
    )
