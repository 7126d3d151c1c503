//! The revision chain and its bookkeeping, compatible with Alembic's `alembic_version`.
//!
//! Each step (one revision up or down) runs in its own transaction together with its
//! version bump, under the database's write lock (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
//! advisory lock), so a failed step leaves the previous revision intact and concurrent
//! migrators apply each step once. `cmbagent_db_migrations` records the checksum of each
//! applied revision's SQL, so drift between a database and this build is reported.

use std::time::Instant;

use chrono::Utc;
use sha2::{Digest, Sha256};

use crate::backend::Conn;
use crate::dialect::Dialect;
use crate::error::{Error, Result};
use crate::schema::ColType;
use crate::value::Value;

pub struct Revision {
    pub id: &'static str,
    pub description: &'static str,
    sqlite: [&'static str; 2],
    postgres: [&'static str; 2],
    /// Tables the downgrade drops, checked for rows first.
    drops: &'static [&'static str],
}

macro_rules! scripts {
    ($dialect:literal, $id:literal) => {
        [
            include_str!(concat!("../migrations/", $dialect, "/", $id, ".up.sql")),
            include_str!(concat!("../migrations/", $dialect, "/", $id, ".down.sql")),
        ]
    };
    // An upgrade followed by a shared script (also run by the code that needs it).
    ($dialect:literal, $id:literal, then $extra:literal) => {
        [
            concat!(
                include_str!(concat!("../migrations/", $dialect, "/", $id, ".up.sql")),
                "\n",
                include_str!(concat!("../migrations/", $dialect, "/", $extra))
            ),
            include_str!(concat!("../migrations/", $dialect, "/", $id, ".down.sql")),
        ]
    };
}

/// Oldest first; each revision's `down_revision` is the one before it.
pub static REVISIONS: [Revision; 3] = [
    Revision {
        id: "000_base",
        description: "sessions and workflow_runs (adopts existing tables)",
        sqlite: scripts!("sqlite", "000_base"),
        postgres: scripts!("postgresql", "000_base"),
        drops: &["workflow_runs", "sessions"],
    },
    Revision {
        id: "001_session_states",
        description: "session_states (Stage 1)",
        sqlite: scripts!("sqlite", "001_session_states"),
        postgres: scripts!("postgresql", "001_session_states"),
        drops: &["session_states"],
    },
    Revision {
        id: "002_approvals_connections",
        description: "approval_requests and active_connections (Stage 2)",
        sqlite: scripts!("sqlite", "002_approvals_connections"),
        postgres: scripts!("postgresql", "002_approvals_connections", then "approval_notify.sql"),
        drops: &["active_connections", "approval_requests"],
    },
];

impl Revision {
    fn scripts(&self, d: Dialect) -> &[&'static str; 2] {
        match d {
            Dialect::Sqlite => &self.sqlite,
            Dialect::Postgres => &self.postgres,
        }
    }
    pub fn up_sql(&self, d: Dialect) -> &'static str {
        self.scripts(d)[0]
    }
    pub fn down_sql(&self, d: Dialect) -> &'static str {
        self.scripts(d)[1]
    }
    /// SHA-256 of the upgrade SQL this build carries for the dialect.
    pub fn checksum(&self, d: Dialect) -> String {
        Sha256::digest(self.up_sql(d).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
    pub fn down_revision(&self) -> Option<&'static str> {
        let i = REVISIONS.iter().position(|r| r.id == self.id)?;
        i.checked_sub(1).map(|j| REVISIONS[j].id)
    }
}

pub fn head() -> &'static str {
    REVISIONS[REVISIONS.len() - 1].id
}

pub fn revision(id: &str) -> Result<&'static Revision> {
    REVISIONS
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(|| unknown(id))
}

fn unknown(id: &str) -> Error {
    let known: Vec<&str> = REVISIONS.iter().map(|r| r.id).collect();
    Error::migration(format!(
        "unknown revision {id:?}: this build knows {}, plus head and base",
        known.join(", ")
    ))
}

/// A place in the chain: 0 is base (no revision), `i + 1` is `REVISIONS[i]`.
type Pos = usize;

fn pos_of(id: Option<&str>) -> Result<Pos> {
    match id {
        None => Ok(0),
        Some(id) => Ok(REVISIONS
            .iter()
            .position(|r| r.id == id)
            .ok_or_else(|| unknown(id))?
            + 1),
    }
}

fn id_at(pos: Pos) -> Option<&'static str> {
    pos.checked_sub(1).map(|i| REVISIONS[i].id)
}

/// `head`, `base`, a revision id, or `+N` / `-N` relative to `current`.
pub fn resolve(target: &str, current: Pos) -> Result<Pos> {
    let relative = |n: &str, sign: i64| -> Result<Pos> {
        let n: i64 = n.parse().map_err(|_| {
            Error::migration(format!(
                "malformed relative revision {target:?}: use +N or -N"
            ))
        })?;
        let to = current as i64 + sign * n;
        if to < 0 || to > REVISIONS.len() as i64 {
            return Err(Error::migration(format!(
                "relative revision {target:?} from {} is outside the chain (base .. {})",
                id_at(current).unwrap_or("base"),
                head()
            )));
        }
        Ok(to as Pos)
    };
    match target {
        "head" | "heads" => Ok(REVISIONS.len()),
        "base" => Ok(0),
        t if t.starts_with('+') => relative(&t[1..], 1),
        t if t.starts_with('-') => relative(&t[1..], -1),
        t => pos_of(Some(t)),
    }
}

const ALEMBIC_TABLE: &str = "CREATE TABLE IF NOT EXISTS alembic_version (\n    version_num VARCHAR(32) NOT NULL,\n    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)\n)";

fn records_table(d: Dialect) -> String {
    let ts = match d {
        Dialect::Sqlite => "TIMESTAMP",
        Dialect::Postgres => "TIMESTAMP WITH TIME ZONE",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS cmbagent_db_migrations (\n    revision VARCHAR(32) NOT NULL PRIMARY KEY,\n    checksum VARCHAR(64) NOT NULL,\n    applied_at {ts} NOT NULL,\n    duration_ms INTEGER NOT NULL\n)"
    )
}

/// Any 64-bit constant works; all instances of this package must use the same one.
const ADVISORY_LOCK_KEY: i64 = 0x636d_6261_6765_6e74;

fn table_exists(conn: &mut Conn, name: &str) -> Result<bool> {
    let sql = match conn.dialect() {
        Dialect::Sqlite => "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        Dialect::Postgres => {
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1"
        }
    };
    let rows = conn.query(
        sql,
        &[Value::Text(name.into())],
        &[("count", ColType::BigInt)],
    )?;
    Ok(matches!(rows.first().and_then(|r| r.first()), Some(Value::Int(n)) if *n > 0))
}

fn count_rows(conn: &mut Conn, table: &str) -> Result<i64> {
    let rows = conn.query(
        &format!("SELECT count(*) FROM {table}"),
        &[],
        &[("count", ColType::BigInt)],
    )?;
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Ok(0),
    }
}

/// The revision recorded in `alembic_version`, as stored (possibly one this build does
/// not know).
fn stored_version(conn: &mut Conn) -> Result<Option<String>> {
    if !table_exists(conn, "alembic_version")? {
        return Ok(None);
    }
    let rows = conn.query(
        "SELECT version_num FROM alembic_version",
        &[],
        &[("alembic_version.version_num", ColType::Str(32))],
    )?;
    match rows.as_slice() {
        [] => Ok(None),
        [row] => match &row[0] {
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Ok(None),
        },
        _ => Err(Error::migration(
            "alembic_version holds several revisions (branches); this package has one linear chain",
        )),
    }
}

fn current_pos(conn: &mut Conn) -> Result<Pos> {
    match stored_version(conn)? {
        None => Ok(0),
        Some(v) => pos_of(Some(&v)).map_err(|_| {
            Error::migration(format!(
                "the database is at revision {v:?}, which this build of cmbagent-db does not know \
                 (a newer version migrated it); upgrade cmbagent-db, or stamp it if you are sure"
            ))
        }),
    }
}

/// The current revision, or `None` at base.
pub fn current(conn: &mut Conn) -> Result<Option<&'static str>> {
    current_pos(conn).map(id_at)
}

/// One record of `cmbagent_db_migrations`.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub revision: String,
    pub checksum: String,
    pub applied_at: Value,
    pub duration_ms: i64,
    /// Whether the checksum equals the SQL this build carries.
    pub matches: bool,
}

pub fn applied(conn: &mut Conn) -> Result<Vec<Applied>> {
    if !table_exists(conn, "cmbagent_db_migrations")? {
        return Ok(Vec::new());
    }
    let d = conn.dialect();
    let rows = conn.query(
        "SELECT revision, checksum, applied_at, duration_ms FROM cmbagent_db_migrations ORDER BY revision",
        &[],
        &[
            ("revision", ColType::Str(32)),
            ("checksum", ColType::Str(64)),
            ("applied_at", ColType::Timestamp { tz: true }),
            ("duration_ms", ColType::Integer),
        ],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let text = |v: &Value| match v {
                Value::Text(s) => s.clone(),
                _ => String::new(),
            };
            let revision = text(&r[0]);
            let checksum = text(&r[1]);
            let matches = revision_checksum(&revision, d).is_some_and(|c| c == checksum);
            Applied {
                revision,
                checksum,
                applied_at: r[2].clone(),
                duration_ms: match r[3] {
                    Value::Int(n) => n,
                    _ => 0,
                },
                matches,
            }
        })
        .collect())
}

fn revision_checksum(id: &str, d: Dialect) -> Option<String> {
    REVISIONS.iter().find(|r| r.id == id).map(|r| r.checksum(d))
}

/// Revisions whose recorded checksum differs from this build's SQL.
pub fn check(conn: &mut Conn) -> Result<Vec<String>> {
    Ok(applied(conn)?
        .into_iter()
        .filter(|a| !a.matches)
        .map(|a| a.revision)
        .collect())
}

/// Opens a write transaction holding the lock that serialises every schema change this
/// package makes, across processes and instances (SQLite's write lock; on PostgreSQL also
/// a transaction-scoped advisory lock).
pub fn lock(conn: &mut Conn) -> Result<()> {
    conn.begin_write()?;
    if conn.dialect() == Dialect::Postgres {
        conn.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[Value::Int(ADVISORY_LOCK_KEY)],
        )?;
    }
    Ok(())
}

fn set_version(conn: &mut Conn, from: Option<&str>, to: Option<&str>) -> Result<()> {
    let p = |n| conn.dialect().placeholder(n);
    match (from, to) {
        (None, Some(to)) => conn.execute(
            &format!(
                "INSERT INTO alembic_version (version_num) VALUES ({})",
                p(1)
            ),
            &[Value::Text(to.into())],
        )?,
        (Some(from), Some(to)) => conn.execute(
            &format!(
                "UPDATE alembic_version SET version_num = {} WHERE version_num = {}",
                p(1),
                p(2)
            ),
            &[Value::Text(to.into()), Value::Text(from.into())],
        )?,
        (_, None) => conn.execute("DELETE FROM alembic_version", &[])?,
    };
    Ok(())
}

fn record(conn: &mut Conn, rev: &Revision, duration_ms: i64) -> Result<()> {
    let d = conn.dialect();
    conn.execute(
        &format!(
            "DELETE FROM cmbagent_db_migrations WHERE revision = {}",
            d.placeholder(1)
        ),
        &[Value::Text(rev.id.into())],
    )?;
    conn.execute(
        &format!(
            "INSERT INTO cmbagent_db_migrations (revision, checksum, applied_at, duration_ms) VALUES ({}, {}, {}, {})",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            d.placeholder(4)
        ),
        &[
            Value::Text(rev.id.into()),
            Value::Text(rev.checksum(d)),
            Value::Timestamp(Utc::now()),
            Value::Int(duration_ms),
        ],
    )?;
    Ok(())
}

fn forget(conn: &mut Conn, rev: &Revision) -> Result<()> {
    let p = conn.dialect().placeholder(1);
    conn.execute(
        &format!("DELETE FROM cmbagent_db_migrations WHERE revision = {p}"),
        &[Value::Text(rev.id.into())],
    )?;
    Ok(())
}

/// Fails when undoing `revisions` would drop tables that hold rows, naming each.
fn refuse_destruction(conn: &mut Conn, revisions: &[Revision]) -> Result<()> {
    let mut holding = Vec::new();
    for rev in revisions.iter().rev() {
        for table in rev.drops {
            if table_exists(conn, table)? {
                let n = count_rows(conn, table)?;
                if n > 0 {
                    holding.push(format!(
                        "{table} holding {n} row{}",
                        if n == 1 { "" } else { "s" }
                    ));
                }
            }
        }
    }
    if holding.is_empty() {
        return Ok(());
    }
    Err(Error::migration(format!(
        "downgrade of {} would drop {}; nothing was changed. Pass force=True \
         (--force on the command line) to drop them",
        revisions
            .iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
            .join(", "),
        holding.join(" and ")
    )))
}

/// A step that was applied: (from, to) revision ids, `None` meaning base.
pub type Step = (Option<&'static str>, Option<&'static str>);

/// Applies one step from `cur` towards `target` inside the already-open transaction.
fn apply_step(conn: &mut Conn, cur: Pos, target: Pos, force: bool) -> Result<Step> {
    let d = conn.dialect();
    conn.batch(ALEMBIC_TABLE)?;
    conn.batch(&records_table(d))?;
    let started = Instant::now();
    if target > cur {
        let rev = &REVISIONS[cur];
        conn.batch(rev.up_sql(d)).map_err(|e| {
            e.context(format!(
                "upgrade to {} failed; the database stays at {}",
                rev.id,
                id_at(cur).unwrap_or("base")
            ))
        })?;
        set_version(conn, id_at(cur), Some(rev.id))?;
        record(conn, rev, started.elapsed().as_millis() as i64)?;
        Ok((id_at(cur), Some(rev.id)))
    } else {
        let rev = &REVISIONS[cur - 1];
        if !force {
            // Checked again under the lock: rows may have arrived since the pre-flight.
            refuse_destruction(conn, std::slice::from_ref(rev))?;
        }
        conn.batch(rev.down_sql(d)).map_err(|e| {
            e.context(format!(
                "downgrade of {} failed; the database stays at {}",
                rev.id, rev.id
            ))
        })?;
        set_version(conn, Some(rev.id), id_at(cur - 1))?;
        forget(conn, rev)?;
        Ok((Some(rev.id), id_at(cur - 1)))
    }
}

/// Brings the database to `target`; returns the steps applied (none when it was there).
pub fn migrate(conn: &mut Conn, target: &str, force: bool) -> Result<Vec<Step>> {
    let start = current_pos(conn)?;
    let target = resolve(target, start)?;
    let mut steps = Vec::new();
    if target == start {
        return Ok(steps);
    }
    if target < start && !force {
        // Refuse before the first step, so a refused downgrade changes nothing.
        refuse_destruction(conn, &REVISIONS[target..start])?;
    }
    if target > start {
        let drifted = check(conn)?;
        if !drifted.is_empty() {
            return Err(Error::migration(format!(
                "applied revision(s) {} differ from the SQL this build carries (checksum mismatch); \
                 run `cmbagent-db check` to inspect, and `cmbagent-db stamp REVISION` to accept the database as it is",
                drifted.join(", ")
            )));
        }
    }
    loop {
        lock(conn)?;
        // Another process may have moved the database while we waited for the lock.
        let result = current_pos(conn).and_then(|cur| {
            if cur == target {
                Ok(None)
            } else {
                apply_step(conn, cur, target, force).map(Some)
            }
        });
        match result {
            Ok(step) => {
                conn.commit()?;
                match step {
                    Some(s) => steps.push(s),
                    None => return Ok(steps),
                }
            }
            Err(e) => {
                conn.rollback()?;
                return Err(e);
            }
        }
    }
}

/// Sets `alembic_version` to `revision` without running any SQL, as `alembic stamp` does.
/// The checksum record is rewritten to match: stamping accepts the database as it is.
pub fn stamp(conn: &mut Conn, revision: &str) -> Result<()> {
    let target = resolve(revision, 0)?;
    lock(conn)?;
    let result = (|| {
        let d = conn.dialect();
        conn.batch(ALEMBIC_TABLE)?;
        conn.batch(&records_table(d))?;
        conn.execute("DELETE FROM alembic_version", &[])?;
        set_version(conn, None, id_at(target))?;
        conn.execute("DELETE FROM cmbagent_db_migrations", &[])?;
        for rev in &REVISIONS[..target] {
            record(conn, rev, 0)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.commit(),
        Err(e) => {
            conn.rollback()?;
            Err(e)
        }
    }
}

/// The SQL a migration from `start` to `target` would run, without a database (Alembic's
/// `--sql`). `start` defaults to base; relative targets count from it.
pub fn offline_sql(d: Dialect, target: &str, start: Option<&str>) -> Result<String> {
    let start = resolve(start.unwrap_or("base"), 0)?;
    let target = resolve(target, start)?;
    let mut out = format!(
        "-- cmbagent-db offline migration for {}: {} -> {}\n\nBEGIN;\n\n{ALEMBIC_TABLE};\n\n{};\n",
        d.name(),
        id_at(start).unwrap_or("base"),
        id_at(target).unwrap_or("base"),
        records_table(d)
    );
    let mut cur = start;
    let quote = |s: Option<&str>| s.map(|s| format!("'{s}'"));
    while cur != target {
        if target > cur {
            let rev = &REVISIONS[cur];
            out.push_str(&format!(
                "\n-- Running upgrade {} -> {}\n\n{}\n",
                id_at(cur).unwrap_or(""),
                rev.id,
                rev.up_sql(d).trim_end()
            ));
            out.push_str(&match quote(id_at(cur)) {
                None => format!("\nINSERT INTO alembic_version (version_num) VALUES ('{}');\n", rev.id),
                Some(from) => format!(
                    "\nUPDATE alembic_version SET version_num='{}' WHERE alembic_version.version_num = {from};\n",
                    rev.id
                ),
            });
            out.push_str(&format!(
                "DELETE FROM cmbagent_db_migrations WHERE revision = '{0}';\nINSERT INTO cmbagent_db_migrations (revision, checksum, applied_at, duration_ms) VALUES ('{0}', '{1}', CURRENT_TIMESTAMP, 0);\n",
                rev.id,
                rev.checksum(d)
            ));
            cur += 1;
        } else {
            let rev = &REVISIONS[cur - 1];
            out.push_str(&format!(
                "\n-- Running downgrade {} -> {}\n\n{}\n",
                rev.id,
                id_at(cur - 1).unwrap_or(""),
                rev.down_sql(d).trim_end()
            ));
            out.push_str(&match id_at(cur - 1) {
                None => format!("\nDELETE FROM alembic_version WHERE alembic_version.version_num = '{}';\n", rev.id),
                Some(to) => format!(
                    "\nUPDATE alembic_version SET version_num='{to}' WHERE alembic_version.version_num = '{}';\n",
                    rev.id
                ),
            });
            out.push_str(&format!(
                "DELETE FROM cmbagent_db_migrations WHERE revision = '{}';\n",
                rev.id
            ));
            cur -= 1;
        }
    }
    out.push_str("\nCOMMIT;\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url;

    fn memory() -> Conn {
        Conn::open(&url::parse("sqlite:///:memory:").unwrap()).unwrap()
    }

    #[test]
    fn targets_resolve() {
        assert_eq!(resolve("head", 0).unwrap(), 3);
        assert_eq!(resolve("base", 3).unwrap(), 0);
        assert_eq!(resolve("+2", 1).unwrap(), 3);
        assert_eq!(resolve("-1", 3).unwrap(), 2);
        assert_eq!(resolve("001_session_states", 0).unwrap(), 2);
        assert!(resolve("+5", 0).is_err());
        assert!(resolve("-1", 0).is_err());
        assert!(resolve("nope", 0).unwrap_err().message.contains("nope"));
    }

    #[test]
    fn up_down_up_keeps_alembic_version_in_step() {
        let mut c = memory();
        let steps = migrate(&mut c, "head", false).unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(current(&mut c).unwrap(), Some(head()));
        assert!(check(&mut c).unwrap().is_empty());
        migrate(&mut c, "-1", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some("001_session_states"));
        assert!(!table_exists(&mut c, "approval_requests").unwrap());
        migrate(&mut c, "base", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), None);
        assert!(table_exists(&mut c, "alembic_version").unwrap());
        assert!(applied(&mut c).unwrap().is_empty());
        migrate(&mut c, "head", false).unwrap();
        assert_eq!(applied(&mut c).unwrap().len(), 3);
    }

    #[test]
    fn downgrade_refuses_to_drop_rows_unless_forced() {
        let mut c = memory();
        migrate(&mut c, "head", false).unwrap();
        c.batch("INSERT INTO sessions (id, name) VALUES ('s', 'n'); INSERT INTO workflow_runs (id, session_id) VALUES ('r', 's');")
            .unwrap();
        let e = migrate(&mut c, "base", false).unwrap_err();
        assert!(e.message.contains("workflow_runs holding 1 row"), "{e}");
        // Refused before any step: even the empty tables above it are still there.
        assert_eq!(current(&mut c).unwrap(), Some(head()));
        assert_eq!(count_rows(&mut c, "sessions").unwrap(), 1);
        migrate(&mut c, "base", true).unwrap();
        assert!(!table_exists(&mut c, "sessions").unwrap());
    }

    #[test]
    fn a_failing_step_leaves_the_previous_revision() {
        let mut c = memory();
        migrate(&mut c, "001_session_states", false).unwrap();
        c.batch("CREATE TABLE blocker(x); CREATE INDEX idx_connection_heartbeat ON blocker(x);")
            .unwrap();
        assert!(migrate(&mut c, "head", false).is_err());
        assert_eq!(current(&mut c).unwrap(), Some("001_session_states"));
        assert!(!table_exists(&mut c, "approval_requests").unwrap());
    }

    #[test]
    fn drift_is_reported_and_stamp_accepts_it() {
        let mut c = memory();
        migrate(&mut c, "001_session_states", false).unwrap();
        c.batch("UPDATE cmbagent_db_migrations SET checksum = 'x' WHERE revision = '000_base'")
            .unwrap();
        assert_eq!(check(&mut c).unwrap(), vec!["000_base".to_string()]);
        assert!(migrate(&mut c, "head", false)
            .unwrap_err()
            .message
            .contains("000_base"));
        stamp(&mut c, "001_session_states").unwrap();
        assert!(check(&mut c).unwrap().is_empty());
        migrate(&mut c, "head", false).unwrap();
    }

    #[test]
    fn unknown_stored_revision_is_refused() {
        let mut c = memory();
        c.batch(&format!(
            "{ALEMBIC_TABLE}; INSERT INTO alembic_version VALUES ('999_future');"
        ))
        .unwrap();
        let e = migrate(&mut c, "head", false).unwrap_err();
        assert!(e.message.contains("999_future"), "{e}");
        assert!(!table_exists(&mut c, "sessions").unwrap());
    }

    #[test]
    fn offline_sql_has_bookkeeping() {
        let sql = offline_sql(Dialect::Postgres, "head", None).unwrap();
        assert!(sql.contains("CREATE TABLE approval_requests"));
        assert!(sql.contains("INSERT INTO alembic_version (version_num) VALUES ('000_base');"));
        assert!(sql.contains("UPDATE alembic_version SET version_num='002_approvals_connections' WHERE alembic_version.version_num = '001_session_states';"));
        let down = offline_sql(Dialect::Sqlite, "base", Some("head")).unwrap();
        assert!(down.contains("DROP TABLE IF EXISTS approval_requests"));
        assert!(down.contains("DELETE FROM alembic_version"));
    }
}
