//! The model classes: a base `Model` holding one Python value per column plus what the
//! unit of work needs, and one subclass per table, all driven by `schema::TABLES`.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::gc::{PyTraverseError, PyVisit};
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyType, PyWeakrefMethods, PyWeakrefReference,
};
use pyo3::PyTypeInfo;

use crate::expr::ColRef;
use crate::python::convert::{normalise, to_py, to_value, Purpose};
use crate::python::expression::PyColumn;
use crate::python::relationship::{key_of, RelKey};
use crate::python::session::PyDbSession;
use crate::schema::{self, ColType, ColumnDefault, NullAs, RelKind, Relationship, TableId, TABLES};
use crate::unit_of_work::ObjState;
use crate::value::Value;

/// One column's value on an object: as read from the database (or defaulted) until Python
/// first asks for it, then converted once and kept; or as Python assigned it. Rows that are
/// loaded but never looked at cost no Python objects, and flushes write raw values as they
/// are.
pub enum Slot {
    Raw(Value),
    Py(Py<PyAny>),
}

/// `dict`: an instance takes plain Python attributes besides its columns, as SQLAlchemy's
/// declarative classes do (`setattr(run, "error", ...)` sets an attribute and writes nothing).
#[pyclass(module = "cmbagent_db.models", name = "Model", subclass, dict)]
pub struct PyModel {
    pub table: TableId,
    /// One slot per column of the table.
    pub values: Vec<Slot>,
    /// One bit per column assigned since the object was last written.
    pub dirty: u64,
    pub state: ObjState,
    /// The session tracking the object, if one does.
    pub session: Option<Py<PyWeakrefReference>>,
    /// Related objects loaded or assigned: a parent object or a collection per key.
    pub related: Vec<(RelKey, Py<PyAny>)>,
}

fn default_value(d: ColumnDefault) -> Value {
    match d {
        ColumnDefault::Uuid => Value::Text(uuid::Uuid::new_v4().to_string()),
        ColumnDefault::Str(s) => Value::Text(s.to_string()),
        ColumnDefault::Int(i) => Value::Int(i),
        ColumnDefault::Bool(b) => Value::Bool(b),
        // Time defaults are filled when the row is inserted.
        ColumnDefault::Now | ColumnDefault::None => Value::Null,
    }
}

/// Whether `name` is a settable attribute Python added to the model class (a relationship
/// the SQLAlchemy bridge declares, `run.workflow_steps`): the constructor leaves such a
/// keyword to the `__init__` that added it, which sets it on the new object.
fn is_added_attribute(py: Python<'_>, table: TableId, name: &str) -> PyResult<bool> {
    let cls = py
        .import("cmbagent_db.models")?
        .getattr(TABLES[table].model)?;
    match cls.getattr(name) {
        Ok(attr) => attr.get_type().hasattr("__set__"),
        Err(_) => Ok(false),
    }
}

impl PyModel {
    /// A new object: defaults first, then the keyword arguments, each checked.
    pub fn build(table: TableId, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<PyModel> {
        let t = &TABLES[table];
        let mut values: Vec<Slot> = t
            .columns
            .iter()
            .map(|c| Slot::Raw(default_value(c.default)))
            .collect();
        let mut related = Vec::new();
        if let Some(kwargs) = kwargs {
            for (k, v) in kwargs.iter() {
                let name = k.cast::<PyString>()?.to_str()?.to_owned();
                if let Some(column) = t.column_index(&name) {
                    values[column] = Slot::Py(normalise(ColRef::new(table, column), &v)?);
                    continue;
                }
                let r = t.relationships.iter().find(|r| r.name == name);
                let Some((key, parent)) = r.map(|r| initial_parent(r, &v)).transpose()? else {
                    if is_added_attribute(kwargs.py(), table, &name)? {
                        continue;
                    }
                    return Err(PyTypeError::new_err(format!(
                        "{name:?} is an invalid keyword argument for {}; its columns are {}",
                        t.model,
                        t.column_names()
                    )));
                };
                let fk = match &parent {
                    Some((pk, _)) => Value::Text(pk.clone()),
                    None => Value::Null,
                };
                values[key.2] = Slot::Raw(fk);
                related.retain(|(k, _)| *k != key);
                if let Some((_, obj)) = parent {
                    related.push((key, obj));
                }
            }
        }
        Ok(PyModel {
            table,
            values,
            related,
            dirty: 0,
            state: ObjState::Transient,
            session: None,
        })
    }

    /// An object for a row just read from the database.
    pub fn loaded(
        table: TableId,
        row: Vec<Value>,
        session: Option<Py<PyWeakrefReference>>,
    ) -> PyModel {
        PyModel {
            table,
            values: row.into_iter().map(Slot::Raw).collect(),
            dirty: 0,
            state: ObjState::Persistent,
            session,
            related: Vec::new(),
        }
    }

    /// The related object or collection cached under `key`.
    pub fn cached(&self, key: RelKey) -> Option<&Py<PyAny>> {
        self.related.iter().find(|(k, _)| *k == key).map(|(_, o)| o)
    }

    /// Caches `obj` under `key`, or forgets what was cached with `None`.
    pub fn set_cached(&mut self, key: RelKey, obj: Option<Py<PyAny>>) {
        self.related.retain(|(k, _)| *k != key);
        if let Some(obj) = obj {
            self.related.push((key, obj));
        }
    }

    /// The session tracking the object, while it is open.
    pub fn session<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyDbSession>> {
        let weak = self.session.as_ref()?.bind(py);
        let alive = weak.upgrade()?;
        alive.cast_into::<PyDbSession>().ok()
    }

    /// Assigns a checked Python value to the named column (as the constructor does).
    fn assign(&mut self, name: &str, v: &Bound<'_, PyAny>) -> PyResult<()> {
        let column = TABLES[self.table].column_index(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{}.{name} is not a column",
                TABLES[self.table].name
            ))
        })?;
        self.values[column] = Slot::Py(normalise(ColRef::new(self.table, column), v)?);
        Ok(())
    }

    /// The primary key as text, if it is one.
    pub fn pk(&self, py: Python<'_>) -> Option<String> {
        self.text(py, schema::Table::PK)
    }

    /// A text column's value, without making a Python object for it.
    pub fn text(&self, py: Python<'_>, column: usize) -> Option<String> {
        match &self.values[column] {
            Slot::Raw(Value::Text(s)) => Some(s.clone()),
            Slot::Raw(_) => None,
            Slot::Py(o) => o.extract::<String>(py).ok(),
        }
    }

    pub fn is_null(&self, py: Python<'_>, column: usize) -> bool {
        match &self.values[column] {
            Slot::Raw(v) => v.is_null(),
            Slot::Py(o) => o.is_none(py),
        }
    }

    /// The column's value for SQL: a raw one as it is, an assigned one checked and converted.
    pub fn value(&self, py: Python<'_>, column: usize) -> PyResult<Value> {
        match &self.values[column] {
            Slot::Raw(v) => Ok(v.clone()),
            Slot::Py(o) => to_value(ColRef::new(self.table, column), o.bind(py), Purpose::Store),
        }
    }

    /// The attribute's Python value, converted from the raw one on first access and kept, so
    /// a JSON value read once is the same (mutable) object afterwards.
    pub fn get(&mut self, py: Python<'_>, column: usize) -> PyResult<Py<PyAny>> {
        let obj = match &self.values[column] {
            Slot::Py(o) => return Ok(o.clone_ref(py)),
            Slot::Raw(v) => to_py(py, v, ColRef::new(self.table, column))?,
        };
        self.values[column] = Slot::Py(obj.clone_ref(py));
        Ok(obj)
    }
}

#[pymethods]
impl PyModel {
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for slot in &self.values {
            if let Slot::Py(o) = slot {
                visit.call(o)?;
            }
        }
        for (_, o) in &self.related {
            visit.call(o)?;
        }
        Ok(())
    }

    fn __clear__(&mut self) {
        self.related.clear();
    }

    /// The object as a dict for API responses: timestamps as ISO strings.
    #[pyo3(name = "to_dict")]
    fn dict<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = &TABLES[self.table];
        let all: Vec<(&str, NullAs)> = match t.to_dict {
            Some(keys) => keys.to_vec(),
            None => t.columns.iter().map(|c| (c.name, NullAs::None)).collect(),
        };
        let d = PyDict::new(py);
        for (name, null_as) in all {
            let i = t.column_index(name).ok_or_else(|| {
                PyValueError::new_err(format!("{}.{name} is not a column", t.name))
            })?;
            let v = self.get(py, i)?.into_bound(py);
            let out = if v.is_none() {
                match null_as {
                    NullAs::None => v.clone(),
                    NullAs::EmptyList => PyList::empty(py).into_any(),
                    NullAs::EmptyDict => PyDict::new(py).into_any(),
                }
            } else if matches!(t.columns[i].ty, ColType::Timestamp { .. }) {
                v.call_method0("isoformat")?
            } else {
                v.clone()
            };
            d.set_item(name, out)?;
        }
        Ok(d)
    }

    fn __repr__(&mut self, py: Python<'_>) -> PyResult<String> {
        let t = &TABLES[self.table];
        let mut parts = vec![format!("id={}", self.get(py, 0)?.bind(py).repr()?)];
        for name in t.repr {
            if let Some(i) = t.column_index(name) {
                parts.push(format!("{name}={}", self.get(py, i)?.bind(py).repr()?));
            }
        }
        Ok(format!("<{} {}>", t.model, parts.join(" ")))
    }
}

/// A many-to-one relationship given to a constructor (`WorkflowRun(session=s)`): the
/// parent's key and the parent, or `None` for `None`. A collection cannot be given there.
#[allow(clippy::type_complexity)]
fn initial_parent(
    r: &Relationship,
    v: &Bound<'_, PyAny>,
) -> PyResult<(RelKey, Option<(String, Py<PyAny>)>)> {
    let what = format!("{}.{}", TABLES[r.child].model, r.name);
    if r.kind == RelKind::ToChildren {
        return Err(PyTypeError::new_err(format!(
            "{} is a collection; append to it after building the object",
            r.name
        )));
    }
    let key = key_of(r);
    if v.is_none() {
        return Ok((key, None));
    }
    let py = v.py();
    match v.cast::<PyModel>() {
        Ok(m) if m.borrow().table == r.parent() => {
            let pk = m.borrow().pk(py).ok_or_else(|| {
                PyValueError::new_err(format!("{what} was given an object without an id"))
            })?;
            Ok((key, Some((pk, v.clone().unbind()))))
        }
        _ => Err(PyTypeError::new_err(format!(
            "{what} takes {} objects, got {}",
            TABLES[r.parent()].model,
            v.repr()?
        ))),
    }
}

/// `timeout_seconds` of `create_pending`: a positive, finite number of seconds. Its own
/// type, so the default (300 s) is distinguishable from an explicit `None`, which is refused.
pub struct Timeout(f64);

impl<'a, 'py> FromPyObject<'a, 'py> for Timeout {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        timeout_seconds(&obj).map(Timeout)
    }
}

fn timeout_seconds(v: &Bound<'_, PyAny>) -> PyResult<f64> {
    let number = !v.is_instance_of::<PyBool>()
        && (v.is_instance_of::<PyInt>() || v.is_instance_of::<PyFloat>());
    if !number {
        return Err(PyTypeError::new_err(format!(
            "timeout_seconds must be a number of seconds, got {} {}",
            v.get_type().name()?,
            v.repr()?
        )));
    }
    let secs: f64 = v.extract()?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(PyValueError::new_err(format!(
            "timeout_seconds must be positive and finite, got {secs}"
        )));
    }
    Ok(secs)
}

/// The one list of model classes: `models! { RustName = "PythonName", TABLE { methods } ... }`
/// defines each class and generates `instantiate`, `add_classes` and `class_table` from
/// the same list, so a table added to the schema is added here once.
macro_rules! models {
    ($($rust:ident = $name:literal, $table:expr, { $($extra:tt)* };)*) => {
        $(
            #[pyclass(extends = PyModel, module = "cmbagent_db.models", name = $name)]
            pub struct $rust;

            #[pymethods]
            impl $rust {
                #[new]
                #[pyo3(signature = (**kwargs))]
                fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<PyClassInitializer<Self>> {
                    Ok(PyClassInitializer::from(PyModel::build($table, kwargs)?).add_subclass($rust))
                }

                #[classattr]
                fn __tablename__() -> &'static str {
                    TABLES[$table].name
                }

                $($extra)*
            }
        )*

        /// A Python object of the right model class for a row read from the database.
        pub fn instantiate(py: Python<'_>, model: PyModel) -> PyResult<Py<PyAny>> {
            let table = model.table;
            let init = PyClassInitializer::from(model);
            $(
                if table == $table {
                    return Ok(Py::new(py, init.add_subclass($rust))?.into_any());
                }
            )*
            Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "no model class is registered for table {}",
                TABLES[table].name
            )))
        }

        /// Adds every model class to the module, each under the name the schema gives it.
        fn add_classes(m: &Bound<'_, PyModule>) -> PyResult<()> {
            $(
                if TABLES[$table].model != $name {
                    return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "model class {} is registered for table {}, whose model is {}",
                        $name, TABLES[$table].name, TABLES[$table].model
                    )));
                }
                m.add_class::<$rust>()?;
            )*
            Ok(())
        }

        /// The table of one of the model classes themselves (not a Python subclass).
        fn class_table(cls: &Bound<'_, PyAny>) -> Option<TableId> {
            let py = cls.py();
            $(
                if cls.is($rust::type_object(py)) {
                    return Some($table);
                }
            )*
            None
        }
    };
}

models! {
    PySession = "Session", schema::SESSIONS, {};
    PyWorkflowRun = "WorkflowRun", schema::WORKFLOW_RUNS, {};
    PySessionState = "SessionState", schema::SESSION_STATES, {
    /// An unsaved, active state for a session, with empty history and context.
    #[classmethod]
    #[pyo3(signature = (session_id, mode, **kwargs))]
    fn create_for_session<'py>(
        cls: &Bound<'py, PyType>,
        session_id: &Bound<'py, PyAny>,
        mode: &Bound<'py, PyAny>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        let get = |key: &str| -> PyResult<Option<Bound<'py, PyAny>>> {
            match kwargs {
                Some(k) => k.get_item(key),
                None => Ok(None),
            }
        };
        let args = PyDict::new(py);
        args.set_item("session_id", session_id)?;
        args.set_item("mode", mode)?;
        args.set_item(
            "conversation_history",
            get("conversation_history")?.unwrap_or_else(|| PyList::empty(py).into_any()),
        )?;
        args.set_item(
            "context_variables",
            get("context_variables")?.unwrap_or_else(|| PyDict::new(py).into_any()),
        )?;
        args.set_item("plan_data", get("plan_data")?)?;
        args.set_item(
            "current_phase",
            get("current_phase")?.unwrap_or_else(|| PyString::new(py, "init").into_any()),
        )?;
        args.set_item("status", "active")?;
        cls.call((), Some(&args))
    }
};
    PyApprovalRequest = "ApprovalRequest", schema::APPROVAL_REQUESTS, {
        /// A pending request that expires `timeout_seconds` from now.
        #[classmethod]
        #[pyo3(signature = (run_id, approval_type, context, timeout_seconds = Timeout(300.0), session_id = None, step_id = None))]
        #[allow(clippy::too_many_arguments)]
        fn create_pending<'py>(
            cls: &Bound<'py, PyType>,
            run_id: &Bound<'py, PyAny>,
            approval_type: &Bound<'py, PyAny>,
            context: &Bound<'py, PyAny>,
            timeout_seconds: Timeout,
            session_id: Option<&Bound<'py, PyAny>>,
            step_id: Option<&Bound<'py, PyAny>>,
        ) -> PyResult<Bound<'py, PyAny>> {
            let py = cls.py();
            let expires =
                crate::approvals::deadline(crate::value::now_micros(), timeout_seconds.0)?;
            if cls.is(py.get_type::<PyApprovalRequest>()) {
                // The class itself (not a Python subclass): build the object directly, with
                // the deadline kept raw until someone reads it.
                let mut m = PyModel::build(schema::APPROVAL_REQUESTS, None)?;
                m.assign("run_id", run_id)?;
                m.assign("approval_type", approval_type)?;
                m.assign("context", context)?;
                if let Some(sid) = session_id {
                    m.assign("session_id", sid)?;
                }
                if let Some(step) = step_id {
                    m.assign("step_id", step)?;
                }
                let column = crate::col!(schema::APPROVAL_REQUESTS, "expires_at").column;
                m.values[column] = Slot::Raw(Value::Timestamp(expires));
                let obj = Py::new(
                    py,
                    PyClassInitializer::from(m).add_subclass(PyApprovalRequest),
                )?;
                return Ok(obj.into_bound(py).into_any());
            }
            let args = PyDict::new(py);
            args.set_item("run_id", run_id)?;
            args.set_item("session_id", session_id)?;
            args.set_item("step_id", step_id)?;
            args.set_item("approval_type", approval_type)?;
            args.set_item("context", context)?;
            args.set_item("status", "pending")?;
            args.set_item("expires_at", expires)?;
            cls.call((), Some(&args))
        }
    };
    PyActiveConnection = "ActiveConnection", schema::ACTIVE_CONNECTIONS, {};
}

/// Registers the model classes and puts a [`PyColumn`] descriptor on each for every column.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyModel>()?;
    add_classes(m)?;
    for (table, t) in TableId::all() {
        let cls = m.getattr(t.model)?;
        for (column, c) in t.columns.iter().enumerate() {
            cls.setattr(
                c.name,
                PyColumn {
                    col: ColRef::new(table, column),
                },
            )?;
        }
    }
    Ok(())
}

/// The end of a message refusing `obj` (an object or a class) that is not one of the five:
/// for a SQLAlchemy model, where it goes instead.
pub fn sqlalchemy_hint(obj: &Bound<'_, PyAny>) -> &'static str {
    if obj
        .hasattr(pyo3::intern!(obj.py(), "__mapper__"))
        .unwrap_or(false)
    {
        "; a SQLAlchemy model goes through a session of cmbagent_db.sqlalchemy (its \
         get_db_session(), or sessionmaker(bind=create_engine(url))), which takes both kinds"
    } else {
        ""
    }
}

/// The table of a model class given to `query()` / `get()`.
pub fn table_of_class(cls: &Bound<'_, PyAny>) -> Option<TableId> {
    let py = cls.py();
    // The classes themselves, by identity: nearly every query names one of them.
    if let Some(table) = class_table(cls) {
        return Some(table);
    }
    // A Python subclass of one of them.
    let cls = cls.cast::<PyType>().ok()?;
    if !cls.is_subclass_of::<PyModel>().ok()? {
        return None;
    }
    let name = cls.getattr(pyo3::intern!(py, "__tablename__")).ok()?;
    schema::table_by_name(name.extract::<&str>().ok()?)
}
