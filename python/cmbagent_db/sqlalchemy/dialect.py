"""SQLAlchemy dialects that run on ``cmbagent_db.dbapi``: ``cmbagent_db+sqlite://`` and
``cmbagent_db+postgresql://`` (also spelled ``sqlite+cmbagent_db://`` and
``postgresql+cmbagent_db://``). They are SQLAlchemy's own SQLite and PostgreSQL dialects
with this package as the driver; what differs from pysqlite / psycopg2 is said here.

SQLite: as pysqlite, except that no Python functions are registered in SQLite (``REGEXP``
is not available) and transactions begin with ``BEGIN IMMEDIATE`` at the first write (see
``cmbagent_db.dbapi``). URL parameters are this package's (``timeout``, ``synchronous``,
``mode=ro``, ...); ``check_same_thread`` in ``connect_args`` is accepted and changes
nothing.

PostgreSQL: the base PostgreSQL dialect with ``$1`` placeholders; parameters go to the
server as typed values or as text the server parses by the column's type, strings with a
``::VARCHAR`` cast. JSON / JSONB come back as text and SQLAlchemy's JSON types decode them
(``json_deserializer`` applies). Arrays are lists both ways, so SQLAlchemy's reflection
(``inspect(engine)``, Alembic autogenerate) runs here; interval, range and other composite
types cannot be bound or read yet: cast them in SQL.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.sql import sqltypes


def _set_autocommit(dbapi_connection: Any, level: str) -> bool:
    """Switches the driver's autocommit for AUTOCOMMIT; True if that was the level."""
    autocommit = level == "AUTOCOMMIT"
    if dbapi_connection.autocommit != autocommit:
        if dbapi_connection.in_transaction:
            dbapi_connection.rollback()
        dbapi_connection.autocommit = autocommit
    return autocommit


class _OnThisDriver:
    """What both dialects take from ``cmbagent_db.dbapi`` (placed before SQLAlchemy's
    dialect class in the bases)."""

    driver = "cmbagent_db"

    @classmethod
    def import_dbapi(cls) -> Any:
        from cmbagent_db import dbapi

        return dbapi

    def detect_autocommit_setting(self, dbapi_conn: Any) -> bool:
        return bool(dbapi_conn.autocommit)

    def is_disconnect(self, e: Any, connection: Any, cursor: Any) -> bool:
        if connection is not None:
            return bool(connection.broken)
        from cmbagent_db.exceptions import InterfaceError, OperationalError

        return isinstance(e, (InterfaceError, OperationalError)) and "connection" in str(e)


class CmbagentSQLiteDialect(_OnThisDriver, SQLiteDialect_pysqlite):
    # SQLAlchemy caches compiled SQL only for a dialect class that sets this itself.
    supports_statement_cache = True

    def create_connect_args(self, url: URL) -> Any:
        query = dict(url.query)
        kwargs = {}
        if "check_same_thread" in query:
            kwargs["check_same_thread"] = query.pop("check_same_thread")
        native = "sqlite:///" + (url.database or ":memory:")
        if query:
            native += "?" + urlencode(query, doseq=True)
        return [native], kwargs

    def on_connect(self) -> Any:
        # pysqlite registers Python functions (REGEXP) in SQLite here; there are none.
        return None

    def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None:
        if not _set_autocommit(dbapi_connection, level):
            SQLiteDialect.set_isolation_level(self, dbapi_connection, level)


class _CastString(sqltypes.String):
    # A string bound where the server cannot infer a parameter's type (an argument of
    # json_build_object, which SQLAlchemy's reflection queries pass) gets a cast, as on
    # pg8000, psycopg and asyncpg, the other drivers that bind on the server.
    render_bind_cast = True


class CmbagentPGDialect(_OnThisDriver, PGDialect):
    supports_statement_cache = True  # (in the class itself, as above)
    colspecs = {**PGDialect.colspecs, sqltypes.String: _CastString}
    default_paramstyle = "numeric_dollar"
    supports_native_decimal = True
    supports_sane_multi_rowcount = True
    supports_server_side_cursors = False
    use_insertmanyvalues = True

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("paramstyle", "numeric_dollar")
        super().__init__(**kwargs)

    def create_connect_args(self, url: URL) -> Any:
        native = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return [native], {}

    def get_isolation_level_values(self, dbapi_conn: Any) -> Any:
        return [*super().get_isolation_level_values(dbapi_conn), "AUTOCOMMIT"]

    def set_isolation_level(self, dbapi_connection: Any, level: Any) -> None:
        if not _set_autocommit(dbapi_connection, level):
            super().set_isolation_level(dbapi_connection, level)

