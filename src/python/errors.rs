//! `Error` -> the Python exception class its kind names in `cmbagent_db.exceptions`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::{Error, ErrorKind};

static EXCEPTIONS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module = EXCEPTIONS.get_or_try_init(py, || {
        py.import("cmbagent_db.exceptions").map(Bound::unbind)
    })?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e.kind {
            ErrorKind::Type => PyTypeError::new_err(e.message),
            ErrorKind::Value => PyValueError::new_err(e.message),
            kind => Python::attach(|py| match class(py, kind.class_name()) {
                Ok(cls) => PyErr::from_type(cls, e.message),
                Err(lookup) => PyRuntimeError::new_err(format!(
                    "{} (and cmbagent_db.exceptions.{} could not be loaded: {lookup})",
                    e.message,
                    kind.class_name()
                )),
            }),
        }
    }
}

/// Raises the named `cmbagent_db.exceptions` class with `message`.
pub fn raise(kind: ErrorKind, message: impl Into<String>) -> PyErr {
    Error::new(kind, message).into()
}
