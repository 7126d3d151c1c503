//! The one error type of the crate, and how database errors map onto the PEP 249 classes.

use std::fmt;

/// Which exception class of `cmbagent_db.exceptions` an [`Error`] becomes in Python.
///
/// Kept separate from the error itself so the mapping from SQLite result codes and
/// PostgreSQL SQLSTATEs can be tested without Python.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Interface,
    Data,
    Operational,
    Integrity,
    Internal,
    Programming,
    NotSupported,
    Migration,
    InvalidRequest,
    NoResultFound,
    MultipleResultsFound,
    PendingRollback,
    StaleData,
    ApprovalNotFound,
    ApprovalExpired,
    ApprovalCancelled,
    ApprovalTimeout,
    /// A Python `TypeError`: a value of the wrong type for a column.
    Type,
    /// A Python `ValueError`: a value of the right type that is out of range.
    Value,
}

impl ErrorKind {
    /// The name of the Python exception class this kind is raised as.
    pub fn class_name(self) -> &'static str {
        match self {
            ErrorKind::Interface => "InterfaceError",
            ErrorKind::Data => "DataError",
            ErrorKind::Operational => "OperationalError",
            ErrorKind::Integrity => "IntegrityError",
            ErrorKind::Internal => "InternalError",
            ErrorKind::Programming => "ProgrammingError",
            ErrorKind::NotSupported => "NotSupportedError",
            ErrorKind::Migration => "MigrationError",
            ErrorKind::InvalidRequest => "InvalidRequestError",
            ErrorKind::NoResultFound => "NoResultFound",
            ErrorKind::MultipleResultsFound => "MultipleResultsFound",
            ErrorKind::PendingRollback => "PendingRollbackError",
            ErrorKind::StaleData => "StaleDataError",
            ErrorKind::ApprovalNotFound => "ApprovalNotFound",
            ErrorKind::ApprovalExpired => "ApprovalExpired",
            ErrorKind::ApprovalCancelled => "ApprovalCancelled",
            ErrorKind::ApprovalTimeout => "ApprovalTimeout",
            ErrorKind::Type => "TypeError",
            ErrorKind::Value => "ValueError",
        }
    }
}

/// An error with the class it maps to and a message a person can act on.
///
/// Messages never contain a password: URLs are redacted before they reach one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn interface(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Interface, m)
    }
    pub fn operational(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Operational, m)
    }
    pub fn migration(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Migration, m)
    }
    pub fn data(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Data, m)
    }
    pub fn not_supported(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, m)
    }

    /// The same error with `context: ` put before its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ffi::ErrorCode as C;
        let kind = match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::ConstraintViolation => ErrorKind::Integrity,
                C::TooBig | C::TypeMismatch => ErrorKind::Data,
                C::InternalMalfunction | C::ApiMisuse => ErrorKind::Internal,
                C::NoLargeFileSupport | C::AuthorizationForStatementDenied => {
                    ErrorKind::NotSupported
                }
                C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen
                | C::NotADatabase
                | C::ReadOnly
                | C::SystemIoFailure
                | C::DatabaseCorrupt
                | C::DiskFull
                | C::FileLockingProtocolFailed
                | C::SchemaChanged
                | C::OperationInterrupted
                | C::OutOfMemory
                | C::PermissionDenied => ErrorKind::Operational,
                // SQLITE_ERROR covers "no such table" and friends; Python's sqlite3
                // raises OperationalError for it too.
                _ => ErrorKind::Operational,
            },
            rusqlite::Error::InvalidParameterCount(..) => ErrorKind::Programming,
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => ErrorKind::Data,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, sqlite_message(&e))
    }
}

fn sqlite_message(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(f, Some(msg)) => {
            if f.code == rusqlite::ffi::ErrorCode::DatabaseBusy
                || f.code == rusqlite::ffi::ErrorCode::DatabaseLocked
            {
                format!("{msg} (another connection holds the write lock longer than the busy timeout; raise it with ?timeout=SECONDS in the URL)")
            } else if f.code == rusqlite::ffi::ErrorCode::ReadOnly {
                format!("{msg} (the URL opens it read-only with mode=ro / immutable=1, or the file or its directory is not writable)")
            } else {
                msg.clone()
            }
        }
        other => other.to_string(),
    }
}

/// PEP 249 class for a PostgreSQL SQLSTATE.
pub fn kind_for_sqlstate(code: &str) -> ErrorKind {
    match code.get(..2).unwrap_or("") {
        "23" => ErrorKind::Integrity,
        "22" => ErrorKind::Data,
        "42" | "26" | "34" | "3D" | "3F" => ErrorKind::Programming,
        "0A" => ErrorKind::NotSupported,
        "XX" => ErrorKind::Internal,
        "08" | "53" | "54" | "55" | "57" | "58" | "40" | "25" | "28" => ErrorKind::Operational,
        _ => ErrorKind::Operational,
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let mut message = db.message().to_string();
                if let Some(detail) = db.detail() {
                    message.push_str(": ");
                    message.push_str(detail);
                }
                Error::new(kind_for_sqlstate(db.code().code()), message)
            }
            // No SQLSTATE: the connection itself failed (refused, closed, reset, timed
            // out). The driver's own text names only the stage; the causes say why.
            None => {
                let mut message = format!("PostgreSQL connection error: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    let text = c.to_string();
                    if !message.contains(&text) {
                        message.push_str(": ");
                        message.push_str(&text);
                    }
                    cause = c.source();
                }
                Error::operational(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_err(sql: &str) -> Error {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "PRAGMA foreign_keys=ON; CREATE TABLE p(id TEXT PRIMARY KEY);
             CREATE TABLE c(id TEXT PRIMARY KEY, p TEXT NOT NULL REFERENCES p(id));",
        )
        .unwrap();
        c.execute_batch(sql).unwrap_err().into()
    }

    #[test]
    fn sqlite_constraint_failures_are_integrity_errors() {
        assert_eq!(
            sqlite_err("INSERT INTO c VALUES ('1', 'missing')").kind,
            ErrorKind::Integrity
        );
        assert_eq!(
            sqlite_err("INSERT INTO p VALUES ('1'); INSERT INTO p VALUES ('1')").kind,
            ErrorKind::Integrity
        );
        assert_eq!(
            sqlite_err("INSERT INTO c VALUES ('1', NULL)").kind,
            ErrorKind::Integrity
        );
    }

    #[test]
    fn sqlite_missing_table_is_operational() {
        let e = sqlite_err("SELECT * FROM nope");
        assert_eq!(e.kind, ErrorKind::Operational);
        assert!(e.message.contains("no such table"));
    }

    #[test]
    fn sqlstates_map_to_pep249_classes() {
        assert_eq!(kind_for_sqlstate("23503"), ErrorKind::Integrity);
        assert_eq!(kind_for_sqlstate("23505"), ErrorKind::Integrity);
        assert_eq!(kind_for_sqlstate("22001"), ErrorKind::Data);
        assert_eq!(kind_for_sqlstate("42P01"), ErrorKind::Programming);
        assert_eq!(kind_for_sqlstate("57P01"), ErrorKind::Operational);
        assert_eq!(kind_for_sqlstate("08006"), ErrorKind::Operational);
        assert_eq!(kind_for_sqlstate("XX000"), ErrorKind::Internal);
        assert_eq!(kind_for_sqlstate("0A000"), ErrorKind::NotSupported);
    }

    #[test]
    fn every_kind_names_a_python_class() {
        assert_eq!(ErrorKind::Integrity.class_name(), "IntegrityError");
        assert_eq!(ErrorKind::ApprovalTimeout.class_name(), "ApprovalTimeout");
        assert_eq!(ErrorKind::Type.class_name(), "TypeError");
    }
}
