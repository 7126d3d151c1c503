//! The approval lifecycle: resolve exactly once, cancel, expire overdue requests, and
//! wait for a resolution pushed by any process.
//!
//! Every state change is one compare-and-set UPDATE guarded by `status = 'pending'`, so
//! concurrent resolvers in any number of processes get exactly one winner: SQLite
//! serialises writers, and PostgreSQL re-checks the WHERE clause of an UPDATE that waited
//! for another's row lock.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};

use crate::backend::{Conn, Row};
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::ColType;
use crate::value::Value;

pub const RESOLUTIONS: [&str; 3] = ["approved", "rejected", "modified"];

/// The PostgreSQL channel a trigger notifies with the id of every approval whose status
/// changes, whoever changed it.
pub const CHANNEL: &str = "cmbagent_db_approvals";

/// What became of a compare-and-set on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// This call made the change.
    Done,
    /// The request was pending but past its deadline: it is now expired.
    Expired,
    /// The request had already left `pending`; its status.
    AlreadyFinal(String),
    NotFound,
}

fn p(d: Dialect, n: usize) -> String {
    d.placeholder(n)
}

fn returned_any(conn: &mut Conn, sql: &str, params: &[Value]) -> Result<bool> {
    Ok(!conn
        .query(sql, params, &[("id", ColType::Str(36))])?
        .is_empty())
}

/// The requests a resolving call may touch: any (the default), or only those of one chat
/// session and / or one run. A request outside the scope is treated exactly as an id that
/// does not exist, so a caller learns nothing of other sessions' requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    pub session_id: Option<String>,
    pub run_id: Option<String>,
}

impl Scope {
    /// ` AND session_id = <n> AND run_id = <n+1>` for what the scope names, with
    /// placeholders from `first`, and their values.
    fn condition(&self, d: Dialect, first: usize) -> (String, Vec<Value>) {
        let mut sql = String::new();
        let mut values = Vec::new();
        for (column, value) in [("session_id", &self.session_id), ("run_id", &self.run_id)] {
            if let Some(v) = value {
                sql.push_str(&format!(" AND {column} = {}", p(d, first + values.len())));
                values.push(Value::Text(v.clone()));
            }
        }
        (sql, values)
    }
}

/// Marks the request expired if it is pending, within `scope` and past its deadline at
/// `now`.
pub(crate) fn expire_one(
    conn: &mut Conn,
    id: &str,
    now: DateTime<Utc>,
    scope: &Scope,
) -> Result<bool> {
    let d = conn.dialect();
    let (within, scoped) = scope.condition(d, 3);
    let mut params = vec![Value::Text(id.into()), Value::Timestamp(now)];
    params.extend(scoped);
    returned_any(
        conn,
        &format!(
            "UPDATE approval_requests SET status = 'expired' WHERE id = {} AND status = 'pending' AND expires_at <= {}{within} RETURNING id",
            p(d, 1),
            p(d, 2)
        ),
        &params,
    )
}

fn status_of(conn: &mut Conn, id: &str, scope: &Scope) -> Result<Option<String>> {
    let d = conn.dialect();
    let (within, scoped) = scope.condition(d, 2);
    let mut params = vec![Value::Text(id.into())];
    params.extend(scoped);
    let rows = conn.query(
        &format!(
            "SELECT status FROM approval_requests WHERE id = {}{within}",
            p(d, 1)
        ),
        &params,
        &[("status", ColType::Str(20))],
    )?;
    Ok(rows.into_iter().next().map(|r| match &r[0] {
        Value::Text(s) => s.clone(),
        _ => "pending".into(),
    }))
}

/// After a compare-and-set matched nothing: why not.
fn why_not(conn: &mut Conn, id: &str, now: DateTime<Utc>, scope: &Scope) -> Result<Outcome> {
    if expire_one(conn, id, now, scope)? {
        return Ok(Outcome::Expired);
    }
    Ok(match status_of(conn, id, scope)? {
        None => Outcome::NotFound,
        Some(s) => Outcome::AlreadyFinal(s),
    })
}

/// The deadline `secs` seconds after `now` (`create_pending`'s `timeout_seconds`). It must
/// be a time Python's `datetime` can hold (year 9999 at most), or reading `expires_at`
/// back would fail.
pub fn deadline(now: DateTime<Utc>, secs: f64) -> Result<DateTime<Utc>> {
    let too_large = || {
        Error::new(
            ErrorKind::Value,
            format!(
                "timeout_seconds={secs} is too large: the deadline must fall before the year 10000"
            ),
        )
    };
    // `as` saturates: a huge number becomes i64::MAX microseconds, refused below.
    let delta = chrono::TimeDelta::microseconds((secs * 1e6) as i64);
    let at = now.checked_add_signed(delta).ok_or_else(too_large)?;
    if at.year() > 9999 {
        return Err(too_large());
    }
    Ok(at)
}

/// Refuses a resolution value other than approved, rejected, modified.
pub fn check_resolution(resolution: &str) -> Result<()> {
    if RESOLUTIONS.contains(&resolution) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Value,
        format!(
            "unknown resolution {resolution:?}: use one of {}",
            RESOLUTIONS.join(", ")
        ),
    ))
}

/// Resolves a pending, unexpired request within `scope` with `resolution` and `result`
/// (JSON text), in one compare-and-set statement. Runs inside the caller's write
/// transaction.
pub fn resolve(
    conn: &mut Conn,
    id: &str,
    resolution: &str,
    result: Option<String>,
    now: DateTime<Utc>,
    scope: &Scope,
) -> Result<Outcome> {
    check_resolution(resolution)?;
    let d = conn.dialect();
    let (within, scoped) = scope.condition(d, 5);
    let sql = format!(
        "UPDATE approval_requests SET status = 'resolved', resolution = {}, result = {}, resolved_at = {} \
         WHERE id = {} AND status = 'pending' AND expires_at > {}{within} RETURNING id",
        p(d, 1),
        p(d, 2),
        p(d, 3),
        p(d, 4),
        p(d, 3)
    );
    let mut params = vec![
        Value::Text(resolution.into()),
        result.map_or(Value::Null, Value::Json),
        Value::Timestamp(now),
        Value::Text(id.into()),
    ];
    params.extend(scoped);
    if returned_any(conn, &sql, &params)? {
        return Ok(Outcome::Done);
    }
    why_not(conn, id, now, scope)
}

/// Cancels a pending request within `scope` (even an overdue one: nobody will resolve it
/// either way).
pub fn cancel(conn: &mut Conn, id: &str, now: DateTime<Utc>, scope: &Scope) -> Result<Outcome> {
    let d = conn.dialect();
    let (within, scoped) = scope.condition(d, 3);
    let sql = format!(
        "UPDATE approval_requests SET status = 'cancelled', resolved_at = {} WHERE id = {} AND status = 'pending'{within} RETURNING id",
        p(d, 1),
        p(d, 2)
    );
    let mut params = vec![Value::Timestamp(now), Value::Text(id.into())];
    params.extend(scoped);
    if returned_any(conn, &sql, &params)? {
        return Ok(Outcome::Done);
    }
    why_not(conn, id, now, scope)
}

/// How many requests one sweep transaction expires at most, unless the caller says.
/// About 40 ms of SQLite's write lock on this machine kind; small enough that a writer
/// waiting in its busy handler gets in between two batches.
pub const SWEEP_BATCH: usize = 5000;

/// Marks at most `limit` pending requests whose deadline is before `now` expired, earliest
/// deadlines first, and returns their ids. Reads only the partial pending-expiry index, so
/// the cost follows the overdue rows, not the table. When no more than `limit` are overdue
/// (an index-only probe says so) it is one plain UPDATE; otherwise an UPDATE over a limited
/// subquery, which on PostgreSQL skips rows another transaction holds locked (a concurrent
/// sweeper or resolver), so two sweepers never wait on each other. The caller commits each
/// batch, keeping every transaction short.
pub fn expire_overdue_batch(
    conn: &mut Conn,
    now: DateTime<Utc>,
    limit: usize,
) -> Result<Vec<String>> {
    check_batch_size(limit)?;
    let d = conn.dialect();
    let overdue = "status = 'pending' AND expires_at < ";
    let more_than_limit = !conn
        .query(
            &format!(
                "SELECT 1 FROM approval_requests WHERE {overdue}{} ORDER BY expires_at LIMIT 1 OFFSET {}",
                p(d, 1),
                p(d, 2)
            ),
            &[Value::Timestamp(now), Value::Int(limit_param(limit))],
            &[("one", ColType::BigInt)],
        )?
        .is_empty();
    let sql = if more_than_limit {
        let skip_locked = match d {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        format!(
            "UPDATE approval_requests SET status = 'expired' WHERE id IN (SELECT id FROM approval_requests WHERE {overdue}{p1} ORDER BY expires_at LIMIT {p2}{skip_locked}) AND {overdue}{p1} RETURNING id",
            p1 = p(d, 1),
            p2 = p(d, 2)
        )
    } else {
        format!(
            "UPDATE approval_requests SET status = 'expired' WHERE {overdue}{} RETURNING id",
            p(d, 1)
        )
    };
    let params = [Value::Timestamp(now), Value::Int(limit_param(limit))];
    let params = if more_than_limit {
        &params[..]
    } else {
        &params[..1]
    };
    let rows = conn.query(&sql, params, &[("id", ColType::Str(36))])?;
    Ok(rows
        .into_iter()
        .filter_map(|r| match r.into_iter().next() {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        })
        .collect())
}

/// A sweep batch holds at least one row.
pub fn check_batch_size(limit: usize) -> Result<()> {
    if limit == 0 {
        return Err(Error::new(
            ErrorKind::Value,
            "batch_size must be a positive number of rows",
        ));
    }
    Ok(())
}

/// A row count as a bound parameter (SQL's LIMIT / OFFSET take a signed 64-bit integer).
fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// How long a sweep leaves the database to other writers after a batch that took
/// `batch`. SQLite has one write lock: a writer waiting in its busy handler (which sleeps
/// up to 100 ms between attempts) only gets in while no batch runs, so the sweep pauses as
/// long as its batch held the lock, at least 10 ms and at most 100 ms. PostgreSQL locks
/// rows, and other writers never wait for a batch: no pause.
pub fn pause_after_batch(dialect: Dialect, batch: Duration) -> Duration {
    match dialect {
        Dialect::Sqlite => batch.clamp(Duration::from_millis(10), Duration::from_millis(100)),
        Dialect::Postgres => Duration::ZERO,
    }
}

/// The PostgreSQL function and trigger behind `CHANNEL`; revision 002 creates them too.
pub(crate) const NOTIFY_TRIGGER: &str =
    include_str!("../migrations/postgresql/approval_notify.sql");

/// Creates the trigger that NOTIFYs `CHANNEL` on every status change, for a database that
/// reached revision 002 without it (Alembic's own 002). PostgreSQL only; idempotent,
/// serialised with migrations by their lock; runs in its own transaction.
pub fn ensure_notify_trigger(conn: &mut Conn) -> Result<()> {
    if conn.dialect() != Dialect::Postgres {
        return Ok(());
    }
    let present = conn.query(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'cmbagent_db_approval_status' AND tgrelid = to_regclass('approval_requests')",
        &[],
        &[("count", ColType::BigInt)],
    )?;
    if matches!(present.first().and_then(|r| r.first()), Some(Value::Int(n)) if *n > 0) {
        return Ok(());
    }
    let result = crate::migrate::lock(conn).and_then(|()| conn.batch(NOTIFY_TRIGGER));
    match result {
        Ok(()) => conn.commit(),
        Err(e) => {
            conn.rollback()?;
            Err(e.context(
                "cannot install the approval notification trigger (it needs CREATE on the schema)",
            ))
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitEnd {
    /// The request's row (every column), resolved.
    Resolved(Row),
    Expired,
    Cancelled,
    NotFound,
    /// A status outside the schema's states (NULL, or a value another client wrote):
    /// final for a waiter, since nothing here will ever move it on.
    UnknownStatus(Option<String>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate;
    use crate::url;
    use chrono::TimeDelta;

    #[test]
    fn deadlines_stay_within_what_python_can_read() {
        let now = Utc::now();
        let d = deadline(now, 300.0).unwrap();
        assert_eq!((d - now).num_seconds(), 300);
        for secs in [2.6e11, 1e15, 1e300] {
            let e = deadline(now, secs).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Value);
            assert!(e.message.contains("year 10000"), "{}", e.message);
        }
    }

    fn db_with_request(expires_in: TimeDelta) -> (Conn, DateTime<Utc>) {
        let mut c = Conn::open(&url::parse("sqlite:///:memory:").unwrap()).unwrap();
        migrate::migrate(&mut c, "head", false).unwrap();
        c.batch("INSERT INTO sessions (id, name) VALUES ('s', 'n'); INSERT INTO workflow_runs (id, session_id) VALUES ('r', 's');")
            .unwrap();
        let now = Utc::now();
        c.execute(
            "INSERT INTO approval_requests (id, run_id, approval_type, context, status, expires_at) VALUES ('a', 'r', 'plan_approval', '{}', 'pending', ?1)",
            &[Value::Timestamp(now + expires_in)],
        )
        .unwrap();
        (c, now)
    }

    #[test]
    fn the_trigger_notifies_the_channel_waiters_listen_on() {
        assert!(NOTIFY_TRIGGER.contains(&format!("pg_notify('{CHANNEL}'")));
        let migration = crate::migrate::revision("002_approvals_connections").unwrap();
        assert!(migration.up_sql(Dialect::Postgres).contains(NOTIFY_TRIGGER));
    }

    #[test]
    fn a_scoped_call_sees_only_its_sessions_and_runs_requests() {
        let (mut c, now) = db_with_request(TimeDelta::minutes(5));
        c.execute("UPDATE approval_requests SET session_id = 's'", &[])
            .unwrap();
        let scope = |session: Option<&str>, run: Option<&str>| Scope {
            session_id: session.map(str::to_string),
            run_id: run.map(str::to_string),
        };
        // Another session's or run's request answers as an unknown id does, and stays.
        for other in [
            scope(Some("x"), None),
            scope(None, Some("x")),
            scope(Some("s"), Some("x")),
        ] {
            assert_eq!(
                resolve(&mut c, "a", "approved", None, now, &other).unwrap(),
                Outcome::NotFound
            );
            assert_eq!(cancel(&mut c, "a", now, &other).unwrap(), Outcome::NotFound);
        }
        let late = now + TimeDelta::minutes(10);
        assert_eq!(
            resolve(&mut c, "a", "approved", None, late, &scope(Some("x"), None)).unwrap(),
            Outcome::NotFound
        );
        assert_eq!(
            status_of(&mut c, "a", &Scope::default())
                .unwrap()
                .as_deref(),
            Some("pending")
        );
        let own = scope(Some("s"), Some("r"));
        assert_eq!(
            resolve(&mut c, "a", "approved", None, now, &own).unwrap(),
            Outcome::Done
        );
        assert_eq!(
            cancel(&mut c, "a", now, &own).unwrap(),
            Outcome::AlreadyFinal("resolved".into())
        );
    }

    #[test]
    fn resolves_exactly_once() {
        let (mut c, now) = db_with_request(TimeDelta::minutes(5));
        assert_eq!(
            resolve(
                &mut c,
                "a",
                "approved",
                Some("{\"ok\": true}".into()),
                now,
                &Scope::default()
            )
            .unwrap(),
            Outcome::Done
        );
        assert_eq!(
            resolve(&mut c, "a", "rejected", None, now, &Scope::default()).unwrap(),
            Outcome::AlreadyFinal("resolved".into())
        );
        assert_eq!(
            resolve(&mut c, "zzz", "approved", None, now, &Scope::default()).unwrap(),
            Outcome::NotFound
        );
        assert_eq!(
            resolve(&mut c, "a", "maybe", None, now, &Scope::default())
                .unwrap_err()
                .kind,
            ErrorKind::Value
        );
    }

    #[test]
    fn an_overdue_request_expires_instead_of_resolving() {
        let (mut c, now) = db_with_request(TimeDelta::seconds(-1));
        assert_eq!(
            resolve(&mut c, "a", "approved", None, now, &Scope::default()).unwrap(),
            Outcome::Expired
        );
        assert_eq!(
            status_of(&mut c, "a", &Scope::default())
                .unwrap()
                .as_deref(),
            Some("expired")
        );
        assert!(expire_overdue_batch(&mut c, now, SWEEP_BATCH)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_sweep_batch_expires_at_most_its_limit_earliest_first() {
        let (mut c, now) = db_with_request(TimeDelta::minutes(5));
        for i in 0..7 {
            c.execute(
                "INSERT INTO approval_requests (id, run_id, approval_type, context, status, expires_at) VALUES (?1, 'r', 'plan_approval', '{}', 'pending', ?2)",
                &[
                    Value::Text(format!("o{i}")),
                    Value::Timestamp(now - TimeDelta::seconds(100 - i)),
                ],
            )
            .unwrap();
        }
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut first = expire_overdue_batch(&mut c, now, 3).unwrap();
        first.sort();
        assert_eq!(first, ids(&["o0", "o1", "o2"]));
        assert_eq!(expire_overdue_batch(&mut c, now, 3).unwrap().len(), 3);
        assert_eq!(expire_overdue_batch(&mut c, now, 3).unwrap(), ids(&["o6"]));
        assert!(expire_overdue_batch(&mut c, now, 3).unwrap().is_empty());
        assert_eq!(
            status_of(&mut c, "a", &Scope::default())
                .unwrap()
                .as_deref(),
            Some("pending")
        );
        let e = expire_overdue_batch(&mut c, now, 0).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Value);
    }

    #[test]
    fn only_sqlite_sweeps_pause_between_batches() {
        let ms = Duration::from_millis;
        assert_eq!(pause_after_batch(Dialect::Sqlite, ms(1)), ms(10));
        assert_eq!(pause_after_batch(Dialect::Sqlite, ms(40)), ms(40));
        assert_eq!(pause_after_batch(Dialect::Sqlite, ms(900)), ms(100));
        assert_eq!(pause_after_batch(Dialect::Postgres, ms(40)), Duration::ZERO);
    }

    #[test]
    fn sweep_returns_overdue_ids() {
        let (mut c, now) = db_with_request(TimeDelta::seconds(-1));
        assert_eq!(
            expire_overdue_batch(&mut c, now, SWEEP_BATCH).unwrap(),
            vec!["a".to_string()]
        );
        assert_eq!(
            cancel(&mut c, "a", now, &Scope::default()).unwrap(),
            Outcome::AlreadyFinal("expired".into())
        );
    }
}
