//! One watcher per database per process, shared by every waiter of that database.
//!
//! A waiter registers the request it waits on and blocks on its own slot (or, from
//! asyncio, is called back when the slot is filled); the watcher's one thread and one
//! connection notice changes and fill the slots of the requests that reached a final
//! state. Changes are noticed by PostgreSQL's LISTEN (triggers NOTIFY the id of every
//! request whose status changes or that is deleted), by SQLite's `PRAGMA data_version`
//! followed by a read of the change log the triggers of revision 004 write (the ids
//! changed since the last read), or, where LISTEN cannot work (a pooler in transaction
//! mode), by looking at every watched request each poll. Every watched request is looked
//! at where nothing names the changes: on SQLite without the change log (a revision before
//! 004) whenever the counter moves or when the log no longer reaches back far enough; on
//! PostgreSQL a batch at a time, all of them every second or few (a deletion on a database
//! without revision 004, a row written with triggers disabled); and on either after the
//! connection is replaced. Looking at every watched request reads only which are still
//! pending; only the others' rows. Deadlines are kept in one ordered
//! set: a request is marked expired when its own deadline passes, without a thread of its
//! own. With nothing to watch the thread sleeps on a condition variable and, after a
//! while, closes its connection and ends.
//!
//! The thread never holds a lock of this module while it reads the database or calls a
//! waiter back, so registering never waits for a statement, and a callback may register.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::approvals::{self, WaitEnd, CHANNEL, RESOLUTIONS};
use crate::backend::{Conn, Row};
use crate::dialect::Dialect;
use crate::engine::Engine;
use crate::error::{Error, ErrorKind, Result};
use crate::migrate::CHANGE_LOG_TABLE as CHANGE_LOG;
use crate::schema::{ColType, APPROVAL_REQUESTS, TABLES};
use crate::value::Value;

/// What a waiter gets: how its wait ended, or why the watcher could not tell.
pub type Outcome = std::result::Result<WaitEnd, Error>;

/// Called from the watcher's thread once a slot is filled (asyncio's waiters).
pub type Notify = Box<dyn Fn() + Send + Sync>;

/// How long the thread waits for a change before it looks at new registrations and
/// deadlines again.
const SLICE: Duration = Duration::from_millis(20);
/// How often SQLite's files are looked at within a slice: every millisecond for a while
/// after a change (requests tend to be resolved in bursts), every 5 ms otherwise. Each
/// look is a wake-up and two `stat`s, so an idle watcher costs well under 1% of a core.
const SQLITE_TICK_BUSY: Duration = Duration::from_millis(1);
const SQLITE_TICK_IDLE: Duration = Duration::from_millis(5);
/// How long after its files were written the watcher looks every millisecond, even where
/// it can sleep until they are written again.
const JUST_WRITTEN: Duration = Duration::from_millis(50);
/// How long after its files were written the watcher still reads the change counter every
/// `SQLITE_TICK_IDLE`: a commit writes its WAL frames, waits for `fsync` (with
/// `synchronous=FULL`, which on a busy disk takes hundreds of milliseconds), and only then
/// publishes them, which sends no event.
const WRITE_SETTLES: Duration = Duration::from_secs(1);
/// How long after a change the watcher keeps looking every millisecond.
const BUSY_FOR: Duration = Duration::from_secs(2);
/// How often every watched request is read when LISTEN is not available.
const POLL: Duration = Duration::from_millis(50);
/// How often every watched request is looked at anyway on PostgreSQL (see `Tour`): once a
/// second, or 400 µs per watched request when there are more than 2,500, so the look stays
/// under about 1% of a core (10,000 requests: every 4 s, a batch every 200 ms).
fn reread_every(watched: usize) -> Duration {
    Duration::from_secs(1).max(Duration::from_micros(400) * watched as u32)
}
/// How long an idle watcher keeps its connection and thread.
const IDLE: Duration = Duration::from_secs(5);
/// The shortest time the watcher goes on trying to reach a database it has lost before
/// it ends every wait with the error (see `Watcher::give_up`).
const LOST_AT_LEAST: Duration = Duration::from_secs(10);
/// Requests per read statement.
const READ_BATCH: usize = 500;
/// How long the watcher's own expiry write waits for a lock before it looks again.
const LOCK_WAIT: Duration = Duration::from_millis(100);

/// One waiter's place: filled once.
struct Slot {
    state: Mutex<SlotState>,
    filled: Condvar,
    notify: Option<Notify>,
}

#[derive(Default)]
struct SlotState {
    outcome: Option<Outcome>,
    /// The watcher has read the request once (found it pending).
    read: bool,
}

impl Slot {
    fn fill(&self, outcome: Outcome) {
        lock(&self.state).outcome = Some(outcome);
        self.filled.notify_all();
        if let Some(notify) = &self.notify {
            notify();
        }
    }

    fn mark_read(&self) {
        lock(&self.state).read = true;
        self.filled.notify_all();
    }
}

#[derive(Default)]
struct State {
    /// The slots waiting on each request.
    waits: HashMap<String, Vec<Arc<Slot>>>,
    /// Requests not read since they were registered (or since the connection changed).
    unread: HashSet<String>,
    /// (deadline, id) of every watched pending request.
    deadlines: BTreeSet<(DateTime<Utc>, String)>,
    /// Each watched request's deadline, to find its entry above.
    deadline_of: HashMap<String, DateTime<Utc>>,
    running: bool,
}

impl State {
    fn forget(&mut self, id: &str) {
        self.waits.remove(id);
        self.unread.remove(id);
        if let Some(d) = self.deadline_of.remove(id) {
            self.deadlines.remove(&(d, id.to_string()));
        }
    }
}

/// The watcher of one database.
struct Watcher {
    engine: Arc<Engine>,
    state: Mutex<State>,
    /// Signalled when a wait is registered.
    registered: Condvar,
    pid: u32,
    /// Whether a connection was ever opened: a database never reached fails its waiters
    /// at once; one reached before is tried again for a while (`give_up`).
    reached: std::sync::atomic::AtomicBool,
}

/// Shared by watcher threads while they are inside SQLite, exclusive around
/// `fork()` (`pthread_atfork`): a thread that forks waits until no watcher is mid-call, so
/// the child never inherits a lock SQLite (or the allocator) holds for a watcher thread
/// that did not come along. The watcher polls often, which would make that likely.
struct ForkLock(std::cell::UnsafeCell<libc::pthread_rwlock_t>);

// SAFETY: the rwlock is only used through the pthread calls, which synchronise.
unsafe impl Sync for ForkLock {}

static FORK_LOCK: ForkLock = ForkLock(std::cell::UnsafeCell::new(libc::PTHREAD_RWLOCK_INITIALIZER));

extern "C" fn before_fork() {
    // SAFETY: a statically initialised rwlock, released (or, in the child, made anew)
    // right after the fork.
    unsafe { libc::pthread_rwlock_wrlock(FORK_LOCK.0.get()) };
}

extern "C" fn after_fork_in_parent() {
    // SAFETY: this thread took the lock in `before_fork`.
    unsafe { libc::pthread_rwlock_unlock(FORK_LOCK.0.get()) };
}

extern "C" fn after_fork_in_child() {
    // The child's one thread has another thread id than the one that took the lock, which
    // glibc's unlock would misread: the child starts with a new, free lock instead.
    // SAFETY: no other thread exists in the child yet.
    unsafe { *FORK_LOCK.0.get() = libc::PTHREAD_RWLOCK_INITIALIZER };
}

/// A watcher thread inside SQLite (see `ForkLock`). PostgreSQL's client holds no lock a
/// child could inherit from this thread (its connection is the watcher's alone), and may
/// block for as long as a connect or statement timeout: it is not held there, so a fork
/// never waits for the server.
struct InLibrary;

impl InLibrary {
    fn enter(dialect: Dialect) -> Option<InLibrary> {
        if dialect != Dialect::Sqlite {
            return None;
        }
        static HANDLERS: std::sync::Once = std::sync::Once::new();
        HANDLERS.call_once(|| {
            // SAFETY: plain function pointers, registered once.
            unsafe {
                libc::pthread_atfork(
                    Some(before_fork),
                    Some(after_fork_in_parent),
                    Some(after_fork_in_child),
                )
            };
        });
        // SAFETY: as above.
        unsafe { libc::pthread_rwlock_rdlock(FORK_LOCK.0.get()) };
        Some(InLibrary)
    }
}

impl Drop for InLibrary {
    fn drop(&mut self) {
        // SAFETY: taken in `enter`.
        unsafe { libc::pthread_rwlock_unlock(FORK_LOCK.0.get()) };
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn registry() -> &'static Mutex<HashMap<String, Arc<Watcher>>> {
    static WATCHERS: OnceLock<Mutex<HashMap<String, Arc<Watcher>>>> = OnceLock::new();
    WATCHERS.get_or_init(Default::default)
}

/// A registered wait. Dropping it before it is filled unregisters it.
pub struct Ticket {
    watcher: Arc<Watcher>,
    id: String,
    slot: Arc<Slot>,
}

/// Registers a wait on request `id` of `engine`'s database; `notify` is called from the
/// watcher's thread when the outcome is there. Starts the database's watcher if none runs
/// in this process (a child after `fork()` starts its own).
pub fn watch(engine: &Arc<Engine>, id: &str, notify: Option<Notify>) -> Result<Ticket> {
    let pid = std::process::id();
    let watcher = {
        let mut watchers = lock(registry());
        match watchers.get(engine.key()) {
            Some(w) if w.pid == pid => w.clone(),
            _ => {
                let w = Arc::new(Watcher {
                    engine: engine.clone(),
                    state: Mutex::new(State::default()),
                    registered: Condvar::new(),
                    pid,
                    reached: Default::default(),
                });
                // A parent's watcher, inherited by fork(), is left as it is: its thread
                // did not come along, and its locks may be held.
                if let Some(old) = watchers.insert(engine.key().to_string(), w.clone()) {
                    std::mem::forget(old);
                }
                w
            }
        }
    };
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState::default()),
        filled: Condvar::new(),
        notify,
    });
    let start = {
        let mut state = lock(&watcher.state);
        state
            .waits
            .entry(id.to_string())
            .or_default()
            .push(slot.clone());
        state.unread.insert(id.to_string());
        let start = !state.running;
        state.running = true;
        start
    };
    watcher.registered.notify_one();
    if start {
        let w = watcher.clone();
        let spawned = std::thread::Builder::new()
            .name("cmbagent-db-watcher".into())
            .spawn(move || w.run());
        if let Err(e) = spawned {
            let mut state = lock(&watcher.state);
            state.running = false;
            state.forget(id);
            return Err(Error::operational(format!(
                "cannot start the approval watcher thread: {e}"
            )));
        }
    }
    Ok(Ticket {
        watcher,
        id: id.to_string(),
        slot,
    })
}

impl Ticket {
    /// The outcome, once there; blocks until it is or until `until` passes (None: for
    /// ever), but not before the request was read once: a wait of no time at all still
    /// says how a request that already ended ended, or that it does not exist. The
    /// outcome stays for later calls.
    pub fn wait(&self, until: Option<Instant>) -> Option<Outcome> {
        let mut slot = lock(&self.slot.state);
        loop {
            if let Some(o) = slot.outcome.as_ref() {
                return Some(o.clone());
            }
            let left = until.map(|t| t.saturating_duration_since(Instant::now()));
            slot = match left {
                Some(left) if !left.is_zero() || !slot.read => {
                    let left = if left.is_zero() {
                        Duration::from_millis(50)
                    } else {
                        left
                    };
                    self.slot
                        .filled
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                Some(_) => return None,
                None => self
                    .slot
                    .filled
                    .wait(slot)
                    .unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// The outcome, if there already.
    pub fn peek(&self) -> Option<Outcome> {
        lock(&self.slot.state).outcome.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // In a child after fork() the parent's watcher is not touched (see `watch`).
        if self.watcher.pid != std::process::id() || lock(&self.slot.state).outcome.is_some() {
            return;
        }
        let mut state = lock(&self.watcher.state);
        let now_empty = match state.waits.get_mut(&self.id) {
            Some(slots) => {
                slots.retain(|s| !Arc::ptr_eq(s, &self.slot));
                slots.is_empty()
            }
            None => false,
        };
        if now_empty {
            state.forget(&self.id);
        }
    }
}

/// How a request's row ends a wait: None while it is pending.
fn classify(row: Row) -> Option<WaitEnd> {
    let status = match &row[crate::col!(APPROVAL_REQUESTS, "status").column] {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    };
    match status.as_deref() {
        Some("pending") => None,
        // Rows of cmbagent's first approval table name their decision in the status.
        Some(s) if s == "resolved" || RESOLUTIONS.contains(&s) => Some(WaitEnd::Resolved(row)),
        Some("expired") => Some(WaitEnd::Expired),
        Some("cancelled") => Some(WaitEnd::Cancelled),
        _ => Some(WaitEnd::UnknownStatus(status)),
    }
}

/// What a read found of one request.
enum Found {
    Final(WaitEnd),
    Pending(Option<DateTime<Utc>>),
}

/// `ids` in batches of `READ_BATCH`: each batch, its placeholders (`?1, ?2, ...` or
/// `$1, $2, ...`) and its values.
fn batches(d: Dialect, ids: &[String]) -> impl Iterator<Item = (&[String], String, Vec<Value>)> {
    ids.chunks(READ_BATCH).map(move |chunk| {
        let marks: Vec<String> = (1..=chunk.len()).map(|n| d.placeholder(n)).collect();
        let params = chunk.iter().map(|i| Value::Text(i.clone())).collect();
        (chunk, marks.join(", "), params)
    })
}

/// Reads `ids` (every column), in statements of `READ_BATCH`.
fn read(conn: &mut Conn, ids: &[String]) -> Result<HashMap<String, Found>> {
    let table = &TABLES[APPROVAL_REQUESTS];
    let shape: Vec<(&str, ColType)> = table.columns.iter().map(|c| (c.name, c.ty)).collect();
    let names: Vec<&str> = table.columns.iter().map(|c| c.name).collect();
    let id_col = crate::col!(APPROVAL_REQUESTS, "id").column;
    let expires_col = crate::col!(APPROVAL_REQUESTS, "expires_at").column;
    let mut found = HashMap::with_capacity(ids.len());
    for (_, marks, params) in batches(conn.dialect(), ids) {
        let sql = format!(
            "SELECT {} FROM approval_requests WHERE id IN ({marks})",
            names.join(", ")
        );
        for row in conn.query(&sql, &params, &shape)? {
            let Value::Text(id) = row[id_col].clone() else {
                continue;
            };
            let expires = match row[expires_col] {
                Value::Timestamp(t) => Some(t),
                _ => None,
            };
            let f = match classify(row) {
                Some(end) => Found::Final(end),
                None => Found::Pending(expires),
            };
            found.insert(id, f);
        }
    }
    Ok(found)
}

/// Which of `ids` are pending: the cheap look at every watched request (a primary-key
/// lookup per request, in statements of `READ_BATCH`). The statements filter on the id
/// alone, so the primary key is the only index a planner can take: with the status in the
/// WHERE clause too, PostgreSQL's plan for a table being resolved row by row scanned it
/// whole for each batch, and a look at 10,000 requests took seconds.
fn pending_among(conn: &mut Conn, ids: &[String]) -> Result<HashSet<String>> {
    let mut pending = HashSet::with_capacity(ids.len());
    for (chunk, marks, params) in batches(conn.dialect(), ids) {
        // Mostly nothing changed: a count says so without a row per request.
        let counted = conn.query(
            &format!(
                "SELECT sum(CASE WHEN status = 'pending' THEN 1 ELSE 0 END) \
                 FROM approval_requests WHERE id IN ({marks})"
            ),
            &params,
            &[("pending", ColType::BigInt)],
        )?;
        if matches!(counted.first().and_then(|r| r.first()), Some(Value::Int(n)) if *n as usize == chunk.len())
        {
            pending.extend(chunk.iter().cloned());
            continue;
        }
        let sql = format!("SELECT id, status FROM approval_requests WHERE id IN ({marks})");
        let shape = [("id", ColType::Str(36)), ("status", ColType::Str(20))];
        for row in conn.query(&sql, &params, &shape)? {
            if let [Value::Text(id), Value::Text(status)] = &row[..] {
                if status == "pending" {
                    pending.insert(id.clone());
                }
            }
        }
    }
    Ok(pending)
}

/// Whether a SQLite error is another connection holding the database.
fn busy(e: &Error) -> bool {
    e.message.contains("locked") || e.message.contains("busy")
}

/// The watcher's connection and how it learns of changes.
struct Link {
    conn: Conn,
    listening: bool,
    /// SQLite's change counter when last read.
    seen: Option<i64>,
    /// SQLite: the last sequence number of the change log read, `None` where the database
    /// has no change log (a revision before 004): then every watched request is looked at
    /// whenever the change counter moves.
    logged: Option<i64>,
    /// SQLite: the database file and its WAL, whose size and modification time are
    /// looked at every tick; the change counter is read only when they moved (a commit
    /// writes one of them) or once every `COUNTER_AT_LEAST`. A `stat` costs a fraction of
    /// a statement, which is what keeps an idle watcher near no CPU at all.
    files: Vec<std::path::PathBuf>,
    stamp: Vec<Option<(std::time::SystemTime, u64)>>,
    counter_read: Instant,
    /// When the change counter last moved.
    changed_at: Instant,
    /// When the database's files were last seen written.
    touched_at: Instant,
    /// Where it can (Linux), the watcher sleeps until a file of the database's directory is
    /// written instead of looking every few milliseconds.
    dir: Option<DirWatch>,
}

/// Linux's inotify on a directory: a wait that ends as soon as a file there is written
/// (by any process), and no wake-up at all while nothing is.
struct DirWatch {
    fd: libc::c_int,
}

impl DirWatch {
    #[cfg(target_os = "linux")]
    fn new(dir: &std::path::Path) -> Option<DirWatch> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: plain system calls on a descriptor this value owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let watch = DirWatch { fd };
        let events = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_DELETE;
        // SAFETY: as above; `path` is NUL-terminated.
        if unsafe { libc::inotify_add_watch(fd, path.as_ptr(), events) } < 0 {
            return None;
        }
        Some(watch)
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_dir: &std::path::Path) -> Option<DirWatch> {
        None
    }

    /// Sleeps until a file of the directory is written or `timeout` passes.
    fn wait(&self, timeout: Duration) {
        let mut fds = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd; the buffer outlives each read.
        unsafe {
            if libc::poll(&mut fds, 1, ms) > 0 {
                let mut buf = [0u8; 4096];
                while libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
            }
        }
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        // SAFETY: the descriptor is this value's.
        unsafe { libc::close(self.fd) };
    }
}

/// How often SQLite's change counter is read even when the files look unchanged (a file
/// system whose modification times are coarse).
const COUNTER_AT_LEAST: Duration = Duration::from_millis(250);

fn stamps(files: &[std::path::PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

impl Link {
    fn open(engine: &Engine) -> Result<Link> {
        let _in = InLibrary::enter(engine.dialect());
        let mut conn = engine.open_for_waiter()?;
        let listening = conn.can_listen();
        if listening {
            approvals::ensure_notify_trigger(&mut conn)?;
            conn.batch(&format!("LISTEN {CHANNEL}"))?;
        }
        // Marking a request expired must not block the watcher behind a client that
        // holds the row.
        conn.set_lock_timeout(LOCK_WAIT)?;
        let seen = conn.data_version()?;
        let logged = last_logged(&mut conn)?;
        let files: Vec<std::path::PathBuf> = conn
            .database_file()
            .map(|db| {
                let mut wal = db.as_os_str().to_owned();
                wal.push("-wal");
                vec![db.to_path_buf(), wal.into()]
            })
            .unwrap_or_default();
        Ok(Link {
            conn,
            listening,
            seen,
            logged,
            stamp: stamps(&files),
            dir: files
                .first()
                .and_then(|db| db.parent())
                .and_then(DirWatch::new),
            files,
            counter_read: Instant::now(),
            changed_at: Instant::now(),
            touched_at: Instant::now(),
        })
    }

    /// Waits up to `slice` for a change. `Some(ids)`: those requests changed; `None`:
    /// something may have changed (read every watched request).
    fn changes(&mut self, slice: Duration) -> Result<Option<Vec<String>>> {
        match self.conn.dialect() {
            Dialect::Postgres if self.listening => Ok(Some(self.conn.notifications(slice)?)),
            Dialect::Postgres => {
                std::thread::sleep(slice);
                Ok(None)
            }
            Dialect::Sqlite => {
                let started = Instant::now();
                loop {
                    let stamp = stamps(&self.files);
                    if self.files.is_empty()
                        || stamp != self.stamp
                        || self.touched_at.elapsed() < WRITE_SETTLES
                        || self.counter_read.elapsed() >= COUNTER_AT_LEAST
                    {
                        if stamp != self.stamp {
                            self.touched_at = Instant::now();
                        }
                        self.stamp = stamp;
                        self.counter_read = Instant::now();
                        let version = {
                            let _in = InLibrary::enter(Dialect::Sqlite);
                            self.conn.data_version()?
                        };
                        if version != self.seen {
                            self.seen = version;
                            self.changed_at = Instant::now();
                            return self.logged_changes();
                        }
                    }
                    let left = slice.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Ok(Some(Vec::new()));
                    }
                    match &self.dir {
                        // A commit writes its WAL frames, then publishes them in the
                        // shared-memory index, which sends no event: just after a write,
                        // look every millisecond for a while, then every few until even
                        // a slow fsync is over.
                        Some(dir) if self.touched_at.elapsed() >= WRITE_SETTLES => dir.wait(left),
                        Some(_) if self.touched_at.elapsed() >= JUST_WRITTEN => {
                            std::thread::sleep(SQLITE_TICK_IDLE)
                        }
                        Some(_) => std::thread::sleep(SQLITE_TICK_BUSY),
                        None => std::thread::sleep(if self.changed_at.elapsed() < BUSY_FOR {
                            SQLITE_TICK_BUSY
                        } else {
                            SQLITE_TICK_IDLE
                        }),
                    }
                }
            }
        }
    }
}

/// Whether a SQLite error says the change log is not there (dropped by a downgrade).
fn no_change_log(e: &Error) -> bool {
    e.message.contains("no such table")
}

/// The newest sequence number of SQLite's change log (0 when empty), or `None` where the
/// database has none. PostgreSQL: `None` (its trigger names each change).
fn last_logged(conn: &mut Conn) -> Result<Option<i64>> {
    if conn.dialect() != Dialect::Sqlite {
        return Ok(None);
    }
    let _in = InLibrary::enter(Dialect::Sqlite);
    let sql = format!("SELECT coalesce(max(seq), 0) FROM {CHANGE_LOG}");
    match conn.query(&sql, &[], &[("seq", ColType::BigInt)]) {
        Ok(rows) => Ok(match rows.first().and_then(|r| r.first()) {
            Some(Value::Int(n)) => Some(*n),
            _ => Some(0),
        }),
        Err(e) if no_change_log(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Link {
    /// After SQLite's change counter moved: the requests the change log names since it was
    /// last read, or `None` (look at every watched request) where there is no log, the log
    /// no longer reaches back that far (more than its 10,000 entries since), or it starts
    /// below what was read (made anew).
    fn logged_changes(&mut self) -> Result<Option<Vec<String>>> {
        let Some(last) = self.logged else {
            return Ok(None);
        };
        // The newest entry comes along even when it is not new: it tells whether the log
        // was made anew below `last`.
        let sql = format!(
            "SELECT seq, request_id FROM {CHANGE_LOG} \
             WHERE seq > ?1 OR seq = (SELECT max(seq) FROM {CHANGE_LOG}) ORDER BY seq"
        );
        let shape = [("seq", ColType::BigInt), ("request_id", ColType::Str(36))];
        let rows = {
            let _in = InLibrary::enter(Dialect::Sqlite);
            self.conn.query(&sql, &[Value::Int(last)], &shape)
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if no_change_log(&e) => {
                self.logged = None;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let mut expected = last + 1;
        let mut complete = true;
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows {
            if let [Value::Int(seq), Value::Text(id)] = &row[..] {
                if *seq <= last {
                    // The newest entry, already read; or, below it, a log made anew.
                    complete &= *seq == last;
                    self.logged = Some(*seq);
                    continue;
                }
                // Entries are numbered without gaps: one missing was pruned unread.
                complete &= *seq == expected;
                expected = seq + 1;
                self.logged = Some(*seq);
                ids.push(id.clone());
            }
        }
        Ok(complete.then_some(ids))
    }
}

/// The look at every watched request that PostgreSQL's watcher makes anyway (a deletion on
/// a database without revision 004's trigger, rows changed with triggers disabled): one
/// batch of `READ_BATCH` per turn, spread over `reread_every`, so no turn holds back the
/// notifications behind it for longer than one statement.
#[derive(Default)]
struct Tour {
    left: Vec<String>,
    next_at: Option<Instant>,
}

impl Tour {
    /// The next batch of watched requests to look at: none until one is due.
    fn due(&mut self, state: &State) -> Vec<String> {
        let now = Instant::now();
        let watched = state.waits.len();
        let next_at = *self
            .next_at
            .get_or_insert_with(|| now + reread_every(watched));
        if now < next_at || watched == 0 {
            return Vec::new();
        }
        if self.left.is_empty() {
            self.left = state.waits.keys().cloned().collect();
        }
        let turns = watched.div_ceil(READ_BATCH).max(1) as u32;
        self.next_at = Some(now + reread_every(watched) / turns);
        let from = self.left.len().saturating_sub(READ_BATCH);
        self.left
            .drain(from..)
            .filter(|i| state.waits.contains_key(i))
            .collect()
    }
}

impl Watcher {
    /// How long a lost database is tried again before every wait ends with the error:
    /// twice the connect timeout, at least `LOST_AT_LEAST`. A restart, a failover or a
    /// killed connection is over well within it; a server gone for good is not waited on
    /// until each caller's own timeout.
    fn give_up(&self) -> Duration {
        self.engine
            .connect_timeout()
            .map_or(LOST_AT_LEAST, |t| (t * 2).max(LOST_AT_LEAST))
    }

    fn run(self: Arc<Self>) {
        /// A panic (a bug) ends the waits the thread leaves with an error instead of
        /// leaving them hanging, and lets a later wait start another thread. (The thread
        /// ends normally only when idle, having said so under the lock.)
        struct Ended<'a>(&'a Watcher);
        impl Drop for Ended<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0
                        .fail_all(Error::internal("the approval watcher thread failed"));
                    lock(&self.0.state).running = false;
                }
            }
        }
        let _ended = Ended(&self);
        let mut link: Option<Link> = None;
        let mut connected_once = self.reached.load(std::sync::atomic::Ordering::Relaxed);
        // Since when the database has been out of reach.
        let mut lost_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let mut tour = Tour::default();
        let mut idle_since: Option<Instant> = None;
        loop {
            // Nothing to watch: sleep until something is, and end after a while.
            {
                let mut state = lock(&self.state);
                while state.waits.is_empty() {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    let left = IDLE.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        state.running = false;
                        drop(state);
                        let _in = InLibrary::enter(self.engine.dialect());
                        drop(link);
                        return;
                    }
                    state = self
                        .registered
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                idle_since = None;
            }
            let l = match link.as_mut() {
                Some(l) => l,
                None => match Link::open(&self.engine) {
                    Ok(l) => {
                        connected_once = true;
                        self.reached
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        lost_since = None;
                        backoff = Duration::from_millis(100);
                        // Whatever happened while there was no connection: read it all.
                        let mut state = lock(&self.state);
                        let ids: Vec<String> = state.waits.keys().cloned().collect();
                        state.unread.extend(ids);
                        drop(state);
                        link.insert(l)
                    }
                    Err(e) => {
                        let lost = lost_since.get_or_insert_with(Instant::now).elapsed();
                        if !connected_once {
                            // A database that cannot be reached at all (a wrong URL, a
                            // password): every waiter hears it now.
                            self.fail_all(e);
                        } else if lost >= self.give_up() {
                            self.fail_all(e.context(format!(
                                "the database has been out of reach for {}s",
                                lost.as_secs()
                            )));
                            lost_since = None;
                        }
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            if let Err(e) = self.step(l, &mut tour) {
                match l.conn.dialect() {
                    // The connection is gone or unusable: a new one, and everything read
                    // again.
                    Dialect::Postgres if l.conn.is_broken() || e.kind == ErrorKind::Operational => {
                        lost_since.get_or_insert_with(Instant::now);
                        link = None;
                        // A failure that did not lose the connection (a statement timeout
                        // of the server's) must not turn into a tight reconnect loop.
                        std::thread::sleep(SLICE);
                    }
                    // Another connection holds SQLite's lock: the next round reads again.
                    Dialect::Sqlite if e.kind == ErrorKind::Operational && busy(&e) => {
                        std::thread::sleep(SLICE)
                    }
                    // Anything else (a database without the table, ...) ends every wait
                    // with the error, as it would end each of them again.
                    _ => self.fail_all(e),
                }
            }
        }
    }

    /// One round: read what is new, expire what is due, wait for a change, read what
    /// changed.
    fn step(&self, link: &mut Link, tour: &mut Tour) -> Result<()> {
        let unread: Vec<String> = lock(&self.state).unread.drain().collect();
        if !unread.is_empty() {
            self.read_and_fill(&mut link.conn, &unread)?;
        }
        self.expire_due(&mut link.conn)?;
        let slice = {
            let state = lock(&self.state);
            if !state.unread.is_empty() {
                return Ok(());
            }
            let until_deadline = state
                .deadlines
                .first()
                .and_then(|(d, _)| (*d - Utc::now()).to_std().ok())
                .unwrap_or(SLICE);
            SLICE.min(until_deadline)
        };
        let postgres = link.conn.dialect() == Dialect::Postgres;
        let poll = postgres && !link.listening;
        let changed = link.changes(if poll { POLL } else { slice })?;
        let (named, looked_at): (Vec<String>, Vec<String>) = {
            let state = lock(&self.state);
            match changed {
                Some(ids) => (
                    ids.into_iter()
                        .filter(|i| state.waits.contains_key(i))
                        .collect(),
                    if postgres {
                        tour.due(&state)
                    } else {
                        Vec::new()
                    },
                ),
                None => (Vec::new(), state.waits.keys().cloned().collect()),
            }
        };
        // The requests looked at by id only: the rows of those no longer pending.
        let ended: Vec<String> = if looked_at.is_empty() {
            Vec::new()
        } else {
            let pending = {
                let _in = InLibrary::enter(link.conn.dialect());
                pending_among(&mut link.conn, &looked_at)?
            };
            looked_at
                .into_iter()
                .filter(|i| !pending.contains(i) && !named.contains(i))
                .collect()
        };
        let ids: Vec<String> = named.into_iter().chain(ended).collect();
        if !ids.is_empty() {
            self.read_and_fill(&mut link.conn, &ids)?;
        }
        Ok(())
    }

    /// Reads `ids` and fills the slots of those that ended (a missing row ends as not
    /// found); notes the deadlines of those still pending.
    fn read_and_fill(&self, conn: &mut Conn, ids: &[String]) -> Result<()> {
        let mut found = {
            let _in = InLibrary::enter(conn.dialect());
            read(conn, ids)?
        };
        let mut done: Vec<(Vec<Arc<Slot>>, WaitEnd)> = Vec::new();
        let mut read_once: Vec<Arc<Slot>> = Vec::new();
        {
            let mut state = lock(&self.state);
            for id in ids {
                if !state.waits.contains_key(id) {
                    continue;
                }
                match found.remove(id) {
                    Some(Found::Pending(expires)) => {
                        read_once.extend(state.waits[id].iter().cloned());
                        if let Some(d) = expires {
                            if state.deadline_of.get(id) != Some(&d) {
                                if let Some(old) = state.deadline_of.insert(id.clone(), d) {
                                    state.deadlines.remove(&(old, id.clone()));
                                }
                                state.deadlines.insert((d, id.clone()));
                            }
                        }
                    }
                    Some(Found::Final(end)) => {
                        let slots = state.waits.remove(id).unwrap_or_default();
                        state.forget(id);
                        done.push((slots, end));
                    }
                    None => {
                        let slots = state.waits.remove(id).unwrap_or_default();
                        state.forget(id);
                        done.push((slots, WaitEnd::NotFound));
                    }
                }
            }
        }
        for slot in read_once {
            slot.mark_read();
        }
        for (slots, end) in done {
            for slot in slots {
                slot.fill(Ok(end.clone()));
            }
        }
        Ok(())
    }

    /// Marks every watched request whose deadline passed expired (unless a resolver got
    /// there first), then reads them.
    fn expire_due(&self, conn: &mut Conn) -> Result<()> {
        let now = Utc::now();
        let due: Vec<String> = {
            let state = lock(&self.state);
            state
                .deadlines
                .iter()
                .take_while(|(d, _)| *d <= now)
                .map(|(_, id)| id.clone())
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let in_library = InLibrary::enter(conn.dialect());
        for id in &due {
            let expired = conn.begin_write().and_then(|()| {
                approvals::expire_one(conn, id, now, &approvals::Scope::default())?;
                conn.commit()
            });
            if let Err(e) = expired {
                conn.rollback()?;
                // Another client holds the row (PostgreSQL: go on with the next one) or
                // SQLite's write lock (stop): it decides the row's fate when it finishes,
                // and the next round looks again.
                if e.kind == ErrorKind::Operational && !conn.is_broken() {
                    match conn.dialect() {
                        Dialect::Postgres => continue,
                        Dialect::Sqlite => break,
                    }
                }
                return Err(e);
            }
        }
        drop(in_library);
        self.read_and_fill(conn, &due)
    }

    /// Fills every slot with `error`: the watcher cannot tell how their waits end.
    fn fail_all(&self, error: Error) {
        let slots: Vec<Arc<Slot>> = {
            let mut state = lock(&self.state);
            let all = state.waits.drain().flat_map(|(_, s)| s).collect();
            state.unread.clear();
            state.deadlines.clear();
            state.deadline_of.clear();
            all
        };
        for slot in slots {
            slot.fill(Err(error.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine;
    use crate::migrate;

    fn db() -> (tempfile::TempDir, String, Conn) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:///{}", dir.path().join("w.db").display());
        let mut c = Conn::open(&crate::url::parse(&url).unwrap()).unwrap();
        migrate::migrate(&mut c, "head", false).unwrap();
        c.batch("INSERT INTO sessions (id, name) VALUES ('s', 'n'); INSERT INTO workflow_runs (id, session_id) VALUES ('r', 's');")
            .unwrap();
        (dir, url, c)
    }

    fn request(c: &mut Conn, id: &str, expires_in: chrono::TimeDelta) {
        c.execute(
            "INSERT INTO approval_requests (id, run_id, approval_type, context, status, expires_at) VALUES (?1, 'r', 'plan_approval', '{}', 'pending', ?2)",
            &[Value::Text(id.into()), Value::Timestamp(Utc::now() + expires_in)],
        )
        .unwrap();
    }

    fn ended(t: &Ticket) -> WaitEnd {
        t.wait(Some(Instant::now() + Duration::from_secs(10)))
            .expect("the wait did not end")
            .unwrap()
    }

    #[test]
    fn one_watcher_wakes_each_waiter_of_the_request_that_changed() {
        let (_dir, url, mut c) = db();
        let minutes = chrono::TimeDelta::minutes(5);
        for id in ["a", "b"] {
            request(&mut c, id, minutes);
        }
        let e = engine::engine(&url).unwrap();
        let a1 = watch(&e, "a", None).unwrap();
        let a2 = watch(&e, "a", None).unwrap();
        let b = watch(&e, "b", None).unwrap();
        let missing = watch(&e, "nope", None).unwrap();
        assert_eq!(ended(&missing), WaitEnd::NotFound);
        c.execute(
            "UPDATE approval_requests SET status = 'cancelled' WHERE id = 'a'",
            &[],
        )
        .unwrap();
        assert_eq!(ended(&a1), WaitEnd::Cancelled);
        assert_eq!(ended(&a2), WaitEnd::Cancelled);
        assert!(b
            .wait(Some(Instant::now() + Duration::from_millis(100)))
            .is_none());
        // A dropped ticket unregisters: nothing is left watching "a".
        drop(b);
        let state = lock(&registry().lock().unwrap()[&url].state).waits.len();
        assert_eq!(state, 0);
    }

    #[test]
    fn a_deadline_expires_the_request_without_a_waiter_thread() {
        let (_dir, url, mut c) = db();
        request(&mut c, "soon", chrono::TimeDelta::milliseconds(200));
        let e = engine::engine(&url).unwrap();
        let t = watch(&e, "soon", None).unwrap();
        assert_eq!(ended(&t), WaitEnd::Expired);
        let status = c
            .query(
                "SELECT status FROM approval_requests WHERE id = 'soon'",
                &[],
                &[("status", ColType::Str(20))],
            )
            .unwrap();
        assert_eq!(status[0][0], Value::Text("expired".into()));
    }

    fn status(c: &mut Conn, id: &str, status: &str) {
        c.execute(
            "UPDATE approval_requests SET status = ?1 WHERE id = ?2",
            &[Value::Text(status.into()), Value::Text(id.into())],
        )
        .unwrap();
    }

    #[test]
    fn sqlite_names_the_requests_that_changed_from_its_change_log() {
        let (_dir, url, mut c) = db();
        let minutes = chrono::TimeDelta::minutes(5);
        for id in ["a", "b", "c"] {
            request(&mut c, id, minutes);
        }
        let e = engine::engine(&url).unwrap();
        let mut link = Link::open(&e).unwrap();
        assert!(link.logged.is_some());
        assert_eq!(link.logged_changes().unwrap(), Some(vec![]));
        // A status written again unchanged is no change; a deletion is, and so is a
        // request deleted with its run.
        status(&mut c, "a", "pending");
        status(&mut c, "b", "cancelled");
        c.execute("DELETE FROM approval_requests WHERE id = 'c'", &[])
            .unwrap();
        assert_eq!(
            link.logged_changes().unwrap(),
            Some(vec!["b".to_string(), "c".to_string()])
        );
        assert_eq!(link.logged_changes().unwrap(), Some(vec![]));
        c.execute("DELETE FROM workflow_runs WHERE id = 'r'", &[])
            .unwrap();
        assert_eq!(
            link.logged_changes().unwrap(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
    }

    #[test]
    fn sqlite_looks_at_everything_when_its_change_log_falls_short() {
        let (_dir, url, mut c) = db();
        request(&mut c, "a", chrono::TimeDelta::minutes(5));
        let e = engine::engine(&url).unwrap();
        let mut link = Link::open(&e).unwrap();
        // More changes than the log keeps: the ones between are gone.
        c.batch("BEGIN").unwrap();
        for i in 0..10_001 {
            status(
                &mut c,
                "a",
                if i % 2 == 0 { "cancelled" } else { "pending" },
            );
        }
        c.batch("COMMIT").unwrap();
        assert_eq!(link.logged_changes().unwrap(), None);
        // From the newest entry on, the log serves again.
        status(&mut c, "a", "expired");
        assert_eq!(link.logged_changes().unwrap(), Some(vec!["a".to_string()]));
        // A log emptied by hand numbers from 1 again: below what was read, so not trusted.
        c.execute("DELETE FROM cmbagent_db_approval_changes", &[])
            .unwrap();
        status(&mut c, "a", "pending");
        assert_eq!(link.logged_changes().unwrap(), None);
        status(&mut c, "a", "cancelled");
        assert_eq!(link.logged_changes().unwrap(), Some(vec!["a".to_string()]));
        // A downgrade drops the log under the watcher: it looks at everything from then on.
        migrate::migrate(&mut c, "003_cmbagent_columns", false).unwrap();
        assert_eq!(link.logged_changes().unwrap(), None);
        assert_eq!(link.logged, None);
        assert_eq!(Link::open(&e).unwrap().logged, None);
    }

    #[test]
    fn a_tour_looks_at_every_watched_request_once_a_batch_at_a_time() {
        let mut state = State::default();
        for n in 0..1_200 {
            state.waits.insert(format!("r{n}"), Vec::new());
        }
        let mut tour = Tour::default();
        assert!(
            tour.due(&state).is_empty(),
            "the first look is a period away"
        );
        let mut seen = HashSet::new();
        for expected in [500, 500, 200] {
            tour.next_at = Some(Instant::now());
            let batch = tour.due(&state);
            assert_eq!(batch.len(), expected);
            seen.extend(batch);
            // The next batch is due within the period spread over three turns.
            let after = tour.next_at.unwrap() - Instant::now();
            assert!(after <= reread_every(1_200) / 3, "{after:?}");
            assert!(tour.due(&state).is_empty());
        }
        assert_eq!(seen.len(), 1_200);
        // A request no longer watched is left out; the next tour starts over.
        state.waits.remove("r0");
        tour.next_at = Some(Instant::now());
        let batch = tour.due(&state);
        assert_eq!(batch.len(), 500);
        assert!(!batch.contains(&"r0".to_string()));
    }

    #[test]
    fn a_callback_hears_the_outcome() {
        let (_dir, url, mut c) = db();
        request(&mut c, "x", chrono::TimeDelta::minutes(5));
        let e = engine::engine(&url).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let t = watch(
            &e,
            "x",
            Some(Box::new(move || {
                let _ = lock(&tx).send(());
            })),
        )
        .unwrap();
        c.execute(
            "UPDATE approval_requests SET status = 'resolved', resolution = 'approved' WHERE id = 'x'",
            &[],
        )
        .unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(ended(&t), WaitEnd::Resolved(_)));
    }
}
