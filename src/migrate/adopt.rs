//! Adoption: bringing a table that exists already (made by cmbagent's SQLAlchemy models, by
//! its own Alembic chain, or by an older cmbagent) to the shape a revision gives it, keeping
//! every row and every column, foreign key and index of its own. Pure: from what the
//! catalogue says ([`TableInfo`]) to the SQL that changes the table, or the list of what
//! cannot be reconciled.
//!
//! PostgreSQL changes a table in place (`ALTER TABLE`). SQLite cannot change a column's
//! nullability or add a foreign key in place, so there the table is rebuilt: a new table
//! with the merged definition, every row copied with its rowid, the old one dropped and the
//! new one renamed, then its indexes and triggers made again. The migrator runs that with
//! foreign-key enforcement off and checks the foreign keys before it commits.
//!
//! How rows of cmbagent's first approval table appear through the columns it lacked:
//! `approval_type` is [`LEGACY_APPROVAL_TYPE`], `context` is a copy of `context_snapshot`
//! (`{}` when that is NULL), `created_at` is `requested_at`, and `expires_at` is
//! [`NO_DEADLINE`]: those requests had no deadline and still have none. Their `status`
//! (`pending`, `approved`, `rejected`, `modified`) is kept as it is.

use crate::dialect::Dialect;
use crate::migrate::inspect::{
    normalise_predicate, ColumnInfo, Family, ForeignKeyInfo, IndexInfo, TableInfo,
};
use crate::schema::{ColType, Column, ColumnDefault, Index, OnDelete, Table, TableId, TABLES};

/// The `approval_type` of requests made before approvals had types.
pub const LEGACY_APPROVAL_TYPE: &str = "legacy";

/// The `expires_at` of requests made before approvals had deadlines: they never expire.
pub const NO_DEADLINE: &str = "9999-12-31 23:59:59";

/// The SQL that adopts one table, in order.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub statements: Vec<String>,
    /// SQLite: the table is rebuilt, so foreign keys must be off while it runs.
    pub rebuilds: bool,
}

/// The columns a table has at `revision`.
pub fn columns_at(t: &Table, revision: u8) -> impl Iterator<Item = &Column> {
    t.columns
        .iter()
        .filter(move |c| c.since.max(t.since) <= revision)
}

fn indexes_at(t: &Table, revision: u8) -> impl Iterator<Item = &Index> {
    t.indexes
        .iter()
        .filter(move |i| i.since.max(t.since) <= revision)
}

/// A name from the catalogue, quoted for SQL.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn column_type(d: Dialect, ty: ColType) -> String {
    match (ty, d) {
        (ColType::Str(n), _) => format!("VARCHAR({n})"),
        (ColType::Text, _) => "TEXT".into(),
        (ColType::Integer, _) => "INTEGER".into(),
        (ColType::BigInt, _) => "BIGINT".into(),
        (ColType::Boolean, _) => "BOOLEAN".into(),
        (ColType::Timestamp { .. }, Dialect::Sqlite) => "TIMESTAMP".into(),
        (ColType::Timestamp { tz: false }, Dialect::Postgres) => {
            "TIMESTAMP WITHOUT TIME ZONE".into()
        }
        (ColType::Timestamp { tz: true }, Dialect::Postgres) => "TIMESTAMP WITH TIME ZONE".into(),
        (ColType::Json, _) => "JSON".into(),
    }
}

/// The value a column's database default gives, as an SQL expression.
fn default_expr(d: Dialect, c: &Column) -> Option<String> {
    Some(match (c.default, d) {
        (ColumnDefault::Str(s), _) => format!("'{s}'"),
        (ColumnDefault::Int(i), _) => i.to_string(),
        (ColumnDefault::Bool(b), Dialect::Sqlite) => u8::from(b).to_string(),
        (ColumnDefault::Bool(b), Dialect::Postgres) => b.to_string(),
        (ColumnDefault::Now, Dialect::Sqlite) => "CURRENT_TIMESTAMP".into(),
        (ColumnDefault::Now, Dialect::Postgres) => match c.ty {
            ColType::Timestamp { tz: true } => "now()".into(),
            _ => "(now() AT TIME ZONE 'utc')".into(),
        },
        (ColumnDefault::Uuid | ColumnDefault::None, _) => return None,
    })
}

/// `DEFAULT ...` as the migrations write it.
fn default_clause(d: Dialect, c: &Column) -> Option<String> {
    let e = default_expr(d, c)?;
    Some(match (c.default, d) {
        (ColumnDefault::Now, Dialect::Sqlite) => format!("DEFAULT ({e})"),
        _ => format!("DEFAULT {e}"),
    })
}

/// `name TYPE [NOT NULL] [DEFAULT ...]`.
fn column_def(d: Dialect, c: &Column, not_null: bool) -> String {
    let mut s = format!("{} {}", c.name, column_type(d, c.ty));
    if not_null {
        s.push_str(" NOT NULL");
    }
    if let Some(dflt) = default_clause(d, c) {
        s.push(' ');
        s.push_str(&dflt);
    }
    s
}

fn on_delete(o: OnDelete) -> &'static str {
    match o {
        OnDelete::Cascade => "CASCADE",
        OnDelete::SetNull => "SET NULL",
    }
}

fn references(c: &Column) -> Option<String> {
    c.foreign_key.map(|fk| {
        format!(
            "REFERENCES {} (id) ON DELETE {}",
            TABLES[fk.table].name,
            on_delete(fk.on_delete)
        )
    })
}

pub fn index_sql(table: &str, i: &Index) -> String {
    format!(
        "CREATE {}INDEX {} ON {table} ({}){}",
        if i.unique { "UNIQUE " } else { "" },
        i.name,
        i.columns.join(", "),
        i.predicate
            .map(|p| format!(" WHERE {p}"))
            .unwrap_or_default()
    )
}

/// The table as `revision` creates it, with its indexes.
pub fn create_table(d: Dialect, table: TableId, revision: u8) -> Vec<String> {
    let t = &TABLES[table];
    let mut parts: Vec<String> = columns_at(t, revision)
        .map(|c| column_def(d, c, !c.nullable))
        .collect();
    parts.push("PRIMARY KEY (id)".into());
    for c in columns_at(t, revision) {
        if let Some(r) = references(c) {
            parts.push(format!("FOREIGN KEY ({}) {r}", c.name));
        }
    }
    let mut out = vec![format!(
        "CREATE TABLE {} (\n    {}\n)",
        t.name,
        parts.join(",\n    ")
    )];
    out.extend(indexes_at(t, revision).map(|i| index_sql(t.name, i)));
    out
}

/// The table as a fresh database has it at `revision`, in the catalogue's terms: what
/// adoption aims at, and what the migrations' scripts must produce.
pub fn described(d: Dialect, table: TableId, revision: u8) -> TableInfo {
    let t = &TABLES[table];
    TableInfo {
        name: t.name.to_string(),
        columns: columns_at(t, revision)
            .map(|c| {
                let declared = column_type(d, c.ty);
                ColumnInfo {
                    name: c.name.to_string(),
                    family: Family::of(&declared),
                    max_len: match c.ty {
                        ColType::Str(n) => Some(n),
                        _ => None,
                    },
                    declared,
                    not_null: !c.nullable,
                    default: default_clause(d, c).map(|s| s["DEFAULT ".len()..].to_string()),
                    pk: i64::from(c.name == "id"),
                }
            })
            .collect(),
        foreign_keys: columns_at(t, revision)
            .filter_map(|c| {
                c.foreign_key.map(|fk| ForeignKeyInfo {
                    column: c.name.to_string(),
                    parent: TABLES[fk.table].name.to_string(),
                    parent_column: "id".into(),
                    on_delete: on_delete(fk.on_delete).into(),
                })
            })
            .collect(),
        indexes: indexes_at(t, revision)
            .map(|i| IndexInfo {
                name: i.name.to_string(),
                columns: i.columns.iter().map(|c| c.to_string()).collect(),
                unique: i.unique,
                predicate: i.predicate.map(str::to_string),
                constraint: false,
                sql: Some(index_sql(t.name, i)),
            })
            .collect(),
        sql: None,
        triggers: Vec::new(),
    }
}

/// What a row of cmbagent's first approval table gets in a column it lacks or holds NULL in.
fn legacy_fill(d: Dialect, table: TableId, c: &Column, actual: &TableInfo) -> Option<String> {
    if table != crate::schema::APPROVAL_REQUESTS {
        return None;
    }
    let pg = d == Dialect::Postgres;
    Some(match c.name {
        "approval_type" => format!("'{LEGACY_APPROVAL_TYPE}'"),
        // SQLAlchemy writes Python's None to a JSON column as JSON null, not SQL NULL.
        "context" => match (actual.column("context_snapshot").is_some(), pg) {
            (true, false) => "CASE WHEN context_snapshot IS NULL OR context_snapshot = 'null' \
                              THEN '{}' ELSE context_snapshot END"
                .into(),
            (true, true) => {
                "CASE WHEN context_snapshot IS NULL OR context_snapshot::text = 'null' \
                             THEN '{}'::json ELSE context_snapshot::json END"
                    .into()
            }
            (false, false) => "'{}'".into(),
            (false, true) => "'{}'::json".into(),
        },
        "expires_at" if pg => format!("'{NO_DEADLINE}+00'::timestamptz"),
        "expires_at" => format!("'{NO_DEADLINE}.000000'"),
        "created_at" => {
            let requested = actual.column("requested_at")?;
            let naive = requested.family == (Family::Timestamp { tz: Some(false) });
            if pg && naive {
                "requested_at AT TIME ZONE 'UTC'".into()
            } else {
                "requested_at".into()
            }
        }
        _ => return None,
    })
}

/// What an existing row gets in a column it lacks or holds NULL in: the legacy mapping,
/// else, where the package needs a value, the column's default.
fn fill(d: Dialect, table: TableId, c: &Column, actual: &TableInfo) -> Option<String> {
    legacy_fill(d, table, c, actual).or_else(|| default_expr(d, c).filter(|_| !c.nullable))
}

/// Why an existing column cannot hold this package's values, or the PostgreSQL type it must
/// be widened to.
fn type_change(d: Dialect, c: &Column, a: &ColumnInfo) -> Result<Option<String>, String> {
    let sqlite = d == Dialect::Sqlite;
    let fits = match c.ty {
        ColType::Str(_) | ColType::Text => a.family == Family::Text,
        ColType::Integer | ColType::BigInt => a.family == Family::Integer,
        ColType::Boolean => a.family == Family::Boolean || (sqlite && a.family == Family::Integer),
        ColType::Timestamp { .. } => matches!(a.family, Family::Timestamp { .. }),
        ColType::Json => a.family == Family::Json || (sqlite && a.family == Family::Text),
    };
    if !fits {
        return Err(format!(
            "column {} is {}, where this package stores {}",
            a.name,
            if a.declared.is_empty() {
                "untyped"
            } else {
                &a.declared
            },
            column_type(d, c.ty)
        ));
    }
    // SQLite does not enforce declared lengths; a narrower PostgreSQL column is widened.
    Ok(match (c.ty, a.max_len, sqlite) {
        (ColType::Str(n), Some(m), false) if m < n => Some(column_type(d, c.ty)),
        (ColType::Text, Some(_), false) => Some("TEXT".into()),
        _ => None,
    })
}

fn equivalent(a: &IndexInfo, i: &Index) -> bool {
    a.unique == i.unique
        && a.columns.len() == i.columns.len()
        && a.columns
            .iter()
            .zip(i.columns)
            .all(|(x, y)| x.eq_ignore_ascii_case(y))
        && a.predicate.as_deref().map(normalise_predicate) == i.predicate.map(normalise_predicate)
}

/// An existing column's definition as the catalogue gives it, NOT NULL or not.
fn existing_def(a: &ColumnInfo, not_null: bool) -> String {
    let mut def = format!("{} {}", quote(&a.name), a.declared);
    if not_null {
        def.push_str(" NOT NULL");
    }
    if let Some(dflt) = &a.default {
        def.push_str(&format!(" DEFAULT {dflt}"));
    }
    def
}

/// One column of a rebuilt SQLite table: its definition and the expression that copies it.
struct Rebuilt {
    name: String,
    def: String,
    copy: String,
}

/// The statements that adopt `actual` as `table` at `revision`, or what stands in the way.
pub fn plan(
    d: Dialect,
    table: TableId,
    revision: u8,
    actual: &TableInfo,
) -> Result<Plan, Vec<String>> {
    let t = &TABLES[table];
    let pg = d == Dialect::Postgres;
    let mut problems = Vec::new();
    // In-place changes (PostgreSQL, and SQLite where no rebuild is needed).
    let mut alter = Vec::new();
    let mut fills = Vec::new();
    let mut tighten = Vec::new();
    let mut rebuild = false;
    // SQLite's rebuilt column list: the existing columns first, in their order.
    let mut columns: Vec<Rebuilt> = Vec::new();
    let expected: Vec<&Column> = columns_at(t, revision).collect();

    for a in &actual.columns {
        let quoted = quote(&a.name);
        match expected
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(&a.name))
        {
            Some(c) => {
                match type_change(d, c, a) {
                    Err(p) => problems.push(p),
                    Ok(Some(ty)) => alter.push(format!(
                        "ALTER TABLE {} ALTER COLUMN {quoted} TYPE {ty}",
                        t.name
                    )),
                    Ok(None) => {}
                }
                let filler = fill(d, table, c, actual);
                // NOT NULL where the package needs a value and can give one to every row;
                // a column it cannot fill stays as permissive as it is.
                let not_null = if c.nullable {
                    false
                } else {
                    a.not_null || filler.is_some()
                };
                let mut copy = quoted.clone();
                if a.not_null && !not_null {
                    rebuild = true;
                    alter.push(format!(
                        "ALTER TABLE {} ALTER COLUMN {quoted} DROP NOT NULL",
                        t.name
                    ));
                }
                if not_null && !a.not_null {
                    rebuild = true;
                    if let Some(f) = &filler {
                        fills.push((quoted.clone(), f.clone()));
                        copy = format!("COALESCE({quoted}, {f})");
                    }
                    tighten.push(format!(
                        "ALTER TABLE {} ALTER COLUMN {quoted} SET NOT NULL",
                        t.name
                    ));
                }
                if c.foreign_key.is_some() && actual.foreign_key(&a.name).is_none() {
                    rebuild = true;
                    if let Some(r) = references(c) {
                        alter.push(format!(
                            "ALTER TABLE {} ADD FOREIGN KEY ({}) {r}",
                            t.name, c.name
                        ));
                    }
                }
                columns.push(Rebuilt {
                    def: existing_def(a, not_null),
                    name: quoted,
                    copy,
                });
            }
            None => {
                // A column of cmbagent's own: kept, but it must not refuse this package's
                // inserts, which do not name it.
                let relax = a.not_null && a.default.is_none() && a.pk == 0;
                if relax {
                    rebuild = true;
                    alter.push(format!(
                        "ALTER TABLE {} ALTER COLUMN {quoted} DROP NOT NULL",
                        t.name
                    ));
                }
                columns.push(Rebuilt {
                    def: existing_def(a, a.not_null && !relax),
                    name: quoted.clone(),
                    copy: quoted,
                });
            }
        }
    }

    for c in &expected {
        if actual.column(c.name).is_some() {
            continue;
        }
        let filler = fill(d, table, c, actual);
        if !c.nullable && filler.is_none() {
            problems.push(format!(
                "it has no column {} ({} NOT NULL), which this package needs and cannot fill in for existing rows",
                c.name,
                column_type(d, c.ty)
            ));
            continue;
        }
        let constant_default = matches!(
            c.default,
            ColumnDefault::Str(_) | ColumnDefault::Int(_) | ColumnDefault::Bool(_)
        );
        // The column's own default fills existing rows when it is added; anything else is
        // an explicit fill. SQLite adds a column in place only with a constant default or
        // none, and NOT NULL only with a default.
        let explicit = filler.clone().filter(|_| !constant_default);
        if c.default == ColumnDefault::Now || (!c.nullable && !constant_default) {
            rebuild = true;
        }
        // A legacy mapping must not be pre-empted by the default PostgreSQL gives the
        // existing rows when the column is added: the default comes after the fill.
        let legacy = legacy_fill(d, table, c, actual).is_some();
        let mut def = column_def(d, c, !c.nullable && constant_default);
        if legacy {
            def = format!("{} {}", c.name, column_type(d, c.ty));
            if let Some(dflt) = default_expr(d, c) {
                tighten.push(format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {dflt}",
                    t.name, c.name
                ));
            }
        }
        let mut add = format!("ALTER TABLE {} ADD COLUMN {def}", t.name);
        if let Some(r) = references(c) {
            add.push(' ');
            add.push_str(&r);
        }
        alter.push(add);
        if let Some(f) = &explicit {
            fills.push((c.name.to_string(), f.clone()));
            if !c.nullable {
                tighten.push(format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
                    t.name, c.name
                ));
            }
        }
        columns.push(Rebuilt {
            name: c.name.to_string(),
            def: column_def(d, c, !c.nullable),
            copy: filler
                .or_else(|| default_expr(d, c))
                .unwrap_or_else(|| "NULL".into()),
        });
    }

    // Indexes: one of this package's is made unless an equivalent one exists under any
    // name; a different index holding its name gives way to it.
    let mut replaced = Vec::new();
    let mut created = Vec::new();
    for i in indexes_at(t, revision) {
        if actual.indexes.iter().any(|a| equivalent(a, i)) {
            continue;
        }
        match actual
            .indexes
            .iter()
            .find(|a| a.name.eq_ignore_ascii_case(i.name))
        {
            Some(a) if a.constraint => continue,
            Some(a) => {
                replaced.push(a.name.clone());
                created.push(format!("DROP INDEX {}", quote(&a.name)));
            }
            None => {}
        }
        created.push(index_sql(t.name, i));
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    if !pg && rebuild {
        let sql = actual
            .sql
            .as_deref()
            .unwrap_or_default()
            .to_ascii_uppercase();
        for (word, what) in [
            ("CHECK", "CHECK constraints"),
            ("WITHOUT ROWID", "WITHOUT ROWID"),
        ] {
            if sql.contains(word) {
                return Err(vec![format!(
                    "it must be rebuilt to change column constraints, and has {what}, which a rebuild would not carry over"
                )]);
            }
        }
        let mut keep: Vec<String> = actual
            .indexes
            .iter()
            .filter(|a| !a.constraint && !replaced.contains(&a.name))
            .filter_map(|a| a.sql.clone())
            .collect();
        keep.extend(created.into_iter().filter(|s| !s.starts_with("DROP INDEX")));
        let mut fks: Vec<String> = expected
            .iter()
            .filter_map(|c| references(c).map(|r| format!("FOREIGN KEY ({}) {r}", c.name)))
            .collect();
        for f in &actual.foreign_keys {
            if !expected
                .iter()
                .any(|c| c.foreign_key.is_some() && c.name.eq_ignore_ascii_case(&f.column))
            {
                fks.push(foreign_key_clause(f));
            }
        }
        return Ok(Plan {
            statements: rebuild_sqlite(actual, &columns, &fks, &keep),
            rebuilds: true,
        });
    }
    // Without a rebuild, SQLite's statements are column additions, fills and indexes only:
    // every constraint change above asked for a rebuild.
    let mut statements = alter;
    if !fills.is_empty() {
        // One pass over the table for every fill: PostgreSQL writes a new version of each
        // row it updates.
        let set: Vec<String> = fills
            .iter()
            .map(|(c, f)| format!("{c} = COALESCE({c}, {f})"))
            .collect();
        let any: Vec<String> = fills.iter().map(|(c, _)| format!("{c} IS NULL")).collect();
        statements.push(format!(
            "UPDATE {} SET {} WHERE {}",
            t.name,
            set.join(", "),
            any.join(" OR ")
        ));
    }
    statements.extend(tighten);
    statements.extend(created);
    Ok(Plan {
        statements,
        rebuilds: false,
    })
}

fn foreign_key_clause(f: &ForeignKeyInfo) -> String {
    let mut s = format!(
        "FOREIGN KEY ({}) REFERENCES {} ({})",
        quote(&f.column),
        quote(&f.parent),
        quote(&f.parent_column)
    );
    if !f.on_delete.is_empty() && f.on_delete != "NO ACTION" {
        s.push_str(&format!(" ON DELETE {}", f.on_delete));
    }
    s
}

/// SQLite's table rebuild: a new table, every row copied with its rowid, the old table
/// dropped, the new one renamed, indexes and triggers made again.
fn rebuild_sqlite(
    actual: &TableInfo,
    columns: &[Rebuilt],
    foreign_keys: &[String],
    indexes: &[String],
) -> Vec<String> {
    let name = quote(&actual.name);
    let temp = quote(&format!("_cmbagent_db_new_{}", actual.name));
    let mut pk: Vec<&ColumnInfo> = actual.columns.iter().filter(|c| c.pk > 0).collect();
    pk.sort_by_key(|c| c.pk);
    let pk: Vec<String> = if pk.is_empty() {
        vec!["id".into()]
    } else {
        pk.iter().map(|c| quote(&c.name)).collect()
    };
    let mut parts: Vec<String> = columns.iter().map(|c| c.def.clone()).collect();
    parts.push(format!("PRIMARY KEY ({})", pk.join(", ")));
    for u in actual.indexes.iter().filter(|i| i.constraint && i.unique) {
        let cols: Vec<String> = u.columns.iter().map(|c| quote(c)).collect();
        if cols != pk {
            parts.push(format!("UNIQUE ({})", cols.join(", ")));
        }
    }
    parts.extend(foreign_keys.iter().cloned());
    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    let copies: Vec<&str> = columns.iter().map(|c| c.copy.as_str()).collect();
    let mut out = vec![
        format!("CREATE TABLE {temp} (\n    {}\n)", parts.join(",\n    ")),
        format!(
            "INSERT INTO {temp} (rowid, {}) SELECT rowid, {} FROM {name}",
            names.join(", "),
            copies.join(", ")
        ),
        format!("DROP TABLE {name}"),
        format!("ALTER TABLE {temp} RENAME TO {name}"),
    ];
    out.extend(indexes.iter().cloned());
    out.extend(actual.triggers.iter().cloned());
    out
}

/// SQLite's downgrade of a revision that added columns: the table rebuilt without them,
/// keeping everything else. (PostgreSQL drops columns in place.)
pub fn drop_columns_sqlite(table: TableId, revision: u8, actual: &TableInfo) -> Vec<String> {
    let t = &TABLES[table];
    let dropped = |name: &str| {
        t.columns
            .iter()
            .any(|c| c.since == revision && c.name.eq_ignore_ascii_case(name))
    };
    let columns: Vec<Rebuilt> = actual
        .columns
        .iter()
        .filter(|a| !dropped(&a.name))
        .map(|a| Rebuilt {
            name: quote(&a.name),
            def: existing_def(a, a.not_null),
            copy: quote(&a.name),
        })
        .collect();
    let fks: Vec<String> = actual
        .foreign_keys
        .iter()
        .filter(|f| !dropped(&f.column))
        .map(foreign_key_clause)
        .collect();
    let keep: Vec<String> = actual
        .indexes
        .iter()
        .filter(|i| !i.constraint && !i.columns.iter().any(|c| dropped(c)))
        .filter_map(|i| i.sql.clone())
        .collect();
    rebuild_sqlite(actual, &columns, &fks, &keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{APPROVAL_REQUESTS, WORKFLOW_RUNS};

    fn col(name: &str, declared: &str, not_null: bool) -> ColumnInfo {
        ColumnInfo {
            name: name.into(),
            declared: declared.into(),
            family: Family::of(declared),
            max_len: None,
            not_null,
            default: None,
            pk: i64::from(name == "id"),
        }
    }

    fn table(name: &str, columns: Vec<ColumnInfo>) -> TableInfo {
        TableInfo {
            name: name.into(),
            columns,
            foreign_keys: Vec::new(),
            indexes: Vec::new(),
            sql: Some(format!("CREATE TABLE {name} (...)")),
            triggers: Vec::new(),
        }
    }

    /// cmbagent's first approval table.
    fn legacy_approvals() -> TableInfo {
        table(
            "approval_requests",
            vec![
                col("id", "VARCHAR(36)", true),
                col("run_id", "VARCHAR(36)", true),
                col("step_id", "VARCHAR(36)", true),
                col("status", "VARCHAR(50)", true),
                col("requested_at", "TIMESTAMP", true),
                col("resolved_at", "TIMESTAMP", false),
                col("context_snapshot", "JSON", false),
                col("user_feedback", "TEXT", false),
                col("resolution", "VARCHAR(50)", false),
            ],
        )
    }

    #[test]
    fn the_legacy_approval_table_is_rebuilt_on_sqlite_with_every_row_mapped() {
        let p = plan(Dialect::Sqlite, APPROVAL_REQUESTS, 2, &legacy_approvals()).unwrap();
        assert!(p.rebuilds);
        let create = &p.statements[0];
        // Legacy NOT NULL columns this package does not write become nullable.
        assert!(create.contains("\"step_id\" VARCHAR(36),"), "{create}");
        assert!(create.contains("\"requested_at\" TIMESTAMP,"), "{create}");
        // New required columns are NOT NULL, filled for the old rows.
        assert!(
            create.contains("approval_type VARCHAR(50) NOT NULL"),
            "{create}"
        );
        assert!(create.contains("session_id VARCHAR(36),"), "{create}");
        assert!(
            create.contains("FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE SET NULL")
        );
        let copy = &p.statements[1];
        assert!(copy.contains("'legacy'"), "{copy}");
        assert!(
            copy.contains("context_snapshot = 'null' THEN '{}' ELSE context_snapshot END"),
            "{copy}"
        );
        assert!(copy.contains("'9999-12-31 23:59:59.000000'"), "{copy}");
        assert!(copy.contains("requested_at"), "{copy}");
        assert!(copy.starts_with("INSERT INTO \"_cmbagent_db_new_approval_requests\" (rowid,"));
        assert_eq!(p.statements[2], "DROP TABLE \"approval_requests\"");
        assert!(p
            .statements
            .iter()
            .any(|s| s.contains("idx_approval_expires") && s.contains("WHERE status = 'pending'")));
    }

    #[test]
    fn postgresql_alters_in_place_and_fills_before_tightening() {
        let p = plan(Dialect::Postgres, APPROVAL_REQUESTS, 2, &legacy_approvals()).unwrap();
        assert!(!p.rebuilds);
        let s = &p.statements;
        let at = |needle: &str| {
            s.iter()
                .position(|x| x.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in {s:#?}"))
        };
        let fill = at("approval_type = COALESCE(approval_type, 'legacy')");
        assert!(at("ADD COLUMN approval_type VARCHAR(50)") < fill);
        assert!(fill < at("ALTER COLUMN approval_type SET NOT NULL"));
        // Every fill in one pass over the table.
        assert_eq!(s.iter().filter(|x| x.starts_with("UPDATE")).count(), 1);
        for column in ["context", "expires_at", "created_at"] {
            assert!(
                s[fill].contains(&format!("{column} = COALESCE({column}, ")),
                "{}",
                s[fill]
            );
        }
        assert!(s[at("\"step_id\" DROP NOT NULL")].starts_with("ALTER TABLE approval_requests"));
    }

    #[test]
    fn a_table_that_is_something_else_is_refused_naming_what_differs() {
        let other = table(
            "approval_requests",
            vec![col("id", "INTEGER", true), col("title", "TEXT", false)],
        );
        let problems = plan(Dialect::Sqlite, APPROVAL_REQUESTS, 2, &other).unwrap_err();
        let all = problems.join("; ");
        assert!(all.contains("column id is INTEGER"), "{all}");
        assert!(all.contains("no column run_id"), "{all}");
    }

    #[test]
    fn today_shape_needs_nothing_but_the_partial_index() {
        // Every column present with the described nullability, a full expiry index.
        let mut t = table(
            "approval_requests",
            columns_at(&TABLES[APPROVAL_REQUESTS], 3)
                .map(|c| {
                    let mut i = col(c.name, &column_type(Dialect::Sqlite, c.ty), !c.nullable);
                    i.pk = i64::from(c.name == "id");
                    i
                })
                .collect(),
        );
        for c in ["run_id", "session_id"] {
            t.foreign_keys.push(ForeignKeyInfo {
                column: c.into(),
                parent: "x".into(),
                parent_column: "id".into(),
                on_delete: "CASCADE".into(),
            });
        }
        t.indexes.push(IndexInfo {
            name: "idx_approval_expires".into(),
            columns: vec!["expires_at".into()],
            unique: false,
            predicate: None,
            constraint: false,
            sql: Some("CREATE INDEX idx_approval_expires ON approval_requests (expires_at)".into()),
        });
        t.indexes.push(IndexInfo {
            name: "ix_approval_requests_session_id".into(),
            columns: vec!["session_id".into()],
            unique: false,
            predicate: None,
            constraint: false,
            sql: None,
        });
        let p = plan(Dialect::Sqlite, APPROVAL_REQUESTS, 3, &t).unwrap();
        assert!(!p.rebuilds, "{p:#?}");
        assert_eq!(
            p.statements,
            vec![
                "CREATE INDEX idx_approval_run_status ON approval_requests (run_id, status)".to_string(),
                "DROP INDEX \"idx_approval_expires\"".to_string(),
                "CREATE INDEX idx_approval_expires ON approval_requests (expires_at) WHERE status = 'pending'".to_string(),
            ]
        );
    }

    #[test]
    fn missing_columns_with_constant_defaults_are_added_in_place() {
        let mut t = table(
            "workflow_runs",
            columns_at(&TABLES[WORKFLOW_RUNS], 0)
                .filter(|c| !matches!(c.name, "is_branch" | "branch_depth" | "branch_parent_id"))
                .map(|c| col(c.name, &column_type(Dialect::Sqlite, c.ty), !c.nullable))
                .collect(),
        );
        t.foreign_keys.push(ForeignKeyInfo {
            column: "session_id".into(),
            parent: "sessions".into(),
            parent_column: "id".into(),
            on_delete: "CASCADE".into(),
        });
        let p = plan(Dialect::Sqlite, WORKFLOW_RUNS, 0, &t).unwrap();
        assert!(!p.rebuilds, "{p:#?}");
        assert!(p.statements.contains(
            &"ALTER TABLE workflow_runs ADD COLUMN is_branch BOOLEAN NOT NULL DEFAULT 0"
                .to_string()
        ));
        assert!(p.statements.contains(
            &"ALTER TABLE workflow_runs ADD COLUMN branch_parent_id VARCHAR(36) REFERENCES workflow_runs (id) ON DELETE SET NULL".to_string()
        ));
    }
}
