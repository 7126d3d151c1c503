//! cmbagent-db: persistence for cmbagent's human-in-the-loop workflows.
//!
//! The pure core (everything but `python`) owns the SQL, the dialects, value encoding,
//! connections and migrations; the `python` module is the PyO3 binding on top of it.

pub mod approvals;
pub mod backend;
pub mod connections;
pub mod dbapi;
pub mod dialect;
pub mod engine;
pub mod error;
pub mod expr;
pub mod migrate;
pub mod pool;
pub mod query;
pub mod schema;
#[cfg(test)]
mod stubs;
pub mod trace;
pub mod unit_of_work;
pub mod url;
pub mod value;
pub mod watch;

#[cfg(feature = "python")]
mod python;

/// mimalloc for the core's allocations: a row read is a dozen small strings and vectors,
/// and glibc's malloc spent more instructions on them than SQLite spent finding the rows.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
