//! WAL checkpoints off the commit path.
//!
//! SQLite's default checkpoints inside the COMMIT that grows the write-ahead log past 1,000
//! pages: that one commit copies every page written since the last checkpoint into the
//! database file and syncs it, which on a large file costs more than the commit itself
//! (an expiry sweep spent half its time there). SQLite documents the alternative this
//! module takes (<https://sqlite.org/wal.html>, "Application-Initiated Checkpoints"): our
//! connections replace the automatic checkpoint with a WAL hook that only notes the log's
//! size, and after a statement that committed past `BACKGROUND_AT` pages, the database is
//! handed to one background thread per process, which runs a PASSIVE checkpoint on a
//! connection of its own (it never blocks readers or writers).
//!
//! Durability does not change: a commit is in the synced WAL before it returns, whoever
//! copies it into the database file later. Should the log reach `INLINE_AT` pages all the
//! same (the thread cannot keep up, or a forked child has none yet), the committing
//! connection checkpoints itself, as SQLite would have.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::hooks::{CheckpointMode, Wal};
use rusqlite::{Connection, OpenFlags};

/// SQLite's own default threshold (`PRAGMA wal_autocheckpoint`).
const BACKGROUND_AT: i32 = 1_000;

/// The log size at which a committing connection stops leaving the work to the thread.
const INLINE_AT: i32 = 10 * BACKGROUND_AT;

/// How long the background connection waits for a lock: a PASSIVE checkpoint never waits
/// for readers or writers, only for another checkpoint that holds the file.
const CHECKPOINT_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

thread_local! {
    /// Pages in the WAL after the last commit on this thread, as the hook saw them.
    static WAL_PAGES: Cell<i32> = const { Cell::new(0) };
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
        WAL_PAGES.set(0);
    } else {
        WAL_PAGES.set(pages);
    }
    Ok(())
}

/// After a statement on a connection to `path`: if it committed past the threshold, have
/// the background thread checkpoint the file.
pub fn after_statement(path: &Path) {
    if WAL_PAGES.replace(0) >= BACKGROUND_AT {
        request(path);
    }
}

struct Worker {
    pid: u32,
    queue: Sender<PathBuf>,
}

static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

fn request(path: &Path) {
    let mut worker = WORKER.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some(w) = worker.as_ref() {
        // A forked child inherits the handle but not the thread behind it.
        if w.pid == pid && w.queue.send(path.to_path_buf()).is_ok() {
            return;
        }
    }
    let (queue, jobs) = channel();
    let spawned = std::thread::Builder::new()
        .name("cmbagent-db-checkpoint".into())
        .spawn(move || run(jobs));
    // Without the thread (no threads left), the inline checkpoint bounds the log.
    if spawned.is_ok() && queue.send(path.to_path_buf()).is_ok() {
        *worker = Some(Worker { pid, queue });
    }
}

fn run(jobs: Receiver<PathBuf>) {
    while let Ok(first) = jobs.recv() {
        // Requests that queued up meanwhile need one checkpoint per file.
        let mut paths: HashSet<PathBuf> = jobs.try_iter().collect();
        paths.insert(first);
        for path in paths {
            // A failed checkpoint loses nothing (the pages stay in the synced log) and
            // the next request retries; there is nobody to report it to.
            let _ = checkpoint(&path);
        }
    }
}

/// A PASSIVE checkpoint of the database at `path`. Never creates the file: one deleted
/// meanwhile is left deleted.
fn checkpoint(path: &Path) -> rusqlite::Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(CHECKPOINT_BUSY_TIMEOUT)?;
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn large_commits_are_checkpointed_by_the_thread_not_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = Connection::open(&path).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        install(&conn);
        // About 1,200 pages in one commit: past BACKGROUND_AT, short of INLINE_AT.
        conn.execute_batch(
            "CREATE TABLE t(x BLOB); BEGIN; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200) \
             INSERT INTO t SELECT zeroblob(4000) FROM n; COMMIT;",
        )
        .unwrap();
        // The committer did not checkpoint: the pages are in the log, not the file.
        assert!(file_len(&path.with_extension("db-wal")) > 1_000 * 4096);
        assert!(file_len(&path) < 100 * 4096, "{} bytes", file_len(&path));
        after_statement(&path);
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
    fn a_log_past_the_inline_limit_is_checkpointed_by_the_committer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.db");
        let conn = Connection::open(&path).unwrap();
        conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        install(&conn);
        // About 10,500 pages in one commit, and no request to the thread.
        conn.execute_batch(
            "CREATE TABLE t(x BLOB); BEGIN; \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10500) \
             INSERT INTO t SELECT zeroblob(4000) FROM n; COMMIT;",
        )
        .unwrap();
        // The hook copied the log into the database file before the commit returned, and
        // left nothing for the thread.
        assert!(file_len(&path) > 10_000 * 4096, "{} bytes", file_len(&path));
        assert_eq!(WAL_PAGES.get(), 0);
    }

    #[test]
    fn a_deleted_database_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.db");
        assert!(checkpoint(&path).is_err());
        assert!(!path.exists());
    }
}
