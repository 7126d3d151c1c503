//! A small connection pool per URL.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::Conn;
use crate::error::{Error, Result};
use crate::url::{DbUrl, SqlitePath, Target};

/// Idle connections kept for reuse; more are opened on demand and closed when returned.
const MAX_IDLE: usize = 8;

struct State {
    idle: Vec<Conn>,
    open: usize,
    /// The process these connections belong to (see `forget_inherited`).
    pid: u32,
    /// After `dispose()`: connections are closed when given back instead of kept.
    disposed: bool,
}

impl State {
    /// After `fork()` the child holds copies of the parent's connections: the same
    /// sockets (and SQLite handles). Talking on them from both processes interleaves two
    /// conversations on one socket and both hang; closing them in the child would end the
    /// parent's sessions (a PostgreSQL Terminate message). The child forgets them unused
    /// and opens its own; the parent is not affected.
    fn forget_inherited(&mut self) {
        let pid = std::process::id();
        if self.pid != pid {
            for conn in self.idle.drain(..) {
                std::mem::forget(conn);
            }
            self.open = 0;
            self.pid = pid;
        }
    }
}

pub struct Pool {
    url: DbUrl,
    state: Mutex<State>,
    returned: Condvar,
    /// `:memory:` is one database per connection, so it has exactly one, shared in turn.
    max_open: Option<usize>,
    wait: Duration,
}

impl Pool {
    pub fn new(url: DbUrl) -> Pool {
        let (max_open, wait) = match &url.target {
            Target::Sqlite {
                path: SqlitePath::Memory,
                busy_timeout,
                ..
            } => (Some(1), *busy_timeout),
            Target::Sqlite { busy_timeout, .. } => (None, *busy_timeout),
            Target::Postgres { .. } => (None, Duration::from_secs(30)),
        };
        Pool {
            url,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                pid: std::process::id(),
                disposed: false,
            }),
            returned: Condvar::new(),
            max_open,
            wait,
        }
    }

    pub fn url(&self) -> &DbUrl {
        &self.url
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain counters behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(self: &Arc<Self>) -> Result<Pooled> {
        let deadline = Instant::now() + self.wait;
        let mut st = self.lock();
        st.forget_inherited();
        loop {
            if let Some(conn) = st.idle.pop() {
                if conn.is_broken() {
                    st.open -= 1;
                    continue;
                }
                return Ok(Pooled {
                    conn: Some(conn),
                    pool: self.clone(),
                    pid: st.pid,
                });
            }
            if self.max_open.is_none_or(|m| st.open < m) {
                st.open += 1;
                let pid = st.pid;
                drop(st);
                return match Conn::open(&self.url) {
                    Ok(conn) => Ok(Pooled {
                        conn: Some(conn),
                        pool: self.clone(),
                        pid,
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::operational(format!(
                    "database is locked: the only connection to {} is in use by another session (commit or close it)",
                    self.url.display
                )));
            }
            st = self
                .returned
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Closes every idle connection: when the server dropped one, it most likely dropped
    /// them all (a restart, a failover), as SQLAlchemy's pool assumes too.
    pub fn purge_idle(&self) {
        let mut st = self.lock();
        st.forget_inherited();
        let n = st.idle.len();
        st.idle.clear();
        st.open -= n;
    }

    /// Closes every idle connection now, and from now on each connection given back
    /// (those sessions hold at the time) is closed too. Sessions that still use the pool
    /// keep working, on a connection opened for each use, as SQLAlchemy's sessions do
    /// after `engine.dispose()`.
    pub fn dispose(&self) {
        self.lock().disposed = true;
        self.purge_idle();
    }

    fn put(&self, mut conn: Conn, pid: u32) {
        if pid != std::process::id() {
            // Checked out before a fork and given back in the child: the parent's.
            std::mem::forget(conn);
            return;
        }
        // A connection goes back clean: whatever its holder left open is undone.
        let clean = conn.rollback().is_ok() && !conn.is_broken();
        let mut st = self.lock();
        st.forget_inherited();
        if clean && !st.disposed && (st.idle.len() < MAX_IDLE || self.max_open.is_some()) {
            st.idle.push(conn);
        } else {
            st.open -= 1;
        }
        drop(st);
        self.returned.notify_one();
    }
}

/// A connection checked out of a pool; it goes back (rolled back) when dropped.
pub struct Pooled {
    conn: Option<Conn>,
    pool: Arc<Pool>,
    /// The process that checked it out.
    pid: u32,
}

impl Pooled {
    /// Whether this process inherited it through `fork()` rather than checking it out.
    pub fn inherited(&self) -> bool {
        self.pid != std::process::id()
    }
}

impl std::ops::Deref for Pooled {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        // Only `drop` takes the connection out.
        self.conn
            .as_ref()
            .expect("pooled connection present until drop") // ok: invariant
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("pooled connection present until drop") // ok: invariant
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put(conn, self.pid);
        }
    }
}
