"""One session for both kinds of models, on one connection and one transaction.

``Session(bind=engine)`` (or a ``sessionmaker(bind=engine, ...)`` factory) checks out one
connection of an engine made by ``cmbagent_db.sqlalchemy.create_engine`` and runs on it both
this package's session (the five models, their SQL in Rust) and a SQLAlchemy ORM session
(every other model). Calls go to the one that maps the object or class; ``flush()`` writes
table by table in foreign-key order (``Base.metadata.sorted_tables``), so a run goes in
before its steps and a step before an approval whose ``step_id`` names it, and
``commit()`` / ``rollback()`` end the one transaction both wrote in.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, cast

from sqlalchemy import event
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import orm
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import PoolProxiedConnection

from cmbagent_db import _native, dbapi, models
from cmbagent_db._native import DbSession
from cmbagent_db.sqlalchemy import OWN_TABLES, Base, metadata
from cmbagent_db.sqlalchemy.pooling import lend_to_sqlalchemy, own_pool_url
from cmbagent_db.sqlalchemy.relationships import (
    BRIDGE, PENDING, bridge_of, copy_key,
)

_OWN = (models.Model,)


def _own_class(entity: Any) -> bool:
    return isinstance(entity, type) and issubclass(entity, _OWN)


class Session:
    """A unit of work over the five models and SQLAlchemy's, sharing one connection.

    Keywords are SQLAlchemy ``Session``'s (``autoflush``, ``expire_on_commit``, ...) and
    apply to its models; the five models behave as this package's sessions do
    (``autoflush=False``, ``expire_on_commit=False``)."""

    # Class-level defaults, empty and never changed in place: a session sets these on
    # itself when it first changes them, so that opening one sets only what every session
    # needs.

    #: The pool connection SQLAlchemy's Connection runs on. Where this package pools the
    #: engine's connections (``pooling``), it is found when SQLAlchemy is first needed: the
    #: five's connection, lent, if they hold a transaction open, else one of SQLAlchemy's
    #: pool that the five then run on too. Otherwise it is checked out of SQLAlchemy's
    #: pool when the session opens.
    _pooled: Optional[PoolProxiedConnection] = None
    _connection: Optional[Connection] = None
    #: SQLAlchemy's session, made when first needed: five-model work never pays for it.
    _orm_session: Optional[orm.Session] = None
    #: Foreign keys to set once their parent has an id: (child, attrs, parent, attrs).
    _links: List[Tuple[Any, List[str], Any, List[str]]] = []
    #: While flushing: the five's runs of tables still to write, by step number, and the
    #: step of each of SQLAlchemy's tables.
    _own_steps: List[Tuple[int, List[str]]] = []
    _step_of: Dict[str, int] = {}

    def __init__(self, bind: Engine, **kwargs: Any) -> None:
        self.bind = bind
        url = own_pool_url(bind)
        #: Whether the engine lets this package pool its connections.
        self._own_pool = url is not None
        if url is not None:
            self._db: DbSession = _native._pool_session(url)
        else:
            self._db = self._checkout_from_sqlalchemy().session()
        self._db._bridge = weakref.ref(self)
        self._orm_kwargs: Dict[str, Any] = kwargs

    @property
    def _orm(self) -> orm.Session:
        if self._connection is None:
            if self._pooled is None:
                if self._db.in_transaction():  # the five's open transaction goes on
                    self._pooled = lend_to_sqlalchemy(self.bind, self._db._lend_connection())
                else:  # the five follow SQLAlchemy onto a connection of its pool
                    self._db._switch_connection(self._checkout_from_sqlalchemy())
            self._connection = Connection(self.bind, connection=self._pooled)
            if self._orm_session is None:
                self._orm_session = orm.Session(bind=self._connection, **self._orm_kwargs)
                self._orm_session.info[BRIDGE] = weakref.ref(self)
            else:
                self._orm_session.bind = self._connection
        return cast(orm.Session, self._orm_session)

    def _replace_lost_connection(self) -> None:
        """After a rollback: when the shared connection was lost (SQLAlchemy invalidated
        it, or the server ended it), both sides go on, with their objects, on a new one."""
        pooled = self._pooled
        if pooled is None:
            return
        raw = pooled.dbapi_connection
        if raw is not None and not raw.broken:
            return
        with contextlib.suppress(Exception):  # closing what is already gone
            (pooled if self._connection is None else self._connection).close()
        self._connection = None
        if self._own_pool:
            self._pooled = None
            self._db._switch_connection(None)
        else:
            self._db._switch_connection(self._checkout_from_sqlalchemy())

    def _checkout_from_sqlalchemy(self) -> "dbapi.Connection":
        """Checks a connection out of the engine's SQLAlchemy pool for this session."""
        from cmbagent_db.exceptions import InterfaceError

        self._pooled = self.bind.raw_connection()
        raw = self._pooled.dbapi_connection
        if not isinstance(raw, dbapi.Connection):
            self._pooled.close()
            raise InterfaceError(
                "a cmbagent_db.sqlalchemy session shares its connection with this package: "
                "make the engine with cmbagent_db.sqlalchemy.create_engine"
            )
        return raw

    def _orm_clean(self) -> bool:
        return self._orm_session is None or self._orm_session._is_clean()

    # ------------------------------------------------------------------ objects

    def _for(self, obj: Any) -> Any:
        return self._db if isinstance(obj, _OWN) else self._orm

    def add(self, obj: Any) -> None:
        if isinstance(obj, _OWN):
            self._db.add(obj)
        else:
            self._orm.add(obj)
        # Links ``obj`` took while in no session (read as an attribute first: an object
        # that took none keeps no ``__dict__`` entry, nor a ``__dict__`` made for it).
        if getattr(obj, PENDING, None) is not None:
            for child_attrs, parent, parent_attrs in obj.__dict__.pop(PENDING):
                self.defer_link(obj, child_attrs, parent, parent_attrs)
                if parent not in self:
                    self.add(parent)

    def add_all(self, objs: Iterable[Any]) -> None:
        for obj in objs:
            self.add(obj)

    def delete(self, obj: Any) -> None:
        self._for(obj).delete(obj)

    def expunge(self, obj: Any) -> None:
        self._for(obj).expunge(obj)

    def refresh(self, obj: Any) -> None:
        self._for(obj).refresh(obj)

    def merge(self, obj: Any, **kwargs: Any) -> Any:
        if isinstance(obj, _OWN):
            raise NotImplementedError("merge() of this package's models: add() them instead")
        return self._orm.merge(obj, **kwargs)

    def get(self, entity: Any, ident: Any, **kwargs: Any) -> Any:
        if _own_class(entity):
            return self._db.get(entity, ident)
        return self._orm.get(entity, ident, **kwargs)

    def query(self, *entities: Any) -> Any:
        """``query(Model)`` of the five runs through this package; of any other model (a
        join to the five included) through SQLAlchemy's ORM."""
        first = entities[0] if entities else None
        if _own_class(first) or isinstance(first, (_native.Column, _native.Aggregate)):
            return self._db.query(*entities)
        return self._orm.query(*entities)

    def __contains__(self, obj: Any) -> bool:
        return obj in self._for(obj)

    @property
    def new(self) -> List[Any]:
        """Objects of both kinds added and not yet flushed."""
        theirs = [] if self._orm_session is None else list(self._orm_session.new)
        return list(self._db.new) + theirs

    @property
    def deleted(self) -> List[Any]:
        """Objects of both kinds marked for deletion and not yet flushed."""
        theirs = [] if self._orm_session is None else list(self._orm_session.deleted)
        return list(self._db.deleted) + theirs

    def children(self, entity: Any, key: Dict[str, Any]) -> List[Any]:
        """The rows of ``entity`` whose attributes equal ``key`` (a relationship's
        collection), read without flushing."""
        if _own_class(entity):
            return self._db.query(entity).filter(
                *[getattr(entity, a) == v for a, v in key.items()]).all()
        with self._orm.no_autoflush:
            return self._orm.query(entity).filter_by(**key).all()

    def defer_link(self, child: Any, child_attrs: List[str], parent: Any,
                   parent_attrs: List[str]) -> None:
        """Sets ``child``'s key to ``parent``'s once the flush has given it one."""
        self._links = [*self._links, (child, child_attrs, parent, parent_attrs)]

    def _resolve_links(self) -> None:
        self._links = [link for link in self._links if not copy_key(*link)]

    # ------------------------------------------------------------------ SQL

    def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.execute(statement, params, **kwargs)

    def scalar(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.scalar(statement, params, **kwargs)

    def scalars(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.scalars(statement, params, **kwargs)

    # ------------------------------------------------------------------ transaction

    def flush(self) -> None:
        """Writes both kinds' changes in the open transaction: new and changed rows table
        by table in foreign-key order, then SQLAlchemy's deletions, then the five's. A
        failure rolls the whole transaction back (``rollback()`` then goes on)."""
        try:
            self._resolve_links()
            if self._orm_clean():
                self._db.flush()
            else:
                self._flush_in_order()
                self._db.flush()  # the five's deletions
        except BaseException:
            self._rollback_all()
            raise

    def _flush_in_order(self) -> None:
        """Writes new and changed rows of both kinds in foreign-key order. The tables in
        ``metadata.sorted_tables`` order fall into runs of one kind (tables with nothing of
        SQLAlchemy's to write are skipped, so the usual flush is the five, then theirs): the
        five's first run is written now, each later one when SQLAlchemy's flush is about to
        write the first table after it (``_before_write``), and what is left at the end."""
        waiting: Set[str] = set()
        for obj in list(self._orm.new) + list(self._orm.dirty):
            waiting.update(t.name for t in sa_inspect(obj).mapper.tables)
        steps: List[Tuple[bool, List[str]]] = []
        for table in metadata.sorted_tables:
            own = table.name in OWN_TABLES
            if not own and table.name not in waiting:
                continue
            if steps and steps[-1][0] == own:
                steps[-1][1].append(table.name)
            else:
                steps.append((own, [table.name]))
        self._own_steps = [(n, tables) for n, (own, tables) in enumerate(steps) if own]
        self._step_of = {t: n for n, (own, tables) in enumerate(steps) if not own
                         for t in tables}
        self._write_own_before(1 if steps and steps[0][0] else 0)
        try:
            self._orm.flush()
        finally:
            self._step_of = {}
        self._write_own_before(len(steps))

    def _write_own_before(self, step: int) -> None:
        while self._own_steps and self._own_steps[0][0] < step:
            self._db._flush_tables(self._own_steps.pop(0)[1], False)
            self._resolve_links()

    def reach(self, table: str) -> None:
        """SQLAlchemy's flush is about to write ``table``: the five's rows it may name go
        first."""
        step = self._step_of.get(table)
        if step is not None:
            self._write_own_before(step)

    def commit(self) -> None:
        if self._links or self._orm_session is not None:
            self.flush()
        try:
            # Flushes what is left of the five's and commits the shared connection: both
            # kinds of rows.
            self._db.commit()
            if self._orm_session is not None:
                self._orm_session.commit()
        except BaseException:
            self._rollback_all()
            raise

    def rollback(self) -> None:
        self._rollback_all()

    def _rollback_all(self) -> None:
        self._links = []
        try:
            self._db.rollback()
        finally:
            if self._orm_session is not None:
                self._orm_session.rollback()
            self._replace_lost_connection()

    def close(self) -> None:
        try:
            self._db.close()
            if self._orm_session is not None:
                self._orm_session.close()
        finally:
            if self._connection is not None:
                self._connection.close()
            elif self._pooled is not None:
                self._pooled.close()

    def in_transaction(self) -> bool:
        theirs = self._orm_session is not None and self._orm_session.in_transaction()
        return bool(self._db.in_transaction() or theirs)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def for_service(self) -> DbSession:
        """The package session this one runs on, flushed: what ``approvals`` and
        ``connections`` run their statements on (their commit commits both kinds)."""
        self.flush()
        return self._db

    @property
    def orm(self) -> orm.Session:
        """The SQLAlchemy ``Session`` of the other models (same connection)."""
        return self._orm


def _before_write(mapper: Any, connection: Any, target: Any) -> None:
    bridge = bridge_of(target)
    if bridge is not None:
        for table in mapper.tables:
            bridge.reach(table.name)


for _event in ("before_insert", "before_update"):
    event.listen(cast(Any, Base), _event, _before_write, propagate=True)


_FACTORIES: Dict[str, "sessionmaker"] = {}
_FACTORIES_LOCK = threading.Lock()


def get_db_session(url: Optional[str] = None) -> Session:
    """``cmbagent_db.get_db_session`` for both kinds of models: a ``Session`` of an engine
    made once per URL (``cmbagent_db.sqlalchemy.create_engine(url)``, SQLAlchemy's default
    pool), configured as cmbagent configures its sessions (``autoflush=False``,
    ``expire_on_commit=False``). ``url`` defaults as ``cmbagent_db.get_db_session``'s does,
    and the database is brought up as there (auto-migration, drift warnings)."""
    from cmbagent_db.sqlalchemy import create_engine

    key = _native.default_url() if url is None else url
    factory = _FACTORIES.get(key)
    if factory is None:
        with _FACTORIES_LOCK:
            factory = _FACTORIES.get(key)
            if factory is None:
                _native.get_db_session(key).close()  # migrates or warns, as there
                factory = sessionmaker(bind=create_engine(key), autoflush=False,
                                       expire_on_commit=False)
                _FACTORIES[key] = factory
    return factory()


def dispose_engines() -> None:
    """Disposes the engines ``get_db_session`` made (``cmbagent_db.dispose_engines()``
    calls this): their idle connections close at once; the engines stay usable."""
    with _FACTORIES_LOCK:
        engines = [factory.bind for factory in _FACTORIES.values()]
    for engine in engines:
        if engine is not None:
            engine.dispose()


class sessionmaker:
    """``sqlalchemy.orm.sessionmaker`` for ``Session``: ``sessionmaker(bind=engine,
    autocommit=False, autoflush=False, expire_on_commit=False)()`` opens one."""

    def __init__(self, bind: Optional[Engine] = None, autocommit: bool = False,
                 **kwargs: Any) -> None:
        if autocommit:
            raise ValueError("autocommit=True is not supported (nor by SQLAlchemy 2)")
        self.bind = bind
        self.kw = kwargs

    def __call__(self, **kwargs: Any) -> Session:
        if not kwargs and self.bind is not None:
            return Session(self.bind, **self.kw)
        bind = kwargs.pop("bind", self.bind)
        if bind is None:
            raise ValueError("sessionmaker needs bind=engine")
        return Session(bind, **{**self.kw, **kwargs})

    def configure(self, **kwargs: Any) -> None:
        self.bind = kwargs.pop("bind", self.bind)
        self.kw.update(kwargs)
