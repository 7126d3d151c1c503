//! The statements a session runs, rendered from the schema: SELECT / count for queries,
//! INSERT / UPDATE / DELETE for flushes and bulk operations.

use std::fmt::Write;

use crate::dialect::Dialect;
use crate::expr::{render_where, Expr, Params};
use crate::schema::{Table, TableId, TABLES};
use crate::value::Value;

/// A `SELECT` over one table, as `session.query(...)` describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Select {
    pub table: TableId,
    /// Column indexes to return, in order.
    pub columns: Vec<usize>,
    pub filters: Vec<Expr>,
    /// (column index, descending)
    pub order_by: Vec<(usize, bool)>,
    pub limit: Option<u64>,
    pub offset: Option<u64>,
}

fn push_column_list(sql: &mut String, table: &Table, columns: &[usize]) {
    for (n, &i) in columns.iter().enumerate() {
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push_str(table.columns[i].name);
    }
}

impl Select {
    pub fn all_columns(table: TableId) -> Self {
        Select {
            table,
            columns: (0..TABLES[table].columns.len()).collect(),
            ..Default::default()
        }
    }

    pub fn render(&self, dialect: Dialect) -> (String, Vec<Value>) {
        let t = &TABLES[self.table];
        let mut sql = String::with_capacity(256);
        sql.push_str("SELECT ");
        push_column_list(&mut sql, t, &self.columns);
        sql.push_str(" FROM ");
        sql.push_str(t.name);
        let mut params = Params::new(dialect);
        render_where(&self.filters, &mut sql, &mut params);
        for (n, &(i, desc)) in self.order_by.iter().enumerate() {
            sql.push_str(if n == 0 { " ORDER BY " } else { ", " });
            sql.push_str(t.columns[i].name);
            if desc {
                sql.push_str(" DESC");
            }
        }
        // write! to a String cannot fail.
        let _ = match (self.limit, self.offset) {
            (Some(l), Some(o)) => write!(sql, " LIMIT {l} OFFSET {o}"),
            (Some(l), None) => write!(sql, " LIMIT {l}"),
            // SQLite needs a LIMIT before OFFSET; -1 means none there, ALL on PostgreSQL.
            (None, Some(o)) => match dialect {
                Dialect::Sqlite => write!(sql, " LIMIT -1 OFFSET {o}"),
                Dialect::Postgres => write!(sql, " OFFSET {o}"),
            },
            (None, None) => Ok(()),
        };
        (sql, params.values)
    }

    /// `SELECT count(*)` of what this query would return.
    pub fn render_count(&self, dialect: Dialect) -> (String, Vec<Value>) {
        let t = &TABLES[self.table];
        if self.limit.is_none() && self.offset.is_none() {
            let mut sql = format!("SELECT count(*) FROM {}", t.name);
            let mut params = Params::new(dialect);
            render_where(&self.filters, &mut sql, &mut params);
            (sql, params.values)
        } else {
            let (inner, values) = self.render(dialect);
            (format!("SELECT count(*) FROM ({inner}) AS counted"), values)
        }
    }
}

/// `INSERT INTO t (cols) VALUES (...), (...)`: `rows` rows in one statement, whose
/// parameters are the rows' values one row after another.
pub fn insert(dialect: Dialect, table: TableId, columns: &[usize], rows: usize) -> String {
    let t = &TABLES[table];
    let n = columns.len();
    let mut sql = format!("INSERT INTO {} (", t.name);
    push_column_list(&mut sql, t, columns);
    sql.push_str(") VALUES ");
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { "), (" });
        for c in 1..=n {
            if c > 1 {
                sql.push_str(", ");
            }
            dialect.push_placeholder(&mut sql, r * n + c);
        }
    }
    if rows > 0 {
        sql.push(')');
    }
    sql
}

/// `UPDATE t SET a = ?1, ... WHERE id = ?N`: the unit of work writes only changed columns.
pub fn update_by_pk(dialect: Dialect, table: TableId, columns: &[usize]) -> String {
    let t = &TABLES[table];
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(n, &i)| format!("{} = {}", t.columns[i].name, dialect.placeholder(n + 1)))
        .collect();
    format!(
        "UPDATE {} SET {} WHERE id = {}",
        t.name,
        sets.join(", "),
        dialect.placeholder(columns.len() + 1)
    )
}

/// `DELETE FROM t WHERE id = ?1`.
pub fn delete_by_pk(dialect: Dialect, table: TableId) -> String {
    format!(
        "DELETE FROM {} WHERE id = {}",
        TABLES[table].name,
        dialect.placeholder(1)
    )
}

/// `UPDATE t SET ... WHERE <filters> RETURNING id`: bulk updates report which rows
/// they touched, so objects already loaded in the session can follow.
pub fn update(
    dialect: Dialect,
    table: TableId,
    set: &[(usize, Value)],
    filters: &[Expr],
) -> (String, Vec<Value>) {
    let t = &TABLES[table];
    let mut params = Params::new(dialect);
    let assignments: Vec<String> = set
        .iter()
        .map(|(i, v)| format!("{} = {}", t.columns[*i].name, params.bind(v.clone())))
        .collect();
    let mut sql = format!("UPDATE {} SET {}", t.name, assignments.join(", "));
    render_where(filters, &mut sql, &mut params);
    sql.push_str(" RETURNING id");
    (sql, params.values)
}

/// `DELETE FROM t WHERE <filters> RETURNING id`.
pub fn delete(dialect: Dialect, table: TableId, filters: &[Expr]) -> (String, Vec<Value>) {
    let t = &TABLES[table];
    let mut params = Params::new(dialect);
    let mut sql = format!("DELETE FROM {}", t.name);
    render_where(filters, &mut sql, &mut params);
    sql.push_str(" RETURNING id");
    (sql, params.values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expr::{CmpOp, ColRef};
    use crate::schema::APPROVAL_REQUESTS;

    fn col(name: &str) -> usize {
        TABLES[APPROVAL_REQUESTS].column_index(name).unwrap()
    }

    #[test]
    fn select_with_filter_order_limit() {
        let mut s = Select::all_columns(APPROVAL_REQUESTS);
        s.columns = vec![col("id"), col("status")];
        s.filters.push(Expr::Compare(
            ColRef {
                table: APPROVAL_REQUESTS,
                column: col("status"),
            },
            CmpOp::Eq,
            Value::Text("pending".into()),
        ));
        s.order_by.push((col("created_at"), true));
        s.limit = Some(10);
        let (sql, values) = s.render(Dialect::Sqlite);
        assert_eq!(
            sql,
            "SELECT id, status FROM approval_requests WHERE status = ?1 ORDER BY created_at DESC LIMIT 10"
        );
        assert_eq!(values, vec![Value::Text("pending".into())]);
        let (count, _) = s.render_count(Dialect::Postgres);
        assert!(count.starts_with("SELECT count(*) FROM (SELECT id, status"));
    }

    #[test]
    fn offset_without_limit() {
        let mut s = Select::all_columns(APPROVAL_REQUESTS);
        s.columns = vec![0];
        s.offset = Some(5);
        assert_eq!(
            s.render(Dialect::Sqlite).0,
            "SELECT id FROM approval_requests LIMIT -1 OFFSET 5"
        );
        assert_eq!(
            s.render(Dialect::Postgres).0,
            "SELECT id FROM approval_requests OFFSET 5"
        );
    }

    #[test]
    fn update_and_delete_return_ids() {
        let (sql, v) = update(
            Dialect::Postgres,
            APPROVAL_REQUESTS,
            &[(col("status"), Value::Text("expired".into()))],
            &[Expr::IsNull(
                ColRef {
                    table: APPROVAL_REQUESTS,
                    column: col("resolved_at"),
                },
                false,
            )],
        );
        assert_eq!(
            sql,
            "UPDATE approval_requests SET status = $1 WHERE resolved_at IS NULL RETURNING id"
        );
        assert_eq!(v.len(), 1);
        assert_eq!(
            delete(Dialect::Sqlite, APPROVAL_REQUESTS, &[]).0,
            "DELETE FROM approval_requests RETURNING id"
        );
        assert_eq!(
            insert(Dialect::Postgres, APPROVAL_REQUESTS, &[0, 1], 1),
            "INSERT INTO approval_requests (id, run_id) VALUES ($1, $2)"
        );
        assert_eq!(
            insert(Dialect::Sqlite, APPROVAL_REQUESTS, &[0, 1], 2),
            "INSERT INTO approval_requests (id, run_id) VALUES (?1, ?2), (?3, ?4)"
        );
    }
}
