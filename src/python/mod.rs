//! The PyO3 binding: converts arguments, calls the core, converts results.

mod convert;
mod errors;
mod expression;
mod functions;
mod json;
mod log;
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
    m.add_function(wrap_pyfunction!(services::resolve, m)?)?;
    m.add_function(wrap_pyfunction!(services::cancel, m)?)?;
    m.add_function(wrap_pyfunction!(services::expire_overdue, m)?)?;
    m.add_function(wrap_pyfunction!(services::pending, m)?)?;
    m.add_function(wrap_pyfunction!(services::wait, m)?)?;
    m.add_function(wrap_pyfunction!(services::heartbeat, m)?)?;
    m.add_function(wrap_pyfunction!(services::disconnect, m)?)?;
    m.add_function(wrap_pyfunction!(services::release_instance, m)?)?;
    m.add_function(wrap_pyfunction!(services::reap_stale, m)?)?;
    m.add_function(wrap_pyfunction!(services::live, m)?)?;
    m.add_function(wrap_pyfunction!(services::owner, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
