//! Statement tracing for Python's `logging`: every statement when a URL asks for
//! `echo=true` (SQLAlchemy's `echo`), and always the slow and the failed ones.
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
    pub params: Vec<Value>,
    pub elapsed: Duration,
}

static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());

/// Runs one statement, recording it when `echo` is on, it was slow, or it failed.
pub fn traced<T>(
    echo: bool,
    sql: &str,
    params: &[Value],
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let result = run();
    let elapsed = started.elapsed();
    let level = match &result {
        Err(e) => Some(Level::Failed(e.message.clone())),
        Ok(_) if elapsed >= SLOW => Some(Level::Slow),
        Ok(_) if echo => Some(Level::Info),
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
            params: params.to_vec(),
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
    use crate::error::Error;

    #[test]
    fn records_echoed_and_failed_statements_only() {
        drain();
        traced(false, "SELECT 1", &[], || Ok(())).unwrap();
        assert!(drain().is_empty());
        traced(true, "SELECT ?1", &[Value::Int(1)], || Ok(())).unwrap();
        let _ = traced(false, "SELECT nope", &[], || -> Result<()> {
            Err(Error::operational("no such column: nope"))
        });
        let got = drain();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].level, Level::Info);
        assert_eq!(got[0].params, vec![Value::Int(1)]);
        assert_eq!(got[1].level, Level::Failed("no such column: nope".into()));
    }
}
