//! Python values <-> [`Value`], checked against the column's declared type. Checks are
//! explicit and ordered (`bool` before `int`, since `bool` is an `int` in Python).

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Utc};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyBytes, PyDateAccess, PyDateTime, PyDelta, PyDeltaAccess, PyInt, PyList, PyString,
    PyTimeAccess, PyTzInfoAccess,
};

use crate::error::ErrorKind;
use crate::expr::ColRef;
use crate::python::errors::raise;
use crate::python::json;
use crate::schema::{ColType, TABLES};
use crate::value::Value;

pub fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn wrong_type(col: ColRef, expected: &str, v: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!(
        "{} expects {expected}, got {} {}",
        col.qualified(),
        type_name(v),
        v.repr().map(|r| r.to_string()).unwrap_or_default()
    ))
}

/// Whether a Python value is checked for the column's declared length.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Written to the database: lengths are enforced.
    Store,
    /// Compared in a filter: an over-long value simply matches nothing.
    Compare,
}

/// The Python value as a [`Value`] for column `col`, or a TypeError / ValueError /
/// DataError that names the column.
pub fn to_value(col: ColRef, v: &Bound<'_, PyAny>, purpose: Purpose) -> PyResult<Value> {
    if v.is_none() {
        return Ok(Value::Null);
    }
    let column = &TABLES[col.table].columns[col.column];
    match column.ty {
        ColType::Str(_) | ColType::Text => {
            let s = v
                .cast::<PyString>()
                .map_err(|_| wrong_type(col, "a str", v))?;
            if let (ColType::Str(max), Purpose::Store) = (column.ty, purpose) {
                let len = s.len()?;
                if len > max {
                    return Err(raise(
                        ErrorKind::Data,
                        format!(
                            "{} is limited to {max} characters; got {len}",
                            col.qualified()
                        ),
                    ));
                }
            }
            let text = s
                .to_str()
                .map_err(|e| PyValueError::new_err(format!("{}: {e}", col.qualified())))?;
            Ok(Value::Text(text.to_owned()))
        }
        ColType::Integer | ColType::BigInt => {
            if v.is_instance_of::<PyBool>() || !v.is_instance_of::<PyInt>() {
                return Err(wrong_type(col, "an int", v));
            }
            v.extract::<i64>().map(Value::Int).map_err(|_| {
                raise(
                    ErrorKind::Data,
                    format!(
                        "{} cannot hold {v} (out of the 64-bit range)",
                        col.qualified()
                    ),
                )
            })
        }
        ColType::Boolean => {
            if let Ok(b) = v.cast::<PyBool>() {
                return Ok(Value::Bool(b.is_true()));
            }
            match (v.is_instance_of::<PyInt>(), v.extract::<i64>()) {
                (true, Ok(0)) => Ok(Value::Bool(false)),
                (true, Ok(1)) => Ok(Value::Bool(true)),
                _ => Err(wrong_type(col, "a bool", v)),
            }
        }
        ColType::Timestamp { .. } => {
            let dt = v
                .cast::<PyDateTime>()
                .map_err(|_| wrong_type(col, "a datetime", v))?;
            utc_of(dt).map(Value::Timestamp).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "{}: {v} cannot be expressed in UTC",
                    col.qualified()
                ))
            })
        }
        ColType::Json => {
            let py = v.py();
            match json::dumps(v) {
                Ok(text) => Ok(Value::Json(text)),
                Err(e) => {
                    let msg = format!(
                        "{} takes only what json can encode: {}",
                        col.qualified(),
                        e.value(py)
                    );
                    if e.is_instance_of::<PyTypeError>(py) {
                        Err(PyTypeError::new_err(msg))
                    } else {
                        Err(PyValueError::new_err(msg))
                    }
                }
            }
        }
    }
}

/// The UTC instant of a datetime; a naive one is taken as UTC.
fn utc_of(dt: &Bound<'_, PyDateTime>) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::new(
        NaiveDate::from_ymd_opt(dt.get_year(), dt.get_month().into(), dt.get_day().into())?,
        NaiveTime::from_hms_micro_opt(
            dt.get_hour().into(),
            dt.get_minute().into(),
            dt.get_second().into(),
            dt.get_microsecond(),
        )?,
    );
    let offset = match dt.get_tzinfo() {
        None => TimeDelta::zero(),
        Some(_) => {
            let off = dt.call_method0("utcoffset").ok()?;
            match off.cast::<PyDelta>() {
                Ok(d) => {
                    TimeDelta::days(d.get_days().into())
                        + TimeDelta::seconds(d.get_seconds().into())
                        + TimeDelta::microseconds(d.get_microseconds().into())
                }
                Err(_) => TimeDelta::zero(),
            }
        }
    };
    // In UTC it must still be a datetime Python can hold (years 1-9999).
    naive
        .checked_sub_signed(offset)
        .map(|n| n.and_utc())
        .filter(|t| (1..=9999).contains(&t.year()))
}

/// A [`Value`] read from the database as the Python object the column holds.
pub fn to_py(py: Python<'_>, v: &Value, col: ColRef) -> PyResult<Py<PyAny>> {
    to_py_from(py, v, &|| col.qualified())
}

/// A [`Value`] as a Python object; `origin` names where it came from in an error message.
pub fn to_py_from(py: Python<'_>, v: &Value, origin: &dyn Fn() -> String) -> PyResult<Py<PyAny>> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        Value::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        Value::Float(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
        Value::Text(s) => PyString::new(py, s).into_any().unbind(),
        Value::Timestamp(t) if !(1..=9999).contains(&t.year()) => {
            return Err(raise(
                ErrorKind::Data,
                format!(
                    "{} holds {t}, outside the years 1-9999 a Python datetime can hold",
                    origin()
                ),
            ))
        }
        Value::Timestamp(t) => t.into_pyobject(py)?.into_any().unbind(),
        Value::Json(s) => json::loads(py, s)
            .map_err(|e| {
                raise(
                    ErrorKind::Data,
                    format!("{} holds text that is not JSON: {}", origin(), e.value(py)),
                )
            })?
            .unbind(),
        Value::Array(members) => py_list(py, members, |m| to_py_from(py, m, origin))?,
    })
}

/// An array's members as a Python list, each converted by `member`.
pub fn py_list(
    py: Python<'_>,
    members: &[Value],
    member: impl Fn(&Value) -> PyResult<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    let items = members.iter().map(member).collect::<PyResult<Vec<_>>>()?;
    Ok(PyList::new(py, items)?.into_any().unbind())
}

/// Checks a value for `col` and returns what the attribute then holds: timestamps become
/// aware UTC datetimes, integers 0/1 for booleans become bools; the rest is kept as given.
pub fn normalise(col: ColRef, v: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    if TABLES[col.table].columns[col.column].ty == ColType::Json {
        return match json::check(v) {
            Ok(()) => Ok(v.clone().unbind()),
            Err((is_type, why)) => {
                let msg = format!("{} takes only what json can encode: {why}", col.qualified());
                Err(if is_type {
                    PyTypeError::new_err(msg)
                } else {
                    PyValueError::new_err(msg)
                })
            }
        };
    }
    let value = to_value(col, v, Purpose::Store)?;
    let py = v.py();
    Ok(match (&TABLES[col.table].columns[col.column].ty, value) {
        (ColType::Timestamp { .. } | ColType::Boolean, value) => to_py(py, &value, col)?,
        _ => v.clone().unbind(),
    })
}
