//! The PEP 249 connection and cursor (`cmbagent_db.dbapi`, which SQLAlchemy's
//! `cmbagent_db+sqlite` / `cmbagent_db+postgresql` dialects load): Python parameters to
//! [`Value`]s, the core's [`dbapi`] runner with the GIL released, rows back to Python.

use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDate, PyDateTime, PyDict, PyFloat, PyInt, PyList, PyMemoryView,
    PyString, PyTime, PyTuple,
};

use crate::backend::{Conn, Row};
use crate::dbapi::{self, Column, Outcome, ReadAs};
use crate::dialect::Dialect;
use crate::engine;
use crate::error::{Error, ErrorKind, Result};
use crate::pool::Pooled;
use crate::python::convert::{py_list, to_py_from};
use crate::python::errors::raise;
use crate::python::session::PyDbSession;
use crate::url;
use crate::value::Value;

/// One database connection: of its own (`connect()`; SQLAlchemy pools these itself), or
/// one a session of this package took from its engine's pool and lent to SQLAlchemy
/// (`DbSession._lend_connection`), which goes back to that pool when closed. Calls from
/// several threads are serialised.
#[pyclass(module = "cmbagent_db.dbapi", name = "Connection", frozen)]
pub struct PyDbapiConnection {
    state: Mutex<State>,
    dialect: Dialect,
    /// The URL it was opened with (the engine of a session it lends itself to).
    url: String,
}

/// The connection a DB-API connection talks on.
// One per DB-API connection, never in a collection (see `Held`).
#[allow(clippy::large_enum_variant)]
enum Link {
    Own(Conn),
    Pooled(Pooled),
}

impl std::ops::Deref for Link {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        match self {
            Link::Own(c) => c,
            Link::Pooled(p) => p,
        }
    }
}

impl std::ops::DerefMut for Link {
    fn deref_mut(&mut self) -> &mut Conn {
        match self {
            Link::Own(c) => c,
            Link::Pooled(p) => p,
        }
    }
}

struct State {
    /// None once closed.
    conn: Option<Link>,
    autocommit: bool,
    /// The process that opened the connection (see `live`).
    pid: u32,
}

impl State {
    /// The open connection of this process. After `fork()` the child must not talk on
    /// the parent's socket (both would hang) nor close it (that would end the parent's
    /// session): it forgets it and reports the connection lost.
    fn live(&mut self) -> Result<&mut Conn> {
        if self.pid != std::process::id() {
            if let Some(inherited) = self.conn.take() {
                std::mem::forget(inherited);
            }
            return Err(Error::operational(
                "this DB-API connection was opened by the parent process before a fork; open a new one in this process",
            ));
        }
        self.conn
            .as_deref_mut()
            .ok_or_else(|| Error::interface("the DB-API connection is closed"))
    }
}

impl PyDbapiConnection {
    /// A DB-API connection over `conn`, a connection of `engine`'s pool (with whatever
    /// transaction is open on it), which goes back to the pool when this one closes.
    pub fn lend(engine: &engine::Engine, conn: Pooled) -> PyDbapiConnection {
        PyDbapiConnection {
            url: engine.key().to_string(),
            dialect: engine.dialect(),
            state: Mutex::new(State {
                conn: Some(Link::Pooled(conn)),
                autocommit: false,
                pid: std::process::id(),
            }),
        }
    }

    /// Runs `f` on the open connection after any other thread's call (the caller has
    /// released the GIL); for a session this connection lends itself to.
    pub fn run<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(state.live()?)
    }

    /// Runs `f` on the open connection, without the GIL, after any other thread's call.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Conn, bool) -> Result<T> + Send,
    ) -> PyResult<T> {
        let out = py.detach(|| {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let autocommit = state.autocommit;
            f(state.live()?, autocommit)
        });
        crate::python::log::flush(py);
        Ok(out?)
    }
}

#[pymethods]
impl PyDbapiConnection {
    fn cursor(slf: &Bound<'_, Self>) -> PyResult<PyDbapiCursor> {
        slf.get().with(slf.py(), |_, _| Ok(()))?;
        Ok(PyDbapiCursor {
            connection: slf.clone().unbind(),
            outcome: None,
            next_row: 0,
            rowcount: -1,
            lastrowid: None,
            arraysize: 1,
            closed: false,
        })
    }

    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c, _| c.commit())
    }

    fn rollback(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |c, _| c.rollback())
    }

    /// Rolls back what is uncommitted and closes; closing again does nothing.
    fn close(&self, py: Python<'_>) {
        let conn = py.detach(|| {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let open = state.live().is_ok();
            state.conn.take().filter(|_| open)
        });
        if let Some(mut conn) = conn {
            // Dropping the connection ends its transaction either way.
            let _ = py.detach(move || conn.rollback());
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .conn
            .is_none()
    }

    /// True once the connection cannot be used again: closed, lost (the server ended it, a
    /// statement outlived `command_timeout`), or inherited across a fork. SQLAlchemy's
    /// dialects read it to tell a disconnect from other errors.
    #[getter]
    fn broken(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.pid != std::process::id() || state.conn.as_deref().is_none_or(Conn::is_broken)
    }

    #[getter]
    fn in_transaction(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |c, _| Ok(c.in_transaction()))
    }

    /// With autocommit on, no statement begins a transaction implicitly. It can only be
    /// changed outside a transaction (commit or roll back first), as with psycopg2.
    #[getter]
    fn get_autocommit(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .autocommit
    }

    #[setter]
    fn set_autocommit(&self, py: Python<'_>, on: bool) -> PyResult<()> {
        let busy = self.with(py, |c, _| Ok(c.in_transaction()))?;
        if busy {
            return Err(raise(
                ErrorKind::Programming,
                "autocommit cannot change inside a transaction: commit or roll back first",
            ));
        }
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .autocommit = on;
        Ok(())
    }

    /// The placeholders this connection's SQL uses: `qmark` (`?`) on SQLite,
    /// `numeric_dollar` (`$1`) on PostgreSQL.
    #[getter]
    fn paramstyle(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "qmark",
            Dialect::Postgres => "numeric_dollar",
        }
    }

    /// Brings this connection's database to `target` (default head) with this package's
    /// migrations, as `cmbagent_db.migrate(url)` does, in transactions of their own (so
    /// none may be open); returns the revision reached.
    #[pyo3(signature = (target = "head", force = false))]
    fn migrate(&self, py: Python<'_>, target: &str, force: bool) -> PyResult<Option<&'static str>> {
        let (steps, current) = self.with(py, |c, _| {
            if c.in_transaction() {
                return Err(Error::new(
                    ErrorKind::Programming,
                    "commit or roll back before migrating: migrations run in transactions of their own",
                ));
            }
            let steps = crate::migrate::migrate(c, target, force)?;
            Ok((steps, crate::migrate::current(c)?))
        })?;
        crate::python::functions::log_steps(py, &steps)?;
        Ok(current)
    }

    /// A session of this package (`DbSession`) whose statements run on this connection,
    /// in its transaction: what `cmbagent_db.sqlalchemy`'s sessions share with SQLAlchemy.
    /// It does not migrate the database (`Base.metadata.create_all` does).
    fn session(slf: &Bound<'_, Self>) -> PyResult<Py<PyDbSession>> {
        let engine = engine::engine(&slf.get().url)?;
        PyDbSession::open_on(slf.py(), engine, Some(slf.clone().unbind()))
    }

    /// "sqlite" or "postgresql".
    #[getter]
    fn backend(&self) -> &'static str {
        self.dialect.name()
    }
}

/// A PEP 249 cursor; its rows are read when `execute` runs.
#[pyclass(module = "cmbagent_db.dbapi", name = "Cursor")]
pub struct PyDbapiCursor {
    connection: Py<PyDbapiConnection>,
    outcome: Option<Outcome>,
    next_row: usize,
    rowcount: i64,
    lastrowid: Option<i64>,
    #[pyo3(get, set)]
    arraysize: usize,
    closed: bool,
}

impl PyDbapiCursor {
    fn check_open(&self) -> PyResult<()> {
        if self.closed {
            return Err(raise(ErrorKind::Interface, "the cursor is closed"));
        }
        Ok(())
    }

    fn run(
        &mut self,
        py: Python<'_>,
        f: impl FnOnce(&mut Conn, bool) -> Result<Outcome> + Send,
    ) -> PyResult<()> {
        self.check_open()?;
        self.outcome = None;
        self.next_row = 0;
        self.rowcount = -1;
        let outcome = self.connection.get().with(py, f)?;
        self.rowcount = outcome.rowcount;
        if outcome.lastrowid.is_some() {
            self.lastrowid = outcome.lastrowid;
        }
        self.outcome = Some(outcome);
        Ok(())
    }

    fn take(&mut self, py: Python<'_>, n: usize) -> PyResult<Vec<Py<PyAny>>> {
        self.check_open()?;
        let Some(outcome) = &self.outcome else {
            return Err(raise(
                ErrorKind::Programming,
                "no statement has been executed on this cursor",
            ));
        };
        let end = outcome.rows.len().min(self.next_row.saturating_add(n));
        let rows = outcome.rows[self.next_row..end]
            .iter()
            .map(|row| row_to_py(py, row, &outcome.columns))
            .collect::<PyResult<Vec<_>>>()?;
        self.next_row = end;
        Ok(rows)
    }
}

#[pymethods]
impl PyDbapiCursor {
    #[pyo3(signature = (operation, parameters = None))]
    fn execute<'py>(
        mut slf: PyRefMut<'py, Self>,
        operation: &str,
        parameters: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<PyRefMut<'py, Self>> {
        let py = slf.py();
        let dialect = slf.connection.get().dialect;
        let params = parameters_of(dialect, parameters)?;
        slf.run(py, |c, autocommit| {
            dbapi::execute(c, operation, &params, autocommit)
        })?;
        Ok(slf)
    }

    fn executemany<'py>(
        mut slf: PyRefMut<'py, Self>,
        operation: &str,
        seq_of_parameters: &Bound<'py, PyAny>,
    ) -> PyResult<PyRefMut<'py, Self>> {
        let py = slf.py();
        let dialect = slf.connection.get().dialect;
        let sets = seq_of_parameters
            .try_iter()?
            .map(|p| parameters_of(dialect, Some(&p?)))
            .collect::<PyResult<Vec<_>>>()?;
        slf.run(py, |c, autocommit| {
            dbapi::execute_many(c, operation, &sets, autocommit)
        })?;
        Ok(slf)
    }

    fn fetchone(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        Ok(self.take(py, 1)?.pop())
    }

    #[pyo3(signature = (size = None))]
    fn fetchmany(&mut self, py: Python<'_>, size: Option<usize>) -> PyResult<Vec<Py<PyAny>>> {
        let n = size.unwrap_or(self.arraysize);
        self.take(py, n)
    }

    fn fetchall(&mut self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        self.take(py, usize::MAX)
    }

    fn close(&mut self) {
        self.closed = true;
        self.outcome = None;
    }

    /// PEP 249's 7-item sequence per column (name, type code, and five Nones); None after
    /// a statement that returns no rows. The type code is the PostgreSQL type OID, None on
    /// SQLite (as with `sqlite3`).
    #[getter]
    fn description<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let Some(outcome) = self.outcome.as_ref().filter(|o| !o.columns.is_empty()) else {
            return Ok(None);
        };
        let items = outcome
            .columns
            .iter()
            .map(|c| {
                let none = py.None();
                PyTuple::new(
                    py,
                    [
                        PyString::new(py, &c.name).into_any().unbind(),
                        c.type_oid.into_pyobject(py)?.into_any().unbind(),
                        none.clone_ref(py),
                        none.clone_ref(py),
                        none.clone_ref(py),
                        none.clone_ref(py),
                        none,
                    ],
                )
            })
            .collect::<PyResult<Vec<_>>>()?;
        PyList::new(py, items).map(Some)
    }

    #[getter]
    fn rowcount(&self) -> i64 {
        self.rowcount
    }

    /// SQLite's rowid of the last row an INSERT on this cursor made; None otherwise.
    #[getter]
    fn lastrowid(&self) -> Option<i64> {
        self.lastrowid
    }

    #[getter]
    fn connection(&self, py: Python<'_>) -> Py<PyDbapiConnection> {
        self.connection.clone_ref(py)
    }

    #[pyo3(signature = (_sizes))]
    fn setinputsizes(&self, _sizes: &Bound<'_, PyAny>) {}

    #[pyo3(signature = (_size, _column = None))]
    fn setoutputsize(&self, _size: &Bound<'_, PyAny>, _column: Option<&Bound<'_, PyAny>>) {}

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.fetchone(py)
    }
}

/// Opens a PEP 249 connection to `url` (a `sqlite:///` or `postgresql://` URL as sessions
/// take). `timeout` (seconds) is how long a statement waits for another connection's lock.
#[pyfunction]
#[pyo3(name = "dbapi_connect", signature = (url, autocommit = false, timeout = None))]
pub fn connect(
    py: Python<'_>,
    url: &str,
    autocommit: bool,
    timeout: Option<f64>,
) -> PyResult<PyDbapiConnection> {
    let parsed = url::parse(url)?;
    let wait = timeout
        .map(|t| {
            Duration::try_from_secs_f64(t).map_err(|_| {
                raise(
                    ErrorKind::Interface,
                    format!("timeout must be a number of seconds >= 0, not {t}"),
                )
            })
        })
        .transpose()?;
    let conn = py.detach(|| -> Result<Conn> {
        let mut conn = Conn::open(&parsed)?;
        if let Some(wait) = wait {
            conn.set_lock_timeout(wait)?;
        }
        Ok(conn)
    })?;
    Ok(PyDbapiConnection {
        url: url.to_string(),
        dialect: conn.dialect(),
        state: Mutex::new(State {
            conn: Some(Link::Own(conn)),
            autocommit,
            pid: std::process::id(),
        }),
    })
}

/// The positional parameters of one execution.
fn parameters_of(dialect: Dialect, parameters: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Value>> {
    let Some(p) = parameters.filter(|p| !p.is_none()) else {
        return Ok(Vec::new());
    };
    if p.is_instance_of::<PyDict>() {
        return Err(raise(
            ErrorKind::Programming,
            "parameters must be a sequence (positional placeholders); named parameters are not supported",
        ));
    }
    if p.is_instance_of::<PyString>() || p.is_instance_of::<PyBytes>() {
        return Err(raise(
            ErrorKind::Programming,
            "parameters must be a sequence of values, not a single string",
        ));
    }
    p.try_iter()
        .map_err(|_| {
            raise(
                ErrorKind::Programming,
                format!(
                    "parameters must be a sequence of values, not {}",
                    type_name(p)
                ),
            )
        })?
        .enumerate()
        .map(|(i, v)| value_of(dialect, &v?, i + 1))
        .collect()
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string())
}

/// One parameter as a [`Value`]: None, bool, int, float, str, bytes-like, datetime, date,
/// time, Decimal and UUID, and on PostgreSQL a list of them (an array; nested lists for
/// more dimensions), as psycopg2 adapts a list. An aware datetime is bound as a timestamp;
/// a naive one, a date, a time, a Decimal and a UUID as their text, which the database
/// reads by the column's type (on PostgreSQL the server parses it, as psycopg2's literals).
fn value_of(dialect: Dialect, v: &Bound<'_, PyAny>, position: usize) -> PyResult<Value> {
    if v.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if v.is_instance_of::<PyInt>() {
        return match v.extract::<i64>() {
            Ok(i) => Ok(Value::Int(i)),
            Err(_) if dialect == Dialect::Postgres => Ok(Value::Text(v.str()?.to_string())),
            Err(_) => Err(raise(
                ErrorKind::Data,
                format!(
                    "parameter {position}: {} does not fit SQLite's 64-bit INTEGER",
                    v.str()?
                ),
            )),
        };
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        return Ok(Value::Float(f.value()));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Value::Text(s.to_str()?.to_owned()));
    }
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok(Value::Bytes(b.as_bytes().to_vec()));
    }
    if let Ok(b) = v.cast::<PyByteArray>() {
        return Ok(Value::Bytes(b.to_vec()));
    }
    if v.is_instance_of::<PyMemoryView>() {
        let b = v.call_method0("tobytes")?;
        return Ok(Value::Bytes(b.cast::<PyBytes>()?.as_bytes().to_vec()));
    }
    if let Ok(dt) = v.cast::<PyDateTime>() {
        if !dt.call_method0("utcoffset")?.is_none() {
            return Ok(Value::Timestamp(dt.extract::<DateTime<Utc>>()?));
        }
        let sep = match dialect {
            Dialect::Sqlite => " ",
            Dialect::Postgres => "T",
        };
        return Ok(Value::Text(
            dt.call_method1("isoformat", (sep,))?.extract()?,
        ));
    }
    if v.is_instance_of::<PyDate>() || v.is_instance_of::<PyTime>() {
        return Ok(Value::Text(v.call_method0("isoformat")?.extract()?));
    }
    let py = v.py();
    if v.is_instance(decimal_class(py)?.bind(py))? || v.is_instance(uuid_class(py)?.bind(py))? {
        return Ok(Value::Text(v.str()?.to_string()));
    }
    if let (Ok(list), Dialect::Postgres) = (v.cast::<PyList>(), dialect) {
        return Ok(Value::Array(
            list.iter()
                .map(|m| value_of(dialect, &m, position))
                .collect::<PyResult<_>>()?,
        ));
    }
    let supported = "None, bool, int, float, str, bytes, datetime, date, time, Decimal, UUID";
    let lists = match dialect {
        Dialect::Postgres => " and lists of them are",
        Dialect::Sqlite => " are; lists bind as arrays on PostgreSQL only",
    };
    Err(raise(
        ErrorKind::Programming,
        format!(
            "parameter {position}: type {} is not supported ({supported}{lists})",
            type_name(v)
        ),
    ))
}

static DECIMAL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static UUID: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static DATE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TIME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn imported<'a>(
    py: Python<'_>,
    cell: &'a PyOnceLock<Py<PyAny>>,
    module: &str,
    name: &str,
) -> PyResult<&'a Py<PyAny>> {
    cell.get_or_try_init(py, || Ok(py.import(module)?.getattr(name)?.unbind()))
}

fn decimal_class(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    imported(py, &DECIMAL, "decimal", "Decimal")
}

fn uuid_class(py: Python<'_>) -> PyResult<&Py<PyAny>> {
    imported(py, &UUID, "uuid", "UUID")
}

fn row_to_py(py: Python<'_>, row: &Row, columns: &[Column]) -> PyResult<Py<PyAny>> {
    let items = row
        .iter()
        .zip(columns)
        .map(|(v, c)| cell_to_py(py, v, c))
        .collect::<PyResult<Vec<_>>>()?;
    Ok(PyTuple::new(py, items)?.into_any().unbind())
}

fn cell_to_py(py: Python<'_>, v: &Value, column: &Column) -> PyResult<Py<PyAny>> {
    let origin = || format!("column {}", column.name);
    Ok(match (v, column.read_as) {
        (Value::Array(members), _) => py_list(py, members, |m| cell_to_py(py, m, column))?,
        (Value::Text(s), ReadAs::Decimal) => decimal_class(py)?.call1(py, (s,))?,
        (Value::Text(s), ReadAs::Uuid) => uuid_class(py)?.call1(py, (s,))?,
        (Value::Text(s), ReadAs::Date) => {
            imported(py, &DATE, "datetime", "date")?.call_method1(py, "fromisoformat", (s,))?
        }
        (Value::Text(s), ReadAs::Time) => {
            imported(py, &TIME, "datetime", "time")?.call_method1(py, "fromisoformat", (s,))?
        }
        (Value::Timestamp(t), ReadAs::NaiveDatetime) if (1..=9999).contains(&t.year()) => {
            t.naive_utc().into_pyobject(py)?.into_any().unbind()
        }
        // JSON stays its text: SQLAlchemy's JSON type decodes it.
        (Value::Json(s), _) => PyString::new(py, s).into_any().unbind(),
        _ => to_py_from(py, v, &origin)?,
    })
}
