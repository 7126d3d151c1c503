//! The revision chain and its bookkeeping, compatible with Alembic's `alembic_version`.
//!
//! Each step (one revision up or down) runs in its own transaction together with its
//! version bump, under the database's write lock (SQLite `BEGIN IMMEDIATE`, a PostgreSQL
//! advisory lock), so a failed step leaves the previous revision intact and concurrent
//! migrators apply each step once. `cmbagent_db_migrations` records the checksum of each
//! applied revision's SQL, so drift between a database and this build is reported.
//!
//! A step whose tables or columns exist already (cmbagent's `create_all` made them, or
//! cmbagent's own Alembic chain) adopts them by inspection instead of running its script:
//! see [`adopt`]. When `alembic_version` holds another chain's revision, this package keeps
//! its own in [`OWN_VERSION_TABLE`] and leaves `alembic_version` alone.

mod adopt;
mod foreign;
pub mod inspect;

use std::collections::HashSet;
use std::time::Instant;

use chrono::Utc;
use sha2::{Digest, Sha256};

use crate::backend::Conn;
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::{ColType, TableId, TABLES};
use crate::value::Value;
use inspect::{inspect, Relation, TableInfo};

pub use adopt::{LEGACY_APPROVAL_TYPE, NO_DEADLINE};

pub struct Revision {
    pub id: &'static str,
    pub description: &'static str,
    sqlite: [&'static str; 2],
    postgres: [&'static str; 2],
    /// Tables the downgrade drops, checked for rows first.
    drops: &'static [&'static str],
    /// PostgreSQL: the shared script the upgrade ends with, run after an adoption too.
    postgres_also: Option<&'static str>,
}

macro_rules! scripts {
    ($dialect:literal, $id:literal) => {
        [
            include_str!(concat!("../../migrations/", $dialect, "/", $id, ".up.sql")),
            include_str!(concat!(
                "../../migrations/",
                $dialect,
                "/",
                $id,
                ".down.sql"
            )),
        ]
    };
    // An upgrade followed by a shared script (also run by the code that needs it).
    ($dialect:literal, $id:literal, then $extra:literal) => {
        [
            concat!(
                include_str!(concat!("../../migrations/", $dialect, "/", $id, ".up.sql")),
                "\n",
                include_str!(concat!("../../migrations/", $dialect, "/", $extra))
            ),
            include_str!(concat!(
                "../../migrations/",
                $dialect,
                "/",
                $id,
                ".down.sql"
            )),
        ]
    };
}

/// Oldest first; each revision's `down_revision` is the one before it, and its position is
/// the number its id starts with (the `since` of the schema description).
pub static REVISIONS: [Revision; 5] = [
    Revision {
        id: "000_base",
        description: "sessions and workflow_runs (adopts existing tables)",
        sqlite: scripts!("sqlite", "000_base"),
        postgres: scripts!("postgresql", "000_base"),
        drops: &["workflow_runs", "sessions"],
        postgres_also: None,
    },
    Revision {
        id: "001_session_states",
        description: "session_states: the state of a session, for resumable workflows",
        sqlite: scripts!("sqlite", "001_session_states"),
        postgres: scripts!("postgresql", "001_session_states"),
        drops: &["session_states"],
        postgres_also: None,
    },
    Revision {
        id: "002_approvals_connections",
        description:
            "approval_requests and active_connections: durable approvals, connection presence",
        sqlite: scripts!("sqlite", "002_approvals_connections"),
        postgres: scripts!("postgresql", "002_approvals_connections", then "approval_notify.sql"),
        drops: &["active_connections", "approval_requests"],
        postgres_also: Some(crate::approvals::NOTIFY_TRIGGER),
    },
    Revision {
        id: "003_cmbagent_columns",
        description: "the task hierarchy of workflow_runs and the legacy approval columns",
        sqlite: scripts!("sqlite", "003_cmbagent_columns"),
        postgres: scripts!("postgresql", "003_cmbagent_columns"),
        drops: &[],
        postgres_also: None,
    },
    Revision {
        id: "004_approval_changes",
        description: "who hears of a changed or deleted approval request: a change log \
                      (SQLite), a notification on deletion (PostgreSQL)",
        sqlite: scripts!("sqlite", "004_approval_changes"),
        postgres: scripts!("postgresql", "004_approval_changes"),
        drops: &[],
        postgres_also: None,
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
    /// The revision's position in the chain: the `since` of what it adds.
    pub fn number(&self) -> u8 {
        REVISIONS
            .iter()
            .position(|r| r.id == self.id)
            .map_or(0, |i| i as u8)
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

/// Alembic's version table, under a given name.
fn version_table(name: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} (\n    version_num VARCHAR(32) NOT NULL,\n    CONSTRAINT {name}_pkc PRIMARY KEY (version_num)\n)"
    )
}

const ALEMBIC_VERSION: &str = "alembic_version";

/// Where this package records its revision when `alembic_version` holds another chain's
/// (cmbagent's own Alembic migrations): same format, its own name.
pub const OWN_VERSION_TABLE: &str = "cmbagent_db_version";

/// SQLite's log of changed approval requests (revision 004), read by the approval watcher.
pub const CHANGE_LOG_TABLE: &str = "cmbagent_db_approval_changes";

/// The tables this package keeps beside the five for its own bookkeeping: Alembic's
/// autogenerate must leave them alone (`cmbagent_db.sqlalchemy.include_name`).
pub const BOOKKEEPING_TABLES: [&str; 3] = [
    "cmbagent_db_migrations",
    OWN_VERSION_TABLE,
    CHANGE_LOG_TABLE,
];

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

fn count(conn: &mut Conn, sql: &str) -> Result<i64> {
    let rows = conn.query(sql, &[], &[("count", ColType::BigInt)])?;
    match rows.first().and_then(|r| r.first()) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Ok(0),
    }
}

fn count_rows(conn: &mut Conn, table: &str) -> Result<i64> {
    count(conn, &format!("SELECT count(*) FROM {table}"))
}

/// The revisions recorded in a version table (none when it does not exist).
fn recorded(conn: &mut Conn, table: &str) -> Result<Vec<String>> {
    if !table_exists(conn, table)? {
        return Ok(Vec::new());
    }
    Ok(conn
        .query(
            &format!("SELECT version_num FROM {table} ORDER BY version_num"),
            &[],
            &[("version_num", ColType::Str(32))],
        )?
        .into_iter()
        .filter_map(|r| match r.into_iter().next() {
            Some(Value::Text(v)) => Some(v),
            _ => None,
        })
        .collect())
}

/// Ids of this package: a known one, or one of a newer build (`NNN_name`).
fn is_ours(id: &str) -> bool {
    let b = id.as_bytes();
    REVISIONS.iter().any(|r| r.id == id)
        || (b.len() > 4 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'_')
}

/// Where this package's revision is recorded, what it is, and the revision(s) another
/// Alembic chain recorded in `alembic_version`.
struct Versions {
    table: &'static str,
    ours: Option<String>,
    foreign: Vec<String>,
}

fn versions(conn: &mut Conn) -> Result<Versions> {
    let alembic = recorded(conn, ALEMBIC_VERSION)?;
    let own = table_exists(conn, OWN_VERSION_TABLE)?;
    let (table, ours, foreign) = if own {
        (
            OWN_VERSION_TABLE,
            recorded(conn, OWN_VERSION_TABLE)?,
            alembic,
        )
    } else if alembic.iter().all(|v| is_ours(v)) {
        (ALEMBIC_VERSION, alembic, Vec::new())
    } else {
        (OWN_VERSION_TABLE, Vec::new(), alembic)
    };
    if ours.len() > 1 {
        return Err(Error::migration(format!(
            "{table} holds several revisions ({}); this package has one linear chain",
            ours.join(", ")
        )));
    }
    Ok(Versions {
        table,
        ours: ours.into_iter().next(),
        foreign,
    })
}

fn pos_checked(v: &Versions) -> Result<Pos> {
    match &v.ours {
        None => Ok(0),
        Some(id) => pos_of(Some(id)).map_err(|_| {
            Error::migration(format!(
                "the database is at revision {id:?}, which this build of cmbagent-db does not know \
                 (a newer version migrated it); upgrade cmbagent-db, or stamp it if you are sure"
            ))
        }),
    }
}

fn current_pos(conn: &mut Conn) -> Result<Pos> {
    pos_checked(&versions(conn)?)
}

/// The current revision, or `None` at base.
pub fn current(conn: &mut Conn) -> Result<Option<&'static str>> {
    current_pos(conn).map(id_at)
}

/// The revision(s) another Alembic chain (cmbagent's own) recorded in `alembic_version`;
/// empty when that table is this package's or absent.
pub fn foreign_revisions(conn: &mut Conn) -> Result<Vec<String>> {
    Ok(versions(conn)?.foreign)
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

fn set_version(conn: &mut Conn, table: &str, from: Option<&str>, to: Option<&str>) -> Result<()> {
    conn.batch(&version_table(table))?;
    let p = |n| conn.dialect().placeholder(n);
    match (from, to) {
        (None, Some(to)) => conn.execute(
            &format!("INSERT INTO {table} (version_num) VALUES ({})", p(1)),
            &[Value::Text(to.into())],
        )?,
        (Some(from), Some(to)) => conn.execute(
            &format!(
                "UPDATE {table} SET version_num = {} WHERE version_num = {}",
                p(1),
                p(2)
            ),
            &[Value::Text(to.into()), Value::Text(from.into())],
        )?,
        (_, None) => conn.execute(&format!("DELETE FROM {table}"), &[])?,
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

/// Columns the revision at `pos - 1` adds to tables older than it: `(table, column)`.
fn added_columns(number: u8) -> impl Iterator<Item = (TableId, &'static str)> {
    TableId::all().flat_map(move |(t, table)| {
        table
            .columns
            .iter()
            .filter(move |c| c.since == number && table.since < number)
            .map(move |c| (t, c.name))
    })
}

/// Fails when undoing `revisions` would drop tables that hold rows, or columns that hold
/// values, naming each.
fn refuse_destruction(conn: &mut Conn, revisions: &[Revision]) -> Result<()> {
    let mut holding = Vec::new();
    for rev in revisions.iter().rev() {
        for table in rev.drops {
            if table_exists(conn, table)? {
                let n = count_rows(conn, table)?;
                if n > 0 {
                    holding.push(format!("{table} holding {n} row{}", plural(n)));
                }
            }
        }
        for (table, column) in added_columns(rev.number()) {
            let name = TABLES[table].name;
            let Relation::Table(info) = inspect(conn, name)? else {
                continue;
            };
            if info.column(column).is_some() {
                let n = count(
                    conn,
                    &format!("SELECT count(*) FROM {name} WHERE {column} IS NOT NULL"),
                )?;
                if n > 0 {
                    holding.push(format!("{name}.{column} holding {n} value{}", plural(n)));
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

fn plural(n: i64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The tables a revision creates or changes, in foreign-key order.
fn touched(number: u8) -> Vec<TableId> {
    TableId::all()
        .filter(|&(_, table)| {
            table.since == number
                || table
                    .columns
                    .iter()
                    .any(|c| c.since.max(table.since) == number)
                || table
                    .indexes
                    .iter()
                    .any(|i| i.since.max(table.since) == number)
        })
        .map(|(t, _)| t)
        .collect()
}

/// The tables a step touches, as they exist (`None`: absent).
type Found = Vec<(TableId, Option<TableInfo>)>;

/// One of the five as it exists, `None` when absent; a view (or anything else that is not
/// a table) of its name is refused.
fn existing(conn: &mut Conn, t: TableId) -> Result<Option<TableInfo>> {
    match inspect(conn, TABLES[t].name)? {
        Relation::Absent => Ok(None),
        Relation::Other(kind) => Err(refusal(
            TABLES[t].name,
            &[format!("it is a {kind}, not a table")],
        )),
        Relation::Table(info) => Ok(Some(info)),
    }
}

fn find_touched(conn: &mut Conn, number: u8) -> Result<Found> {
    touched(number)
        .into_iter()
        .map(|t| Ok((t, existing(conn, t)?)))
        .collect()
}

/// Whether a step must adopt: one of the tables it creates, or of the columns it adds, is
/// there already.
fn must_adopt(number: u8, found: &Found) -> bool {
    found.iter().any(|(t, info)| {
        let table = &TABLES[*t];
        info.as_ref().is_some_and(|info| {
            table.since == number
                || table
                    .columns
                    .iter()
                    .any(|c| c.since == number && info.column(c.name).is_some())
        })
    })
}

fn refusal(table: &str, problems: &[String]) -> Error {
    Error::migration(format!(
        "{table} exists but is not a table this package can adopt: {}; nothing was changed",
        problems.join("; ")
    ))
}

/// SQLite's foreign-key violations, as comparable lines.
fn violations(conn: &mut Conn) -> Result<HashSet<String>> {
    Ok(conn
        .query(
            "SELECT \"table\", coalesce(rowid, ''), parent, fkid FROM pragma_foreign_key_check",
            &[],
            &[
                ("table", ColType::Text),
                ("rowid", ColType::Text),
                ("parent", ColType::Text),
                ("fkid", ColType::Text),
            ],
        )?
        .into_iter()
        .map(|r| {
            r.iter()
                .map(|v| match v {
                    Value::Text(s) => s.clone(),
                    _ => String::new(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect())
}

/// Runs table rebuilds on SQLite (foreign keys are off during migrations there) and fails
/// if they left a row whose foreign key points nowhere that was not so before.
fn run_checked(conn: &mut Conn, statements: &[String], rebuilds: bool) -> Result<()> {
    let before = if rebuilds && conn.dialect() == Dialect::Sqlite {
        Some(violations(conn)?)
    } else {
        None
    };
    for s in statements {
        conn.batch(s)?;
    }
    if let Some(before) = before {
        let mut new: Vec<String> = violations(conn)?.difference(&before).cloned().collect();
        if !new.is_empty() {
            new.sort();
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "rebuilding the table would leave rows whose foreign key points nowhere \
                     (table rowid parent key): {}",
                    new.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// A step up that finds its tables there: each is created or adopted by inspection.
fn adopt_step(conn: &mut Conn, number: u8, found: &Found) -> Result<()> {
    let d = conn.dialect();
    let mut statements = Vec::new();
    let mut rebuilds = false;
    for (t, info) in found {
        match info {
            None => statements.extend(adopt::create_table(d, *t, number)),
            Some(info) => {
                let plan =
                    adopt::plan(d, *t, number, info).map_err(|p| refusal(TABLES[*t].name, &p))?;
                rebuilds |= plan.rebuilds;
                statements.extend(plan.statements);
            }
        }
    }
    if d == Dialect::Postgres {
        if let Some(also) = REVISIONS[number as usize].postgres_also {
            statements.push(also.to_string());
        }
    }
    run_checked(conn, &statements, rebuilds)
}

/// SQLite's downgrade of a revision that added columns: each table rebuilt without them.
fn drop_columns_step(conn: &mut Conn, number: u8) -> Result<()> {
    let mut statements = Vec::new();
    for (t, info) in find_touched(conn, number)? {
        if let Some(info) = info {
            statements.extend(adopt::drop_columns_sqlite(t, number, &info));
        }
    }
    run_checked(conn, &statements, true)
}

/// Whether a revision's SQLite downgrade is a rebuild rather than its script.
fn sqlite_down_rebuilds(number: u8) -> bool {
    added_columns(number).next().is_some()
}

/// A step that was applied: (from, to) revision ids, `None` meaning base.
pub type Step = (Option<&'static str>, Option<&'static str>);

/// Applies one step from `cur` towards `target` inside the already-open transaction.
fn apply_step(conn: &mut Conn, table: &str, cur: Pos, target: Pos, force: bool) -> Result<Step> {
    let d = conn.dialect();
    conn.batch(&records_table(d))?;
    let started = Instant::now();
    if target > cur {
        let rev = &REVISIONS[cur];
        let number = rev.number();
        let ran = find_touched(conn, number).and_then(|found| {
            if must_adopt(number, &found) {
                adopt_step(conn, number, &found)
            } else {
                conn.batch(rev.up_sql(d))
            }
        });
        ran.map_err(|e| {
            e.context(format!(
                "upgrade to {} failed; the database stays at {}",
                rev.id,
                id_at(cur).unwrap_or("base")
            ))
        })?;
        set_version(conn, table, id_at(cur), Some(rev.id))?;
        record(conn, rev, started.elapsed().as_millis() as i64)?;
        Ok((id_at(cur), Some(rev.id)))
    } else {
        let rev = &REVISIONS[cur - 1];
        if !force {
            // Checked again under the lock: rows may have arrived since the pre-flight.
            refuse_destruction(conn, std::slice::from_ref(rev))?;
        }
        let ran = if d == Dialect::Sqlite && sqlite_down_rebuilds(rev.number()) {
            drop_columns_step(conn, rev.number())
        } else {
            conn.batch(rev.down_sql(d))
        };
        ran.map_err(|e| {
            e.context(format!(
                "downgrade of {} failed; the database stays at {}",
                rev.id, rev.id
            ))
        })?;
        set_version(conn, table, Some(rev.id), id_at(cur - 1))?;
        forget(conn, rev)?;
        Ok((Some(rev.id), id_at(cur - 1)))
    }
}

/// Before the first step up: every existing table of the five can be adopted into the
/// target's shape, and none of the additions would get ahead of cmbagent's own chain.
fn preflight(conn: &mut Conn, foreign: &[String], target: Pos) -> Result<()> {
    let d = conn.dialect();
    let number = (target - 1) as u8;
    let mut found: Vec<(TableId, TableInfo)> = Vec::new();
    for (t, _) in TableId::all() {
        if let Some(info) = existing(conn, t)? {
            found.push((t, info));
        }
    }
    for (t, info) in &found {
        if TABLES[*t].since <= number {
            adopt::plan(d, *t, number, info).map_err(|p| refusal(TABLES[*t].name, &p))?;
        }
    }
    for at in foreign {
        let pending = foreign::pending_additions(at, |table, column| {
            found.iter().any(|(t, info)| {
                TABLES[*t].name == table && column.is_none_or(|c| info.column(c).is_some())
            })
        });
        if pending.is_empty() {
            continue;
        }
        let mut by_revision: Vec<(&str, Vec<&str>)> = Vec::new();
        for (rev, object) in pending {
            match by_revision.iter_mut().find(|(r, _)| *r == rev) {
                Some((_, objects)) => objects.push(object),
                None => by_revision.push((rev, vec![object])),
            }
        }
        let what: Vec<String> = by_revision
            .iter()
            .map(|(r, o)| format!("{r} adds {}", o.join(", ")))
            .collect();
        return Err(Error::migration(format!(
            "alembic_version holds cmbagent's revision {at}, and its later revisions add what this \
             package would add now ({}), which would make cmbagent's `alembic upgrade head` fail. \
             Run cmbagent's `alembic upgrade head` first, then open the database again; nothing was changed",
            what.join("; ")
        )));
    }
    Ok(())
}

/// Brings the database to `target`; returns the steps applied (none when it was there).
///
/// On SQLite, foreign-key enforcement is off while the steps run (a table rebuild must not
/// cascade its drop), and every rebuild checks the foreign keys before it commits.
pub fn migrate(conn: &mut Conn, target: &str, force: bool) -> Result<Vec<Step>> {
    let v = versions(conn)?;
    let start = pos_checked(&v)?;
    let target = resolve(target, start)?;
    if target == start {
        return Ok(Vec::new());
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
        preflight(conn, &v.foreign, target)?;
    }
    let sqlite = conn.dialect() == Dialect::Sqlite;
    if sqlite {
        conn.batch("PRAGMA foreign_keys=OFF")?;
    }
    let out = run_steps(conn, target, force);
    if sqlite {
        let restored = conn.batch("PRAGMA foreign_keys=ON");
        if out.is_ok() {
            restored?;
        }
    }
    out
}

fn run_steps(conn: &mut Conn, target: Pos, force: bool) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    loop {
        lock(conn)?;
        // Another process may have moved the database while we waited for the lock.
        let result = versions(conn).and_then(|v| {
            let cur = pos_checked(&v)?;
            if cur == target {
                Ok(None)
            } else {
                apply_step(conn, v.table, cur, target, force).map(Some)
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

/// Sets the recorded revision to `revision` without running any SQL, as `alembic stamp`
/// does (in this package's own version table when `alembic_version` is another chain's).
/// The checksum record is rewritten to match: stamping accepts the database as it is.
pub fn stamp(conn: &mut Conn, revision: &str) -> Result<()> {
    let target = resolve(revision, 0)?;
    lock(conn)?;
    let result = (|| {
        let d = conn.dialect();
        let table = versions(conn)?.table;
        conn.batch(&records_table(d))?;
        set_version(conn, table, None, None)?;
        set_version(conn, table, None, id_at(target))?;
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
    // A SQLite downgrade that rebuilds tables must not cascade their drop.
    let rebuilds = d == Dialect::Sqlite
        && (target..start).any(|p| sqlite_down_rebuilds(REVISIONS[p].number()));
    let mut out = format!(
        "-- cmbagent-db offline migration for {}: {} -> {}\n\n{}BEGIN;\n\n{};\n\n{};\n",
        d.name(),
        id_at(start).unwrap_or("base"),
        id_at(target).unwrap_or("base"),
        if rebuilds {
            "PRAGMA foreign_keys=OFF;\n"
        } else {
            ""
        },
        version_table(ALEMBIC_VERSION),
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
            let number = rev.number();
            let script = if d == Dialect::Sqlite && sqlite_down_rebuilds(number) {
                // Rendered for the tables as this package creates them.
                touched(number)
                    .into_iter()
                    .flat_map(|t| {
                        adopt::drop_columns_sqlite(t, number, &adopt::described(d, t, number))
                    })
                    .map(|s| format!("{s};\n"))
                    .collect::<String>()
            } else {
                rev.down_sql(d).to_string()
            };
            out.push_str(&format!(
                "\n-- Running downgrade {} -> {}\n\n{}\n",
                rev.id,
                id_at(cur - 1).unwrap_or(""),
                script.trim_end()
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
    if rebuilds {
        out.push_str("PRAGMA foreign_keys=ON;\n");
    }
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
        assert_eq!(resolve("head", 0).unwrap(), 5);
        assert_eq!(resolve("base", 3).unwrap(), 0);
        assert_eq!(resolve("+2", 1).unwrap(), 3);
        assert_eq!(resolve("-1", 3).unwrap(), 2);
        assert_eq!(resolve("001_session_states", 0).unwrap(), 2);
        assert!(resolve("+6", 0).is_err());
        assert!(resolve("-1", 0).is_err());
        assert!(resolve("nope", 0).unwrap_err().message.contains("nope"));
    }

    #[test]
    fn up_down_up_keeps_alembic_version_in_step() {
        let mut c = memory();
        let steps = migrate(&mut c, "head", false).unwrap();
        assert_eq!(steps.len(), 5);
        assert_eq!(current(&mut c).unwrap(), Some(head()));
        assert!(check(&mut c).unwrap().is_empty());
        migrate(&mut c, "-1", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some("003_cmbagent_columns"));
        assert!(!table_exists(&mut c, "cmbagent_db_approval_changes").unwrap());
        migrate(&mut c, "-1", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some("002_approvals_connections"));
        let Relation::Table(runs) = inspect(&mut c, "workflow_runs").unwrap() else {
            panic!("workflow_runs is gone")
        };
        assert!(runs.column("parent_run_id").is_none());
        assert!(runs.column("branch_parent_id").is_some());
        migrate(&mut c, "-1", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some("001_session_states"));
        assert!(!table_exists(&mut c, "approval_requests").unwrap());
        migrate(&mut c, "base", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), None);
        assert!(table_exists(&mut c, "alembic_version").unwrap());
        assert!(applied(&mut c).unwrap().is_empty());
        migrate(&mut c, "head", false).unwrap();
        assert_eq!(applied(&mut c).unwrap().len(), REVISIONS.len());
    }

    /// Every table a fresh migration makes matches the schema description: columns (kind,
    /// length, nullability), foreign keys and indexes, at every revision.
    #[test]
    fn the_scripts_make_the_described_tables() {
        let mut c = memory();
        for (pos, rev) in REVISIONS.iter().enumerate() {
            migrate(&mut c, rev.id, false).unwrap();
            for (t, table) in TableId::all() {
                if table.since as usize > pos {
                    assert_eq!(inspect(&mut c, table.name).unwrap(), Relation::Absent);
                    continue;
                }
                let Relation::Table(info) = inspect(&mut c, table.name).unwrap() else {
                    panic!("{} missing at {}", table.name, rev.id)
                };
                assert_same_shape(&info, &adopt::described(Dialect::Sqlite, t, pos as u8));
            }
        }
    }

    fn assert_same_shape(actual: &TableInfo, described: &TableInfo) {
        let name = &described.name;
        let cols = |t: &TableInfo| {
            t.columns
                .iter()
                .map(|c| (c.name.clone(), c.family, c.max_len, c.not_null))
                .collect::<Vec<_>>()
        };
        let mut want = cols(described);
        let mut got = cols(actual);
        // PostgreSQL does not say which timestamps have a zone through Family::of(...) alone
        // on SQLite, and the order of added columns is the order they were added.
        want.sort_by(|a, b| a.0.cmp(&b.0));
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "{name}: columns");
        let fks = |t: &TableInfo| {
            let mut v: Vec<_> = t
                .foreign_keys
                .iter()
                .map(|f| (f.column.clone(), f.parent.clone(), f.on_delete.clone()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(fks(actual), fks(described), "{name}: foreign keys");
        let idx = |t: &TableInfo| {
            let mut v: Vec<_> = t
                .indexes
                .iter()
                .filter(|i| !i.constraint)
                .map(|i| {
                    (
                        i.name.clone(),
                        i.columns.clone(),
                        i.unique,
                        i.predicate.as_deref().map(inspect::normalise_predicate),
                    )
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(idx(actual), idx(described), "{name}: indexes");
    }

    /// cmbagent's first tables, as its SQLAlchemy models made them, with one row each and a
    /// workflow_steps table that approvals point at.
    const LEGACY: &str = "
        PRAGMA foreign_keys=ON;
        CREATE TABLE sessions (id VARCHAR(36) NOT NULL, user_id VARCHAR(36), name VARCHAR(255) NOT NULL,
            created_at TIMESTAMP NOT NULL, last_active_at TIMESTAMP NOT NULL, status VARCHAR(50) NOT NULL,
            meta JSON, resource_limits JSON, PRIMARY KEY (id));
        CREATE TABLE workflow_runs (id VARCHAR(36) NOT NULL, session_id VARCHAR(36) NOT NULL,
            project_id VARCHAR(36), mode VARCHAR(50) NOT NULL, agent VARCHAR(100) NOT NULL,
            model VARCHAR(100) NOT NULL, status VARCHAR(50) NOT NULL, started_at TIMESTAMP,
            completed_at TIMESTAMP, last_heartbeat_at TIMESTAMP,
            checkpoint_frequency_minutes INTEGER NOT NULL, task_description TEXT, meta JSON,
            PRIMARY KEY (id), FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE);
        CREATE TABLE workflow_steps (id VARCHAR(36) NOT NULL PRIMARY KEY,
            run_id VARCHAR(36) NOT NULL REFERENCES workflow_runs (id) ON DELETE CASCADE);
        CREATE TABLE approval_requests (id VARCHAR(36) NOT NULL, run_id VARCHAR(36) NOT NULL,
            step_id VARCHAR(36) NOT NULL, status VARCHAR(50) NOT NULL, requested_at TIMESTAMP NOT NULL,
            resolved_at TIMESTAMP, context_snapshot JSON, user_feedback TEXT, resolution VARCHAR(50),
            PRIMARY KEY (id), FOREIGN KEY (run_id) REFERENCES workflow_runs (id) ON DELETE CASCADE,
            FOREIGN KEY (step_id) REFERENCES workflow_steps (id) ON DELETE CASCADE);
        CREATE INDEX idx_approval_requests_status ON approval_requests (status);
        CREATE INDEX ix_approval_requests_step_id ON approval_requests (step_id);
        INSERT INTO sessions VALUES ('s', NULL, 'n', '2025-01-01 00:00:00.000000', '2025-01-01 00:00:00.000000', 'active', NULL, NULL);
        INSERT INTO workflow_runs VALUES ('r', 's', NULL, 'one_shot', 'engineer', 'gpt-4o', 'completed',
            NULL, NULL, NULL, 10, NULL, NULL);
        INSERT INTO workflow_steps VALUES ('st', 'r');
        INSERT INTO approval_requests VALUES ('a1', 'r', 'st', 'approved', '2025-01-02 03:04:05.000000',
            '2025-01-02 03:05:00.000000', '{\"plan\": 1}', 'fine', 'approved');
        INSERT INTO approval_requests VALUES ('a2', 'r', 'st', 'pending', '2025-01-03 00:00:00.000000',
            NULL, NULL, NULL, NULL);
    ";

    fn texts(c: &mut Conn, sql: &str) -> Vec<Vec<String>> {
        let n = sql
            .split(" FROM ")
            .next()
            .unwrap_or("")
            .matches(',')
            .count()
            + 1;
        let shape: Vec<(&str, ColType)> = (0..n).map(|_| ("v", ColType::Text)).collect();
        c.query(sql, &[], &shape)
            .unwrap()
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| match v {
                        Value::Text(s) => s,
                        Value::Null => "NULL".into(),
                        other => format!("{other:?}"),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_legacy_database_is_adopted_keeping_every_row_and_foreign_key() {
        let mut c = memory();
        c.batch(LEGACY).unwrap();
        assert_eq!(migrate(&mut c, "head", false).unwrap().len(), 5);
        for (t, table) in TableId::all() {
            let Relation::Table(info) = inspect(&mut c, table.name).unwrap() else {
                panic!("{}", table.name)
            };
            let described = adopt::described(Dialect::Sqlite, t, head_number());
            for col in &described.columns {
                let got = info
                    .column(&col.name)
                    .unwrap_or_else(|| panic!("{}.{}", info.name, col.name));
                assert_eq!(got.not_null, col.not_null, "{}.{}", info.name, col.name);
            }
        }
        assert_eq!(
            texts(&mut c, "SELECT id, status, approval_type, context, expires_at, created_at, step_id, user_feedback, resolution FROM approval_requests ORDER BY id"),
            vec![
                vec!["a1", "approved", "legacy", "{\"plan\": 1}", "9999-12-31 23:59:59.000000", "2025-01-02 03:04:05.000000", "st", "fine", "approved"],
                vec!["a2", "pending", "legacy", "{}", "9999-12-31 23:59:59.000000", "2025-01-03 00:00:00.000000", "st", "NULL", "NULL"],
            ]
        );
        // The step foreign key survived the rebuild, and still cascades.
        assert!(violations(&mut c).unwrap().is_empty());
        c.batch("PRAGMA foreign_keys=ON; DELETE FROM workflow_steps")
            .unwrap();
        assert_eq!(count_rows(&mut c, "approval_requests").unwrap(), 0);
        // cmbagent's own indexes are kept beside this package's.
        let Relation::Table(info) = inspect(&mut c, "approval_requests").unwrap() else {
            panic!()
        };
        let names: Vec<&str> = info.indexes.iter().map(|i| i.name.as_str()).collect();
        for n in [
            "idx_approval_requests_status",
            "ix_approval_requests_step_id",
            "idx_approval_expires",
        ] {
            assert!(names.contains(&n), "{names:?}");
        }
    }

    fn head_number() -> u8 {
        (REVISIONS.len() - 1) as u8
    }

    #[test]
    fn adoption_that_fails_leaves_the_old_tables_and_rows() {
        let mut c = memory();
        c.batch(LEGACY).unwrap();
        c.batch("CREATE TABLE blocker(x); CREATE INDEX idx_connection_heartbeat ON blocker(x);")
            .unwrap();
        let e = migrate(&mut c, "head", false).unwrap_err();
        assert!(e.message.contains("002_approvals_connections"), "{e}");
        assert_eq!(current(&mut c).unwrap(), Some("001_session_states"));
        let Relation::Table(info) = inspect(&mut c, "approval_requests").unwrap() else {
            panic!()
        };
        assert!(info.column("approval_type").is_none());
        assert!(info.column("step_id").unwrap().not_null);
        assert_eq!(count_rows(&mut c, "approval_requests").unwrap(), 2);
    }

    #[test]
    fn a_rebuild_that_would_break_a_foreign_key_is_refused() {
        let mut c = memory();
        c.batch(LEGACY).unwrap();
        // A session_id column without its foreign key, naming a session that does not exist:
        // the rebuild adds the key, and its check finds the row.
        c.batch("ALTER TABLE approval_requests ADD COLUMN session_id VARCHAR(36); UPDATE approval_requests SET session_id = 'gone' WHERE id = 'a1';")
            .unwrap();
        let e = migrate(&mut c, "head", false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Integrity, "{e}");
        assert!(e.message.contains("approval_requests"), "{e}");
        assert_eq!(current(&mut c).unwrap(), Some("001_session_states"));
        assert_eq!(count_rows(&mut c, "approval_requests").unwrap(), 2);
    }

    #[test]
    fn a_table_of_another_shape_is_refused_before_anything_changes() {
        let mut c = memory();
        c.batch("CREATE TABLE approval_requests (id INTEGER PRIMARY KEY, title TEXT)")
            .unwrap();
        let e = migrate(&mut c, "head", false).unwrap_err();
        assert!(
            e.message
                .contains("approval_requests exists but is not a table this package can adopt"),
            "{e}"
        );
        assert!(e.message.contains("no column run_id"), "{e}");
        assert!(e.message.contains("nothing was changed"), "{e}");
        assert!(!table_exists(&mut c, "sessions").unwrap());
        assert!(!table_exists(&mut c, "alembic_version").unwrap());
    }

    /// The legacy database, with another chain's revision in `alembic_version`.
    fn legacy_at(revision: &str) -> Conn {
        let mut c = memory();
        c.batch(LEGACY).unwrap();
        c.batch(&format!(
            "{}; INSERT INTO alembic_version VALUES ('{revision}');",
            version_table(ALEMBIC_VERSION)
        ))
        .unwrap();
        c
    }

    #[test]
    fn another_chain_keeps_alembic_version_and_this_package_its_own() {
        let mut c = legacy_at("5f0a1b2c3d4e");
        migrate(&mut c, "head", false).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some(head()));
        assert_eq!(
            recorded(&mut c, ALEMBIC_VERSION).unwrap(),
            vec!["5f0a1b2c3d4e"]
        );
        assert_eq!(recorded(&mut c, OWN_VERSION_TABLE).unwrap(), vec![head()]);
        assert_eq!(foreign_revisions(&mut c).unwrap(), vec!["5f0a1b2c3d4e"]);
        migrate(&mut c, "-2", true).unwrap();
        assert_eq!(current(&mut c).unwrap(), Some("002_approvals_connections"));
        assert_eq!(
            recorded(&mut c, ALEMBIC_VERSION).unwrap(),
            vec!["5f0a1b2c3d4e"]
        );
    }

    #[test]
    fn an_older_revision_of_cmbagent_chain_is_refused_with_the_remedy() {
        let mut c = legacy_at("d4e5f6a7b8c9");
        let e = migrate(&mut c, "head", false).unwrap_err();
        assert!(
            e.message
                .contains("e5f6a7b8c9d0 adds approval_requests.session_id"),
            "{e}"
        );
        assert!(e.message.contains("alembic upgrade head"), "{e}");
        assert!(!table_exists(&mut c, OWN_VERSION_TABLE).unwrap());
        assert!(!table_exists(&mut c, "session_states").unwrap());
    }

    #[test]
    fn downgrade_of_added_columns_refuses_values_unless_forced() {
        let mut c = memory();
        migrate(&mut c, "head", false).unwrap();
        c.batch("INSERT INTO sessions (id, name) VALUES ('s', 'n'); INSERT INTO workflow_runs (id, session_id, stage_name) VALUES ('r', 's', 'idea');")
            .unwrap();
        let e = migrate(&mut c, "-2", false).unwrap_err();
        assert!(
            e.message
                .contains("workflow_runs.stage_name holding 1 value"),
            "{e}"
        );
        migrate(&mut c, "-2", true).unwrap();
        assert_eq!(count_rows(&mut c, "workflow_runs").unwrap(), 1);
        migrate(&mut c, "head", false).unwrap();
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
            "{}; INSERT INTO alembic_version VALUES ('999_future');",
            version_table(ALEMBIC_VERSION)
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
