//! WAL checkpoints off the commit path.
//!
//! SQLite's default checkpoints inside the COMMIT that grows the write-ahead log past 1,000
//! pages: that one commit copies every page written since the last checkpoint into the
//! database file and syncs it, which on a large file costs more than the commit itself
//! (an expiry sweep spent half its time there). SQLite documents the alternative this
//! module takes (<https://sqlite.org/wal.html>, "Application-Initiated Checkpoints"): our
//! connections replace the automatic checkpoint with a WAL hook that only notes the log's
//! size. When a commit that itself wrote at least `LARGE_COMMIT` pages takes the log past
//! `BACKGROUND_AT` pages, the file is queued for a background thread, which runs a PASSIVE
//! checkpoint on a connection of its own (it never blocks readers or writers) and exits
//! when the queue is empty. A small commit past the threshold checkpoints on the spot, as
//! SQLite would (see `after_statement`).
//!
//! With `synchronous=FULL` (the default) durability does not change: a commit is in the
//! synced WAL before it returns, whoever copies it into the database file later. (With
//! `synchronous=NORMAL` the WAL is synced by checkpoints, so the commits a power cut may
//! lose are those since the last background checkpoint.) Should the log reach `INLINE_AT`
//! pages all the same (the thread cannot keep up, or a reader keeps it from finishing), the
//! committing connection checkpoints itself, as SQLite would have.
//!
//! Fork safety: a child forked while the thread is inside SQLite would inherit SQLite's
//! allocator mutex locked and hang at its first SQLite call (Python's `sqlite3` too).
//! `pthread_atfork` handlers make `fork()` wait until the thread is outside SQLite and the
//! queue is unlocked; the child starts with no thread and spawns one when it needs it.

use std::cell::{Cell, UnsafeCell};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::Duration;

use rusqlite::hooks::{CheckpointMode, Wal};
use rusqlite::{Connection, OpenFlags};

use crate::url::Synchronous;

/// SQLite's own default threshold (`PRAGMA wal_autocheckpoint`).
const BACKGROUND_AT: i32 = 1_000;

/// A commit that wrote this many pages leaves its checkpoint to the thread.
const LARGE_COMMIT: i32 = BACKGROUND_AT / 2;

/// The log size at which a committing connection stops leaving the work to the thread.
const INLINE_AT: i32 = 10 * BACKGROUND_AT;

/// How long the background connection waits for a lock while it opens the database (its
/// PASSIVE checkpoint itself never waits: it copies what it can and returns).
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// A database file in WAL mode, with the `synchronous` setting its connections use (the
/// background checkpoint syncs as much as a checkpoint on those connections would).
#[derive(Debug, Clone, PartialEq)]
pub struct WalFile {
    pub path: PathBuf,
    pub synchronous: Synchronous,
}

thread_local! {
    /// Pages in the WAL after the last commit on this thread, as the hook saw them (0 when
    /// the hook copied them itself); None when nothing committed since it was read.
    static WAL_PAGES: Cell<Option<i32>> = const { Cell::new(None) };
}

/// Installs the hook on a new connection (it replaces SQLite's automatic checkpoint).
pub fn install(conn: &Connection) {
    conn.wal_hook(Some(on_commit));
}

/// Called by SQLite after each commit, on the committing thread.
fn on_commit(wal: &Wal, pages: i32) -> rusqlite::Result<()> {
    if pages >= INLINE_AT {
        // The log is not being drained: do what SQLite's automatic checkpoint does. A
        // busy result means another connection is checkpointing, which is as good.
        let _ = wal.checkpoint_v2(CheckpointMode::PASSIVE);
        WAL_PAGES.set(Some(0));
    } else {
        WAL_PAGES.set(Some(pages));
    }
    Ok(())
}

/// After a statement on `conn`, a connection to `file`: if it committed past the
/// threshold, queue the file for the background thread, or, when the thread has not
/// managed to get the log restarted, checkpoint it here (see `Queue::requested_at`).
///
/// Only a commit that itself wrote `LARGE_COMMIT` pages or more is left to the thread (a
/// sweep, a bulk insert: the commits whose callers would wait longest). Small commits
/// that take the log past the threshold checkpoint on the spot, as SQLite's own hook
/// does: under a steady stream of them a background copy never catches up with the log,
/// which then grows instead of restarting, and each commit cost a third more.
pub fn after_statement(conn: &Connection, file: &WalFile) {
    let Some(pages) = WAL_PAGES.take() else {
        return;
    };
    let written = pages_written(conn);
    if pages < BACKGROUND_AT {
        return;
    }
    if written < LARGE_COMMIT || request(file, pages) == Request::Inline {
        if let Ok(true) = run_checkpoint(conn) {
            forget(&file.path);
        }
    }
}

/// Pages `conn` wrote to the WAL since the previous call (SQLite's
/// `SQLITE_DBSTATUS_CACHE_WRITE`, read and reset), so after a commit: what it wrote.
fn pages_written(conn: &Connection) -> i32 {
    let (mut current, mut highwater) = (0, 0);
    // SAFETY: `conn` is open; sqlite3_db_status only reads (and resets) a counter of it.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_db_status(
            conn.handle(),
            rusqlite::ffi::SQLITE_DBSTATUS_CACHE_WRITE,
            &mut current,
            &mut highwater,
            1,
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        current
    } else {
        0
    }
}

/// A value behind a pthread mutex, which (unlike std's `Mutex`) the fork handlers can lock
/// in one callback and unlock in another.
struct ForkLocked<T> {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is only reached through `with`, which holds `mutex`.
unsafe impl<T: Send> Sync for ForkLocked<T> {}

impl<T> ForkLocked<T> {
    const fn new(value: T) -> Self {
        ForkLocked {
            mutex: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
            value: UnsafeCell::new(value),
        }
    }

    fn lock(&self) {
        // SAFETY: a statically initialised, never moved, never destroyed mutex.
        unsafe { libc::pthread_mutex_lock(self.mutex.get()) };
    }

    fn unlock(&self) {
        // SAFETY: as in `lock`; called only by the thread that locked it (the fork handlers
        // run in the forking thread, and in the child that thread is the only one).
        unsafe { libc::pthread_mutex_unlock(self.mutex.get()) };
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        struct Unlock<'a, T>(&'a ForkLocked<T>);
        impl<T> Drop for Unlock<'_, T> {
            fn drop(&mut self) {
                self.0.unlock();
            }
        }
        self.lock();
        let _unlock = Unlock(self);
        // SAFETY: the mutex is held until `_unlock` drops, after `f` returns.
        f(unsafe { &mut *self.value.get() })
    }
}

struct Queue {
    files: Vec<WalFile>,
    /// Whether a thread is draining `files`.
    draining: bool,
    /// The WAL size at each file's last request, until a checkpoint copied the whole log
    /// (the next write transaction then restarts it). Under steady writes a background
    /// checkpoint never copies the whole log (a commit lands before it ends), so the log
    /// keeps growing instead of restarting and every commit finds it past the threshold.
    /// So: a file is queued again only once its log grew by another `BACKGROUND_AT`
    /// pages, and once it grew by twice that the committer checkpoints it itself, as
    /// SQLite would have; the log then restarts.
    requested_at: Vec<(PathBuf, i32)>,
}

static QUEUE: ForkLocked<Queue> = ForkLocked::new(Queue {
    files: Vec::new(),
    draining: false,
    requested_at: Vec::new(),
});

/// Held by the thread while it is inside SQLite.
static IN_SQLITE: ForkLocked<()> = ForkLocked::new(());

static FORK_HANDLERS: Once = Once::new();
static FORK_HANDLERS_OK: AtomicBool = AtomicBool::new(false);

extern "C" fn before_fork() {
    IN_SQLITE.lock();
    QUEUE.lock();
}

extern "C" fn after_fork_in_parent() {
    QUEUE.unlock();
    IN_SQLITE.unlock();
}

extern "C" fn after_fork_in_child() {
    // SAFETY: the queue's mutex is held by this thread since `before_fork`.
    unsafe { (*QUEUE.value.get()).draining = false };
    QUEUE.unlock();
    IN_SQLITE.unlock();
}

#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// Queued for the thread, or asked for already.
    Left,
    /// The committer should checkpoint.
    Inline,
}

fn request(file: &WalFile, pages: i32) -> Request {
    let path = &file.path;
    FORK_HANDLERS.call_once(|| {
        // SAFETY: registers three `extern "C"` functions that take no arguments.
        let rc = unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_in_parent),
                Some(after_fork_in_child),
            )
        };
        FORK_HANDLERS_OK.store(rc == 0, Ordering::Release);
    });
    if !FORK_HANDLERS_OK.load(Ordering::Acquire) {
        // No fork-safe thread: checkpoint as SQLite would.
        return Request::Inline;
    }
    QUEUE.with(|q| {
        match q.requested_at.iter_mut().find(|(p, _)| p == path) {
            // Smaller than at the last request: the log restarted since.
            Some((_, last)) if pages < *last => *last = pages,
            Some((_, last)) if pages < *last + BACKGROUND_AT => return Request::Left,
            Some((_, last)) if pages >= *last + 2 * BACKGROUND_AT => return Request::Inline,
            Some((_, last)) => *last = pages,
            None => q.requested_at.push((path.to_path_buf(), pages)),
        }
        if !q.files.iter().any(|f| &f.path == path) {
            q.files.push(file.clone());
        }
        if !q.draining {
            let spawned = std::thread::Builder::new()
                .name("cmbagent-db-checkpoint".into())
                .spawn(drain);
            if spawned.is_err() {
                // No thread to be had: checkpoint as SQLite would.
                q.files.retain(|f| &f.path != path);
                return Request::Inline;
            }
            q.draining = true;
        }
        Request::Left
    })
}

/// The whole log of `path` was copied: the next request starts afresh.
fn forget(path: &Path) {
    QUEUE.with(|q| q.requested_at.retain(|(p, _)| p != path));
}

/// The thread: checkpoints queued files until the queue is empty.
fn drain() {
    loop {
        let files = QUEUE.with(|q| {
            let files = std::mem::take(&mut q.files);
            q.draining = !files.is_empty();
            files
        });
        if files.is_empty() {
            return;
        }
        for file in files {
            // A failed checkpoint loses nothing (the pages stay in the synced log) and
            // the next commit past the threshold asks again; nobody is there to tell.
            if let Ok(true) = IN_SQLITE.with(|()| checkpoint(&file)) {
                forget(&file.path);
            }
        }
    }
}

/// A PASSIVE checkpoint of `file`, on a connection of its own; whether it
/// copied the whole log. Never creates the file: one deleted meanwhile is left deleted.
fn checkpoint(file: &WalFile) -> rusqlite::Result<bool> {
    let conn = Connection::open_with_flags(
        &file.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)?;
    conn.execute_batch(&format!("PRAGMA synchronous={}", file.synchronous.pragma()))?;
    run_checkpoint(&conn)
}

/// `PRAGMA wal_checkpoint(PASSIVE)`; whether every frame of the log is now in the file.
fn run_checkpoint(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok(r.get::<_, i64>(0)? == 0 && r.get::<_, i64>(1)? == r.get::<_, i64>(2)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_file(path: &Path) -> WalFile {
        WalFile {
            path: path.to_path_buf(),
            synchronous: Synchronous::Full,
        }
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// A WAL database in `dir` with the hook installed, and one commit of about `pages`
    /// pages (a row of 4,000 bytes each).
    fn committed(dir: &Path, pages: usize) -> (PathBuf, Connection) {
        let path = dir.join("c.db");
        let conn = Connection::open(&path).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        install(&conn);
        conn.execute_batch(&format!(
            "CREATE TABLE t(x BLOB); BEGIN; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {pages}) \
             INSERT INTO t SELECT zeroblob(4000) FROM n; COMMIT;"
        ))
        .unwrap();
        (path, conn)
    }

    #[test]
    fn large_commits_are_checkpointed_by_the_thread_not_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        // Past BACKGROUND_AT, short of INLINE_AT.
        let (path, conn) = committed(dir.path(), 1200);
        // The committer did not checkpoint: the pages are in the log, not the file.
        assert!(file_len(&path.with_extension("db-wal")) > 1_000 * 4096);
        assert!(file_len(&path) < 100 * 4096, "{} bytes", file_len(&path));
        after_statement(&conn, &wal_file(&path));
        // The thread copies them into the database file.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while file_len(&path) < 1_000 * 4096 {
            assert!(
                std::time::Instant::now() < deadline,
                "no background checkpoint within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let (log, copied): (i64, i64) = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(log, copied);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1200);
    }

    #[test]
    fn a_small_commit_past_the_threshold_checkpoints_on_the_spot() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = committed(dir.path(), 990);
        let file = wal_file(&path);
        after_statement(&conn, &file);
        assert!(
            file_len(&path) < 100 * 4096,
            "below the threshold: nothing copied"
        );
        // A few pages more take the log past the threshold: copied before returning.
        conn.execute_batch("INSERT INTO t SELECT zeroblob(4000) FROM t LIMIT 20")
            .unwrap();
        after_statement(&conn, &file);
        assert!(file_len(&path) > 1_000 * 4096, "{} bytes", file_len(&path));
    }

    #[test]
    fn a_log_past_the_inline_limit_is_checkpointed_by_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        // Past INLINE_AT, and no request to the thread.
        let (path, _conn) = committed(dir.path(), 10_500);
        // The hook copied the log into the database file before the commit returned, and
        // left nothing for the thread.
        assert!(file_len(&path) > 10_000 * 4096, "{} bytes", file_len(&path));
        assert_eq!(WAL_PAGES.get(), Some(0));
    }

    #[test]
    fn fork_waits_until_the_thread_is_outside_sqlite_and_the_child_has_no_thread() {
        let dir = tempfile::tempdir().unwrap();
        // Registers the fork handlers (the file does not exist: nothing is checkpointed).
        request(&wal_file(&dir.path().join("none.db")), BACKGROUND_AT);
        assert!(FORK_HANDLERS_OK.load(Ordering::Acquire));
        // Stand in for the thread: inside SQLite for 300 ms, while a real thread waits
        // with a file queued (so the parent is draining when it forks).
        let (entered, inside) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            IN_SQLITE.with(|()| {
                entered.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            })
        });
        inside.recv().unwrap();
        request(&wal_file(&dir.path().join("queued.db")), BACKGROUND_AT);
        let started = std::time::Instant::now();
        // SAFETY: the child only reads a static and calls _exit (no allocation, no locks).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let draining = unsafe { (*QUEUE.value.get()).draining };
            unsafe { libc::_exit(if draining { 1 } else { 0 }) };
        }
        let waited = started.elapsed();
        assert!(pid > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        worker.join().unwrap();
        assert!(
            waited >= Duration::from_millis(200),
            "fork went ahead while the thread was inside SQLite ({waited:?})"
        );
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn a_deleted_database_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.db");
        assert!(checkpoint(&wal_file(&path)).is_err());
        assert!(!path.exists());
    }
}
