"""SQLAlchemy on this package's own connections (install with ``cmbagent-db[sqlalchemy]``).

``create_engine(url, **kw)`` is SQLAlchemy's ``create_engine`` with ``cmbagent_db.dbapi`` as
the driver: ``sqlite:///...`` and ``postgresql://...`` mean ``cmbagent_db+sqlite`` and
``cmbagent_db+postgresql``; every keyword SQLAlchemy takes (``poolclass``, ``connect_args``,
``echo``, ...) is passed on. The dialects are registered with SQLAlchemy when this module is
imported (and through the package's entry points), so ``sqlalchemy.create_engine(
"cmbagent_db+sqlite:///...")`` works too.
"""

from __future__ import annotations

from typing import Any, Union

import sqlalchemy
from sqlalchemy.dialects import registry as _registry
from sqlalchemy.engine import URL, Engine, make_url

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
    """SQLAlchemy's ``create_engine`` on this package's connections."""
    return sqlalchemy.create_engine(engine_url(url), **kwargs)


__all__ = ["create_engine", "engine_url"]
