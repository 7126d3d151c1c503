"""A PEP 249 (DB-API 2.0) driver over this package's own connections, for SQLite and
PostgreSQL: what SQLAlchemy's ``cmbagent_db+sqlite`` and ``cmbagent_db+postgresql`` dialects
(``cmbagent_db.sqlalchemy``) run on, so SQLAlchemy models and this package's models use one
SQLite library and one kind of connection.

    >>> from cmbagent_db import dbapi
    >>> conn = dbapi.connect("sqlite:///:memory:")
    >>> cur = conn.cursor()
    >>> cur.execute("SELECT ? + 1", (41,)).fetchone()
    (42,)

``connect(url)`` takes the URLs sessions take (``sqlite:///path``, ``postgresql://...``) with
their parameters. Each connection is its own (SQLAlchemy pools them), and ``:memory:`` is a
new database per connection, as with ``sqlite3``.

Placeholders are positional: ``?`` on SQLite (``paramstyle = "qmark"``), ``$1, $2, ...`` on
PostgreSQL (``Connection.paramstyle`` says ``numeric_dollar``). Parameters: None, bool, int,
float, str, bytes, datetime, date, time, Decimal, UUID.

Transactions are implicit, as PEP 249 asks: on PostgreSQL every statement outside one begins
one (as psycopg2); on SQLite a statement that writes does, with ``BEGIN IMMEDIATE`` (reads
outside a transaction run on their own, as ``sqlite3`` does). ``commit()``/``rollback()`` end
it; ``connect(url, autocommit=True)`` or ``conn.autocommit = True`` begins none.

Rows are tuples. On SQLite values come back as stored (int, float, str, bytes, None); on
PostgreSQL by column type: numeric as Decimal, timestamp as a naive and timestamptz as an
aware UTC datetime, date, time, uuid as UUID, json/jsonb as their text (SQLAlchemy's JSON
type decodes it), bytea as bytes. ``Cursor.description`` type codes are PostgreSQL type OIDs
(None on SQLite), comparable with ``STRING``, ``NUMBER``, ``DATETIME``, ``BINARY``, ``ROWID``.

``threadsafety = 1``: threads may share the module; a connection may be used from several
threads (calls are serialised, as with ``check_same_thread=False``), a cursor by one.
"""

from __future__ import annotations

import datetime as _datetime
import time as _time
from typing import Any, Optional

from cmbagent_db import _native
from cmbagent_db.exceptions import (
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    NotSupportedError,
    OperationalError,
    ProgrammingError,
    Warning,
)

apilevel = "2.0"
threadsafety = 1
paramstyle = "qmark"

Connection = _native.Connection
Cursor = _native.Cursor

#: The SQLite library this module (and, by the one-library rule, Python's sqlite3) uses.
sqlite_version: str = _native.sqlite_version
sqlite_version_info = tuple(int(p) for p in sqlite_version.split("."))


def connect(url: str, *, autocommit: bool = False, timeout: Optional[float] = None,
            check_same_thread: Any = None) -> Connection:
    """Opens a connection to ``url``. ``timeout`` (seconds): how long a statement waits for
    another connection's lock (SQLite's busy timeout, PostgreSQL's lock_timeout).
    ``check_same_thread`` is accepted for ``sqlite3`` compatibility and changes nothing:
    calls from several threads are always serialised."""
    return _native.dbapi_connect(url, autocommit, timeout)


Date = _datetime.date
Time = _datetime.time
Timestamp = _datetime.datetime
Binary = bytes


def DateFromTicks(ticks: float) -> _datetime.date:
    return Date(*_time.localtime(ticks)[:3])


def TimeFromTicks(ticks: float) -> _datetime.time:
    return Time(*_time.localtime(ticks)[3:6])


def TimestampFromTicks(ticks: float) -> _datetime.datetime:
    return Timestamp(*_time.localtime(ticks)[:6])


class _TypeObject:
    """Equal to every type code of its group (PEP 249's type objects)."""

    def __init__(self, name: str, *codes: int) -> None:
        self.name = name
        self.codes = frozenset(codes)

    def __eq__(self, other: object) -> bool:
        return other in self.codes

    def __hash__(self) -> int:
        return hash(self.codes)

    def __repr__(self) -> str:
        return f"dbapi.{self.name}"


# PostgreSQL type OIDs (pg_type.oid): text, varchar, bpchar, name, "char", json, jsonb.
STRING = _TypeObject("STRING", 25, 1043, 1042, 19, 18, 114, 3802)
BINARY = _TypeObject("BINARY", 17)
# int8, int2, int4, oid, float4, float8, numeric
NUMBER = _TypeObject("NUMBER", 20, 21, 23, 26, 700, 701, 1700)
# date, time, timestamp, timestamptz, timetz, interval
DATETIME = _TypeObject("DATETIME", 1082, 1083, 1114, 1184, 1266, 1186)
ROWID = _TypeObject("ROWID", 26)

__all__ = [
    "apilevel", "threadsafety", "paramstyle", "connect", "Connection", "Cursor",
    "Warning", "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError",
    "IntegrityError", "InternalError", "ProgrammingError", "NotSupportedError",
    "Date", "Time", "Timestamp", "DateFromTicks", "TimeFromTicks", "TimestampFromTicks",
    "Binary", "STRING", "BINARY", "NUMBER", "DATETIME", "ROWID",
    "sqlite_version", "sqlite_version_info",
]
