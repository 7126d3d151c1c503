"""The exceptions cmbagent_db raises, in the PEP 249 shape.

Database errors are mapped from SQLite result codes and PostgreSQL SQLSTATEs: a foreign-key
or unique violation is an IntegrityError, a locked database or a lost connection an
OperationalError. Value checks raise the builtin TypeError / ValueError, or DataError for a
string longer than its column allows.
"""

from __future__ import annotations

import builtins


class Warning(builtins.Warning):  # noqa: A001 - the PEP 249 name
    """Important warnings (PEP 249; an Exception, and a warnings category). Issued with
    ``warnings.warn`` when a session opens a database whose applied revision SQL differs
    from this build's (see ``cmbagent-db check``)."""


class Error(Exception):
    """Base class of every error cmbagent_db raises for a database or API condition."""


class InterfaceError(Error):
    """A problem with how the database is addressed: a malformed URL or URL parameter."""


class DatabaseError(Error):
    """An error reported by (or about) the database."""


class DataError(DatabaseError):
    """A value the column cannot hold: a string over its declared length, a number out of range."""


class OperationalError(DatabaseError):
    """The database could not do the work: locked, unreachable, connection lost, no such table."""


class IntegrityError(DatabaseError):
    """A constraint refused the change: missing parent row, duplicate key, NOT NULL."""


class InternalError(DatabaseError):
    """The database reported an internal error."""


class ProgrammingError(DatabaseError):
    """The SQL sent was wrong (a bug: please report it)."""


class NotSupportedError(DatabaseError):
    """A feature or URL scheme this package does not support."""


class MigrationError(Error):
    """A migration cannot proceed: unknown revision, a database from a newer build, drift, or a
    downgrade that would destroy rows without force."""


class InvalidRequestError(Error):
    """The API was used in a way it does not support (as SQLAlchemy's of the same name)."""


class NoResultFound(InvalidRequestError):
    """``one()`` found no row."""


class MultipleResultsFound(InvalidRequestError):
    """``one()`` / ``one_or_none()`` found more than one row."""


class PendingRollbackError(InvalidRequestError):
    """The session's transaction failed; call ``rollback()`` before using it again."""


class StaleDataError(Error):
    """An UPDATE matched no row: the object's row was deleted underneath it."""


class ApprovalError(Error):
    """Base class of the approval lifecycle errors."""


class ApprovalNotFound(ApprovalError, LookupError):
    """No approval request has that id."""


class ApprovalExpired(ApprovalError):
    """The approval request's deadline passed before anyone resolved it."""


class ApprovalCancelled(ApprovalError):
    """The approval request was cancelled before anyone resolved it."""


class ApprovalTimeout(ApprovalError, TimeoutError):
    """The caller's wait ended before the request was resolved; the request stays pending."""


__all__ = [
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
