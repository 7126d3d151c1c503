"""One session for both kinds of models, on one connection and one transaction.

``Session(bind=engine)`` (or a ``sessionmaker(bind=engine, ...)`` factory) checks out one
connection of an engine made by ``cmbagent_db.sqlalchemy.create_engine`` and runs on it both
this package's session (the five models, their SQL in Rust) and a SQLAlchemy ORM session
(every other model). Calls go to the one that maps the object or class; ``flush()`` writes
the five models first, then SQLAlchemy's (their foreign keys point at the five), and
``commit()`` / ``rollback()`` end the one transaction both wrote in.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from sqlalchemy import orm
from sqlalchemy.engine import Engine

from cmbagent_db import _native, models
from cmbagent_db._native import DbSession

_OWN = (models.Model,)


def _own_class(entity: Any) -> bool:
    return isinstance(entity, type) and issubclass(entity, _OWN)


class Session:
    """A unit of work over the five models and SQLAlchemy's, sharing one connection.

    Keywords are SQLAlchemy ``Session``'s (``autoflush``, ``expire_on_commit``, ...) and
    apply to its models; the five models behave as this package's sessions do
    (``autoflush=False``, ``expire_on_commit=False``)."""

    def __init__(self, bind: Engine, **kwargs: Any) -> None:
        from cmbagent_db import dbapi
        from cmbagent_db.exceptions import InterfaceError

        self.bind = bind
        self._connection = bind.connect()
        raw = self._connection.connection.dbapi_connection
        if not isinstance(raw, dbapi.Connection):
            self._connection.close()
            raise InterfaceError(
                "a cmbagent_db.sqlalchemy session shares its connection with this package: "
                "make the engine with cmbagent_db.sqlalchemy.create_engine"
            )
        self._db: DbSession = raw.session()
        kwargs.pop("bind", None)
        self._orm: orm.Session = orm.Session(bind=self._connection, **kwargs)

    # ------------------------------------------------------------------ objects

    def _for(self, obj: Any) -> Any:
        return self._db if isinstance(obj, _OWN) else self._orm

    def add(self, obj: Any) -> None:
        self._for(obj).add(obj)

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

    # ------------------------------------------------------------------ SQL

    def execute(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.execute(statement, params, **kwargs)

    def scalar(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.scalar(statement, params, **kwargs)

    def scalars(self, statement: Any, params: Any = None, **kwargs: Any) -> Any:
        return self._orm.scalars(statement, params, **kwargs)

    # ------------------------------------------------------------------ transaction

    def flush(self) -> None:
        """Writes the five models' changes, then SQLAlchemy's, in the open transaction. A
        failure rolls the whole transaction back (``rollback()`` then goes on)."""
        try:
            self._db.flush()
            self._orm.flush()
        except BaseException:
            self._rollback_all()
            raise

    def commit(self) -> None:
        self.flush()
        try:
            self._db.commit()  # commits the shared connection: both kinds of rows
            self._orm.commit()
        except BaseException:
            self._rollback_all()
            raise

    def rollback(self) -> None:
        self._rollback_all()

    def _rollback_all(self) -> None:
        try:
            self._db.rollback()
        finally:
            self._orm.rollback()

    def close(self) -> None:
        try:
            self._db.close()
            self._orm.close()
        finally:
            self._connection.close()

    def in_transaction(self) -> bool:
        return bool(self._db.in_transaction() or self._orm.in_transaction())

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def orm(self) -> orm.Session:
        """The SQLAlchemy ``Session`` of the other models (same connection)."""
        return self._orm


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
        bind = kwargs.pop("bind", self.bind)
        if bind is None:
            raise ValueError("sessionmaker needs bind=engine")
        return Session(bind, **{**self.kw, **kwargs})

    def configure(self, **kwargs: Any) -> None:
        self.bind = kwargs.pop("bind", self.bind)
        self.kw.update(kwargs)
