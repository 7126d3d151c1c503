//! The unit of work: what a session's flush writes, and what deleting rows does to the
//! objects it still tracks, planned from plain values. The binding collects the values
//! from its objects, asks for a [`Flush`], runs it, and moves the objects to their new
//! states; everything here is tested without Python.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::backend::Conn;
use crate::dialect::Dialect;
use crate::error::{Error, ErrorKind, Result};
use crate::query;
use crate::schema::{ColumnDefault, OnDelete, TableId, TABLES};
use crate::value::Value;

/// Where an object stands with respect to a session (SQLAlchemy's object states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjState {
    /// Built, never added to a session.
    Transient,
    /// Added, not yet inserted.
    Pending,
    /// Has a row, and a session tracks it.
    Persistent,
    /// Its row was deleted in the session's open transaction.
    Deleted,
    /// Has a row; no session tracks it any more.
    Detached,
}

/// A row's identity: its table and primary key.
pub type Identity = (TableId, String);

/// A pending object's row: one value per column of its table, NULL where nothing is set.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRow {
    pub table: TableId,
    pub values: Vec<Value>,
}

/// A tracked object's assigned columns, keyed by the identity it was loaded under.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedRow {
    pub table: TableId,
    pub pk: String,
    pub columns: Vec<(usize, Value)>,
}

/// A value the flush chose for an object (the time of its insert or update), which the
/// object takes once the flush is written. `object` indexes the planner's input list.
#[derive(Debug, Clone, PartialEq)]
pub struct Filled {
    pub object: usize,
    pub column: usize,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
struct Update {
    table: TableId,
    columns: Vec<usize>,
    /// The new values, then the primary key.
    params: Vec<Value>,
}

/// The statements of one flush, in an order the foreign keys accept: inserts parent
/// tables first (and, within a table, a row after the row it references), then updates,
/// then deletes children first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Writes {
    inserts: Vec<(TableId, Vec<Vec<Value>>)>,
    updates: Vec<Update>,
    deletes: Vec<Identity>,
}

/// A planned flush: the writes, and what the objects become once they are written.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Flush {
    pub writes: Writes,
    /// Indexes into the `new` list, in the order their rows are written.
    pub insert_order: Vec<usize>,
    /// Indexes into the `changed` list that are written (rows being deleted are not).
    pub update_order: Vec<usize>,
    /// The rows deleted, children first.
    pub deleted: Vec<Identity>,
    /// Insert times for `new` objects.
    pub filled_new: Vec<Filled>,
    /// Update times for `changed` objects.
    pub filled_changed: Vec<Filled>,
}

/// Orders one table's new rows so a row referencing another new row of the same table
/// (a branch and its parent run) comes after it; otherwise rows keep the order they were
/// added in. A cycle keeps the order it was given, and the database reports it.
fn dependency_order<'a>(table: TableId, rows: &[(usize, &'a NewRow)]) -> Vec<usize> {
    let t = &TABLES[table];
    let self_refs: Vec<usize> = t
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.foreign_key.is_some_and(|fk| fk.table == table))
        .map(|(i, _)| i)
        .collect();
    let order: Vec<usize> = rows.iter().map(|(i, _)| *i).collect();
    if self_refs.is_empty() || rows.len() < 2 {
        return order;
    }
    let key = |v: &'a Value| match v {
        Value::Text(s) => Some(s.as_str()),
        _ => None,
    };
    let position: HashMap<&str, usize> = rows
        .iter()
        .enumerate()
        .filter_map(|(n, (_, r))| Some((key(&r.values[crate::schema::Table::PK])?, n)))
        .collect();
    let parents: Vec<Vec<usize>> = rows
        .iter()
        .enumerate()
        .map(|(n, (_, r))| {
            self_refs
                .iter()
                .filter_map(|&c| position.get(key(&r.values[c])?).copied())
                .filter(|&p| p != n)
                .collect()
        })
        .collect();
    // Depth-first, visiting parents before the row itself; `visiting` breaks cycles.
    let mut out = Vec::with_capacity(rows.len());
    let mut done = vec![false; rows.len()];
    let mut visiting = vec![false; rows.len()];
    for start in 0..rows.len() {
        let mut stack = vec![(start, 0usize)];
        while let Some((n, next)) = stack.pop() {
            if done[n] {
                continue;
            }
            visiting[n] = true;
            match parents[n].get(next) {
                Some(&p) => {
                    stack.push((n, next + 1));
                    if !done[p] && !visiting[p] {
                        stack.push((p, 0));
                    }
                }
                None => {
                    visiting[n] = false;
                    done[n] = true;
                    out.push(order[n]);
                }
            }
        }
    }
    out
}

impl Flush {
    /// Plans a flush of `new` rows, `changed` columns and `deleted` identities. `now` gives
    /// the time for each insert-time default left NULL and each on-update column the
    /// caller did not set itself.
    pub fn plan(
        mut new: Vec<NewRow>,
        changed: Vec<ChangedRow>,
        deleted: Vec<Identity>,
        mut now: impl FnMut() -> DateTime<Utc>,
    ) -> Flush {
        let mut flush = Flush::default();
        for (n, row) in new.iter_mut().enumerate() {
            for (column, c) in TABLES[row.table].columns.iter().enumerate() {
                if c.default == ColumnDefault::Now && row.values[column].is_null() {
                    let value = Value::Timestamp(now());
                    row.values[column] = value.clone();
                    flush.filled_new.push(Filled {
                        object: n,
                        column,
                        value,
                    });
                }
            }
        }
        let mut by_table: Vec<(usize, &NewRow)> = new.iter().enumerate().collect();
        by_table.sort_by_key(|(_, r)| r.table);
        let mut groups: Vec<(TableId, Vec<usize>)> = Vec::new();
        for chunk in by_table.chunk_by(|a, b| a.1.table == b.1.table) {
            let table = chunk[0].1.table;
            groups.push((table, dependency_order(table, chunk)));
        }
        for (table, order) in groups {
            let rows = order
                .iter()
                .map(|&i| std::mem::take(&mut new[i].values))
                .collect();
            flush.insert_order.extend(order);
            flush.writes.inserts.push((table, rows));
        }

        let deleting: HashSet<(TableId, &str)> =
            deleted.iter().map(|(t, pk)| (*t, pk.as_str())).collect();
        let mut updates: Vec<(usize, &ChangedRow)> = changed
            .iter()
            .enumerate()
            .filter(|(_, c)| !deleting.contains(&(c.table, c.pk.as_str())))
            .collect();
        updates.sort_by_key(|(_, c)| c.table);
        for (n, row) in updates {
            let mut columns = Vec::with_capacity(row.columns.len() + 1);
            let mut params = Vec::with_capacity(row.columns.len() + 2);
            for (column, value) in &row.columns {
                columns.push(*column);
                params.push(value.clone());
            }
            for (column, c) in TABLES[row.table].columns.iter().enumerate() {
                if c.on_update_now && !columns.contains(&column) {
                    let value = Value::Timestamp(now());
                    columns.push(column);
                    params.push(value.clone());
                    flush.filled_changed.push(Filled {
                        object: n,
                        column,
                        value,
                    });
                }
            }
            params.push(Value::Text(row.pk.clone()));
            flush.update_order.push(n);
            flush.writes.updates.push(Update {
                table: row.table,
                columns,
                params,
            });
        }

        let mut deleted = deleted;
        deleted.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        flush.writes.deletes = deleted.clone();
        flush.deleted = deleted;
        flush
    }
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.updates.is_empty() && self.deletes.is_empty()
    }

    /// Runs the statements on `conn`, inside the caller's transaction. An UPDATE that
    /// matches no row is a `StaleData` error: the row is gone.
    pub fn execute(self, conn: &mut Conn) -> Result<()> {
        let d = conn.dialect();
        for (table, rows) in self.inserts {
            let columns: Vec<usize> = (0..TABLES[table].columns.len()).collect();
            conn.insert_rows(table, &columns, rows)?;
        }
        for u in &self.updates {
            let sql = query::update_by_pk(d, u.table, &u.columns);
            if conn.execute(&sql, &u.params)? == 0 {
                let pk = match u.params.last() {
                    Some(Value::Text(pk)) => pk.as_str(),
                    _ => "",
                };
                return Err(Error::new(
                    ErrorKind::StaleData,
                    format!(
                        "UPDATE of {} id={pk} matched no row: it was deleted (perhaps by ON DELETE CASCADE of its parent) or never written",
                        TABLES[u.table].name
                    ),
                ));
            }
        }
        for (table, pk) in &self.deletes {
            conn.execute(&query::delete_by_pk(d, *table), &[Value::Text(pk.clone())])?;
        }
        Ok(())
    }

    /// The SQL of each statement in order, for tests and tracing.
    pub fn statements(&self, d: Dialect) -> Vec<String> {
        let mut out = Vec::new();
        for (table, rows) in &self.inserts {
            let columns: Vec<usize> = (0..TABLES[*table].columns.len()).collect();
            out.push(query::insert(d, *table, &columns, rows.len()));
        }
        for u in &self.updates {
            out.push(query::update_by_pk(d, u.table, &u.columns));
        }
        for (table, _) in &self.deletes {
            out.push(query::delete_by_pk(d, *table));
        }
        out
    }
}

/// A tracked row's references to other rows: `(column, parent key)` for each
/// foreign-key column that holds a key.
#[derive(Debug, Clone, PartialEq)]
pub struct References {
    pub table: TableId,
    pub pk: String,
    pub refs: Vec<(usize, String)>,
}

/// What the database's ON DELETE rules did to tracked rows once some rows were deleted:
/// indexes into the tracked list whose rows went too (CASCADE), and `(index, column)`
/// pairs whose reference became NULL (SET NULL).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeleteEffects {
    pub deleted: Vec<usize>,
    pub nulled: Vec<(usize, usize)>,
}

/// Follows ON DELETE rules from `deleted` rows through `tracked` rows, transitively: a
/// cascaded delete cascades in turn.
pub fn after_deletes(deleted: &[Identity], tracked: &[References]) -> DeleteEffects {
    // Per parent row: (tracked index, referencing column, rule).
    type Referrers = Vec<(usize, usize, OnDelete)>;
    let mut children: HashMap<(TableId, &str), Referrers> = HashMap::new();
    for (n, r) in tracked.iter().enumerate() {
        for (column, parent) in &r.refs {
            if let Some(fk) = TABLES[r.table].columns[*column].foreign_key {
                children
                    .entry((fk.table, parent.as_str()))
                    .or_default()
                    .push((n, *column, fk.on_delete));
            }
        }
    }
    let mut effects = DeleteEffects::default();
    let mut gone = vec![false; tracked.len()];
    let mut queue: Vec<(TableId, &str)> = deleted.iter().map(|(t, pk)| (*t, pk.as_str())).collect();
    while let Some(parent) = queue.pop() {
        for &(n, column, on_delete) in children.get(&parent).into_iter().flatten() {
            if gone[n] {
                continue;
            }
            match on_delete {
                OnDelete::Cascade => {
                    gone[n] = true;
                    effects.deleted.push(n);
                    queue.push((tracked[n].table, tracked[n].pk.as_str()));
                }
                OnDelete::SetNull => effects.nulled.push((n, column)),
            }
        }
    }
    effects.nulled.retain(|(n, _)| !gone[*n]);
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{APPROVAL_REQUESTS, SESSIONS, WORKFLOW_RUNS};
    use chrono::TimeZone;

    fn column(table: TableId, name: &str) -> usize {
        TABLES[table].column_index(name).unwrap()
    }

    fn row(table: TableId, id: &str, set: &[(&str, &str)]) -> NewRow {
        let mut values = vec![Value::Null; TABLES[table].columns.len()];
        values[0] = Value::Text(id.into());
        for (name, v) in set {
            values[column(table, name)] = Value::Text((*v).into());
        }
        NewRow { table, values }
    }

    fn clock() -> impl FnMut() -> DateTime<Utc> {
        let mut t = 0;
        move || {
            t += 1;
            Utc.timestamp_opt(1_700_000_000 + t, 0).unwrap()
        }
    }

    #[test]
    fn inserts_go_parents_first_and_in_added_order_within_a_table() {
        let new = vec![
            row(APPROVAL_REQUESTS, "a1", &[("run_id", "r1")]),
            row(WORKFLOW_RUNS, "r1", &[("session_id", "s1")]),
            row(SESSIONS, "s1", &[]),
            row(APPROVAL_REQUESTS, "a2", &[("run_id", "r1")]),
        ];
        let flush = Flush::plan(new, vec![], vec![], clock());
        assert_eq!(flush.insert_order, vec![2, 1, 0, 3]);
        let sql = flush.writes.statements(Dialect::Sqlite);
        assert_eq!(sql.len(), 3, "one INSERT per table: {sql:?}");
        assert!(sql[0].starts_with("INSERT INTO sessions"));
        assert!(sql[2].starts_with("INSERT INTO approval_requests"));
    }

    #[test]
    fn a_branch_is_inserted_after_the_run_it_branches_from() {
        let new = vec![
            row(WORKFLOW_RUNS, "child", &[("branch_parent_id", "mid")]),
            row(WORKFLOW_RUNS, "mid", &[("parent_run_id", "root")]),
            row(WORKFLOW_RUNS, "other", &[]),
            row(WORKFLOW_RUNS, "root", &[]),
        ];
        let flush = Flush::plan(new, vec![], vec![], clock());
        assert_eq!(flush.insert_order, vec![3, 1, 0, 2]);
    }

    #[test]
    fn a_reference_cycle_keeps_every_row_once() {
        let new = vec![
            row(WORKFLOW_RUNS, "x", &[("branch_parent_id", "y")]),
            row(WORKFLOW_RUNS, "y", &[("branch_parent_id", "x")]),
        ];
        let mut order = Flush::plan(new, vec![], vec![], clock()).insert_order;
        order.sort();
        assert_eq!(order, vec![0, 1]);
    }

    #[test]
    fn insert_times_fill_only_what_is_unset_and_are_reported() {
        let mut given = row(SESSIONS, "s1", &[]);
        let created = column(SESSIONS, "created_at");
        let set = Value::Timestamp(Utc.timestamp_opt(5, 0).unwrap());
        given.values[created] = set.clone();
        let flush = Flush::plan(vec![given], vec![], vec![], clock());
        let filled: Vec<usize> = flush.filled_new.iter().map(|f| f.column).collect();
        assert_eq!(filled, vec![column(SESSIONS, "last_active_at")]);
        assert_eq!(flush.writes.inserts[0].1[0][created], set);
    }

    #[test]
    fn updates_write_changed_columns_plus_on_update_times_and_skip_deleted_rows() {
        let status = column(SESSIONS, "status");
        let changed = vec![
            ChangedRow {
                table: SESSIONS,
                pk: "s1".into(),
                columns: vec![(status, Value::Text("archived".into()))],
            },
            ChangedRow {
                table: SESSIONS,
                pk: "s2".into(),
                columns: vec![(status, Value::Text("x".into()))],
            },
        ];
        let flush = Flush::plan(vec![], changed, vec![(SESSIONS, "s2".into())], clock());
        assert_eq!(flush.update_order, vec![0]);
        assert_eq!(
            flush.writes.statements(Dialect::Postgres),
            vec![
                "UPDATE sessions SET status = $1, last_active_at = $2 WHERE id = $3".to_string(),
                "DELETE FROM sessions WHERE id = $1".to_string(),
            ]
        );
        assert_eq!(flush.filled_changed.len(), 1);
        assert_eq!(flush.filled_changed[0].object, 0);
    }

    #[test]
    fn deletes_go_children_first() {
        let flush = Flush::plan(
            vec![],
            vec![],
            vec![
                (SESSIONS, "s".into()),
                (APPROVAL_REQUESTS, "a".into()),
                (WORKFLOW_RUNS, "r".into()),
            ],
            clock(),
        );
        let tables: Vec<TableId> = flush.deleted.iter().map(|(t, _)| *t).collect();
        assert_eq!(tables, vec![APPROVAL_REQUESTS, WORKFLOW_RUNS, SESSIONS]);
    }

    #[test]
    fn deleting_a_session_cascades_to_runs_and_their_approvals_and_nulls_set_null_refs() {
        let refs = |table, pk: &str, set: &[(&str, &str)]| References {
            table,
            pk: pk.into(),
            refs: set
                .iter()
                .map(|(c, v)| (column(table, c), (*v).to_string()))
                .collect(),
        };
        let tracked = vec![
            refs(WORKFLOW_RUNS, "r1", &[("session_id", "s1")]),
            // Both references point at deleted rows: the cascade wins, nothing is nulled.
            refs(
                APPROVAL_REQUESTS,
                "a1",
                &[("run_id", "r1"), ("session_id", "s1")],
            ),
            refs(
                APPROVAL_REQUESTS,
                "a2",
                &[("run_id", "r2"), ("session_id", "s1")],
            ),
            refs(WORKFLOW_RUNS, "r2", &[("session_id", "s2")]),
            refs(
                WORKFLOW_RUNS,
                "r3",
                &[("session_id", "s2"), ("branch_parent_id", "r1")],
            ),
        ];
        let mut effects = after_deletes(&[(SESSIONS, "s1".into())], &tracked);
        effects.deleted.sort();
        assert_eq!(effects.deleted, vec![0, 1]);
        let mut nulled = effects.nulled;
        nulled.sort();
        assert_eq!(
            nulled,
            vec![
                (2, column(APPROVAL_REQUESTS, "session_id")),
                (4, column(WORKFLOW_RUNS, "branch_parent_id")),
            ]
        );
    }
}
