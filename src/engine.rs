//! One engine per URL per process: its pool, and whether its schema was brought to head.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::backend::Conn;
use crate::dialect::Dialect;
use crate::error::{Error, Result};
use crate::migrate;
use crate::pool::{Pool, Pooled};
use crate::url::{self, Target};

pub struct Engine {
    /// The URL it is registered under (`engine(key)` finds it again).
    key: String,
    pool: Arc<Pool>,
    /// Set once the schema was checked (and brought to head) for sessions.
    ready: Mutex<bool>,
}

impl Engine {
    pub fn connect(&self) -> Result<Pooled> {
        self.pool.get()
    }

    pub fn dialect(&self) -> Dialect {
        match self.pool.url().target {
            Target::Sqlite { .. } => Dialect::Sqlite,
            Target::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// How long one connection attempt may take (`connect_timeout`); None for SQLite, or
    /// a URL that waits for ever.
    pub fn connect_timeout(&self) -> Option<std::time::Duration> {
        match &self.pool.url().target {
            Target::Postgres { timeouts, .. } => timeouts.connect,
            Target::Sqlite { .. } => None,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn display_url(&self) -> &str {
        &self.pool.url().display
    }

    /// Before the first session of this engine: bring the database to head, as cmbagent's
    /// start-up `create_all` does, unless the URL says `auto_migrate=false`. Returns, that
    /// first time only, the applied revisions whose SQL differs from this build's, for the
    /// binding to warn about.
    pub fn ensure_ready(&self) -> Result<Vec<String>> {
        let mut ready = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        if *ready {
            return Ok(Vec::new());
        }
        let url = self.pool.url();
        let drifted = if !url.writable() {
            // Nothing can be brought to head through a read-only URL: it must be there.
            let current = self.with_conn(migrate::current)?;
            if current != Some(migrate::head()) {
                return Err(Error::migration(format!(
                    "{} is opened read-only and its schema is at revision {}, not {}: \
                     migrate it through a writable URL first",
                    url.display,
                    current.unwrap_or("(none)"),
                    migrate::head()
                )));
            }
            Vec::new()
        } else if url.auto_migrate {
            self.with_conn(|c| {
                migrate::migrate(c, "head", false)?;
                migrate::check(c)
            })?
        } else {
            Vec::new()
        };
        *ready = true;
        Ok(drifted)
    }

    /// A connection of its own, outside the pool, for a waiter: it holds the connection for
    /// the whole wait and runs only short statements on it.
    pub fn open_for_waiter(&self) -> Result<Conn> {
        let listen = url::listen_url(&self.key, &|k| std::env::var(k).ok())?;
        let url = listen.as_ref().unwrap_or(self.pool.url());
        Conn::open(&url.for_short_statements())
    }

    /// Runs `f` on a pooled connection and hands both back. `f` must be safe to run again:
    /// when it fails because the server had closed the connection the pool handed out (a
    /// restart, a failover), the idle connections are dropped and `f` runs once more on a
    /// new one.
    fn on_live_conn<T>(&self, mut f: impl FnMut(&mut Conn) -> Result<T>) -> Result<(Pooled, T)> {
        let mut conn = self.connect()?;
        match f(&mut conn) {
            Err(_) if conn.is_broken() => {
                drop(conn);
                self.pool.purge_idle();
                let mut fresh = self.connect()?;
                let out = f(&mut fresh)?;
                Ok((fresh, out))
            }
            Err(e) => Err(e),
            Ok(out) => Ok((conn, out)),
        }
    }

    /// Runs `f` (safe to run again) on a pooled connection, then returns the connection.
    pub fn with_conn<T>(&self, f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        self.on_live_conn(f).map(|(_, out)| out)
    }

    /// A pooled connection with a write transaction begun on it.
    pub fn begin_write(&self) -> Result<Pooled> {
        self.on_live_conn(Conn::begin_write).map(|(conn, ())| conn)
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Engine>>> {
    static ENGINES: OnceLock<Mutex<HashMap<String, Arc<Engine>>>> = OnceLock::new();
    ENGINES.get_or_init(Default::default)
}

/// The engine for `url`, created on first use.
pub fn engine(url: &str) -> Result<Arc<Engine>> {
    let mut engines = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = engines.get(url) {
        return Ok(e.clone());
    }
    let parsed = url::parse(url)?;
    let e = Arc::new(Engine {
        key: url.to_string(),
        pool: Arc::new(Pool::new(parsed)),
        ready: Mutex::new(false),
    });
    engines.insert(url.to_string(), e.clone());
    Ok(e)
}

/// Drops every cached engine and closes its idle connections at once; a connection a
/// session holds closes when the session gives it back (commit, rollback, close), and a
/// session used again afterwards opens one for that use only.
pub fn dispose_all() {
    let engines: Vec<Arc<Engine>> = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, e)| e)
        .collect();
    for e in engines {
        e.pool.dispose();
    }
}
