//! Filter expressions: what `Model.column == value`, `and_()`, `in_()`... build, and how
//! they become a WHERE clause. Column names come only from the schema; values are always
//! bound as parameters.

use crate::dialect::Dialect;
use crate::schema::{TableId, TABLES};
use crate::value::Value;

/// A table as a query reads it: under its own name (`alias` 0) or under an alias
/// (`aliased(WorkflowRun)`), rendered `workflow_runs_<alias>` so that self-joins can name
/// both sides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Source {
    pub table: TableId,
    pub alias: u32,
}

impl Source {
    pub const fn of(table: TableId) -> Self {
        Source { table, alias: 0 }
    }

    /// The name columns are qualified with.
    pub fn push_name(self, sql: &mut String) {
        sql.push_str(TABLES[self.table].name);
        if self.alias != 0 {
            sql.push('_');
            sql.push_str(&self.alias.to_string());
        }
    }

    /// The FROM / JOIN item: `workflow_runs` or `workflow_runs AS workflow_runs_1`.
    pub fn push_from(self, sql: &mut String) {
        sql.push_str(TABLES[self.table].name);
        if self.alias != 0 {
            sql.push_str(" AS ");
            self.push_name(sql);
        }
    }

    /// `WorkflowRun` or `aliased(WorkflowRun)`, for messages.
    pub fn describe(self) -> String {
        let model = TABLES[self.table].model;
        if self.alias == 0 {
            model.to_owned()
        } else {
            format!("aliased({model})")
        }
    }
}

/// A column of a table as a query reads it (see [`Source`] for `alias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ColRef {
    pub table: TableId,
    pub column: usize,
    pub alias: u32,
}

impl ColRef {
    pub const fn new(table: TableId, column: usize) -> Self {
        ColRef {
            table,
            column,
            alias: 0,
        }
    }
    pub fn source(self) -> Source {
        Source {
            table: self.table,
            alias: self.alias,
        }
    }
    pub fn name(self) -> &'static str {
        TABLES[self.table].columns[self.column].name
    }
    /// `table.column`, the form used in error messages.
    pub fn qualified(self) -> String {
        let mut s = String::new();
        self.source().push_name(&mut s);
        s.push('.');
        s.push_str(self.name());
        s
    }
    /// The column in SQL: qualified by its table (or alias) when the statement reads
    /// more than one table.
    pub fn push_sql(self, sql: &mut String, qualify: bool) {
        if qualify {
            self.source().push_name(sql);
            sql.push('.');
        }
        sql.push_str(self.name());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn sql(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Compare(ColRef, CmpOp, Value),
    /// Two columns compared, as join conditions are: `Session.id == SessionState.session_id`.
    CompareColumns(ColRef, CmpOp, ColRef),
    /// `IS NULL`, or `IS NOT NULL` when negated.
    IsNull(ColRef, bool),
    /// `IN (...)`, or `NOT IN (...)` when negated.
    In(ColRef, Vec<Value>, bool),
    /// `LIKE`; case-insensitive on both backends when the flag is set.
    Like(ColRef, String, bool),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

/// Collects bound values while SQL is rendered, handing out their placeholders.
#[derive(Debug)]
pub struct Params {
    pub dialect: Dialect,
    pub values: Vec<Value>,
    /// Whether columns are written `table.column` (statements over several tables).
    pub qualify: bool,
}

impl Params {
    pub fn new(dialect: Dialect) -> Self {
        Params {
            dialect,
            values: Vec::new(),
            qualify: false,
        }
    }
    pub fn bind(&mut self, v: Value) -> String {
        let mut s = String::new();
        self.push(v, &mut s);
        s
    }

    /// Binds `v` and appends its placeholder to `sql`.
    pub fn push(&mut self, v: Value, sql: &mut String) {
        self.values.push(v);
        self.dialect.push_placeholder(sql, self.values.len());
    }
}

impl Expr {
    /// Every table this expression reads, so a query can refuse columns of another table.
    pub fn for_each_column(&self, f: &mut impl FnMut(ColRef)) {
        match self {
            Expr::Compare(c, ..) | Expr::IsNull(c, _) | Expr::In(c, ..) | Expr::Like(c, ..) => {
                f(*c)
            }
            Expr::CompareColumns(a, _, b) => {
                f(*a);
                f(*b)
            }
            Expr::And(xs) | Expr::Or(xs) => xs.iter().for_each(|x| x.for_each_column(f)),
            Expr::Not(x) => x.for_each_column(f),
        }
    }

    pub fn render(&self, sql: &mut String, params: &mut Params) {
        match self {
            Expr::Compare(c, op, v) => {
                c.push_sql(sql, params.qualify);
                sql.push(' ');
                sql.push_str(op.sql());
                sql.push(' ');
                params.push(v.clone(), sql);
            }
            Expr::CompareColumns(a, op, b) => {
                a.push_sql(sql, params.qualify);
                sql.push(' ');
                sql.push_str(op.sql());
                sql.push(' ');
                b.push_sql(sql, params.qualify);
            }
            Expr::IsNull(c, negated) => {
                c.push_sql(sql, params.qualify);
                sql.push_str(if *negated { " IS NOT NULL" } else { " IS NULL" });
            }
            Expr::In(c, values, negated) => {
                if values.is_empty() {
                    // x IN () is false and x NOT IN () is true, as SQLAlchemy renders them.
                    sql.push_str(if *negated { "1 = 1" } else { "1 = 0" });
                    return;
                }
                c.push_sql(sql, params.qualify);
                sql.push_str(if *negated { " NOT IN (" } else { " IN (" });
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    params.push(v.clone(), sql);
                }
                sql.push(')');
            }
            Expr::Like(c, pattern, insensitive) => {
                if *insensitive {
                    sql.push_str("lower(");
                }
                c.push_sql(sql, params.qualify);
                sql.push_str(if *insensitive {
                    ") LIKE lower("
                } else {
                    " LIKE "
                });
                params.push(Value::Text(pattern.clone()), sql);
                if *insensitive {
                    sql.push(')');
                }
            }
            Expr::And(xs) | Expr::Or(xs) => {
                let (joiner, empty) = match self {
                    Expr::And(_) => (" AND ", "1 = 1"),
                    _ => (" OR ", "1 = 0"),
                };
                if xs.is_empty() {
                    sql.push_str(empty);
                    return;
                }
                sql.push('(');
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        sql.push_str(joiner);
                    }
                    x.render(sql, params);
                }
                sql.push(')');
            }
            Expr::Not(x) => {
                sql.push_str("NOT (");
                x.render(sql, params);
                sql.push(')');
            }
        }
    }
}

/// Renders `WHERE a AND b ...` for a list of criteria (nothing for an empty list).
pub fn render_where(filters: &[Expr], sql: &mut String, params: &mut Params) {
    for (i, f) in filters.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE " } else { " AND " });
        f.render(sql, params);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::APPROVAL_REQUESTS;

    fn c(name: &str) -> ColRef {
        ColRef::new(
            APPROVAL_REQUESTS,
            TABLES[APPROVAL_REQUESTS].column_index(name).unwrap(),
        )
    }

    #[test]
    fn values_are_bound_never_inlined() {
        let e = Expr::Or(vec![
            Expr::Compare(c("status"), CmpOp::Eq, Value::Text("x' OR '1'='1".into())),
            Expr::In(
                c("id"),
                vec![Value::Text("a".into()), Value::Text("b".into())],
                true,
            ),
            Expr::IsNull(c("resolved_at"), false),
        ]);
        let mut sql = String::new();
        let mut p = Params::new(Dialect::Postgres);
        e.render(&mut sql, &mut p);
        assert_eq!(
            sql,
            "(status = $1 OR id NOT IN ($2, $3) OR resolved_at IS NULL)"
        );
        assert_eq!(p.values.len(), 3);
        assert!(!sql.contains('\''));
    }

    #[test]
    fn empty_in_and_empty_or_are_constant() {
        let mut sql = String::new();
        let mut p = Params::new(Dialect::Sqlite);
        render_where(
            &[Expr::In(c("id"), vec![], false), Expr::Or(vec![])],
            &mut sql,
            &mut p,
        );
        assert_eq!(sql, " WHERE 1 = 0 AND 1 = 0");
    }
}
