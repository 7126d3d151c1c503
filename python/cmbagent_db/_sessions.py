"""The package session behind the session a service is given.

The services (``approvals``, ``connections``) run their statements in Rust on this
package's ``DbSession``. A ``cmbagent_db.sqlalchemy`` session holds one, on the connection
it shares with SQLAlchemy: given such a session, a service first flushes it (so the
statement sees both kinds of pending rows), then runs on its ``DbSession``, whose commit
commits the one transaction.
"""

from __future__ import annotations

from typing import Any

from cmbagent_db._native import DbSession


def native(db: Any) -> DbSession:
    """``db`` itself if it is a ``DbSession``, else the one it runs on (anything else is
    passed on for the service to refuse with a TypeError)."""
    if isinstance(db, DbSession):
        return db
    for_service = getattr(db, "for_service", None)
    return db if for_service is None else for_service()
