//! The statement runner behind the PEP 249 module (`cmbagent_db.dbapi`): any SQL with
//! positional parameters on one of this package's connections, rows of whatever the
//! columns hold, and PEP 249's implicit transactions.
//!
//! Transactions follow what SQLAlchemy expects of the drivers it knows. On PostgreSQL, as
//! psycopg2 does, every statement outside a transaction begins one. On SQLite, as Python's
//! `sqlite3` does, a statement that writes (DML, DDL, SAVEPOINT) begins one, with
//! `BEGIN IMMEDIATE` rather than a deferred BEGIN, so a writer waits for the write lock up
//! front instead of failing to upgrade a read; reads outside a transaction run on their own.
//! `commit()` / `rollback()` end it; with `autocommit` nothing is begun implicitly.

use crate::backend::{Conn, Row};
use crate::dialect::Dialect;
use crate::error::Result;
use crate::value::Value;

/// A result column: its name, on PostgreSQL its type's OID (SQLite has no column types,
/// as with `sqlite3`), and the Python type its values become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: Option<u32>,
    pub read_as: ReadAs,
}

/// The Python type of a column's values, where the [`Value`] alone does not say: text the
/// backend decoded from a type Python has its own class for, and timestamps without a
/// time zone (naive datetimes, as psycopg2 returns them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAs {
    /// As the value is: None, bool, int, float, str (JSON as its text), bytes, an aware
    /// UTC datetime.
    Native,
    Decimal,
    Date,
    Time,
    Uuid,
    NaiveDatetime,
}

/// What one statement produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
    /// Rows changed (or, on PostgreSQL, returned by a query); -1 where the backend does
    /// not count (a SQLite SELECT or DDL), as PEP 249 asks.
    pub rowcount: i64,
    /// SQLite's rowid of the row an INSERT made; None for other statements.
    pub lastrowid: Option<i64>,
}

/// The statement's first keyword, upper-cased, after whitespace and comments.
pub fn leading_keyword(sql: &str) -> String {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            break;
        }
    }
    rest.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Whether a statement with this leading keyword opens (true) or ends (false) a
/// transaction itself; None for every other statement. `ROLLBACK TO` a savepoint and
/// `RELEASE` leave the transaction open.
pub fn transaction_effect(sql: &str) -> Option<bool> {
    let keyword = leading_keyword(sql);
    match keyword.as_str() {
        "BEGIN" | "START" => Some(true),
        "COMMIT" | "END" | "ABORT" => Some(false),
        "ROLLBACK" => {
            let after = sql.trim_start()[keyword.len()..].to_ascii_uppercase();
            let to_savepoint = after.split_whitespace().take(2).any(|w| w == "TO");
            (!to_savepoint).then_some(false)
        }
        _ => None,
    }
}

/// Whether `sql` may return rows (and so has columns to describe even when it returns
/// none): a query, or a statement with a RETURNING clause. Others (DDL, INSERT / UPDATE /
/// DELETE without RETURNING, SET, ...) return none.
pub fn may_return_rows(sql: &str) -> bool {
    match leading_keyword(sql).as_str() {
        "SELECT" | "WITH" | "VALUES" | "TABLE" | "SHOW" | "EXPLAIN" | "FETCH" => true,
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" => sql.to_ascii_uppercase().contains("RETURNING"),
        _ => false,
    }
}

/// Whether `sql`, run outside a transaction and without autocommit, first begins one.
fn begins_transaction(conn: &mut Conn, sql: &str) -> Result<bool> {
    if transaction_effect(sql).is_some() {
        return Ok(false);
    }
    Ok(match conn.dialect() {
        Dialect::Postgres => true,
        Dialect::Sqlite => match leading_keyword(sql).as_str() {
            // Settings and maintenance that SQLite refuses, or ignores, inside a transaction.
            "PRAGMA" | "VACUUM" | "ATTACH" | "DETACH" | "RELEASE" => false,
            "SAVEPOINT" => true,
            _ => conn.statement_writes(sql)?,
        },
    })
}

/// Runs one statement as a PEP 249 cursor's `execute` does.
pub fn execute(conn: &mut Conn, sql: &str, params: &[Value], autocommit: bool) -> Result<Outcome> {
    if !autocommit && !conn.in_transaction() && begins_transaction(conn, sql)? {
        conn.begin_write()?;
    }
    conn.run_any(sql, params)
}

/// Runs one statement once per parameter set, as `executemany` does; the rowcount is the
/// sum. Rows a statement returns are kept from the last set only.
pub fn execute_many(
    conn: &mut Conn,
    sql: &str,
    param_sets: &[Vec<Value>],
    autocommit: bool,
) -> Result<Outcome> {
    let mut total = Outcome {
        columns: Vec::new(),
        rows: Vec::new(),
        rowcount: 0,
        lastrowid: None,
    };
    let mut counted = false;
    for params in param_sets {
        let one = execute(conn, sql, params, autocommit)?;
        if one.rowcount >= 0 {
            total.rowcount += one.rowcount;
            counted = true;
        }
        total.columns = one.columns;
        total.rows = one.rows;
        total.lastrowid = one.lastrowid.or(total.lastrowid);
    }
    if !counted {
        total.rowcount = -1;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::url;

    #[test]
    fn queries_and_returning_clauses_may_return_rows() {
        assert!(may_return_rows("  -- read\nselect 1"));
        assert!(may_return_rows("WITH x AS (SELECT 1) SELECT * FROM x"));
        assert!(may_return_rows(
            "insert into t (a) values ($1) returning id"
        ));
        assert!(!may_return_rows("INSERT INTO t (a) VALUES ($1)"));
        assert!(!may_return_rows("CREATE TABLE t (a int)"));
        assert!(!may_return_rows("SET lock_timeout = 10"));
    }

    #[test]
    fn keywords_skip_comments_and_savepoint_rollbacks_stay_open() {
        assert_eq!(leading_keyword("  -- note\n /* x */ select 1"), "SELECT");
        assert_eq!(leading_keyword("/* unterminated"), "");
        assert_eq!(transaction_effect("begin immediate"), Some(true));
        assert_eq!(transaction_effect("COMMIT"), Some(false));
        assert_eq!(transaction_effect("rollback"), Some(false));
        assert_eq!(transaction_effect("ROLLBACK TO SAVEPOINT sa_1"), None);
        assert_eq!(transaction_effect("rollback transaction to sa_1"), None);
        assert_eq!(transaction_effect("INSERT INTO t VALUES (1)"), None);
    }

    fn memory() -> Conn {
        Conn::open(&url::parse("sqlite:///:memory:").unwrap()).unwrap()
    }

    #[test]
    fn sqlite_writes_begin_a_transaction_and_reads_do_not() {
        let mut c = memory();
        execute(&mut c, "SELECT 1", &[], false).unwrap();
        assert!(!c.in_transaction());
        execute(
            &mut c,
            "CREATE TABLE t (a INTEGER PRIMARY KEY, b REAL, c BLOB)",
            &[],
            false,
        )
        .unwrap();
        assert!(c.in_transaction());
        let out = execute(
            &mut c,
            "INSERT INTO t (b, c) VALUES (?, ?)",
            &[Value::Float(1.5), Value::Bytes(vec![0, 255])],
            false,
        )
        .unwrap();
        assert_eq!((out.rowcount, out.lastrowid), (1, Some(1)));
        execute(&mut c, "ROLLBACK", &[], false).unwrap();
        assert!(!c.in_transaction());
        // the table went with the transaction
        assert!(execute(&mut c, "SELECT * FROM t", &[], false).is_err());
    }

    #[test]
    fn sqlite_rows_keep_their_storage_class() {
        let mut c = memory();
        let out = execute(
            &mut c,
            "SELECT NULL AS n, 1 AS i, 2.5 AS f, 'x' AS t, x'00ff' AS b",
            &[],
            false,
        )
        .unwrap();
        let names: Vec<&str> = out.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["n", "i", "f", "t", "b"]);
        assert_eq!(
            out.rows,
            vec![vec![
                Value::Null,
                Value::Int(1),
                Value::Float(2.5),
                Value::Text("x".into()),
                Value::Bytes(vec![0, 255])
            ]]
        );
        assert_eq!(out.rowcount, -1);
    }

    #[test]
    fn executemany_sums_rowcounts_and_autocommit_begins_nothing() {
        let mut c = memory();
        execute(&mut c, "CREATE TABLE t (a INTEGER)", &[], true).unwrap();
        assert!(!c.in_transaction());
        let sets: Vec<Vec<Value>> = (0..3).map(|i| vec![Value::Int(i)]).collect();
        let out = execute_many(&mut c, "INSERT INTO t VALUES (?)", &sets, false).unwrap();
        assert_eq!(out.rowcount, 3);
        assert!(c.in_transaction());
        execute(&mut c, "COMMIT", &[], false).unwrap();
        let n = execute(&mut c, "SELECT count(*) FROM t", &[], false).unwrap();
        assert_eq!(n.rows, vec![vec![Value::Int(3)]]);
        let e = execute(&mut c, "INSERT INTO t VALUES (?)", &[], false).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Programming);
    }
}
