//! The PyO3 binding: converts arguments, calls the core, converts results.
//!
//! Every Rust type exposed to Python is named `Py` + its Python name (`PyColumn` is
//! `cmbagent_db.Column`, `PySession` is `cmbagent_db.models.Session`), so it never shares a
//! name with the core type it wraps (`schema::Column`, `schema::Table`).

mod convert;
mod dbapi;
mod errors;
mod expression;
mod functions;
mod json;
mod log;
mod model;
mod query;
mod relationship;
mod services;
mod session;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    model::register(m)?;
    relationship::register(m)?;
    m.add_class::<expression::PyColumn>()?;
    m.add_class::<expression::PyExpression>()?;
    m.add_class::<expression::PyOrdering>()?;
    m.add_class::<expression::PyAggregate>()?;
    m.add_class::<expression::PyAliased>()?;
    m.add_class::<expression::PyFunctionNamespace>()?;
    m.add("func", expression::PyFunctionNamespace)?;
    m.add_class::<session::PyDbSession>()?;
    m.add_class::<query::PyQuery>()?;
    m.add_class::<services::OverdueSweep>()?;
    m.add_class::<services::PyTicket>()?;
    m.add_class::<dbapi::PyDbapiConnection>()?;
    m.add_class::<dbapi::PyDbapiCursor>()?;
    m.add_function(wrap_pyfunction!(dbapi::connect, m)?)?;
    m.add("sqlite_version", rusqlite::version())?;
    m.add_function(wrap_pyfunction!(functions::sqlite_library, m)?)?;
    m.add_function(wrap_pyfunction!(expression::and_, m)?)?;
    m.add_function(wrap_pyfunction!(expression::or_, m)?)?;
    m.add_function(wrap_pyfunction!(expression::not_, m)?)?;
    m.add_function(wrap_pyfunction!(expression::aliased, m)?)?;
    m.add_function(wrap_pyfunction!(functions::get_db_session, m)?)?;
    m.add_function(wrap_pyfunction!(functions::pool_session, m)?)?;
    m.add_function(wrap_pyfunction!(functions::init_database, m)?)?;
    m.add_function(wrap_pyfunction!(functions::migrate, m)?)?;
    m.add_function(wrap_pyfunction!(functions::current, m)?)?;
    m.add_function(wrap_pyfunction!(functions::foreign_revisions, m)?)?;
    m.add_function(wrap_pyfunction!(functions::history, m)?)?;
    m.add_function(wrap_pyfunction!(functions::revision_info, m)?)?;
    m.add_function(wrap_pyfunction!(functions::stamp, m)?)?;
    m.add_function(wrap_pyfunction!(functions::migration_sql, m)?)?;
    m.add_function(wrap_pyfunction!(functions::applied, m)?)?;
    m.add_function(wrap_pyfunction!(functions::check, m)?)?;
    m.add_function(wrap_pyfunction!(functions::default_url, m)?)?;
    m.add_function(wrap_pyfunction!(functions::redact_url, m)?)?;
    m.add_function(wrap_pyfunction!(functions::dispose_engines, m)?)?;
    m.add_function(wrap_pyfunction!(functions::object_session, m)?)?;
    m.add_function(wrap_pyfunction!(functions::schema_tables, m)?)?;
    m.add_function(wrap_pyfunction!(functions::schema_indexes, m)?)?;
    m.add_function(wrap_pyfunction!(functions::bookkeeping_tables, m)?)?;
    m.add_function(wrap_pyfunction!(services::resolve, m)?)?;
    m.add_function(wrap_pyfunction!(services::cancel, m)?)?;
    m.add_function(wrap_pyfunction!(services::expire_overdue, m)?)?;
    m.add_function(wrap_pyfunction!(services::pending, m)?)?;
    m.add_function(wrap_pyfunction!(services::wait, m)?)?;
    m.add_function(wrap_pyfunction!(services::heartbeat, m)?)?;
    m.add_function(wrap_pyfunction!(services::heartbeat_many, m)?)?;
    m.add_function(wrap_pyfunction!(services::watch_request, m)?)?;
    m.add_function(wrap_pyfunction!(services::at_exit, m)?)?;
    m.add_function(wrap_pyfunction!(services::disconnect, m)?)?;
    m.add_function(wrap_pyfunction!(services::release_instance, m)?)?;
    m.add_function(wrap_pyfunction!(services::reap_stale, m)?)?;
    m.add_function(wrap_pyfunction!(services::live, m)?)?;
    m.add_function(wrap_pyfunction!(services::owner, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SWEEP_BATCH", crate::approvals::SWEEP_BATCH)?;
    Ok(())
}
