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
from typing import Any, Collection, Dict, List, NamedTuple, Optional, Tuple

from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, Pool, PoolProxiedConnection, QueuePool

#: create_engine keywords that configure SQLAlchemy's pool or what runs on each new
#: connection: with any of them the engine keeps its own pool.
_POOL_SETTINGS = frozenset({
    "poolclass", "pool", "creator", "async_creator", "pool_size", "max_overflow",
    "pool_timeout", "pool_recycle", "pool_use_lifo", "pool_reset_on_return",
    "isolation_level",
})

#: The pool events whose listeners expect to see every connection of the pool.
_EVENTS = ("connect", "first_connect", "checkout", "checkin", "reset", "close", "detach",
           "invalidate", "soft_invalidate", "close_detached")


class _Noted(NamedTuple):
    """An engine that lets this package pool: the URL of this package's engine, and the
    pool's listeners as they were when the engine was made (the dialect's own)."""

    url: str
    pool: Pool
    #: The deques SQLAlchemy keeps the pool's listeners in, instance and class level, for
    #: every event of ``_EVENTS``: an ``event.listen`` appends to one of them.
    lists: Tuple[Collection[Any], ...]
    #: How many listeners they held in all (the dialect's own).
    total: int


#: Per engine that lets this package pool, by ``id()`` (a lookup at every session: a
#: WeakKeyDictionary would make a weak reference for each); the entry goes with the engine.
_POOLED_HERE: Dict[int, _Noted] = {}
#: Per such engine: the pool that wraps lent connections for SQLAlchemy.
_LENDING: "weakref.WeakKeyDictionary[Engine, NullPool]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _listener_lists(pool: Pool) -> Tuple[Collection[Any], ...]:
    """The deques holding ``pool``'s listeners of ``_EVENTS``. Each event's collection is
    made instance-level now (what the first ``event.listen`` on it would do), so that it
    stays the same object from then on and a session's check is a length per deque."""
    dispatch = pool.dispatch
    lists: List[Collection[Any]] = []
    for name in _EVENTS:
        collection = getattr(dispatch, name).for_modify(dispatch)
        lists += (collection.parent_listeners, collection.listeners)
    return tuple(lists)


def note_engine(engine: Engine, kwargs: Dict[str, Any]) -> None:
    """Records whether ``engine`` (just made with ``kwargs``) lets this package pool."""
    if _POOL_SETTINGS.intersection(kwargs) or type(engine.pool) is not QueuePool:
        return
    args, params = engine.dialect.create_connect_args(engine.url)
    params = {**params, **(kwargs.get("connect_args") or {})}
    params.pop("check_same_thread", None)
    if params or len(args) != 1:
        return
    lists = _listener_lists(engine.pool)
    _POOLED_HERE[id(engine)] = _Noted(args[0], engine.pool, lists, sum(map(len, lists)))
    weakref.finalize(engine, _POOLED_HERE.pop, id(engine), None)


def own_pool_url(engine: Engine) -> Optional[str]:
    """The URL of this package's engine whose pool ``engine``'s sessions use, or None when
    they use SQLAlchemy's (see the module's text): checked at every session, as a listener
    may be added to the engine at any time."""
    noted = _POOLED_HERE.get(id(engine))
    if noted is None:
        return None
    if engine.pool is not noted.pool:  # engine.dispose() made a new pool, same listeners
        lists = _listener_lists(engine.pool)
        noted = noted._replace(pool=engine.pool, lists=lists)
        _POOLED_HERE[id(engine)] = noted
    return noted.url if sum(map(len, noted.lists)) == noted.total else None


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
