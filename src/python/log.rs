//! Drains the core's statement records into Python's `logging`, under `cmbagent_db.sql`:
//! INFO for echoed statements, WARNING for slow or failed ones. Values, where the URL lets
//! them be logged (see `trace`), are shown shortened; URLs in messages are already redacted.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::trace::{self, Level};
use crate::value::Value;

static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// Longest rendering of one parameter in a log line.
const SHOWN: usize = 200;

fn shown(v: &Value) -> String {
    let s = match v {
        Value::Null => "None".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bytes(b) => format!("<{} bytes>", b.len()),
        Value::Text(s) | Value::Json(s) => format!("{s:?}"),
        Value::Timestamp(t) => t.to_rfc3339(),
        Value::Array(members) => format!("<array of {}>", members.len()),
    };
    match s.char_indices().nth(SHOWN) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Logs every waiting record. Logging must never turn a result into an error, so a
/// failure to log is dropped.
pub fn flush(py: Python<'_>) {
    let records = trace::drain();
    if records.is_empty() {
        return;
    }
    let Ok(logger) = LOGGER.get_or_try_init(py, || {
        py.import("logging")?
            .call_method1("getLogger", ("cmbagent_db.sql",))
            .map(Bound::unbind)
    }) else {
        return;
    };
    let logger = logger.bind(py);
    for r in records {
        let ms = r.elapsed.as_secs_f64() * 1000.0;
        let params = match &r.params {
            Some(values) => {
                let shown: Vec<String> = values.iter().map(shown).collect();
                format!("[{}]", shown.join(", "))
            }
            None => "[values hidden]".to_string(),
        };
        let _ = match r.level {
            Level::Info => logger.call_method1("info", ("%s %s (%.3f ms)", r.sql, params, ms)),
            Level::Slow => logger.call_method1(
                "warning",
                ("slow statement (%.3f ms): %s %s", ms, r.sql, params),
            ),
            Level::Failed(why) => logger.call_method1(
                "warning",
                ("statement failed (%s): %s %s", why, r.sql, params),
            ),
        };
    }
}
