"""cmbagent-db: persistence for cmbagent's human-in-the-loop workflows.

SQLAlchemy-compatible sessions and models, and Alembic-compatible migrations, with every SQL
statement run by the Rust core (SQLite embedded, PostgreSQL for several server instances).

    >>> from cmbagent_db import get_db_session
    >>> from cmbagent_db.models import ApprovalRequest
"""

import sys

# First: binds the native module to the SQLite library Python's sqlite3 module uses.
from cmbagent_db._sqlite_library import SQLiteLibraryWarning, load as _load_native

_load_native()

from cmbagent_db import _native, approvals, connections, models
from cmbagent_db._native import (
    Aggregate,
    AliasedClass,
    Column,
    DbSession,
    Expression,
    LoadOption,
    Ordering,
    Query,
    Relationship,
    RelationshipList,
    __version__,
    aliased,
    and_,
    applied,
    check,
    current,
    default_url,
    foreign_revisions,
    func,
    get_db_session,
    history,
    init_database,
    joinedload,
    migrate,
    migration_sql,
    not_,
    object_session,
    or_,
    redact_url,
    revision_info,
    selectinload,
    stamp,
)
from cmbagent_db.exceptions import (
    ApprovalCancelled,
    ApprovalError,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalTimeout,
    DatabaseError,
    DataError,
    Error,
    IntegrityError,
    InterfaceError,
    InternalError,
    InvalidRequestError,
    MigrationError,
    MultipleResultsFound,
    NoResultFound,
    NotSupportedError,
    OperationalError,
    PendingRollbackError,
    ProgrammingError,
    StaleDataError,
    Warning,
)
from cmbagent_db.models import (
    ActiveConnection,
    ApprovalRequest,
    Model,
    Session,
    SessionState,
    WorkflowRun,
)


def dispose_engines() -> None:
    """Closes the idle pooled connections of every URL at once (a connection an open
    session holds is closed when the session gives it back), and, once
    ``cmbagent_db.sqlalchemy`` is in use, those of the engines its ``get_db_session``
    made. Sessions used afterwards still work, as after SQLAlchemy's ``engine.dispose()``."""
    bridge = sys.modules.get("cmbagent_db.sqlalchemy.session")
    if bridge is not None:
        bridge.dispose_engines()
    _native.dispose_engines()


__all__ = [
    "__version__",
    "SQLiteLibraryWarning",
    "models",
    "approvals",
    "connections",
    "get_db_session",
    "init_database",
    "migrate",
    "current",
    "foreign_revisions",
    "history",
    "revision_info",
    "stamp",
    "migration_sql",
    "applied",
    "check",
    "default_url",
    "redact_url",
    "dispose_engines",
    "object_session",
    "and_",
    "or_",
    "not_",
    "func",
    "aliased",
    "selectinload",
    "joinedload",
    "DbSession",
    "Query",
    "Column",
    "Expression",
    "Ordering",
    "Aggregate",
    "AliasedClass",
    "Relationship",
    "RelationshipList",
    "LoadOption",
    "Model",
    "Session",
    "WorkflowRun",
    "SessionState",
    "ApprovalRequest",
    "ActiveConnection",
    "Warning",
    "Error",
    "InterfaceError",
    "DatabaseError",
    "DataError",
    "OperationalError",
    "IntegrityError",
    "InternalError",
    "ProgrammingError",
    "NotSupportedError",
    "MigrationError",
    "InvalidRequestError",
    "NoResultFound",
    "MultipleResultsFound",
    "PendingRollbackError",
    "StaleDataError",
    "ApprovalError",
    "ApprovalNotFound",
    "ApprovalExpired",
    "ApprovalCancelled",
    "ApprovalTimeout",
]
