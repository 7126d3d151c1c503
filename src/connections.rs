//! Connection presence: which server instance holds which task's WebSocket, kept fresh by
//! heartbeats and forgotten when an instance stops beating.

use chrono::{DateTime, TimeDelta, Utc};

use crate::backend::{Conn, Row};
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Result};
use crate::schema::{ColType, ACTIVE_CONNECTIONS, TABLES};
use crate::value::{json_string, Value};

fn all_columns() -> (String, Vec<(&'static str, ColType)>) {
    let t = &TABLES[ACTIVE_CONNECTIONS];
    (
        t.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", "),
        t.columns.iter().map(|c| (c.name, c.ty)).collect(),
    )
}

/// The oldest heartbeat still live for a TTL.
pub fn cutoff(ttl_seconds: f64, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if !(ttl_seconds.is_finite() && ttl_seconds >= 0.0) {
        return Err(Error::new(
            ErrorKind::Value,
            format!("ttl_seconds must be a non-negative number of seconds, got {ttl_seconds}"),
        ));
    }
    now.checked_sub_signed(TimeDelta::microseconds((ttl_seconds * 1e6) as i64))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Value,
                format!("ttl_seconds {ttl_seconds} is too large"),
            )
        })
}

/// Inserts the task's connection row or refreshes it, in one atomic statement (no
/// read-then-insert race between instances). Returns the row as stored.
pub fn heartbeat(
    conn: &mut Conn,
    task_id: &str,
    session_id: Option<&str>,
    server_instance: &str,
    now: DateTime<Utc>,
) -> Result<Row> {
    let d = conn.dialect();
    let (columns, shape) = all_columns();
    let ph: Vec<String> = (1..=6).map(|n| d.placeholder(n)).collect();
    // session_id is only set when given: SET on an indexed column rewrites its index entry
    // even when the value does not change, one more page written per heartbeat.
    let keep_session = if session_id.is_some() {
        ", session_id = excluded.session_id"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO active_connections (id, task_id, session_id, server_instance, connected_at, last_heartbeat) \
         VALUES ({}) ON CONFLICT (task_id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat, \
         server_instance = excluded.server_instance{keep_session} RETURNING {columns}",
        ph.join(", ")
    );
    let params = [
        Value::Text(uuid::Uuid::new_v4().to_string()),
        Value::Text(task_id.into()),
        session_id.map_or(Value::Null, |s| Value::Text(s.into())),
        Value::Text(server_instance.into()),
        Value::Timestamp(now),
        Value::Timestamp(now),
    ];
    conn.query(&sql, &params, &shape)?
        .pop()
        .ok_or_else(|| Error::internal("heartbeat upsert returned no row"))
}

/// Inserts or refreshes the connection row of every task in `tasks` (task id, and the
/// session id to store, None keeping the stored one) in one statement, whatever their
/// number: the rows go as one JSON parameter, so the statement text (and its prepared
/// form) is the same for every call. A task named twice counts once, with its last
/// session id. `with_sessions` false leaves every row's session id as stored, without
/// rewriting its index entry. Returns the number of tasks refreshed or inserted.
pub fn heartbeat_many(
    conn: &mut Conn,
    tasks: &[(String, Option<String>)],
    with_sessions: bool,
    server_instance: &str,
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut last: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(tasks.len());
    for (i, (task, _)) in tasks.iter().enumerate() {
        last.insert(task.as_str(), i);
    }
    if last.is_empty() {
        return Ok(0);
    }
    let mut rows = String::with_capacity(tasks.len() * 100);
    rows.push('[');
    for (i, (task, session)) in tasks.iter().enumerate() {
        if last.get(task.as_str()) != Some(&i) {
            continue;
        }
        if rows.len() > 1 {
            rows.push(',');
        }
        rows.push_str("{\"id\":\"");
        rows.push_str(&uuid::Uuid::new_v4().to_string());
        rows.push_str("\",\"task_id\":");
        json_string(task, &mut rows);
        rows.push_str(",\"session_id\":");
        match session {
            Some(s) => json_string(s, &mut rows),
            None => rows.push_str("null"),
        }
        rows.push('}');
    }
    rows.push(']');
    let columns = "id, task_id, session_id, server_instance, connected_at, last_heartbeat";
    let keep_session = if with_sessions {
        ", session_id = COALESCE(excluded.session_id, active_connections.session_id)"
    } else {
        ""
    };
    let on_conflict = format!(
        "ON CONFLICT (task_id) DO UPDATE SET last_heartbeat = excluded.last_heartbeat, \
         server_instance = excluded.server_instance{keep_session}"
    );
    let (sql, params) = match conn.dialect() {
        Dialect::Sqlite => (
            format!(
                "INSERT INTO active_connections ({columns}) SELECT json_extract(j.value, '$.id'), \
                 json_extract(j.value, '$.task_id'), json_extract(j.value, '$.session_id'), ?1, ?2, ?2 \
                 FROM json_each(?3) AS j WHERE true {on_conflict}"
            ),
            vec![
                Value::Text(server_instance.into()),
                Value::Timestamp(now),
                Value::Text(rows),
            ],
        ),
        // The table's own row type reads each value with its column's input function, so
        // a `timestamp` column of a database another tool made takes the instant as UTC,
        // as a `timestamptz` one does.
        Dialect::Postgres => {
            let mut shared = String::from("{\"server_instance\":");
            json_string(server_instance, &mut shared);
            let at = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            shared.push_str(&format!(",\"connected_at\":\"{at}\",\"last_heartbeat\":\"{at}\"}}"));
            (
                format!(
                    "INSERT INTO active_connections ({columns}) SELECT r.id, r.task_id, r.session_id, \
                     s.server_instance, s.connected_at, s.last_heartbeat \
                     FROM json_populate_recordset(NULL::active_connections, $1::json) AS r, \
                     json_populate_record(NULL::active_connections, $2::json) AS s {on_conflict}"
                ),
                vec![Value::Text(rows), Value::Text(shared)],
            )
        }
    };
    conn.execute(&sql, &params)
}

/// A removed connection: its row id and task id.
pub type Removed = (String, String);

fn removed(conn: &mut Conn, sql: &str, params: &[Value]) -> Result<Vec<Removed>> {
    Ok(conn
        .query(
            sql,
            params,
            &[("id", ColType::Str(36)), ("task_id", ColType::Str(100))],
        )?
        .into_iter()
        .filter_map(|r| match (r.first(), r.get(1)) {
            (Some(Value::Text(id)), Some(Value::Text(task))) => Some((id.clone(), task.clone())),
            _ => None,
        })
        .collect())
}

pub fn disconnect(conn: &mut Conn, task_id: &str) -> Result<Vec<Removed>> {
    let p = conn.dialect().placeholder(1);
    removed(
        conn,
        &format!("DELETE FROM active_connections WHERE task_id = {p} RETURNING id, task_id"),
        &[Value::Text(task_id.into())],
    )
}

/// Forgets every connection of one instance (its clean shutdown).
pub fn release_instance(conn: &mut Conn, server_instance: &str) -> Result<Vec<Removed>> {
    let p = conn.dialect().placeholder(1);
    removed(
        conn,
        &format!(
            "DELETE FROM active_connections WHERE server_instance = {p} RETURNING id, task_id"
        ),
        &[Value::Text(server_instance.into())],
    )
}

/// Removes connections whose last heartbeat is older than the cutoff.
pub fn reap_stale(conn: &mut Conn, cutoff: DateTime<Utc>) -> Result<Vec<Removed>> {
    let p = conn.dialect().placeholder(1);
    removed(
        conn,
        &format!("DELETE FROM active_connections WHERE last_heartbeat < {p} RETURNING id, task_id"),
        &[Value::Timestamp(cutoff)],
    )
}

/// The instance holding `task_id`, if its heartbeat is not older than the cutoff.
pub fn owner(conn: &mut Conn, task_id: &str, cutoff: DateTime<Utc>) -> Result<Option<String>> {
    let d = conn.dialect();
    let rows = conn.query(
        &format!(
            "SELECT server_instance FROM active_connections WHERE task_id = {} AND last_heartbeat >= {}",
            d.placeholder(1),
            d.placeholder(2)
        ),
        &[Value::Text(task_id.into()), Value::Timestamp(cutoff)],
        &[("server_instance", ColType::Str(100))],
    )?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| match r.into_iter().next() {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate;
    use crate::url;

    fn db() -> Conn {
        let mut c = Conn::open(&url::parse("sqlite:///:memory:").unwrap()).unwrap();
        migrate::migrate(&mut c, "head", false).unwrap();
        c
    }

    #[test]
    fn heartbeat_upserts_one_row_per_task() {
        let mut c = db();
        let t0 = Utc::now();
        let a = heartbeat(&mut c, "t", None, "w1", t0).unwrap();
        let b = heartbeat(&mut c, "t", None, "w2", t0 + TimeDelta::seconds(5)).unwrap();
        assert_eq!(a[0], b[0], "same row id");
        assert_eq!(b[3], Value::Text("w2".into()));
        assert_eq!(owner(&mut c, "t", t0).unwrap().as_deref(), Some("w2"));
        assert_eq!(
            owner(&mut c, "t", t0 + TimeDelta::seconds(10)).unwrap(),
            None
        );
        let reaped = reap_stale(&mut c, t0 + TimeDelta::seconds(10)).unwrap();
        assert_eq!(reaped, vec![(a_id(&a), "t".to_string())]);
        assert!(disconnect(&mut c, "t").unwrap().is_empty());
    }

    fn a_id(row: &Row) -> String {
        match &row[0] {
            Value::Text(s) => s.clone(),
            v => panic!("{v:?}"),
        }
    }

    fn rows_of(c: &mut Conn) -> Vec<Row> {
        let (columns, shape) = all_columns();
        c.query(
            &format!("SELECT {columns} FROM active_connections ORDER BY task_id"),
            &[],
            &shape,
        )
        .unwrap()
    }

    #[test]
    fn heartbeat_many_upserts_every_task_in_one_statement() {
        let mut c = db();
        for s in ["s-old", "s-b", "s-1", "s-2"] {
            c.execute(
                "INSERT INTO sessions (id, name) VALUES (?1, 'x')",
                &[Value::Text(s.into())],
            )
            .unwrap();
        }
        let t0 = crate::value::now_micros();
        let first = heartbeat(&mut c, "a", Some("s-old"), "w1", t0).unwrap();
        let t1 = t0 + TimeDelta::seconds(5);
        let tasks = vec![
            ("a".to_string(), None),
            ("b\"\u{e9}".to_string(), Some("s-b".to_string())),
            ("c".to_string(), Some("s-1".to_string())),
            ("c".to_string(), Some("s-2".to_string())),
        ];
        assert_eq!(heartbeat_many(&mut c, &tasks, true, "w2", t1).unwrap(), 3);
        let rows = rows_of(&mut c);
        assert_eq!(rows.len(), 3);
        // The existing row keeps its id, connected_at and (None given) its session.
        assert_eq!(rows[0][0], first[0]);
        assert_eq!(rows[0][2], Value::Text("s-old".into()));
        assert_eq!(rows[0][4], first[4]);
        assert_eq!(rows[1][1], Value::Text("b\"\u{e9}".into()));
        assert_eq!(
            rows[2][2],
            Value::Text("s-2".into()),
            "the last session of a task wins"
        );
        for r in &rows {
            assert_eq!(r[3], Value::Text("w2".into()));
            assert_eq!(r[5], Value::Timestamp(t1));
        }
        // Without session ids every stored one stays.
        assert_eq!(
            heartbeat_many(&mut c, &[("c".into(), None)], false, "w3", t1).unwrap(),
            1
        );
        assert_eq!(rows_of(&mut c)[2][2], Value::Text("s-2".into()));
        assert_eq!(heartbeat_many(&mut c, &[], true, "w3", t1).unwrap(), 0);
    }

    #[test]
    fn negative_ttl_is_refused() {
        assert_eq!(cutoff(-1.0, Utc::now()).unwrap_err().kind, ErrorKind::Value);
        assert_eq!(
            cutoff(f64::NAN, Utc::now()).unwrap_err().kind,
            ErrorKind::Value
        );
    }
}
