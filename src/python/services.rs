//! The approval and connection lifecycle services (`cmbagent_db.approvals` and
//! `cmbagent_db.connections` wrap these). Every call that writes commits before returning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDateTime;

use crate::approvals::{self, Outcome, WaitEnd, RESOLUTIONS};
use crate::col;
use crate::connections;
use crate::engine;
use crate::error::ErrorKind;
use crate::expr::{CmpOp, ColRef, Expr};
use crate::python::convert::{to_value, Purpose};
use crate::python::errors::raise;
use crate::python::model::{instantiate, PyModel};
use crate::python::session::{exclusive, PyDbSession};
use crate::query::{Item, Select};
use crate::schema::{ACTIVE_CONNECTIONS, APPROVAL_REQUESTS};
use crate::unit_of_work::ObjState;
use crate::url;
use crate::value::Value;
use crate::watch;

fn outcome(outcome: Outcome, id: &str) -> PyResult<bool> {
    match outcome {
        Outcome::Done => Ok(true),
        Outcome::Expired | Outcome::AlreadyFinal(_) => Ok(false),
        Outcome::NotFound => Err(raise(
            ErrorKind::ApprovalNotFound,
            format!("no approval request has id {id:?}"),
        )),
    }
}

/// Resolves a pending request (of `session_id` / `run_id` when given) in one
/// compare-and-set statement; True for the one caller that resolved it, False when it was
/// already final or had expired (it is then marked expired). Commits.
#[pyfunction]
#[pyo3(
    name = "approval_resolve",
    signature = (db, approval_id, resolution, result = None, *, session_id = None, run_id = None)
)]
#[allow(clippy::too_many_arguments)] // the Python signature's keywords
pub fn resolve(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    approval_id: String,
    resolution: String,
    result: Option<&Bound<'_, PyAny>>,
    session_id: Option<String>,
    run_id: Option<String>,
) -> PyResult<bool> {
    let scope = approvals::Scope { session_id, run_id };
    let result = match result {
        Some(r) => match to_value(col!(APPROVAL_REQUESTS, "result"), r, Purpose::Store)? {
            Value::Json(s) => Some(s),
            _ => None,
        },
        None => None,
    };
    // Refused before the transaction begins, so a bad value costs the session nothing.
    approvals::check_resolution(&resolution)?;
    let mut s = exclusive(db)?;
    let id = approval_id.clone();
    let done = s.write_and_commit(py, move |c| {
        approvals::resolve(c, &id, &resolution, result, Utc::now(), &scope)
    })?;
    s.refresh_ids(py, APPROVAL_REQUESTS, std::slice::from_ref(&approval_id))?;
    outcome(done, &approval_id)
}

/// Cancels a pending request (of `session_id` / `run_id` when given); True if this call
/// cancelled it. Commits.
#[pyfunction]
#[pyo3(name = "approval_cancel", signature = (db, approval_id, *, session_id = None, run_id = None))]
pub fn cancel(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    approval_id: String,
    session_id: Option<String>,
    run_id: Option<String>,
) -> PyResult<bool> {
    let scope = approvals::Scope { session_id, run_id };
    let mut s = exclusive(db)?;
    let id = approval_id.clone();
    let done = s.write_and_commit(py, move |c| approvals::cancel(c, &id, Utc::now(), &scope))?;
    s.refresh_ids(py, APPROVAL_REQUESTS, std::slice::from_ref(&approval_id))?;
    outcome(done, &approval_id)
}

/// Starts a sweep of the pending requests past their deadline at `now` (default the
/// current time), returned as an iterator of committed batches (`OverdueSweep`) of at
/// most `batch_size` requests (default `approvals::SWEEP_BATCH`).
#[pyfunction]
#[pyo3(name = "approval_expire_overdue", signature = (db, now = None, batch_size = None))]
pub fn expire_overdue(
    db: &Bound<'_, PyDbSession>,
    now: Option<&Bound<'_, PyDateTime>>,
    batch_size: Option<usize>,
) -> PyResult<OverdueSweep> {
    let batch_size = batch_size.unwrap_or(approvals::SWEEP_BATCH);
    let now = match now {
        Some(t) => match to_value(
            col!(APPROVAL_REQUESTS, "expires_at"),
            t.as_any(),
            Purpose::Compare,
        )? {
            Value::Timestamp(t) => t,
            _ => return Err(PyTypeError::new_err("now must be a datetime")),
        },
        None => Utc::now(),
    };
    // Refused here, before the first batch, rather than when iteration starts.
    approvals::check_batch_size(batch_size)?;
    Ok(OverdueSweep {
        db: db.clone().unbind(),
        now,
        batch_size,
        pause: None,
        done: false,
    })
}

/// One sweep of overdue requests: each step expires up to `batch_size` of them, earliest
/// deadlines first, in its own transaction, commits, and yields their ids; it ends after
/// the first batch that is not full. `now` is fixed when the sweep starts, so requests
/// that fall due meanwhile wait for the next sweep. Between two batches on SQLite it
/// pauses (`approvals::pause_after_batch`) so that other writers get the write lock.
#[pyclass(module = "cmbagent_db", name = "OverdueSweep")]
pub struct OverdueSweep {
    db: Py<PyDbSession>,
    now: DateTime<Utc>,
    batch_size: usize,
    /// How long to leave the database alone before the next batch; None before the first.
    pause: Option<Duration>,
    done: bool,
}

#[pymethods]
impl OverdueSweep {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(slf: &Bound<'_, Self>) -> PyResult<Option<Vec<String>>> {
        let py = slf.py();
        let mut sweep = slf.try_borrow_mut().map_err(|_| {
            raise(
                ErrorKind::InvalidRequest,
                "this sweep is in use by another thread: iterate a sweep from one thread",
            )
        })?;
        if sweep.done {
            return Ok(None);
        }
        if let Some(pause) = sweep.pause.filter(|p| !p.is_zero()) {
            py.detach(|| std::thread::sleep(pause));
        }
        let (now, limit) = (sweep.now, sweep.batch_size);
        let db = sweep.db.clone_ref(py);
        let mut s = exclusive(db.bind(py))?;
        let started = Instant::now();
        let ids = s
            .write_and_commit(py, move |c| approvals::expire_overdue_batch(c, now, limit))
            .inspect_err(|_| sweep.done = true)?;
        sweep.pause = Some(approvals::pause_after_batch(s.dialect(), started.elapsed()));
        sweep.done = ids.len() < limit;
        s.refresh_ids(py, APPROVAL_REQUESTS, &ids)?;
        Ok((!ids.is_empty()).then_some(ids))
    }
}

/// Pending requests that can still be resolved (not past their deadline), oldest first,
/// optionally of one run and/or one session.
#[pyfunction]
#[pyo3(name = "approval_pending", signature = (db, run_id = None, session_id = None))]
pub fn pending(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    run_id: Option<String>,
    session_id: Option<String>,
) -> PyResult<Vec<Py<PyAny>>> {
    let t = APPROVAL_REQUESTS;
    let mut select = Select::all_columns(t);
    select.filters.push(Expr::Compare(
        col!(APPROVAL_REQUESTS, "status"),
        CmpOp::Eq,
        Value::Text("pending".into()),
    ));
    select.filters.push(Expr::Compare(
        col!(APPROVAL_REQUESTS, "expires_at"),
        CmpOp::Gt,
        Value::Timestamp(Utc::now()),
    ));
    if let Some(r) = run_id {
        select.filters.push(Expr::Compare(
            col!(APPROVAL_REQUESTS, "run_id"),
            CmpOp::Eq,
            Value::Text(r),
        ));
    }
    if let Some(sid) = session_id {
        select.filters.push(Expr::Compare(
            col!(APPROVAL_REQUESTS, "session_id"),
            CmpOp::Eq,
            Value::Text(sid),
        ));
    }
    select
        .order_by
        .push((Item::Column(col!(APPROVAL_REQUESTS, "created_at")), false));
    exclusive(db)?.fetch(py, &select, false)
}

/// How a wait ended, for Python: the request (detached from any session) when it was
/// resolved, else the exception that says how it ended.
fn ended(py: Python<'_>, approval_id: &str, outcome: watch::Outcome) -> PyResult<Py<PyAny>> {
    match outcome? {
        WaitEnd::Resolved(row) => {
            let mut model = PyModel::loaded(APPROVAL_REQUESTS, row, None);
            model.state = ObjState::Detached;
            instantiate(py, model)
        }
        WaitEnd::Expired => Err(raise(
            ErrorKind::ApprovalExpired,
            format!("approval request {approval_id} expired before anyone resolved it"),
        )),
        WaitEnd::Cancelled => Err(raise(
            ErrorKind::ApprovalCancelled,
            format!("approval request {approval_id} was cancelled"),
        )),
        WaitEnd::NotFound => Err(raise(
            ErrorKind::ApprovalNotFound,
            format!("no approval request has id {approval_id:?}"),
        )),
        WaitEnd::UnknownStatus(status) => {
            let shown = status.map_or("NULL".to_string(), |s| format!("{s:?}"));
            Err(raise(
                ErrorKind::Data,
                format!(
                    "approval request {approval_id} has status {shown}, which is not one of \
                     the states a request can be in (pending, {}, resolved, expired, \
                     cancelled); the wait ends here",
                    RESOLUTIONS.join(", ")
                ),
            ))
        }
    }
}

/// The engine of `url` (default: cmbagent's), its database brought up as for a session.
fn waited_engine(py: Python<'_>, url: Option<String>) -> PyResult<Arc<engine::Engine>> {
    let url = match url {
        Some(u) => u,
        None => url::default_url()?,
    };
    let engine = engine::engine(&url)?;
    py.detach(|| engine.ensure_ready())?;
    Ok(engine)
}

/// Set when the interpreter begins to exit: the watcher threads then call no Python.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Called at interpreter exit (an `atexit` hook of `cmbagent_db.approvals`): from then on,
/// a watcher thread fills its waiters' slots but calls no Python back.
#[pyfunction]
#[pyo3(name = "_approvals_at_exit")]
pub fn at_exit() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Blocks until the request is resolved and returns it (detached from any session),
/// without holding the GIL or a transaction, on the database's one watcher. See
/// `cmbagent_db.approvals.wait`.
#[pyfunction]
#[pyo3(name = "approval_wait", signature = (approval_id, timeout = None, *, url = None))]
pub fn wait(
    py: Python<'_>,
    approval_id: String,
    timeout: Option<f64>,
    url: Option<String>,
) -> PyResult<Py<PyAny>> {
    if let Some(t) = timeout {
        if !(t.is_finite() && t >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "timeout must be a non-negative number of seconds or None, got {t}"
            )));
        }
    }
    let engine = waited_engine(py, url)?;
    let ticket = watch::watch(&engine, &approval_id, None)?;
    // A timeout longer than a monotonic clock can count (centuries) is no deadline at all.
    let deadline = timeout.and_then(|t| {
        Duration::try_from_secs_f64(t)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))
    });
    // Signals reach Python in its main thread only: there, short slices keep Ctrl-C
    // responsive; any other thread sleeps until the outcome or its deadline.
    let threading = py.import("threading")?;
    let main = threading
        .call_method0("current_thread")?
        .is(&threading.call_method0("main_thread")?);
    loop {
        let until = if main {
            let slice = Instant::now() + Duration::from_millis(50);
            Some(deadline.map_or(slice, |d| d.min(slice)))
        } else {
            deadline
        };
        if let Some(outcome) = py.detach(|| ticket.wait(until)) {
            return ended(py, &approval_id, outcome);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(raise(
                ErrorKind::ApprovalTimeout,
                format!(
                    "approval request {approval_id} is still pending after {}s; it stays pending",
                    timeout.unwrap_or(0.0)
                ),
            ));
        }
        py.check_signals()?;
    }
}

/// A wait registered with the database's watcher, for asyncio
/// (`cmbagent_db.approvals.wait_async`): `notify` is called once it has ended.
#[pyclass(name = "ApprovalTicket", module = "cmbagent_db._native", frozen)]
pub struct PyTicket {
    approval_id: String,
    ticket: Mutex<Option<watch::Ticket>>,
}

#[pymethods]
impl PyTicket {
    /// The request, resolved (or the exception of how the wait ended); None while the
    /// wait goes on.
    fn result(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let outcome = match &*self.ticket.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(t) => t.peek(),
            None => None,
        };
        outcome.map(|o| ended(py, &self.approval_id, o)).transpose()
    }

    /// Stops waiting (the request is left as it is).
    fn close(&self) {
        self.ticket.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Registers a wait for `approval_id` with the database's watcher; `notify()` is called
/// (from the watcher's thread, with the GIL) once it has ended.
#[pyfunction]
#[pyo3(name = "approval_watch", signature = (approval_id, *, url = None, notify))]
pub fn watch_request(
    py: Python<'_>,
    approval_id: String,
    url: Option<String>,
    notify: Py<PyAny>,
) -> PyResult<PyTicket> {
    let engine = waited_engine(py, url)?;
    let callback: watch::Notify = Box::new(move || {
        if EXITING.load(Ordering::SeqCst) {
            return;
        }
        Python::attach(|py| {
            if let Err(e) = notify.call0(py) {
                e.write_unraisable(py, None);
            }
        });
    });
    let ticket = watch::watch(&engine, &approval_id, Some(callback))?;
    Ok(PyTicket {
        approval_id,
        ticket: Mutex::new(Some(ticket)),
    })
}

fn ttl(ttl_seconds: &Bound<'_, PyAny>) -> PyResult<chrono::DateTime<Utc>> {
    if ttl_seconds.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(
            "ttl_seconds must be a number of seconds, got bool",
        ));
    }
    let secs: f64 = ttl_seconds.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "ttl_seconds must be a number of seconds, got {}",
            ttl_seconds
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_default()
        ))
    })?;
    Ok(connections::cutoff(secs, Utc::now())?)
}

fn text_arg(col: ColRef, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<String>> {
    match v {
        None => Ok(None),
        Some(v) => match to_value(col, v, Purpose::Store)? {
            Value::Text(s) => Ok(Some(s)),
            _ => Ok(None),
        },
    }
}

fn task_arg(task_id: &Bound<'_, PyAny>) -> PyResult<String> {
    text_arg(col!(ACTIVE_CONNECTIONS, "task_id"), Some(task_id))?
        .ok_or_else(|| PyTypeError::new_err("active_connections.task_id cannot be None"))
}

fn instance_arg(server_instance: &Bound<'_, PyAny>) -> PyResult<String> {
    Ok(text_arg(
        col!(ACTIVE_CONNECTIONS, "server_instance"),
        Some(server_instance),
    )?
    .unwrap_or_default())
}

/// Inserts or refreshes the task's connection row in one atomic statement; returns it.
/// Commits.
#[pyfunction]
#[pyo3(name = "connection_heartbeat", signature = (db, task_id, server_instance, session_id = None))]
pub fn heartbeat(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    task_id: &Bound<'_, PyAny>,
    server_instance: &Bound<'_, PyAny>,
    session_id: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<PyAny>> {
    let t = ACTIVE_CONNECTIONS;
    let task = task_arg(task_id)?;
    let instance = instance_arg(server_instance)?;
    let session = text_arg(col!(ACTIVE_CONNECTIONS, "session_id"), session_id)?;
    let mut s = exclusive(db)?;
    let row = s.write_and_commit(py, move |c| {
        connections::heartbeat(c, &task, session.as_deref(), &instance, Utc::now())
    })?;
    s.merge_row(py, t, row)
}

/// Inserts or refreshes the connection row of every task in `task_ids` in one statement;
/// returns how many tasks. Commits.
#[pyfunction]
#[pyo3(name = "connection_heartbeat_many", signature = (db, task_ids, server_instance, session_ids = None))]
pub fn heartbeat_many(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    task_ids: &Bound<'_, PyAny>,
    server_instance: &Bound<'_, PyAny>,
    session_ids: Option<&Bound<'_, PyAny>>,
) -> PyResult<u64> {
    if task_ids.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err(
            "task_ids must be a sequence of task ids, not one string",
        ));
    }
    let mut tasks = Vec::new();
    for task in task_ids.try_iter()? {
        tasks.push((task_arg(&task?)?, None));
    }
    if let Some(sessions) = session_ids {
        let sessions: Vec<Bound<'_, PyAny>> = sessions.try_iter()?.collect::<PyResult<_>>()?;
        if sessions.len() != tasks.len() {
            return Err(PyValueError::new_err(format!(
                "session_ids has {} items for {} task_ids: give one session id (or None) per task",
                sessions.len(),
                tasks.len()
            )));
        }
        for (task, session) in tasks.iter_mut().zip(&sessions) {
            task.1 = text_arg(col!(ACTIVE_CONNECTIONS, "session_id"), Some(session))?;
        }
    }
    let instance = instance_arg(server_instance)?;
    let with_sessions = session_ids.is_some();
    exclusive(db)?.write_and_commit(py, move |c| {
        connections::heartbeat_many(c, &tasks, with_sessions, &instance, Utc::now())
    })
}

fn forget(py: Python<'_>, s: &mut PyDbSession, removed: &[connections::Removed]) -> PyResult<()> {
    let ids: Vec<String> = removed.iter().map(|(id, _)| id.clone()).collect();
    s.forget_ids(py, ACTIVE_CONNECTIONS, &ids)
}

/// Forgets a task's connection; True if there was one. Commits.
#[pyfunction]
#[pyo3(name = "connection_disconnect")]
pub fn disconnect(py: Python<'_>, db: &Bound<'_, PyDbSession>, task_id: String) -> PyResult<bool> {
    let mut s = exclusive(db)?;
    let removed = s.write_and_commit(py, move |c| connections::disconnect(c, &task_id))?;
    forget(py, &mut s, &removed)?;
    Ok(!removed.is_empty())
}

/// Forgets every connection of a server instance (its clean shutdown); returns how many.
/// Commits.
#[pyfunction]
#[pyo3(name = "connection_release_instance")]
pub fn release_instance(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    server_instance: String,
) -> PyResult<usize> {
    let mut s = exclusive(db)?;
    let removed = s.write_and_commit(py, move |c| {
        connections::release_instance(c, &server_instance)
    })?;
    forget(py, &mut s, &removed)?;
    Ok(removed.len())
}

/// Removes connections whose heartbeat is older than `ttl_seconds`; returns their task
/// ids. Commits.
#[pyfunction]
#[pyo3(name = "connection_reap_stale")]
pub fn reap_stale(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    ttl_seconds: &Bound<'_, PyAny>,
) -> PyResult<Vec<String>> {
    let cutoff = ttl(ttl_seconds)?;
    let mut s = exclusive(db)?;
    let removed = s.write_and_commit(py, move |c| connections::reap_stale(c, cutoff))?;
    forget(py, &mut s, &removed)?;
    Ok(removed.into_iter().map(|(_, task)| task).collect())
}

/// Connections whose heartbeat is within `ttl_seconds`, optionally of one session.
#[pyfunction]
#[pyo3(name = "connection_live", signature = (db, ttl_seconds, session_id = None))]
pub fn live(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    ttl_seconds: &Bound<'_, PyAny>,
    session_id: Option<String>,
) -> PyResult<Vec<Py<PyAny>>> {
    let t = ACTIVE_CONNECTIONS;
    let mut select = Select::all_columns(t);
    select.filters.push(Expr::Compare(
        col!(ACTIVE_CONNECTIONS, "last_heartbeat"),
        CmpOp::Ge,
        Value::Timestamp(ttl(ttl_seconds)?),
    ));
    if let Some(sid) = session_id {
        select.filters.push(Expr::Compare(
            col!(ACTIVE_CONNECTIONS, "session_id"),
            CmpOp::Eq,
            Value::Text(sid),
        ));
    }
    select
        .order_by
        .push((Item::Column(col!(ACTIVE_CONNECTIONS, "task_id")), false));
    exclusive(db)?.fetch(py, &select, false)
}

/// The server instance holding `task_id`, or None when its heartbeat is older than the TTL.
#[pyfunction]
#[pyo3(name = "connection_owner")]
pub fn owner(
    py: Python<'_>,
    db: &Bound<'_, PyDbSession>,
    task_id: String,
    ttl_seconds: &Bound<'_, PyAny>,
) -> PyResult<Option<String>> {
    let cutoff = ttl(ttl_seconds)?;
    exclusive(db)?.read(py, move |c| connections::owner(c, &task_id, cutoff))
}
