"""Helpers for tests: raw database access that bypasses cmbagent_db entirely.

Everything here reads the database's own catalogue (sqlite_master / PRAGMA on SQLite,
information_schema / pg_catalog on PostgreSQL), so tests can check what the package really
wrote without trusting the package's own reading code.

Import it as ``from helpers import raw_connect, ...`` (conftest.py puts tests/ on sys.path).

URLs accepted: the ones cmbagent_db accepts, i.e. ``sqlite:///rel.db``,
``sqlite:////abs/path.db``, ``sqlite:///:memory:`` (query parameters ignored here) and
``postgresql://``, ``postgres://``, ``postgresql+psycopg2://``, ``postgresql+psycopg://``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "is_sqlite",
    "is_postgresql",
    "sqlite_path",
    "pg_dsn",
    "raw_connect",
    "connected",
    "fetch_all",
    "sa_url",
    "table_names",
    "column_names",
    "index_names",
    "index_info",
    "row_count",
    "fixture_engine",
    "terminate_backend",
    "run_threads",
]

_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg")
# Query parameters that only cmbagent_db understands; libpq / sqlite3 / SQLAlchemy would
# reject them.
_OUR_PARAMS = {"auto_migrate", "synchronous"}


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def is_sqlite(url: str) -> bool:
    return _scheme(url) in ("sqlite", "sqlite+pysqlite")


def is_postgresql(url: str) -> bool:
    return _scheme(url) in _PG_SCHEMES


def sqlite_path(url: str) -> str:
    """The file path of a ``sqlite:///...`` URL (``:memory:`` for in-memory)."""
    if not is_sqlite(url):
        raise ValueError(f"not a SQLite URL: {url!r}")
    rest = url.split(":", 1)[1]
    if not rest.startswith("///"):
        raise ValueError(f"SQLite URL must look like sqlite:///path: {url!r}")
    path = rest[3:].split("?", 1)[0]
    return path or ":memory:"


def _strip_params(url: str, drop: set) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in drop]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def pg_dsn(url: str) -> str:
    """A libpq URI (what psycopg2.connect accepts) for a PostgreSQL URL."""
    if not is_postgresql(url):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    rest = url.split(":", 1)[1]
    return _strip_params("postgresql:" + rest, _OUR_PARAMS)


def raw_connect(url: str):
    """A plain DB-API connection to the database behind ``url``, in autocommit mode.

    SQLite: ``sqlite3`` connection (isolation_level=None, i.e. autocommit, foreign_keys=ON,
    5 s busy timeout). Opening a missing file creates it, as sqlite3 does.
    PostgreSQL: ``psycopg2`` connection with ``autocommit = True``.
    Placeholders differ: ``?`` for sqlite3, ``%s`` for psycopg2 (see fetch_all).
    The caller closes it (or use ``connected(url)``).
    """
    if is_sqlite(url):
        conn = sqlite3.connect(sqlite_path(url), timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn
    if is_postgresql(url):
        import psycopg2

        conn = psycopg2.connect(pg_dsn(url), connect_timeout=10)
        conn.autocommit = True
        return conn
    raise ValueError(f"unsupported URL scheme: {url!r}")


@contextlib.contextmanager
def connected(url: str) -> Iterator[Any]:
    """``with connected(url) as conn:`` a raw_connect() connection closed on exit."""
    conn = raw_connect(url)
    try:
        yield conn
    finally:
        conn.close()


def _catalogue_connect(url: str):
    # Reading the catalogue must never create a SQLite file as a side effect.
    if is_sqlite(url):
        path = sqlite_path(url)
        if path != ":memory:" and not os.path.exists(path):
            raise FileNotFoundError(f"SQLite database file does not exist: {path}")
    return connected(url)


def fetch_all(url: str, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
    """Run one statement on a fresh raw connection and return all rows as tuples.

    Write placeholders as ``?``; they are turned into ``%s`` for PostgreSQL (so do not put a
    literal ``?`` or ``%`` in the SQL). Statements that return no rows give ``[]``.
    """
    with _catalogue_connect(url) as conn:
        cur = conn.cursor()
        if is_postgresql(url) and params:
            cur.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(params))
        elif is_postgresql(url):
            cur.execute(sql)
        else:
            cur.execute(sql, tuple(params))
        rows = cur.fetchall() if cur.description is not None else []
        cur.close()
        return [tuple(r) for r in rows]


def sa_url(url: str) -> str:
    """The SQLAlchemy spelling of a cmbagent_db URL.

    ``sqlite:///...`` is kept as is (minus the cmbagent_db-only query parameters
    ``synchronous`` / ``auto_migrate``, which pysqlite would reject); PostgreSQL URLs become
    ``postgresql+psycopg2://...``.
    """
    if is_sqlite(url):
        return _strip_params(url, _OUR_PARAMS)
    if is_postgresql(url):
        rest = url.split(":", 1)[1]
        return _strip_params("postgresql+psycopg2:" + rest, _OUR_PARAMS)
    raise ValueError(f"unsupported URL scheme: {url!r}")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def table_names(url: str) -> List[str]:
    """User tables (sorted), excluding SQLite's internal ``sqlite_*`` tables.

    PostgreSQL: base tables of the current schema (normally ``public``).
    """
    with _catalogue_connect(url) as conn:
        cur = conn.cursor()
        if is_sqlite(url):
            cur.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
            )
        else:
            cur.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        names = sorted(r[0] for r in cur.fetchall())
        cur.close()
        return names


def column_names(url: str, table: str) -> List[str]:
    """Column names of ``table`` in declaration order ([] when the table does not exist)."""
    with _catalogue_connect(url) as conn:
        cur = conn.cursor()
        if is_sqlite(url):
            cur.execute(f"PRAGMA table_info({_quote_ident(table)})")
            names = [r[1] for r in cur.fetchall()]
        else:
            cur.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = %s "
                "ORDER BY ordinal_position",
                (table,),
            )
            names = [r[0] for r in cur.fetchall()]
        cur.close()
        return names


def index_info(url: str, table: str, *, include_constraints: bool = True) -> Dict[str, Dict[str, Any]]:
    """Indexes of ``table``: ``{name: {"columns": [...], "unique": bool, "partial": bool,
    "constraint": bool}}``.

    ``constraint`` is True for the indexes the database creates by itself to back a PRIMARY
    KEY or UNIQUE constraint (SQLite ``sqlite_autoindex_*``, PostgreSQL ``*_pkey`` / ``*_key``);
    their names differ between backends. With ``include_constraints=False`` they are left out,
    so only indexes made by CREATE INDEX remain (same names on both backends).
    Expression columns are left out of ``columns``.
    """
    out: Dict[str, Dict[str, Any]] = {}
    with _catalogue_connect(url) as conn:
        cur = conn.cursor()
        if is_sqlite(url):
            cur.execute(f"PRAGMA index_list({_quote_ident(table)})")
            rows = cur.fetchall()
            for row in rows:
                # seq, name, unique, origin ('c' CREATE INDEX, 'u' UNIQUE, 'pk'), partial
                name, unique, origin, partial = row[1], bool(row[2]), row[3], bool(row[4])
                cur.execute(f"PRAGMA index_info({_quote_ident(name)})")
                cols = [r[2] for r in sorted(cur.fetchall()) if r[2] is not None]
                out[name] = {
                    "columns": cols,
                    "unique": unique,
                    "partial": partial,
                    "constraint": origin != "c",
                }
        else:
            cur.execute(
                """
                SELECT i.relname,
                       ix.indisunique,
                       ix.indpred IS NOT NULL,
                       ARRAY(
                           SELECT a.attname
                           FROM unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                           JOIN pg_attribute a
                             ON a.attrelid = ix.indrelid AND a.attnum = k.attnum
                           ORDER BY k.ord
                       ),
                       EXISTS (
                           SELECT 1 FROM pg_constraint c
                           WHERE c.conindid = ix.indexrelid AND c.contype IN ('p', 'u', 'x')
                       )
                FROM pg_index ix
                JOIN pg_class t ON t.oid = ix.indrelid
                JOIN pg_class i ON i.oid = ix.indexrelid
                JOIN pg_namespace n ON n.oid = t.relnamespace
                WHERE n.nspname = current_schema() AND t.relname = %s
                """,
                (table,),
            )
            for name, unique, partial, cols, constraint in cur.fetchall():
                out[name] = {
                    "columns": list(cols),
                    "unique": bool(unique),
                    "partial": bool(partial),
                    "constraint": bool(constraint),
                }
        cur.close()
    if not include_constraints:
        out = {k: v for k, v in out.items() if not v["constraint"]}
    return out


def index_names(url: str, table: str, *, include_constraints: bool = False) -> List[str]:
    """Sorted names of the indexes on ``table``.

    By default only indexes created with CREATE INDEX (named the same on both backends);
    pass ``include_constraints=True`` to also list the ones backing PRIMARY KEY / UNIQUE
    constraints (``sqlite_autoindex_*`` / ``*_pkey``, ``*_key``).
    """
    return sorted(index_info(url, table, include_constraints=include_constraints))


def row_count(url: str, table: str) -> int:
    """``SELECT COUNT(*)`` of ``table`` on a fresh raw connection."""
    with _catalogue_connect(url) as conn:
        cur = conn.cursor()
        cur.execute(f"SELECT COUNT(*) FROM {_quote_ident(table)}")
        (n,) = cur.fetchone()
        cur.close()
        return int(n)


@contextlib.contextmanager
def fixture_engine(backend: str, db_url: str, metadata: Any) -> Iterator[Any]:
    """cmbagent's test-fixture engine on this package's driver, with ``metadata``'s tables
    made, dropped afterwards: in memory with StaticPool on SQLite (one connection shared
    by every session and thread), ``db_url`` (a fresh database) on PostgreSQL."""
    from sqlalchemy.pool import StaticPool

    from cmbagent_db.sqlalchemy import create_engine

    if backend == "sqlite":
        engine = create_engine("sqlite:///:memory:", connect_args={"check_same_thread": False},
                               poolclass=StaticPool)
    else:
        engine = create_engine(db_url)
    metadata.create_all(engine)
    try:
        yield engine
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def terminate_backend(url: str, pid: int) -> None:
    """Ends one PostgreSQL server process (``pg_terminate_backend``), as an administrator
    or a server restart would end a client's connection."""
    admin = raw_connect(url)
    try:
        admin.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
        admin.commit()
    finally:
        admin.close()


def run_threads(target, args_list: Sequence[Tuple[Any, ...]]) -> None:
    """Runs ``target(*args)`` for each args in its own thread, all at once; waits for all."""
    import threading

    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ------------------------------------------------------------------ an Alembic environment

_ENV_PY = '''\
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

url = context.config.get_main_option("sqlalchemy.url")
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
'''


def alembic_config(directory: Path, url: str, chain: Sequence[Tuple[str, Optional[str]]]):
    """An Alembic environment in ``directory`` whose script directory holds ``chain``
    ((revision, down_revision) pairs, each with empty upgrade and downgrade), configured
    for the database at ``url``."""
    from alembic.config import Config

    scripts = directory / "alembic_scripts"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(_ENV_PY)
    for rev, down in chain:
        (scripts / "versions" / f"{rev}.py").write_text(
            textwrap.dedent(
                f'''\
                """{rev}

                Revision ID: {rev}
                Revises: {down or ""}
                """
                revision = {rev!r}
                down_revision = {down!r}
                branch_labels = None
                depends_on = None


                def upgrade():
                    pass


                def downgrade():
                    pass
                '''
            )
        )
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    cfg.set_main_option("sqlalchemy.url", sa_url(url))
    return cfg
