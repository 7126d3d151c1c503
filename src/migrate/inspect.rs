//! What a table that already exists looks like: its columns, foreign keys and indexes, read
//! from the catalogue (SQLite's pragmas, PostgreSQL's `information_schema` and
//! `pg_catalog`). Adoption compares this with the schema description.

use crate::backend::Conn;
use crate::dialect::Dialect;
use crate::error::Result;
use crate::schema::ColType;
use crate::value::Value;

/// The kind of a column's declared type, as far as this package's values care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Text,
    Integer,
    Boolean,
    /// `tz` is known on PostgreSQL only (SQLite stores both alike).
    Timestamp {
        tz: Option<bool>,
    },
    Json,
    Other,
}

impl Family {
    /// The family of a declared type: SQLite's type text or PostgreSQL's `data_type`.
    pub fn of(declared: &str) -> Family {
        let t = declared.to_ascii_uppercase();
        if t.contains("JSON") {
            Family::Json
        } else if t.contains("TIMESTAMP") || t.contains("DATETIME") {
            Family::Timestamp {
                tz: if t.contains("WITHOUT TIME ZONE") {
                    Some(false)
                } else if t.contains("WITH TIME ZONE") {
                    Some(true)
                } else {
                    None
                },
            }
        } else if t.contains("CHAR") || t.contains("TEXT") || t.contains("CLOB") {
            Family::Text
        } else if t.contains("BOOL") {
            Family::Boolean
        } else if t.contains("INT") {
            Family::Integer
        } else {
            Family::Other
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    /// The declared type as the catalogue shows it (`VARCHAR(36)`, `character varying`).
    pub declared: String,
    pub family: Family,
    /// `VARCHAR(n)`'s `n`, where the type has one.
    pub max_len: Option<usize>,
    pub not_null: bool,
    /// The default's SQL text.
    pub default: Option<String>,
    /// Position in the primary key, 0 when not part of it (SQLite only).
    pub pk: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForeignKeyInfo {
    pub column: String,
    pub parent: String,
    pub parent_column: String,
    /// `CASCADE`, `SET NULL`, `NO ACTION`, ...
    pub on_delete: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    pub name: String,
    pub columns: Vec<String>,
    pub unique: bool,
    /// The `WHERE` clause of a partial index, as written.
    pub predicate: Option<String>,
    /// Made by a PRIMARY KEY or UNIQUE constraint: it cannot be dropped by name.
    pub constraint: bool,
    /// SQLite: the `CREATE INDEX` statement, to make it again after a rebuild.
    pub sql: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    pub name: String,
    pub columns: Vec<ColumnInfo>,
    pub foreign_keys: Vec<ForeignKeyInfo>,
    pub indexes: Vec<IndexInfo>,
    /// SQLite: the `CREATE TABLE` statement.
    pub sql: Option<String>,
    /// SQLite: the `CREATE TRIGGER` statements on the table.
    pub triggers: Vec<String>,
}

impl TableInfo {
    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }
    pub fn foreign_key(&self, column: &str) -> Option<&ForeignKeyInfo> {
        self.foreign_keys
            .iter()
            .find(|f| f.column.eq_ignore_ascii_case(column))
    }
}

/// What a name in the database is.
#[derive(Debug, Clone, PartialEq)]
pub enum Relation {
    Absent,
    Table(TableInfo),
    /// A view, a foreign table, ...: its kind as the catalogue names it.
    Other(String),
}

/// `WHERE` predicates compared without case, spaces, parentheses or PostgreSQL's casts, so
/// `status = 'pending'` and `((status)::text = 'pending'::text)` are the same.
pub fn normalise_predicate(p: &str) -> String {
    let mut s = p.to_ascii_lowercase();
    for cast in ["::character varying", "::text"] {
        s = s.replace(cast, "");
    }
    s.chars()
        .filter(|c| !c.is_whitespace() && *c != '(' && *c != ')' && *c != '"')
        .collect()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Bool(b) => i64::from(*b),
        _ => 0,
    }
}

/// The columns from a catalogue query of (name, declared type, length or NULL when the type
/// carries it, NOT NULL as 0/1, default, position in the primary key).
fn columns(conn: &mut Conn, sql: &str, table: &str) -> Result<Vec<ColumnInfo>> {
    let rows = conn.query(
        sql,
        &[Value::Text(table.into())],
        &[
            ("name", ColType::Text),
            ("type", ColType::Text),
            ("length", ColType::Integer),
            ("notnull", ColType::Integer),
            ("default", ColType::Text),
            ("pk", ColType::Integer),
        ],
    )?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let declared = text(&r[1]).unwrap_or_default();
            ColumnInfo {
                name: text(&r[0]).unwrap_or_default(),
                family: Family::of(&declared),
                max_len: match r[2] {
                    Value::Int(n) => usize::try_from(n).ok(),
                    _ => declared_len(&declared),
                },
                declared,
                not_null: int(&r[3]) != 0,
                default: text(&r[4]),
                pk: int(&r[5]),
            }
        })
        .collect())
}

/// A foreign key from a catalogue row of (column, parent, parent column, ON DELETE).
fn foreign_key(r: &[Value]) -> ForeignKeyInfo {
    ForeignKeyInfo {
        column: text(&r[0]).unwrap_or_default(),
        parent: text(&r[1]).unwrap_or_default(),
        parent_column: text(&r[2]).unwrap_or_default(),
        on_delete: text(&r[3]).unwrap_or_default(),
    }
}

fn strings(conn: &mut Conn, sql: &str, name: &str, width: usize) -> Result<Vec<Vec<Value>>> {
    let shape: Vec<(&str, ColType)> = (0..width).map(|_| ("catalogue", ColType::Text)).collect();
    conn.query(sql, &[Value::Text(name.into())], &shape)
}

/// `VARCHAR(36)` -> 36.
fn declared_len(declared: &str) -> Option<usize> {
    let open = declared.find('(')?;
    let close = declared[open..].find(')')? + open;
    declared[open + 1..close].trim().parse().ok()
}

/// The `WHERE` clause of a `CREATE INDEX` statement.
fn sqlite_predicate(sql: &str) -> Option<String> {
    let upper = sql.to_ascii_uppercase();
    let at = upper.rfind(" WHERE ")?;
    Some(
        sql[at + 7..]
            .trim()
            .trim_end_matches(';')
            .trim()
            .to_string(),
    )
}

pub fn inspect(conn: &mut Conn, name: &str) -> Result<Relation> {
    match conn.dialect() {
        Dialect::Sqlite => inspect_sqlite(conn, name),
        Dialect::Postgres => inspect_postgres(conn, name),
    }
}

fn inspect_sqlite(conn: &mut Conn, name: &str) -> Result<Relation> {
    let kind = strings(
        conn,
        "SELECT type, sql FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'view')",
        name,
        2,
    )?;
    let Some(row) = kind.first() else {
        return Ok(Relation::Absent);
    };
    if text(&row[0]).as_deref() != Some("table") {
        return Ok(Relation::Other(text(&row[0]).unwrap_or_default()));
    }
    let sql = text(&row[1]);
    let columns = columns(
        conn,
        "SELECT name, type, NULL, \"notnull\", dflt_value, pk FROM pragma_table_info(?1) ORDER BY cid",
        name,
    )?;
    let foreign_keys = strings(
        conn,
        "SELECT \"from\", \"table\", coalesce(\"to\", 'id'), on_delete FROM pragma_foreign_key_list(?1) ORDER BY id, seq",
        name,
        4,
    )?
    .iter()
    .map(|r| foreign_key(r))
    .collect();
    let listed = conn.query(
        "SELECT l.name, l.\"unique\", l.origin, m.sql FROM pragma_index_list(?1) AS l \
         LEFT JOIN sqlite_master AS m ON m.type = 'index' AND m.name = l.name ORDER BY l.name",
        &[Value::Text(name.into())],
        &[
            ("name", ColType::Text),
            ("unique", ColType::Integer),
            ("origin", ColType::Text),
            ("sql", ColType::Text),
        ],
    )?;
    let mut indexes = Vec::new();
    for r in listed {
        let index = text(&r[0]).unwrap_or_default();
        let columns = strings(
            conn,
            "SELECT coalesce(name, '') FROM pragma_index_info(?1) ORDER BY seqno",
            &index,
            1,
        )?
        .iter()
        .filter_map(|c| text(&c[0]))
        .collect();
        let sql = text(&r[3]);
        indexes.push(IndexInfo {
            name: index,
            columns,
            unique: int(&r[1]) != 0,
            predicate: sql.as_deref().and_then(sqlite_predicate),
            constraint: text(&r[2]).as_deref() != Some("c"),
            sql,
        });
    }
    let triggers = strings(
        conn,
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?1 ORDER BY name",
        name,
        1,
    )?
    .iter()
    .filter_map(|r| text(&r[0]))
    .collect();
    Ok(Relation::Table(TableInfo {
        name: name.to_string(),
        columns,
        foreign_keys,
        indexes,
        sql,
        triggers,
    }))
}

fn inspect_postgres(conn: &mut Conn, name: &str) -> Result<Relation> {
    let kind = strings(
        conn,
        "SELECT table_type::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_name = $1",
        name,
        1,
    )?;
    let Some(row) = kind.first() else {
        return Ok(Relation::Absent);
    };
    if text(&row[0]).as_deref() != Some("BASE TABLE") {
        return Ok(Relation::Other(text(&row[0]).unwrap_or_default()));
    }
    let columns = columns(
        conn,
        "SELECT column_name::text, data_type::text, character_maximum_length::integer, \
         (is_nullable = 'NO')::integer, column_default::text, 0 FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        name,
    )?;
    let foreign_keys = strings(
        conn,
        "SELECT a.attname::text, p.relname::text, pa.attname::text, \
         CASE c.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'r' THEN 'RESTRICT' \
         WHEN 'd' THEN 'SET DEFAULT' ELSE 'NO ACTION' END \
         FROM pg_constraint c \
         JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
         JOIN pg_class p ON p.oid = c.confrelid \
         JOIN pg_attribute pa ON pa.attrelid = c.confrelid AND pa.attnum = c.confkey[1] \
         WHERE c.contype = 'f' AND c.conrelid = to_regclass($1) ORDER BY c.conname",
        name,
        4,
    )?
    .iter()
    .map(|r| foreign_key(r))
    .collect();
    let indexes = conn
        .query(
            "SELECT ic.relname::text, i.indisunique, coalesce(pg_get_expr(i.indpred, i.indrelid), '')::text, \
             coalesce((SELECT string_agg(a.attname::text, ',' ORDER BY k.n) \
                 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum), '')::text, \
             EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u')) \
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
             WHERE i.indrelid = to_regclass($1) ORDER BY ic.relname",
            &[Value::Text(name.into())],
            &[
                ("name", ColType::Text),
                ("unique", ColType::Boolean),
                ("predicate", ColType::Text),
                ("columns", ColType::Text),
                ("constraint", ColType::Boolean),
            ],
        )?
        .into_iter()
        .map(|r| IndexInfo {
            name: text(&r[0]).unwrap_or_default(),
            unique: int(&r[1]) != 0,
            predicate: text(&r[2]).filter(|p| !p.is_empty()),
            columns: text(&r[3])
                .unwrap_or_default()
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            constraint: int(&r[4]) != 0,
            sql: None,
        })
        .collect();
    Ok(Relation::Table(TableInfo {
        name: name.to_string(),
        columns,
        foreign_keys,
        indexes,
        sql: None,
        triggers: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_of_declared_types() {
        assert_eq!(Family::of("VARCHAR(36)"), Family::Text);
        assert_eq!(Family::of("character varying"), Family::Text);
        assert_eq!(Family::of("JSON"), Family::Json);
        assert_eq!(Family::of("jsonb"), Family::Json);
        assert_eq!(
            Family::of("timestamp with time zone"),
            Family::Timestamp { tz: Some(true) }
        );
        assert_eq!(
            Family::of("timestamp without time zone"),
            Family::Timestamp { tz: Some(false) }
        );
        assert_eq!(Family::of("DATETIME"), Family::Timestamp { tz: None });
        assert_eq!(Family::of("BOOLEAN"), Family::Boolean);
        assert_eq!(Family::of("bigint"), Family::Integer);
        assert_eq!(Family::of("BLOB"), Family::Other);
        assert_eq!(declared_len("VARCHAR(50)"), Some(50));
        assert_eq!(declared_len("TEXT"), None);
    }

    #[test]
    fn predicates_compare_across_dialects() {
        assert_eq!(
            normalise_predicate("((status)::text = 'pending'::text)"),
            normalise_predicate("status = 'pending'")
        );
        assert_eq!(
            sqlite_predicate("CREATE INDEX i ON t (x) WHERE status = 'pending'").as_deref(),
            Some("status = 'pending'")
        );
        assert_eq!(sqlite_predicate("CREATE INDEX i ON t (x)"), None);
    }
}
