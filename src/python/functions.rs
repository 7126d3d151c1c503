//! The module-level functions: sessions, and the migration commands.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::engine;
use crate::migrate::{self as migrations, REVISIONS};
use crate::python::convert::to_py_from;
use crate::python::log;
use crate::python::model::PyModel;
use crate::python::session::PyDbSession;
use crate::schema::{ColType, OnDelete, Table, TableId, TABLES};
use crate::url;

fn resolve_url(url: Option<String>) -> PyResult<String> {
    match url {
        Some(u) => Ok(u),
        None => Ok(url::default_url()?),
    }
}

pub(crate) fn log_steps(py: Python<'_>, steps: &[migrations::Step]) -> PyResult<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("cmbagent_db.migrations",))?;
    let position = |r: Option<&str>| {
        r.and_then(|r| REVISIONS.iter().position(|x| x.id == r))
            .map_or(0, |i| i + 1)
    };
    for (from, to) in steps {
        let verb = if position(*to) > position(*from) {
            "upgrade"
        } else {
            "downgrade"
        };
        logger.call_method1(
            "info",
            (
                "Running %s %s -> %s",
                verb,
                from.unwrap_or(""),
                to.unwrap_or(""),
            ),
        )?;
    }
    Ok(())
}

/// Warns (`cmbagent_db.Warning`) that applied revisions differ from this build's SQL: the
/// database works, but its schema is not the one this build would make.
fn warn_drift(py: Python<'_>, url: &str, drifted: &[String]) -> PyResult<()> {
    let category = py.import("cmbagent_db.exceptions")?.getattr("Warning")?;
    let message = format!(
        "the applied SQL of revision(s) {} in {url} differs from this build's; \
         inspect with `cmbagent-db check` and accept with `cmbagent-db stamp`",
        drifted.join(", ")
    );
    let message = std::ffi::CString::new(message.replace('\0', " "))
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    PyErr::warn(py, &category, &message, 1)
}

/// A new session on `url` (default: cmbagent's). The first session of a URL in a process
/// brings its database to head unless the URL says `auto_migrate=false`.
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn get_db_session(py: Python<'_>, url: Option<String>) -> PyResult<Py<PyDbSession>> {
    let url = resolve_url(url)?;
    let engine = engine::engine(&url)?;
    let drifted = py.detach(|| engine.ensure_ready())?;
    if !drifted.is_empty() {
        warn_drift(py, engine.display_url(), &drifted)?;
    }
    PyDbSession::open(py, engine)
}

/// A session on the pool of this package's engine for `url` (a URL as the DB-API's
/// `connect` takes it), without bringing the database to head: what a
/// `cmbagent_db.sqlalchemy` session runs on when its engine lets this package pool the
/// connections (the application's `create_all` made the schema).
#[pyfunction]
#[pyo3(name = "_pool_session")]
pub fn pool_session(py: Python<'_>, url: &str) -> PyResult<Py<PyDbSession>> {
    PyDbSession::open(py, engine::engine(url)?)
}

/// Brings the database to `target` (head, base, a revision, +N, -N); returns the revision
/// now current. A downgrade that would drop tables holding rows needs `force=True`.
#[pyfunction]
#[pyo3(signature = (url = None, target = "head", *, force = false))]
pub fn migrate(
    py: Python<'_>,
    url: Option<String>,
    target: &str,
    force: bool,
) -> PyResult<Option<&'static str>> {
    let url = resolve_url(url)?;
    let engine = engine::engine(&url)?;
    let result = py.detach(|| {
        engine.with_conn(|c| {
            let steps = migrations::migrate(c, target, force)?;
            Ok((steps, migrations::current(c)?))
        })
    });
    log::flush(py);
    let (steps, current) = result?;
    log_steps(py, &steps)?;
    Ok(current)
}

/// Brings the database to head; returns the head revision.
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn init_database(py: Python<'_>, url: Option<String>) -> PyResult<Option<&'static str>> {
    migrate(py, url, "head", false)
}

/// The database's current revision, or None at base.
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn current(py: Python<'_>, url: Option<String>) -> PyResult<Option<&'static str>> {
    let engine = engine::engine(&resolve_url(url)?)?;
    Ok(py.detach(|| engine.with_conn(migrations::current))?)
}

/// The revision(s) another Alembic chain (cmbagent's own migrations) recorded in
/// `alembic_version`; empty when that table holds this package's revision or does not exist.
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn foreign_revisions(py: Python<'_>, url: Option<String>) -> PyResult<Vec<String>> {
    let engine = engine::engine(&resolve_url(url)?)?;
    Ok(py.detach(|| engine.with_conn(migrations::foreign_revisions))?)
}

/// Revision ids, oldest first.
#[pyfunction]
pub fn history() -> Vec<&'static str> {
    REVISIONS.iter().map(|r| r.id).collect()
}

/// `{"revision", "down_revision", "description"}` of one revision.
#[pyfunction]
pub fn revision_info<'py>(py: Python<'py>, revision: &str) -> PyResult<Bound<'py, PyDict>> {
    let r = migrations::revision(revision)?;
    let d = PyDict::new(py);
    d.set_item("revision", r.id)?;
    d.set_item("down_revision", r.down_revision())?;
    d.set_item("description", r.description)?;
    Ok(d)
}

/// Records `revision` as current without running its SQL (Alembic's `stamp`).
#[pyfunction]
#[pyo3(signature = (url, revision))]
pub fn stamp(py: Python<'_>, url: Option<String>, revision: &str) -> PyResult<()> {
    let engine = engine::engine(&resolve_url(url)?)?;
    Ok(py.detach(|| engine.with_conn(|c| migrations::stamp(c, revision)))?)
}

/// The SQL a migration would run, without touching the database (Alembic's `--sql`).
/// The URL only selects the dialect.
#[pyfunction]
#[pyo3(signature = (url, target = "head", *, start = None))]
pub fn migration_sql(url: Option<String>, target: &str, start: Option<&str>) -> PyResult<String> {
    let parsed = url::parse(&resolve_url(url)?)?;
    let dialect = match parsed.target {
        url::Target::Sqlite { .. } => crate::dialect::Dialect::Sqlite,
        url::Target::Postgres { .. } => crate::dialect::Dialect::Postgres,
    };
    Ok(migrations::offline_sql(dialect, target, start)?)
}

/// The record of applied revisions: revision, checksum, applied_at, duration_ms, matches.
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn applied<'py>(py: Python<'py>, url: Option<String>) -> PyResult<Bound<'py, PyList>> {
    let engine = engine::engine(&resolve_url(url)?)?;
    let records = py.detach(|| engine.with_conn(migrations::applied))?;
    let out = PyList::empty(py);
    for a in records {
        let d = PyDict::new(py);
        d.set_item("revision", &a.revision)?;
        d.set_item("checksum", &a.checksum)?;
        d.set_item(
            "applied_at",
            to_py_from(py, &a.applied_at, &|| "applied_at".to_string())?,
        )?;
        d.set_item("duration_ms", a.duration_ms)?;
        d.set_item("matches", a.matches)?;
        out.append(d)?;
    }
    Ok(out)
}

/// Applied revisions whose SQL differs from this build's (empty when all match).
#[pyfunction]
#[pyo3(signature = (url = None))]
pub fn check(py: Python<'_>, url: Option<String>) -> PyResult<Vec<String>> {
    let engine = engine::engine(&resolve_url(url)?)?;
    Ok(py.detach(|| engine.with_conn(migrations::check))?)
}

/// The SQLite library this module's calls reach: `(file, version, address of
/// sqlite3_libversion)`, compared at import with the one Python's `sqlite3` module uses.
#[pyfunction]
pub fn sqlite_library() -> (Option<String>, &'static str, usize) {
    let lib = crate::backend::sqlite_library();
    (lib.file, lib.version, lib.address)
}

/// cmbagent's default database URL.
#[pyfunction]
pub fn default_url() -> PyResult<String> {
    Ok(url::default_url()?)
}

/// `url` with its password masked.
#[pyfunction]
pub fn redact_url(url: &str) -> String {
    url::redact(url)
}

/// The open session tracking `obj` (one of the five models), or None: SQLAlchemy's
/// `object_session`.
#[pyfunction]
pub fn object_session<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyDbSession>>> {
    let model = obj.cast::<PyModel>().map_err(|_| {
        PyTypeError::new_err(format!(
            "object_session() takes an object of the five models, got {}",
            obj.get_type()
                .name()
                .map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    let session = model.borrow().session(obj.py());
    Ok(session)
}

/// Closes idle pooled connections of every URL (open sessions keep theirs).
#[pyfunction]
pub fn dispose_engines() {
    engine::dispose_all();
}

/// An index as `schema_indexes` gives it: (table, name, columns, unique, `WHERE` of a
/// partial index).
type IndexInfo = (
    &'static str,
    &'static str,
    Vec<&'static str>,
    bool,
    Option<&'static str>,
);

/// The indexes the migrations create on the five tables, as SQLAlchemy `Index` objects are
/// declared from them.
#[pyfunction]
pub fn schema_indexes() -> Vec<IndexInfo> {
    TableId::all()
        .flat_map(|(_, t)| {
            t.indexes
                .iter()
                .map(|i| (t.name, i.name, i.columns.to_vec(), i.unique, i.predicate))
        })
        .collect()
}

/// The tables this package keeps for its own bookkeeping beside the five (its revision,
/// its applied checksums, SQLite's change log of approval requests).
#[pyfunction]
pub fn bookkeeping_tables() -> Vec<&'static str> {
    migrations::BOOKKEEPING_TABLES.to_vec()
}

/// The five tables as SQLAlchemy `Table` objects are built from them
/// (`cmbagent_db.sqlalchemy.Base.metadata`): per table its name and, per column, (name,
/// type, length, nullable, primary key, foreign key). Types: string, text, integer,
/// boolean, timestamp, timestamptz, json. A foreign key is (referenced table, ON DELETE,
/// whether the table is one of the five); one to an application's table is declared only
/// once the application declares that table.
#[pyfunction]
pub fn schema_tables(py: Python<'_>) -> PyResult<Vec<(&'static str, Bound<'_, PyList>)>> {
    TableId::all()
        .map(|(_, t)| {
            let columns = t
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (ty, length) = match c.ty {
                        ColType::Str(n) => ("string", Some(n)),
                        ColType::Text => ("text", None),
                        ColType::Integer => ("integer", None),
                        ColType::BigInt => ("biginteger", None),
                        ColType::Boolean => ("boolean", None),
                        ColType::Timestamp { tz: false } => ("timestamp", None),
                        ColType::Timestamp { tz: true } => ("timestamptz", None),
                        ColType::Json => ("json", None),
                    };
                    let on_delete = |d| match d {
                        OnDelete::Cascade => "CASCADE",
                        OnDelete::SetNull => "SET NULL",
                    };
                    let fk = match (c.foreign_key, c.app_reference) {
                        (Some(fk), _) => {
                            Some((TABLES[fk.table].name, on_delete(fk.on_delete), true))
                        }
                        (None, Some(r)) => Some((r.table, on_delete(r.on_delete), false)),
                        (None, None) => None,
                    };
                    (c.name, ty, length, c.nullable, i == Table::PK, fk)
                })
                .collect::<Vec<_>>();
            Ok((t.name, PyList::new(py, columns)?))
        })
        .collect()
}
