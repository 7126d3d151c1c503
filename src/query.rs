//! The statements a session runs, rendered from the schema: SELECT / count for queries,
//! INSERT / UPDATE / DELETE for flushes and bulk operations.

use std::fmt::Write;

use crate::dialect::Dialect;
use crate::expr::{render_where, CmpOp, ColRef, Expr, Params, Source};
use crate::schema::{ColType, Table, TableId, TABLES};
use crate::value::Value;

/// An aggregate a query can select or sort by: `func.count(...)`, `func.max(...)`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Count,
    Max,
    Min,
    Sum,
}

impl Aggregate {
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::Max => "max",
            Aggregate::Min => "min",
            Aggregate::Sum => "sum",
        }
    }
}

/// One selected value: a column, or an aggregate over a column (`count(*)` without one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Item {
    Column(ColRef),
    Aggregate(Aggregate, Option<ColRef>),
}

impl Item {
    pub fn column(self) -> Option<ColRef> {
        match self {
            Item::Column(c) | Item::Aggregate(_, Some(c)) => Some(c),
            Item::Aggregate(_, None) => None,
        }
    }

    /// The name and type a row value of this item is read as.
    pub fn shape(self) -> (&'static str, ColType) {
        match self {
            Item::Column(c) => (c.name(), TABLES[c.table].columns[c.column].ty),
            Item::Aggregate(Aggregate::Count, _) => ("count", ColType::BigInt),
            Item::Aggregate(a, Some(c)) => {
                let ty = match TABLES[c.table].columns[c.column].ty {
                    // A sum of 32-bit integers can need 64 bits (PostgreSQL returns bigint).
                    ColType::Integer if a == Aggregate::Sum => ColType::BigInt,
                    ty => ty,
                };
                (a.name(), ty)
            }
            Item::Aggregate(a, None) => (a.name(), ColType::BigInt),
        }
    }

    /// `sessions.id` or `count(sessions.id)`, for messages.
    pub fn describe(self) -> String {
        let mut s = String::new();
        self.push_sql(&mut s, true);
        s
    }

    fn push_sql(self, sql: &mut String, qualify: bool) {
        match self {
            Item::Column(c) => c.push_sql(sql, qualify),
            Item::Aggregate(a, c) => {
                sql.push_str(a.name());
                sql.push('(');
                match c {
                    Some(c) => c.push_sql(sql, qualify),
                    None => sql.push('*'),
                }
                sql.push(')');
            }
        }
    }
}

/// How the values of a row make up what a query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A model object read from the table's columns, in schema order, from `start` on.
    Entity { table: TableId, start: usize },
    /// The value of one item.
    Value(usize),
}

/// `JOIN target ON on`, or `LEFT OUTER JOIN` when `outer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    pub target: Source,
    pub on: Expr,
    pub outer: bool,
}

impl Join {
    /// The join of `target` onto one of `sources` along the single foreign key between them;
    /// an error (for the user) when there is none or more than one.
    pub fn along_foreign_key(
        sources: &[Source],
        target: Source,
        outer: bool,
    ) -> Result<Join, String> {
        let mut found = Vec::new();
        for &s in sources {
            for (child, parent) in [(target, s), (s, target)] {
                for (i, c) in TABLES[child.table].columns.iter().enumerate() {
                    if c.foreign_key.is_some_and(|fk| fk.table == parent.table) {
                        found.push(Expr::CompareColumns(
                            ColRef {
                                alias: parent.alias,
                                ..ColRef::new(parent.table, Table::PK)
                            },
                            CmpOp::Eq,
                            ColRef {
                                alias: child.alias,
                                ..ColRef::new(child.table, i)
                            },
                        ));
                    }
                }
                if child == s {
                    // A table joined onto itself: both directions are the same keys.
                    break;
                }
            }
        }
        found.dedup();
        match found.len() {
            1 => Ok(Join {
                target,
                on: found.remove(0),
                outer,
            }),
            0 => Err(format!(
                "cannot join {}: no foreign key links it to {}; give the ON clause, \
                 e.g. .join(Target, Target.x == Source.y)",
                target.describe(),
                describe_all(sources)
            )),
            _ => Err(format!(
                "cannot join {}: several foreign keys link it to {}; give the ON clause",
                target.describe(),
                describe_all(sources)
            )),
        }
    }
}

fn describe_all(sources: &[Source]) -> String {
    let names: Vec<String> = sources.iter().map(|s| s.describe()).collect();
    names.join(", ")
}

/// A `SELECT`, as `session.query(...)` describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Select {
    /// The first FROM item; joins attach to it.
    pub from: Source,
    /// The values each row holds, in order.
    pub items: Vec<Item>,
    pub joins: Vec<Join>,
    pub filters: Vec<Expr>,
    pub group_by: Vec<ColRef>,
    /// (item, descending)
    pub order_by: Vec<(Item, bool)>,
    pub distinct: bool,
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

/// Every column of `source`, in schema order: what selecting a whole model reads.
pub fn entity_items(source: Source) -> impl Iterator<Item = Item> {
    (0..TABLES[source.table].columns.len()).map(move |i| {
        Item::Column(ColRef {
            alias: source.alias,
            ..ColRef::new(source.table, i)
        })
    })
}

impl Select {
    pub fn all_columns(table: TableId) -> Self {
        let from = Source::of(table);
        Select {
            from,
            items: entity_items(from).collect(),
            ..Default::default()
        }
    }

    /// The name and type of each row value, to read rows with.
    pub fn shape(&self) -> Vec<(&'static str, ColType)> {
        self.items.iter().map(|i| i.shape()).collect()
    }

    /// The FROM items the statement needs besides `from` and the join targets, in order
    /// of first use: tables whose columns are selected or filtered on without a join.
    fn implicit_sources(&self) -> Vec<Source> {
        let mut out: Vec<Source> = Vec::new();
        let mut note = |c: ColRef| {
            let s = c.source();
            if s != self.from && !self.joins.iter().any(|j| j.target == s) && !out.contains(&s) {
                out.push(s);
            }
        };
        for i in &self.items {
            i.column().into_iter().for_each(&mut note);
        }
        for f in &self.filters {
            f.for_each_column(&mut note);
        }
        for (i, _) in &self.order_by {
            i.column().into_iter().for_each(&mut note);
        }
        self.group_by.iter().copied().for_each(&mut note);
        out
    }

    /// The first FROM item and every join target, in order: what a new join can attach to.
    pub fn joined(&self) -> Vec<Source> {
        let mut all = vec![self.from];
        all.extend(self.joins.iter().map(|j| j.target));
        all
    }

    /// Whether the statement reads one table only: columns then need no qualification,
    /// and `count()` needs no subquery.
    fn single_table(&self, implicit: &[Source]) -> bool {
        self.joins.is_empty() && implicit.is_empty() && self.from.alias == 0
    }

    /// Whether the statement reads one table under its own name, so that each of its rows
    /// is a different row of that table.
    pub fn reads_one_table(&self) -> bool {
        self.single_table(&self.implicit_sources())
    }

    /// A join condition may only name the tables joined before it and its own target.
    pub fn check(&self) -> Result<(), String> {
        let mut available = vec![self.from];
        for j in &self.joins {
            if available.contains(&j.target) {
                return Err(format!(
                    "{} is joined twice; join aliased({}) for a second copy",
                    j.target.describe(),
                    TABLES[j.target.table].model
                ));
            }
            available.push(j.target);
            let mut wrong = None;
            j.on.for_each_column(&mut |c| {
                if !available.contains(&c.source()) {
                    wrong = Some(c);
                }
            });
            if let Some(c) = wrong {
                return Err(format!(
                    "the ON clause of the join to {} names {}, which is not joined before it",
                    j.target.describe(),
                    c.qualified()
                ));
            }
        }
        Ok(())
    }

    pub fn render(&self, dialect: Dialect) -> (String, Vec<Value>) {
        let implicit = self.implicit_sources();
        let mut params = Params::new(dialect);
        params.qualify = !self.single_table(&implicit);
        let q = params.qualify;
        let mut sql = String::with_capacity(256);
        sql.push_str(if self.distinct {
            "SELECT DISTINCT "
        } else {
            "SELECT "
        });
        for (n, item) in self.items.iter().enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            item.push_sql(&mut sql, q);
        }
        sql.push_str(" FROM ");
        self.from.push_from(&mut sql);
        for j in &self.joins {
            sql.push_str(if j.outer {
                " LEFT OUTER JOIN "
            } else {
                " JOIN "
            });
            j.target.push_from(&mut sql);
            sql.push_str(" ON ");
            j.on.render(&mut sql, &mut params);
        }
        for s in implicit {
            sql.push_str(", ");
            s.push_from(&mut sql);
        }
        render_where(&self.filters, &mut sql, &mut params);
        for (n, c) in self.group_by.iter().enumerate() {
            sql.push_str(if n == 0 { " GROUP BY " } else { ", " });
            c.push_sql(&mut sql, q);
        }
        for (n, &(item, desc)) in self.order_by.iter().enumerate() {
            sql.push_str(if n == 0 { " ORDER BY " } else { ", " });
            item.push_sql(&mut sql, q);
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

    /// `SELECT count(*)` of the rows this query would return.
    pub fn render_count(&self, dialect: Dialect) -> (String, Vec<Value>) {
        let aggregated = !self.group_by.is_empty()
            || self.items.iter().any(|i| matches!(i, Item::Aggregate(..)));
        if self.single_table(&self.implicit_sources())
            && !aggregated
            && !self.distinct
            && self.limit.is_none()
            && self.offset.is_none()
        {
            let mut sql = format!("SELECT count(*) FROM {}", TABLES[self.from.table].name);
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
    use crate::schema::{APPROVAL_REQUESTS, SESSIONS, SESSION_STATES, WORKFLOW_RUNS};

    fn col(name: &str) -> usize {
        TABLES[APPROVAL_REQUESTS].column_index(name).unwrap()
    }

    fn c(table: TableId, name: &str) -> ColRef {
        ColRef::new(table, TABLES[table].column_index(name).unwrap())
    }

    #[test]
    fn select_with_filter_order_limit() {
        let mut s = Select::all_columns(APPROVAL_REQUESTS);
        s.items = vec![
            Item::Column(c(APPROVAL_REQUESTS, "id")),
            Item::Column(c(APPROVAL_REQUESTS, "status")),
        ];
        s.filters.push(Expr::Compare(
            c(APPROVAL_REQUESTS, "status"),
            CmpOp::Eq,
            Value::Text("pending".into()),
        ));
        s.order_by
            .push((Item::Column(c(APPROVAL_REQUESTS, "created_at")), true));
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
        s.items.truncate(1);
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
    fn a_join_qualifies_every_column_and_binds_every_value() {
        let mut s = Select::all_columns(SESSIONS);
        s.items = vec![
            Item::Column(c(SESSIONS, "id")),
            Item::Column(c(SESSION_STATES, "mode")),
        ];
        s.joins.push(
            Join::along_foreign_key(&[Source::of(SESSIONS)], Source::of(SESSION_STATES), false)
                .unwrap(),
        );
        s.filters.push(Expr::Compare(
            c(SESSION_STATES, "status"),
            CmpOp::Eq,
            Value::Text("active".into()),
        ));
        s.order_by
            .push((Item::Column(c(SESSION_STATES, "updated_at")), true));
        let (sql, values) = s.render(Dialect::Postgres);
        assert_eq!(
            sql,
            "SELECT sessions.id, session_states.mode FROM sessions \
             JOIN session_states ON sessions.id = session_states.session_id \
             WHERE session_states.status = $1 ORDER BY session_states.updated_at DESC"
        );
        assert_eq!(values.len(), 1);
        assert!(s
            .render_count(Dialect::Sqlite)
            .0
            .starts_with("SELECT count(*) FROM (SELECT sessions.id"));
    }

    #[test]
    fn aliases_group_by_and_aggregates() {
        let parent = Source {
            table: WORKFLOW_RUNS,
            alias: 1,
        };
        let parent_id = ColRef {
            alias: 1,
            ..c(WORKFLOW_RUNS, "id")
        };
        // Two foreign keys link a run to a run: the ON clause must be given.
        let err = Join::along_foreign_key(&[Source::of(WORKFLOW_RUNS)], parent, true).unwrap_err();
        assert!(err.contains("several foreign keys"), "{err}");
        let mut s = Select::all_columns(WORKFLOW_RUNS);
        s.items = vec![
            Item::Column(parent_id),
            Item::Aggregate(Aggregate::Count, Some(c(WORKFLOW_RUNS, "id"))),
            Item::Aggregate(Aggregate::Max, Some(c(WORKFLOW_RUNS, "started_at"))),
        ];
        s.joins.push(Join {
            target: parent,
            on: Expr::CompareColumns(parent_id, CmpOp::Eq, c(WORKFLOW_RUNS, "parent_run_id")),
            outer: true,
        });
        s.group_by.push(parent_id);
        s.order_by
            .push((Item::Aggregate(Aggregate::Count, None), true));
        s.distinct = true;
        assert_eq!(s.check(), Ok(()));
        assert_eq!(
            s.render(Dialect::Sqlite).0,
            "SELECT DISTINCT workflow_runs_1.id, count(workflow_runs.id), max(workflow_runs.started_at) \
             FROM workflow_runs LEFT OUTER JOIN workflow_runs AS workflow_runs_1 \
             ON workflow_runs_1.id = workflow_runs.parent_run_id \
             GROUP BY workflow_runs_1.id ORDER BY count(*) DESC"
        );
        assert_eq!(s.shape()[1], ("count", ColType::BigInt));
        assert_eq!(s.shape()[2], ("max", ColType::Timestamp { tz: false }));
    }

    #[test]
    fn unjoined_tables_become_from_items_and_bad_joins_are_refused() {
        let mut s = Select::all_columns(APPROVAL_REQUESTS);
        s.items.push(Item::Column(c(WORKFLOW_RUNS, "status")));
        s.filters.push(Expr::CompareColumns(
            c(APPROVAL_REQUESTS, "run_id"),
            CmpOp::Eq,
            c(WORKFLOW_RUNS, "id"),
        ));
        let sql = s.render(Dialect::Sqlite).0;
        assert!(
            sql.ends_with(
                "FROM approval_requests, workflow_runs \
                 WHERE approval_requests.run_id = workflow_runs.id"
            ),
            "{sql}"
        );
        // The ON clause names a table joined only later.
        s.joins.push(Join {
            target: Source::of(WORKFLOW_RUNS),
            on: Expr::CompareColumns(c(WORKFLOW_RUNS, "id"), CmpOp::Eq, c(SESSIONS, "id")),
            outer: false,
        });
        assert!(s.check().unwrap_err().contains("sessions.id"));
        let none = Join::along_foreign_key(
            &[Source::of(SESSION_STATES)],
            Source::of(WORKFLOW_RUNS),
            false,
        )
        .unwrap_err();
        assert!(none.contains("no foreign key"), "{none}");
    }

    #[test]
    fn update_and_delete_return_ids() {
        let (sql, v) = update(
            Dialect::Postgres,
            APPROVAL_REQUESTS,
            &[(col("status"), Value::Text("expired".into()))],
            &[Expr::IsNull(c(APPROVAL_REQUESTS, "resolved_at"), false)],
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
