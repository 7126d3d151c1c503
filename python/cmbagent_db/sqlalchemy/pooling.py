"""Whose pool a ``cmbagent_db.sqlalchemy`` session takes its connection from.

An engine made by ``create_engine`` with SQLAlchemy's pool left as it comes (the
``QueuePool`` of a SQLite file or a PostgreSQL server, no pool settings, no pool event
listeners) lets this package pool the connections: a session then starts as cheaply as
``cmbagent_db.get_db_session()``'s, on this package's pool for the same URL, and the five
models' work alone never checks out a SQLAlchemy connection. When the session first needs
SQLAlchemy's ORM, the five's open transaction, if there is one, goes on under SQLAlchemy:
their connection is handed to it, wrapped as a pool connection of its own, and goes back
to this package's pool when the session closes. With no transaction open, the session
checks a connection out of SQLAlchemy's pool as any other would, and the five run on it
from then on.

Every other engine keeps SQLAlchemy's pool for its sessions: ``StaticPool`` (one shared
connection, as in-memory test databases need), ``pool_size`` / ``max_overflow`` /
``pool_timeout`` / ``pool_recycle`` limits, a ``creator``, ``isolation_level``,
``connect_args`` other than ``check_same_thread``, and any ``connect`` / ``checkout`` /
``checkin`` / ``reset`` listener on the engine (such listeners expect to see every
connection). ``pool_pre_ping`` needs no pool of SQLAlchemy's: this package's pool drops a
connection the server closed and opens a new one when a transaction begins on it.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, Optional, Tuple

from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, PoolProxiedConnection, QueuePool

#: create_engine keywords that configure SQLAlchemy's pool or what runs on each new
#: connection: with any of them the engine keeps its own pool.
_POOL_SETTINGS = frozenset({
    "poolclass", "pool", "creator", "async_creator", "pool_size", "max_overflow",
    "pool_timeout", "pool_recycle", "pool_use_lifo", "pool_reset_on_return",
    "isolation_level",
})

#: Per engine that lets this package pool: the URL of this package's engine and the
#: pool's listener counts when it was made (the dialect's own).
_POOLED_HERE: "weakref.WeakKeyDictionary[Engine, Tuple[str, Tuple[int, ...]]]" = (
    weakref.WeakKeyDictionary())
#: Per such engine: the pool that wraps lent connections for SQLAlchemy.
_LENDING: "weakref.WeakKeyDictionary[Engine, NullPool]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _listeners(engine: Engine) -> Tuple[int, ...]:
    """How many listeners each of the pool's events has (checked at every session: spelt
    out, as attribute reads are the cheapest)."""
    d = engine.pool.dispatch
    return (len(d.connect), len(d.first_connect), len(d.checkout), len(d.checkin),
            len(d.reset), len(d.close), len(d.detach), len(d.invalidate),
            len(d.soft_invalidate), len(d.close_detached))


def note_engine(engine: Engine, kwargs: Dict[str, Any]) -> None:
    """Records whether ``engine`` (just made with ``kwargs``) lets this package pool."""
    if _POOL_SETTINGS.intersection(kwargs) or type(engine.pool) is not QueuePool:
        return
    args, params = engine.dialect.create_connect_args(engine.url)
    params = {**params, **(kwargs.get("connect_args") or {})}
    params.pop("check_same_thread", None)
    if params or len(args) != 1:
        return
    _POOLED_HERE[engine] = (args[0], _listeners(engine))


def own_pool_url(engine: Engine) -> Optional[str]:
    """The URL of this package's engine whose pool ``engine``'s sessions use, or None when
    they use SQLAlchemy's (see the module's text)."""
    noted = _POOLED_HERE.get(engine)
    if noted is None or _listeners(engine) != noted[1]:
        return None
    return noted[0]


class _Handed(threading.local):
    conn: Any = None


_HANDED = _Handed()


def _take_handed() -> Any:
    return _HANDED.conn


def lend_to_sqlalchemy(engine: Engine, dbapi_connection: Any) -> PoolProxiedConnection:
    """``dbapi_connection`` (a session's, lent by ``DbSession._lend_connection``) as a
    pool connection SQLAlchemy's ``Connection`` runs on; closing it rolls back and gives
    the connection back to this package's pool."""
    pool = _LENDING.get(engine)
    if pool is None:
        with _LOCK:
            pool = _LENDING.get(engine)
            if pool is None:
                # The dialect's first-connect checks (server version, ...) run once, on a
                # connection of SQLAlchemy's pool.
                engine.connect().close()
                pool = NullPool(_take_handed, dialect=engine.dialect, echo=engine.pool.echo)
                _LENDING[engine] = pool
    _HANDED.conn = dbapi_connection
    try:
        return pool.connect()
    finally:
        _HANDED.conn = None
