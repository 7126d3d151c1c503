"""SQLAlchemy on this package's own connections (install with ``cmbagent-db[sqlalchemy]``).

``Base`` is a declarative base whose ``metadata`` holds SQLAlchemy ``Table`` objects for the
five tables, built from the package's one schema description: models that subclass it can
declare ``ForeignKey("workflow_runs.id")`` / ``ForeignKey("sessions.id")``, and the five
model classes and their columns work inside SQLAlchemy constructs (``select(WorkflowRun)``,
``.join(WorkflowRun, Stage.run_id == WorkflowRun.id)``, ``.order_by(WorkflowRun.started_at
.desc())``) through ``__clause_element__``. ``Base.metadata.create_all(engine)`` creates the
five tables with this package's migrations (exactly what ``cmbagent_db.init_database``
makes, on the engine's own connection, so also in an in-memory ``StaticPool`` database) and
every other table as SQLAlchemy does; ``drop_all`` drops the others, then the five.

``create_engine(url, **kw)`` is SQLAlchemy's ``create_engine`` with ``cmbagent_db.dbapi`` as
the driver: ``sqlite:///...`` and ``postgresql://...`` mean ``cmbagent_db+sqlite`` and
``cmbagent_db+postgresql``; every keyword SQLAlchemy takes (``poolclass``, ``connect_args``,
``echo``, ...) is passed on. The dialects are registered with SQLAlchemy when this module is
imported (and through the package's entry points), so ``sqlalchemy.create_engine(
"cmbagent_db+sqlite:///...")`` works too.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Union

import sqlalchemy
from sqlalchemy import (
    JSON, TIMESTAMP, BigInteger, Boolean, Column, ForeignKey, ForeignKeyConstraint, Index,
    Integer, MetaData, String, Table, Text, text,
)
from sqlalchemy import event
from sqlalchemy.dialects import registry as _registry
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import declarative_base

from cmbagent_db import _native, models

for _name, _cls in [
    ("cmbagent_db.sqlite", "CmbagentSQLiteDialect"),
    ("sqlite.cmbagent_db", "CmbagentSQLiteDialect"),
    ("cmbagent_db.postgresql", "CmbagentPGDialect"),
    ("postgresql.cmbagent_db", "CmbagentPGDialect"),
]:
    _registry.register(_name, "cmbagent_db.sqlalchemy.dialect", _cls)

_DRIVERS = {
    "sqlite": "cmbagent_db+sqlite",
    "postgresql": "cmbagent_db+postgresql",
    "postgres": "cmbagent_db+postgresql",
}


def engine_url(url: Union[str, URL]) -> URL:
    """``url`` with this package as its driver: plain ``sqlite`` / ``postgresql`` URLs are
    rewritten; one naming another driver (``postgresql+psycopg2``) is refused."""
    u = make_url(url)
    backend, _, driver = u.drivername.partition("+")
    if backend in _DRIVERS and not driver:
        return u.set(drivername=_DRIVERS[backend])
    if u.drivername in _DRIVERS.values() or driver == "cmbagent_db":
        return u
    from cmbagent_db.exceptions import NotSupportedError

    raise NotSupportedError(
        f"cmbagent_db.sqlalchemy.create_engine runs SQLAlchemy on this package's "
        f"connections; {u.drivername!r} names another driver: use sqlite:/// or postgresql://"
    )


def create_engine(url: Union[str, URL], **kwargs: Any) -> Engine:
    """SQLAlchemy's ``create_engine`` on this package's connections. Left with SQLAlchemy's
    default pool, its sessions take their connections from this package's pool
    (``cmbagent_db.sqlalchemy.pooling``)."""
    from cmbagent_db.sqlalchemy.pooling import note_engine

    engine = sqlalchemy.create_engine(engine_url(url), **kwargs)
    note_engine(engine, kwargs)
    return engine


_TYPES: dict = {
    "string": String,
    "text": lambda _: Text(),
    "integer": lambda _: Integer(),
    "biginteger": lambda _: BigInteger(),
    "boolean": lambda _: Boolean(),
    "timestamp": lambda _: TIMESTAMP(),
    "timestamptz": lambda _: TIMESTAMP(timezone=True),
    "json": lambda _: JSON(),
}

#: The tables this package's migrations own.
OWN_TABLES = frozenset(name for name, _ in _native.schema_tables())

#: The tables this package keeps for its own bookkeeping beside the five.
BOOKKEEPING_TABLES = frozenset(_native.bookkeeping_tables())


def include_name(name: Optional[str], type_: str, parent_names: Any) -> bool:
    """Alembic's ``include_name`` hook for ``context.configure`` in ``env.py``: leaves this
    package's bookkeeping tables (its revision, applied checksums and SQLite's change log
    of approval requests, none of them in ``Base.metadata``) out of ``alembic revision
    --autogenerate``, which would otherwise propose to drop them."""
    return not (type_ == "table" and name in BOOKKEEPING_TABLES)


def _migrate(bind: Union[Engine, Connection], target: str, force: bool = False) -> None:
    """Runs this package's migrations on ``bind``'s own DB-API connection."""
    from cmbagent_db import dbapi
    from cmbagent_db.exceptions import InterfaceError

    def run(dbapi_connection: Any) -> None:
        if not isinstance(dbapi_connection, dbapi.Connection):
            raise InterfaceError(
                "Base.metadata creates the five tables with this package's migrations, on "
                "its own driver: make the engine with cmbagent_db.sqlalchemy.create_engine, "
                f"not {type(dbapi_connection).__module__}"
            )
        dbapi_connection.migrate(target, force)

    if isinstance(bind, Connection):
        run(bind.connection.dbapi_connection)
        return
    raw = bind.raw_connection()
    try:
        run(raw.dbapi_connection)
    finally:
        raw.close()


class _MetaData(MetaData):
    """MetaData whose five own tables are made and dropped by this package's migrations,
    and whose foreign keys to an application's table are declared when it declares it."""

    def __init__(self) -> None:
        super().__init__()
        #: application table -> [(column of the five, ON DELETE)] naming its ``id``.
        self.app_references: dict = {}

    def declare_app_references(self, table: Table) -> None:
        """``table`` of the application's just joined: the five's keys naming it."""
        for column, ondelete in self.app_references.get(table.name, ()):
            if not column.foreign_keys:
                column.table.append_constraint(ForeignKeyConstraint(
                    [column.name], [f"{table.name}.id"], ondelete=ondelete))

    def _others(self, tables: Optional[Iterable[Table]]) -> List[Table]:
        chosen = self.sorted_tables if tables is None else list(tables)
        return [t for t in chosen if t.name not in OWN_TABLES]

    def create_all(self, bind: Any, tables: Optional[Iterable[Table]] = None,
                   checkfirst: Any = True) -> None:
        tables = None if tables is None else list(tables)
        if tables is None or any(t.name in OWN_TABLES for t in tables):
            _migrate(bind, "head")
        super().create_all(bind, tables=self._others(tables), checkfirst=checkfirst)

    def drop_all(self, bind: Any, tables: Optional[Iterable[Table]] = None,
                 checkfirst: Any = True) -> None:
        tables = None if tables is None else list(tables)
        super().drop_all(bind, tables=self._others(tables), checkfirst=checkfirst)
        if tables is None or any(t.name in OWN_TABLES for t in tables):
            _migrate(bind, "base", force=True)


metadata = _MetaData()
for _table, _columns in _native.schema_tables():
    _t = Table(_table, metadata, *[
        Column(name, _TYPES[kind](length),
               *([ForeignKey(f"{fk[0]}.id", ondelete=fk[1])] if fk and fk[2] else []),
               primary_key=pk, nullable=nullable)
        for name, kind, length, nullable, pk, fk in _columns
    ])
    for name, _kind, _length, _nullable, _pk, fk in _columns:
        if fk and not fk[2]:
            metadata.app_references.setdefault(fk[0], []).append((_t.c[name], fk[1]))

# The indexes the migrations create, so that Alembic's autogenerate finds them declared.
for _on, _name, _keys, _unique, _where in _native.schema_indexes():
    _partial: dict[str, Any] = (
        {"sqlite_where": text(_where), "postgresql_where": text(_where)} if _where else {})
    Index(_name, *[metadata.tables[_on].c[k] for k in _keys], unique=_unique, **_partial)

Base: Any = declarative_base(metadata=metadata)


@event.listens_for(Table, "after_parent_attach")
def _table_attached(table: Table, parent: Any) -> None:
    if parent is metadata:
        metadata.declare_app_references(table)


class _TableOfClass:
    """``Model.__clause_element__()`` on the class: its table. Instances are rows, not
    tables, so they have none."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __get__(self, instance: Any, owner: Any = None) -> Callable[[], Table]:
        if instance is not None:
            raise AttributeError("__clause_element__")
        return lambda: self.table


for _model in (models.Session, models.WorkflowRun, models.SessionState,
               models.ApprovalRequest, models.ActiveConnection):
    setattr(_model, "__clause_element__", _TableOfClass(metadata.tables[_model.__tablename__]))


def _clause(table: str, column: str, descending: Optional[bool]) -> Any:
    """The SQLAlchemy form of a column of the five tables (``Column.__clause_element__``),
    ordered when ``descending`` is not None."""
    c = metadata.tables[table].c[column]
    if descending is None:
        return c
    return c.desc() if descending else c.asc()


from cmbagent_db.sqlalchemy.relationships import Wiring  # noqa: E402
from cmbagent_db.sqlalchemy.session import Session, get_db_session, sessionmaker  # noqa: E402

_wiring = Wiring(Base)

__all__ = ["Base", "metadata", "OWN_TABLES", "BOOKKEEPING_TABLES", "include_name", "Session",
           "sessionmaker", "get_db_session", "create_engine", "engine_url"]
