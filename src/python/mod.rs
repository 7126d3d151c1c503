//! The PyO3 binding: converts arguments, calls the core, converts results.

mod convert;
mod errors;
mod expression;
mod functions;
mod model;
mod query;
mod services;
mod session;

use pyo3::prelude::*;

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    model::register(m)?;
    m.add_class::<expression::Column>()?;
    m.add_class::<expression::Expression>()?;
    m.add_class::<expression::Ordering>()?;
    m.add_class::<session::DbSession>()?;
    m.add_class::<query::Query>()?;
    m.add_function(wrap_pyfunction!(expression::and_, m)?)?;
    m.add_function(wrap_pyfunction!(expression::or_, m)?)?;
    m.add_function(wrap_pyfunction!(expression::not_, m)?)?;
    m.add_function(wrap_pyfunction!(functions::get_db_session, m)?)?;
    m.add_function(wrap_pyfunction!(functions::init_database, m)?)?;
    m.add_function(wrap_pyfunction!(functions::migrate, m)?)?;
    m.add_function(wrap_pyfunction!(functions::current, m)?)?;
    m.add_function(wrap_pyfunction!(functions::history, m)?)?;
    m.add_function(wrap_pyfunction!(functions::revision_info, m)?)?;
    m.add_function(wrap_pyfunction!(functions::stamp, m)?)?;
    m.add_function(wrap_pyfunction!(functions::migration_sql, m)?)?;
    m.add_function(wrap_pyfunction!(functions::applied, m)?)?;
    m.add_function(wrap_pyfunction!(functions::check, m)?)?;
    m.add_function(wrap_pyfunction!(functions::default_url, m)?)?;
    m.add_function(wrap_pyfunction!(functions::redact_url, m)?)?;
    m.add_function(wrap_pyfunction!(functions::dispose_engines, m)?)?;
    let approvals = PyModule::new(m.py(), "approvals")?;
    approvals.add_function(wrap_pyfunction!(services::resolve, &approvals)?)?;
    approvals.add_function(wrap_pyfunction!(services::cancel, &approvals)?)?;
    approvals.add_function(wrap_pyfunction!(services::expire_overdue, &approvals)?)?;
    approvals.add_function(wrap_pyfunction!(services::pending, &approvals)?)?;
    approvals.add_function(wrap_pyfunction!(services::wait, &approvals)?)?;
    m.add_submodule(&approvals)?;
    let connections = PyModule::new(m.py(), "connections")?;
    connections.add_function(wrap_pyfunction!(services::heartbeat, &connections)?)?;
    connections.add_function(wrap_pyfunction!(services::disconnect, &connections)?)?;
    connections.add_function(wrap_pyfunction!(services::release_instance, &connections)?)?;
    connections.add_function(wrap_pyfunction!(services::reap_stale, &connections)?)?;
    connections.add_function(wrap_pyfunction!(services::live, &connections)?)?;
    connections.add_function(wrap_pyfunction!(services::owner, &connections)?)?;
    m.add_submodule(&connections)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
