"""``cmbagent_db.dbapi``: the PEP 249 driver over this package's connections, on SQLite
and PostgreSQL (``db_url``): module globals, every parameter and column type cmbagent's
models use, implicit transactions, counts and descriptions, bad input, threads and a lost
connection.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

import cmbagent_db.exceptions as exc
from cmbagent_db import dbapi

from helpers import fetch_all, is_sqlite, run_threads, terminate_backend

UTC = dt.timezone.utc


def ph(conn, n: int) -> str:
    """The placeholder for the n-th parameter on this connection."""
    return "?" if conn.paramstyle == "qmark" else f"${n}"


def marks(conn, k: int) -> str:
    return ", ".join(ph(conn, i + 1) for i in range(k))


@pytest.fixture
def conn(db_url):
    c = dbapi.connect(db_url)
    yield c
    c.close()


def test_module_globals_and_exception_tree():
    assert (dbapi.apilevel, dbapi.threadsafety, dbapi.paramstyle) == ("2.0", 1, "qmark")
    for name in ["Warning", "Error", "InterfaceError", "DatabaseError", "DataError",
                 "OperationalError", "IntegrityError", "InternalError", "ProgrammingError",
                 "NotSupportedError"]:
        assert getattr(dbapi, name) is getattr(exc, name)
    assert issubclass(dbapi.Error, Exception) and issubclass(dbapi.Warning, Exception)
    for sub in [dbapi.DataError, dbapi.OperationalError, dbapi.IntegrityError,
                dbapi.InternalError, dbapi.ProgrammingError, dbapi.NotSupportedError]:
        assert issubclass(sub, dbapi.DatabaseError)
    assert issubclass(dbapi.InterfaceError, dbapi.Error)
    assert dbapi.Binary(b"x") == b"x" and dbapi.Date(2024, 1, 2) == dt.date(2024, 1, 2)
    assert dbapi.TimestampFromTicks(0).year in (1969, 1970)
    assert dbapi.sqlite_version_info >= (3, 35, 0)
    import sqlite3

    # one SQLite library in the process: the same one Python's sqlite3 reports
    assert dbapi.sqlite_version == sqlite3.sqlite_version


def test_parameters_and_rows_keep_their_types(conn, db_url):
    cur = conn.cursor()
    now = dt.datetime.now(UTC).replace(microsecond=123456)
    if is_sqlite(db_url):
        cur.execute("CREATE TABLE t (i INTEGER, f REAL, s TEXT, b BLOB, n TEXT, flag INTEGER)")
        row = (2**62, 1.25, "héllo ✓", b"\x00\xff", None, True)
        cur.execute(f"INSERT INTO t VALUES ({marks(conn, 6)})", row)
        cur.execute("SELECT i, f, s, b, n, flag FROM t")
        assert cur.fetchall() == [(2**62, 1.25, "héllo ✓", b"\x00\xff", None, 1)]
        assert [d[0] for d in cur.description] == ["i", "f", "s", "b", "n", "flag"]
        assert all(d[1] is None for d in cur.description)
        # a naive datetime is stored as SQLAlchemy's SQLite text form
        cur.execute(f"SELECT {ph(conn, 1)}", (dt.datetime(2024, 1, 2, 3, 4, 5),))
        assert cur.fetchone() == ("2024-01-02 03:04:05",)
        return
    cur.execute(
        "CREATE TABLE t (i bigint, f double precision, s varchar(20), b bytea, n text, "
        "flag boolean, d numeric(10, 6), big numeric, ts timestamp, tz timestamptz, "
        "day date, tm time, u uuid, j json, jb jsonb)"
    )
    u = uuid.uuid4()
    row = (2**62, 1.25, "héllo ✓", b"\x00\xff", None, True, Decimal("1.234567"), 10**30,
           now.replace(tzinfo=None), now, dt.date(2024, 2, 29), dt.time(12, 30, 1), u,
           '{"a": [1, 2]}', '{"b": null}')
    cur.execute(f"INSERT INTO t VALUES ({marks(conn, 15)})", row)
    assert cur.rowcount == 1
    cur.execute("SELECT * FROM t")
    got = cur.fetchone()
    assert got[:12] == (2**62, 1.25, "héllo ✓", b"\x00\xff", None, True, Decimal("1.234567"),
                        Decimal(10**30), now.replace(tzinfo=None), now, dt.date(2024, 2, 29),
                        dt.time(12, 30, 1))
    assert got[12] == u and isinstance(got[12], uuid.UUID)
    # JSON comes back as its text (SQLAlchemy's JSON type decodes it)
    assert got[13] == '{"a": [1, 2]}' and got[14] == '{"b": null}'
    codes = [d[1] for d in cur.description]
    assert codes[0] == dbapi.NUMBER and codes[2] == dbapi.STRING and codes[3] == dbapi.BINARY
    assert codes[8] == dbapi.DATETIME and codes[6] == dbapi.NUMBER and codes[0] != dbapi.STRING
    # numbers bind to numeric columns; text to dates, as psycopg2's literals do
    cur.execute(f"SELECT {ph(conn, 1)}::numeric + 1, {ph(conn, 2)}::date", (2.5, "2024-03-01"))
    assert cur.fetchone() == (Decimal("3.5"), dt.date(2024, 3, 1))


def test_postgresql_arrays_read_as_lists_and_lists_bind_as_arrays(pg_url):
    """As psycopg2 does: an array column (``int2vector`` and ``oidvector`` too, which
    SQLAlchemy's reflection reads) is a list, nested for more dimensions, its members
    converted as a column of their type; a list parameter binds as an array."""
    conn = dbapi.connect(pg_url)
    cur = conn.cursor()
    u = uuid.uuid4()
    cur.execute(
        "SELECT ARRAY[1, NULL, 3]::int4[], ARRAY['a', 'b,\"c\\', NULL]::text[], "
        "ARRAY[[1.5, 2], [3, 4]]::numeric[], ARRAY[$1::uuid], '{}'::int8[], "
        "'1 3 2'::int2vector, ARRAY[true, false], ARRAY[date '2024-02-29']",
        (str(u),),
    )
    got = cur.fetchone()
    assert got == ([1, None, 3], ["a", 'b,"c\\', None],
                   [[Decimal("1.5"), Decimal(2)], [Decimal(3), Decimal(4)]], [u], [],
                   [1, 3, 2], [True, False], [dt.date(2024, 2, 29)])
    assert isinstance(got[3][0], uuid.UUID) and isinstance(got[2][0][0], Decimal)
    # members that need quoting in an array literal survive the trip
    odd = ['x "y"', "back\\slash", None, "NULL", "", "{a,b}", " pad "]
    cur.execute("SELECT $1::int4[], $2::text[], $3 = ANY($4::text[]), cardinality($5::int8[])",
                ([1, None, -3], odd, "b", ["a", "b"], []))
    assert cur.fetchone() == ([1, None, -3], odd, True, 0)
    cur.execute("CREATE TEMP TABLE arr (tags text[], grid int4[], at timestamptz[], raw bytea[])")
    now = dt.datetime.now(UTC)
    cur.execute("INSERT INTO arr VALUES ($1, $2, $3, $4)",
                (["p", "q"], [[1, 2], [3, 4]], [now], [b"\x00\\\xff"]))
    cur.execute("SELECT tags, grid, at, raw FROM arr")
    assert cur.fetchall() == [(["p", "q"], [[1, 2], [3, 4]], [now], [b"\x00\\\xff"])]
    # a ragged list is the server's error, and the connection is usable after a rollback
    with pytest.raises(dbapi.DataError, match="array"):
        cur.execute("SELECT $1::int4[]", ([[1], [2, 3]],))
    conn.rollback()
    cur.execute("SELECT cardinality($1::text[])", (["only"],))
    assert cur.fetchone() == (1,)
    conn.close()


def test_sqlite_reads_run_outside_a_transaction_writes_begin_one(conn, db_url):
    cur = conn.cursor()
    cur.execute("SELECT 1")
    if is_sqlite(db_url):
        assert not conn.in_transaction
    else:
        assert conn.in_transaction  # as psycopg2: every statement begins one
        conn.rollback()
    cur.execute("CREATE TABLE t (a INTEGER)")
    assert conn.in_transaction
    conn.commit()
    cur.execute(f"INSERT INTO t VALUES ({ph(conn, 1)})", (1,))
    assert conn.in_transaction
    # not visible elsewhere before the commit
    assert fetch_all(db_url, "SELECT count(*) FROM t") == [(0,)]
    conn.commit()
    assert not conn.in_transaction
    assert fetch_all(db_url, "SELECT count(*) FROM t") == [(1,)]
    cur.execute(f"INSERT INTO t VALUES ({ph(conn, 1)})", (2,))
    conn.rollback()
    assert fetch_all(db_url, "SELECT a FROM t") == [(1,)]


def test_autocommit_commits_each_statement(db_url):
    c = dbapi.connect(db_url, autocommit=True)
    try:
        cur = c.cursor()
        cur.execute("CREATE TABLE t (a INTEGER)")
        cur.execute(f"INSERT INTO t VALUES ({ph(c, 1)})", (1,))
        assert not c.in_transaction
        assert fetch_all(db_url, "SELECT count(*) FROM t") == [(1,)]
        c.autocommit = False
        cur.execute(f"INSERT INTO t VALUES ({ph(c, 1)})", (2,))
        with pytest.raises(dbapi.ProgrammingError, match="inside a transaction"):
            c.autocommit = True
        c.rollback()
        c.autocommit = True
        assert c.autocommit
    finally:
        c.close()
    assert fetch_all(db_url, "SELECT count(*) FROM t") == [(1,)]


def test_counts_descriptions_and_fetching(conn):
    cur = conn.cursor()
    cur.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    assert cur.description is None
    cur.executemany(f"INSERT INTO t (id, v) VALUES ({marks(conn, 2)})",
                    [(i, f"v{i}") for i in range(1, 6)])
    assert cur.rowcount == 5
    cur.execute(f"UPDATE t SET v = 'x' WHERE id > {ph(conn, 1)}", (2,))
    assert cur.rowcount == 3
    cur.execute("SELECT id, v FROM t ORDER BY id")
    assert [d[0] for d in cur.description] == ["id", "v"]
    assert cur.fetchone() == (1, "v1")
    cur.arraysize = 2
    assert cur.fetchmany() == [(2, "v2"), (3, "x")]
    assert list(cur) == [(4, "x"), (5, "x")]
    assert cur.fetchone() is None and cur.fetchall() == []
    cur.execute(f"DELETE FROM t WHERE id = {ph(conn, 1)} RETURNING v", (1,))
    assert cur.fetchall() == [("v1",)] and cur.rowcount == 1
    if conn.paramstyle == "qmark":
        cur.execute("INSERT INTO t (v) VALUES ('auto')")
        assert cur.lastrowid == 6
    cur.setinputsizes([None])
    cur.setoutputsize(10)
    cur.close()
    with pytest.raises(dbapi.InterfaceError, match="closed"):
        cur.execute("SELECT 1")


def test_bad_input_is_a_clear_error_and_loses_nothing(conn, db_url):
    cur = conn.cursor()
    cur.execute("CREATE TABLE p (id INTEGER PRIMARY KEY)")
    cur.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER NOT NULL REFERENCES p (id))")
    conn.commit()
    cur.execute(f"INSERT INTO p VALUES ({ph(conn, 1)})", (1,))
    with pytest.raises(dbapi.ProgrammingError, match="no statement"):
        conn.cursor().fetchone()
    with pytest.raises(dbapi.ProgrammingError):
        cur.execute(f"SELECT {marks(conn, 2)}", (1,))
    with pytest.raises(dbapi.ProgrammingError, match="parameter 1: type dict"):
        cur.execute(f"SELECT {ph(conn, 1)}", ({"a": 1},))
    with pytest.raises(dbapi.ProgrammingError, match="named parameters"):
        cur.execute(f"SELECT {ph(conn, 1)}", {"a": 1})
    with pytest.raises(dbapi.ProgrammingError, match="single string"):
        cur.execute(f"SELECT {ph(conn, 1)}", "abc")
    conn.rollback()
    cur.execute(f"INSERT INTO p VALUES ({ph(conn, 1)})", (1,))
    with pytest.raises(dbapi.IntegrityError):
        cur.execute(f"INSERT INTO c VALUES ({marks(conn, 2)})", (1, 99))
    conn.rollback()
    assert fetch_all(db_url, "SELECT count(*) FROM p") == [(0,)]
    # usable after the rollback
    cur.execute(f"INSERT INTO p VALUES ({ph(conn, 1)})", (2,))
    conn.commit()
    assert fetch_all(db_url, "SELECT id FROM p") == [(2,)]
    with pytest.raises((dbapi.ProgrammingError, dbapi.OperationalError)):
        cur.execute("SELEC nonsense")
    conn.rollback()
    if is_sqlite(db_url):
        with pytest.raises(dbapi.DataError, match="64-bit"):
            cur.execute("SELECT ?", (2**64,))
        with pytest.raises(dbapi.ProgrammingError, match="type list"):
            cur.execute("SELECT ?", ([1, 2],))
    else:
        with pytest.raises(dbapi.DataError, match="cast it"):
            cur.execute("SELECT interval '1 day'")
        conn.rollback()
    conn.close()
    conn.close()  # closing twice is fine
    assert conn.closed and conn.broken
    with pytest.raises(dbapi.InterfaceError, match="closed"):
        conn.cursor()


def test_a_connection_shared_by_threads_serialises_their_calls(db_url):
    c = dbapi.connect(db_url, autocommit=True)
    c.cursor().execute("CREATE TABLE t (k INTEGER, i INTEGER)")
    errors = []

    def work(k):
        try:
            cur = c.cursor()
            for i in range(50):
                cur.execute(f"INSERT INTO t VALUES ({marks(c, 2)})", (k, i))
        except BaseException as e:  # noqa: BLE001 - a panic is a BaseException
            errors.append(repr(e))

    run_threads(work, [(k,) for k in range(8)])
    c.close()
    assert errors == []
    assert fetch_all(db_url, "SELECT count(*), count(DISTINCT k) FROM t") == [(400, 8)]


def test_a_lost_postgresql_connection_reads_as_broken(pg_url):
    c = dbapi.connect(pg_url)
    cur = c.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    c.rollback()
    assert not c.broken
    terminate_backend(pg_url, pid)
    with pytest.raises(dbapi.OperationalError):
        cur.execute("SELECT 1")
    assert c.broken
    c.close()
