//! Statement tracing for Python's `logging`: every statement, and the failed ones, when a
//! URL asks for `echo=true` (SQLAlchemy's `echo`), and the slow ones always. Bound values
//! (approval contexts, `meta`, feedback) are logged only with echo on and
//! `hide_parameters` off; without echo a failed statement logs nothing (the exception
//! tells the caller), since a driver's message can quote values.
//!
//! Connections run with the GIL released, so they cannot log themselves: they record into
//! a process-wide buffer, and the binding drains it into the `cmbagent_db.sql` logger when
//! it holds the GIL again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::value::Value;

/// Statements slower than this are logged as warnings even without echo.
pub const SLOW: Duration = Duration::from_secs(1);

/// At most this many records wait for the binding; older ones are dropped first.
const CAPACITY: usize = 10_000;

/// What a connection logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Echo {
    /// Only slow statements, without their values.
    #[default]
    Off,
    /// Every statement and failure, without values (`echo=true&hide_parameters=true`).
    Statements,
    /// Every statement and failure with its values (`echo=true`).
    WithValues,
}

impl Echo {
    pub fn new(echo: bool, hide_parameters: bool) -> Echo {
        match (echo, hide_parameters) {
            (false, _) => Echo::Off,
            (true, true) => Echo::Statements,
            (true, false) => Echo::WithValues,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Level {
    /// Echo of a statement that went well.
    Info,
    Slow,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub level: Level,
    pub sql: String,
    /// The bound values, where the URL lets them be logged.
    pub params: Option<Vec<Value>>,
    pub elapsed: Duration,
}

static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());

/// Runs one statement, recording it as `echo` asks, and when it was slow.
pub fn traced<T>(
    echo: Echo,
    sql: &str,
    params: &[Value],
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let result = run();
    let elapsed = started.elapsed();
    let level = match &result {
        // A driver's message can quote values (PostgreSQL's "Key (id)=(...)"): without
        // values, only the exception's class.
        Err(e) if echo == Echo::WithValues => Some(Level::Failed(e.message.clone())),
        Err(e) if echo == Echo::Statements => Some(Level::Failed(e.kind.class_name().to_string())),
        Err(_) => None,
        Ok(_) if elapsed >= SLOW => Some(Level::Slow),
        Ok(_) if echo != Echo::Off => Some(Level::Info),
        Ok(_) => None,
    };
    if let Some(level) = level {
        let mut records = RECORDS.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= CAPACITY {
            records.remove(0);
        }
        records.push(Record {
            level,
            sql: sql.to_string(),
            params: (echo == Echo::WithValues).then(|| params.to_vec()),
            elapsed,
        });
    }
    result
}

/// Takes every record waiting to be logged.
pub fn drain() -> Vec<Record> {
    std::mem::take(&mut *RECORDS.lock().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, ErrorKind};

    fn fail(echo: Echo) {
        let _ = traced(
            echo,
            "SELECT ?1",
            &[Value::Text("secret".into())],
            || -> Result<()> {
                Err(Error::new(
                    ErrorKind::Integrity,
                    "Key (task_id)=(secret) already exists",
                ))
            },
        );
    }

    // One test: the record buffer is process-wide.
    #[test]
    fn values_and_failures_are_recorded_only_as_echo_asks() {
        drain();
        traced(Echo::Off, "SELECT 1", &[], || Ok(())).unwrap();
        fail(Echo::Off);
        assert!(drain().is_empty());
        traced(Echo::WithValues, "SELECT ?1", &[Value::Int(1)], || Ok(())).unwrap();
        fail(Echo::WithValues);
        traced(Echo::Statements, "SELECT ?1", &[Value::Int(2)], || Ok(())).unwrap();
        fail(Echo::Statements);
        let got = drain();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].level, Level::Info);
        assert_eq!(got[0].params, Some(vec![Value::Int(1)]));
        assert!(matches!(&got[1].level, Level::Failed(m) if m.contains("already exists")));
        assert_eq!(got[1].params, Some(vec![Value::Text("secret".into())]));
        assert_eq!(
            (got[2].params.as_ref(), got[3].params.as_ref()),
            (None, None)
        );
    }
}
