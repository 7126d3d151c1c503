//! JSON columns: checked when assigned, encoded once when written, decoded when read.
//!
//! The stored text is exactly what SQLAlchemy stores, `json.dumps(value)` with its default
//! separators and `ensure_ascii`, so either side reads the other's rows byte for byte.
//! Values built from the exact builtin types (dict, list, tuple, str, int, float, bool,
//! None) are encoded here, in one walk; anything else (subclasses, strings holding lone
//! surrogates, integers Python will not print) goes to Python's own `json.dumps`, which
//! is also what raises for values it refuses.

use std::fmt::Write;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::python::convert::type_name;
use crate::value::json_string;

/// How deep a JSON value may nest: deeper is refused (as is a value that contains itself).
const MAX_DEPTH: usize = 512;

/// `json.dumps` / `json.loads`, looked up once.
struct Json {
    dumps: Py<PyAny>,
    dumps_kwargs: Py<PyDict>,
    loads: Py<PyAny>,
}

static JSON: PyOnceLock<Json> = PyOnceLock::new();

fn json(py: Python<'_>) -> PyResult<&Json> {
    JSON.get_or_try_init(py, || {
        let m = py.import("json")?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("allow_nan", false)?;
        Ok(Json {
            dumps: m.getattr("dumps")?.unbind(),
            dumps_kwargs: kwargs.unbind(),
            loads: m.getattr("loads")?.unbind(),
        })
    })
}

/// `json.dumps(v, allow_nan=False)`.
pub fn dumps(v: &Bound<'_, PyAny>) -> PyResult<String> {
    let mut out = String::new();
    if encode(v, &mut out, 0).is_some() {
        return Ok(out);
    }
    let py = v.py();
    let j = json(py)?;
    j.dumps
        .bind(py)
        .call((v,), Some(j.dumps_kwargs.bind(py)))?
        .extract::<String>()
}

/// `json.loads(text)`.
pub fn loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    json(py)?.loads.bind(py).call1((text,))
}

/// Appends `json.dumps(v)` to `out`; `None` (and `out` half written) for a value outside
/// the exact builtin types, a non-finite float, or one nested deeper than `MAX_DEPTH`.
fn encode(v: &Bound<'_, PyAny>, out: &mut String, depth: usize) -> Option<()> {
    if depth > MAX_DEPTH {
        return None;
    }
    if let Ok(s) = v.cast_exact::<PyString>() {
        json_string(s.to_str().ok()?, out);
        return Some(());
    }
    if other_scalar(v, out)? {
        return Some(());
    }
    if let Ok(d) = v.cast_exact::<PyDict>() {
        out.push('{');
        for (n, (k, item)) in d.iter().enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            key(&k, out)?;
            out.push_str(": ");
            encode(&item, out, depth + 1)?;
        }
        out.push('}');
    } else if let Ok(l) = v.cast_exact::<PyList>() {
        items(l.iter(), out, depth)?;
    } else if let Ok(t) = v.cast_exact::<PyTuple>() {
        items(t.iter(), out, depth)?;
    } else {
        return None;
    }
    Some(())
}

fn items<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    out: &mut String,
    depth: usize,
) -> Option<()> {
    out.push('[');
    for (n, item) in items.enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        encode(&item, out, depth + 1)?;
    }
    out.push(']');
    Some(())
}

/// A dict key: str as is; float, int, bool and None by their JSON text, as a string.
fn key(k: &Bound<'_, PyAny>, out: &mut String) -> Option<()> {
    if let Ok(s) = k.cast_exact::<PyString>() {
        json_string(s.to_str().ok()?, out);
        return Some(());
    }
    let mut text = String::new();
    if !other_scalar(k, &mut text)? {
        return None;
    }
    json_string(&text, out);
    Some(())
}

/// `null`, `true` / `false`, an int or a float, as json writes them: `Some(true)`;
/// `Some(false)` (nothing written) for any other value; `None` for a number json refuses.
fn other_scalar(v: &Bound<'_, PyAny>, out: &mut String) -> Option<bool> {
    if v.is_none() {
        out.push_str("null");
    } else if let Ok(b) = v.cast_exact::<PyBool>() {
        out.push_str(if b.is_true() { "true" } else { "false" });
    } else if let Ok(i) = v.cast_exact::<PyInt>() {
        int(i, out)?;
    } else if let Ok(f) = v.cast_exact::<PyFloat>() {
        float(f, out)?;
    } else {
        return Some(false);
    }
    Some(true)
}

fn int(i: &Bound<'_, PyInt>, out: &mut String) -> Option<()> {
    match i.extract::<i64>() {
        Ok(n) => write!(out, "{n}").ok(),
        // Beyond 64 bits, Python prints it (or refuses past its digit limit).
        Err(_) => {
            out.push_str(i.str().ok()?.to_str().ok()?);
            Some(())
        }
    }
}

/// `float.__repr__`, as json uses; NaN and infinities are refused.
fn float(f: &Bound<'_, PyFloat>, out: &mut String) -> Option<()> {
    if !f.value().is_finite() {
        return None;
    }
    out.push_str(f.repr().ok()?.to_str().ok()?);
    Some(())
}

/// Refuses what `json.dumps(v, allow_nan=False)` would refuse, without encoding: a column
/// assignment is checked at once, and the value is encoded once, when it is written.
/// `Err((true, why))` is a type problem (TypeError), `Err((false, why))` a value problem.
pub fn check(v: &Bound<'_, PyAny>) -> Result<(), (bool, String)> {
    check_at(v, 0)
}

fn check_at(v: &Bound<'_, PyAny>, depth: usize) -> Result<(), (bool, String)> {
    if depth > MAX_DEPTH {
        return Err((
            false,
            format!("nested more than {MAX_DEPTH} levels deep, or circular"),
        ));
    }
    let finite = |f: f64| {
        if f.is_finite() {
            Ok(())
        } else {
            Err((
                false,
                format!("Out of range float values are not JSON compliant: {f}"),
            ))
        }
    };
    if v.is_none()
        || v.is_instance_of::<PyBool>()
        || v.is_instance_of::<PyInt>()
        || v.is_instance_of::<PyString>()
    {
        return Ok(());
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        return finite(f.value());
    }
    if let Ok(d) = v.cast::<PyDict>() {
        // A snapshot of the items, as json takes: checking a value may run Python code
        // (a list subclass's __iter__) that changes the dict.
        for pair in d.items().iter() {
            let (k, item) = pair
                .extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>()
                .map_err(|e| (true, e.to_string()))?;
            if let Ok(f) = k.cast::<PyFloat>() {
                finite(f.value())?;
            } else if !(k.is_none()
                || k.is_instance_of::<PyBool>()
                || k.is_instance_of::<PyInt>()
                || k.is_instance_of::<PyString>())
            {
                return Err((
                    true,
                    format!(
                        "keys must be str, int, float, bool or None, not {}",
                        type_name(&k)
                    ),
                ));
            }
            check_at(&item, depth + 1)?;
        }
        return Ok(());
    }
    if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        for item in v.try_iter().map_err(|e| (true, e.to_string()))? {
            check_at(&item.map_err(|e| (true, e.to_string()))?, depth + 1)?;
        }
        return Ok(());
    }
    Err((
        true,
        format!("Object of type {} is not JSON serializable", type_name(v)),
    ))
}
