//! The one description of the five tables: columns, types, lengths, defaults and foreign
//! keys. Model classes, validation, SQL and `to_dict` are all driven from here.

/// A column's type, named after the SQLAlchemy type the existing rows were written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColType {
    /// `String(n)`: at most `n` characters, enforced on every backend.
    Str(usize),
    Text,
    Integer,
    Boolean,
    /// `TIMESTAMP`; `tz` is `TIMESTAMP(timezone=True)` (only PostgreSQL stores it differently).
    Timestamp {
        tz: bool,
    },
    Json,
    /// `count(*)` and similar: not a column type, only a result type.
    BigInt,
}

/// What a column holds when the caller gives nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnDefault {
    None,
    /// uuid4 text, set when the object is built.
    Uuid,
    /// The current UTC time, set when the row is inserted.
    Now,
    Str(&'static str),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDelete {
    Cascade,
    SetNull,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignKey {
    pub table: TableId,
    pub on_delete: OnDelete,
}

/// A foreign key to a table of the application's own (cmbagent's `projects`,
/// `workflow_steps`): the migrations neither create that table nor the constraint (databases
/// cmbagent made have it already), but an application that declares the table to
/// SQLAlchemy gets the key declared on this side too, so its relationships find their join
/// and a flush writes the application's row before the one naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppReference {
    pub table: &'static str,
    pub on_delete: OnDelete,
}

/// How `to_dict()` renders a NULL column (some keys show an empty list or dict instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullAs {
    None,
    EmptyList,
    EmptyDict,
}

#[derive(Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColType,
    pub nullable: bool,
    pub default: ColumnDefault,
    /// Set to now on every UPDATE that does not set it itself.
    pub on_update_now: bool,
    pub foreign_key: Option<ForeignKey>,
    pub app_reference: Option<AppReference>,
    /// The revision that adds the column, as an index into `migrate::REVISIONS` (its
    /// number); a column is never older than its table.
    pub since: u8,
}

/// An index the migrations create. Adoption of an existing table creates the ones it lacks,
/// unless an index with the same columns, uniqueness and predicate exists under another name.
#[derive(Debug)]
pub struct Index {
    pub name: &'static str,
    pub columns: &'static [&'static str],
    pub unique: bool,
    /// `WHERE` clause of a partial index.
    pub predicate: Option<&'static str>,
    /// The revision that creates it.
    pub since: u8,
}

/// Which side of a foreign key a relationship attribute sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    /// On the referencing table: `approval.run` is the row `run_id` names.
    ToParent,
    /// On the referenced table: `run.approval_requests` are the rows naming it.
    ToChildren,
}

/// A relationship attribute, as SQLAlchemy's `relationship()` declares it. Both sides of
/// one foreign key are kept in step in memory (`back_populates`): appending to
/// `run.approval_requests` sets `approval.run`, and the other way round.
#[derive(Debug)]
pub struct Relationship {
    pub name: &'static str,
    pub kind: RelKind,
    /// The referencing table, its foreign-key column and the table that column references,
    /// resolved when the schema is compiled.
    pub child: TableId,
    pub column: usize,
    pub parent: TableId,
    /// `cascade="all, delete-orphan"`: a child removed from the collection is deleted.
    pub delete_orphan: bool,
}

impl Relationship {
    /// The foreign-key column's index in the child table.
    pub fn column_index(&self) -> usize {
        self.column
    }

    /// The referenced table.
    pub fn parent(&self) -> TableId {
        self.parent
    }

    /// The table of the objects this attribute holds.
    pub fn target(&self) -> TableId {
        match self.kind {
            RelKind::ToParent => self.parent(),
            RelKind::ToChildren => self.child,
        }
    }
}

const fn to_parent(name: &'static str, child: TableId, column: &'static str) -> Relationship {
    let column = column_index_of(child, column);
    Relationship {
        name,
        kind: RelKind::ToParent,
        child,
        column,
        parent: referenced(child, column),
        delete_orphan: false,
    }
}

const fn to_children(
    name: &'static str,
    child: TableId,
    column: &'static str,
    delete_orphan: bool,
) -> Relationship {
    let column = column_index_of(child, column);
    Relationship {
        name,
        kind: RelKind::ToChildren,
        child,
        column,
        parent: referenced(child, column),
        delete_orphan,
    }
}

#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    /// The Python class name of the model.
    pub model: &'static str,
    pub columns: &'static [Column],
    /// Columns shown by `repr()` after the id.
    pub repr: &'static [&'static str],
    /// `to_dict()` keys in order; `None` means every column.
    pub to_dict: Option<&'static [(&'static str, NullAs)]>,
    pub indexes: &'static [Index],
    /// The revision that creates the table.
    pub since: u8,
    pub relationships: &'static [Relationship],
}

/// `col!(TABLE, "name")`: the [`ColRef`](crate::expr::ColRef) of a column of the schema,
/// resolved at compile time (a misspelt name fails the build, never falls back).
#[macro_export]
macro_rules! col {
    ($table:expr, $name:literal) => {
        const { $crate::expr::ColRef::new($table, $crate::schema::column_index_of($table, $name)) }
    };
}

/// One of the five tables: its position in [`TABLES`], which is also its place in
/// foreign-key order (a table only references tables before it, or itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TableId(u8);

impl TableId {
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Every table with its id, in foreign-key order.
    pub fn all() -> impl Iterator<Item = (TableId, &'static Table)> {
        TABLES
            .iter()
            .enumerate()
            .map(|(i, t)| (TableId(i as u8), t))
    }
}

impl std::ops::Index<TableId> for [Table; 5] {
    type Output = Table;

    fn index(&self, id: TableId) -> &Table {
        &self[id.index()]
    }
}

impl Table {
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
    /// The column names, comma-separated, for messages.
    pub fn column_names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// Names and types of `columns`, the shape a backend decodes a row of them with.
    pub fn shape(&self, columns: &[usize]) -> Vec<(&'static str, ColType)> {
        columns
            .iter()
            .map(|&i| (self.columns[i].name, self.columns[i].ty))
            .collect()
    }
    /// Every table's primary key is its first column, `id`.
    pub const PK: usize = 0;
}

const fn col(name: &'static str, ty: ColType, nullable: bool) -> Column {
    Column {
        name,
        ty,
        nullable,
        default: ColumnDefault::None,
        on_update_now: false,
        foreign_key: None,
        app_reference: None,
        since: 0,
    }
}

/// A column that a later revision adds to an existing table.
const fn added_in(mut c: Column, revision: u8) -> Column {
    c.since = revision;
    c
}

const fn index(name: &'static str, columns: &'static [&'static str]) -> Index {
    Index {
        name,
        columns,
        unique: false,
        predicate: None,
        since: 0,
    }
}

const fn index_since(mut i: Index, revision: u8) -> Index {
    i.since = revision;
    i
}

const fn with_default(mut c: Column, d: ColumnDefault) -> Column {
    c.default = d;
    c
}

const fn on_update(mut c: Column) -> Column {
    c.on_update_now = true;
    c
}

const fn fk(mut c: Column, table: TableId, on_delete: OnDelete) -> Column {
    c.foreign_key = Some(ForeignKey { table, on_delete });
    c
}

const fn app_fk(mut c: Column, table: &'static str, on_delete: OnDelete) -> Column {
    c.app_reference = Some(AppReference { table, on_delete });
    c
}

const ID: Column = with_default(col("id", ColType::Str(36), false), ColumnDefault::Uuid);
const TS: ColType = ColType::Timestamp { tz: false };
const TSTZ: ColType = ColType::Timestamp { tz: true };

/// Default values of the NOT NULL `workflow_runs` columns a caller may leave out.
pub const DEFAULT_MODE: &str = "one_shot";
pub const DEFAULT_AGENT: &str = "engineer";
pub const DEFAULT_MODEL: &str = "gpt-4o";

pub const SESSIONS: TableId = TableId(0);
pub const WORKFLOW_RUNS: TableId = TableId(1);
pub const SESSION_STATES: TableId = TableId(2);
pub const APPROVAL_REQUESTS: TableId = TableId(3);
pub const ACTIVE_CONNECTIONS: TableId = TableId(4);

const SESSIONS_COLUMNS: &[Column] = &[
    ID,
    col("user_id", ColType::Str(36), true),
    col("name", ColType::Str(255), false),
    with_default(col("created_at", TS, false), ColumnDefault::Now),
    on_update(with_default(
        col("last_active_at", TS, false),
        ColumnDefault::Now,
    )),
    with_default(
        col("status", ColType::Str(50), false),
        ColumnDefault::Str("active"),
    ),
    col("meta", ColType::Json, true),
    col("resource_limits", ColType::Json, true),
];

const WORKFLOW_RUNS_COLUMNS: &[Column] = &[
    ID,
    fk(
        col("session_id", ColType::Str(36), false),
        SESSIONS,
        OnDelete::Cascade,
    ),
    app_fk(
        col("project_id", ColType::Str(36), true),
        "projects",
        OnDelete::SetNull,
    ),
    with_default(
        col("mode", ColType::Str(50), false),
        ColumnDefault::Str(DEFAULT_MODE),
    ),
    with_default(
        col("agent", ColType::Str(100), false),
        ColumnDefault::Str(DEFAULT_AGENT),
    ),
    with_default(
        col("model", ColType::Str(100), false),
        ColumnDefault::Str(DEFAULT_MODEL),
    ),
    with_default(
        col("status", ColType::Str(50), false),
        ColumnDefault::Str("draft"),
    ),
    col("started_at", TS, true),
    col("completed_at", TS, true),
    col("last_heartbeat_at", TS, true),
    with_default(
        col("checkpoint_frequency_minutes", ColType::Integer, false),
        ColumnDefault::Int(10),
    ),
    col("task_description", ColType::Text, true),
    col("meta", ColType::Json, true),
    fk(
        col("branch_parent_id", ColType::Str(36), true),
        WORKFLOW_RUNS,
        OnDelete::SetNull,
    ),
    with_default(
        col("is_branch", ColType::Boolean, false),
        ColumnDefault::Bool(false),
    ),
    with_default(
        col("branch_depth", ColType::Integer, false),
        ColumnDefault::Int(0),
    ),
    // cmbagent's task hierarchy: a stage's run points at its task's run.
    added_in(
        fk(
            col("parent_run_id", ColType::Str(36), true),
            WORKFLOW_RUNS,
            OnDelete::SetNull,
        ),
        3,
    ),
    added_in(col("stage_number", ColType::Integer, true), 3),
    added_in(col("stage_name", ColType::Str(100), true), 3),
];

const SESSION_STATES_COLUMNS: &[Column] = &[
    ID,
    fk(
        col("session_id", ColType::Str(36), false),
        SESSIONS,
        OnDelete::Cascade,
    ),
    col("mode", ColType::Str(50), false),
    col("conversation_history", ColType::Json, true),
    col("context_variables", ColType::Json, true),
    col("plan_data", ColType::Json, true),
    col("current_phase", ColType::Str(50), true),
    col("current_step", ColType::Integer, true),
    with_default(
        col("status", ColType::Str(20), true),
        ColumnDefault::Str("active"),
    ),
    with_default(col("created_at", TSTZ, true), ColumnDefault::Now),
    on_update(with_default(
        col("updated_at", TSTZ, true),
        ColumnDefault::Now,
    )),
    col("expires_at", TSTZ, true),
    with_default(
        col("version", ColType::Integer, true),
        ColumnDefault::Int(1),
    ),
];

const APPROVAL_REQUESTS_COLUMNS: &[Column] = &[
    ID,
    fk(
        col("run_id", ColType::Str(36), false),
        WORKFLOW_RUNS,
        OnDelete::Cascade,
    ),
    fk(
        col("session_id", ColType::Str(36), true),
        SESSIONS,
        OnDelete::SetNull,
    ),
    col("approval_type", ColType::Str(50), false),
    col("context", ColType::Json, false),
    with_default(
        col("status", ColType::Str(20), true),
        ColumnDefault::Str("pending"),
    ),
    col("resolution", ColType::Str(20), true),
    col("result", ColType::Json, true),
    with_default(col("created_at", TSTZ, true), ColumnDefault::Now),
    col("expires_at", TSTZ, false),
    col("resolved_at", TSTZ, true),
    // The columns of the approval table cmbagent had before durable approvals, kept
    // so its rows stay readable: the step asked about, when, what was shown, and
    // what the human wrote back.
    added_in(
        app_fk(
            col("step_id", ColType::Str(36), true),
            "workflow_steps",
            OnDelete::Cascade,
        ),
        3,
    ),
    added_in(col("requested_at", TS, true), 3),
    added_in(col("context_snapshot", ColType::Json, true), 3),
    added_in(col("user_feedback", ColType::Text, true), 3),
];

const ACTIVE_CONNECTIONS_COLUMNS: &[Column] = &[
    ID,
    col("task_id", ColType::Str(100), false),
    fk(
        col("session_id", ColType::Str(36), true),
        SESSIONS,
        OnDelete::SetNull,
    ),
    col("server_instance", ColType::Str(100), true),
    with_default(col("connected_at", TSTZ, true), ColumnDefault::Now),
    with_default(col("last_heartbeat", TSTZ, true), ColumnDefault::Now),
];

/// A table's columns, for the schema's own constants (`column_index_of`).
const fn columns_of(table: TableId) -> &'static [Column] {
    match table.0 {
        0 => SESSIONS_COLUMNS,
        1 => WORKFLOW_RUNS_COLUMNS,
        2 => SESSION_STATES_COLUMNS,
        3 => APPROVAL_REQUESTS_COLUMNS,
        4 => ACTIVE_CONNECTIONS_COLUMNS,
        _ => panic!("no such table in the schema"),
    }
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The index of column `name` of `table`, for constants only: through [`col!`](crate::col)
/// or in a `const`, it runs at compile time, and a name the table does not have fails the
/// build. (Names known only at run time go through `Table::column_index`.)
pub const fn column_index_of(table: TableId, name: &str) -> usize {
    let columns = columns_of(table);
    let mut i = 0;
    while i < columns.len() {
        if same(columns[i].name, name) {
            return i;
        }
        i += 1;
    }
    panic!("no such column in the schema")
}

/// The table a foreign-key column references, for constants (a column that is not a
/// foreign key fails the build).
const fn referenced(table: TableId, column: usize) -> TableId {
    match columns_of(table)[column].foreign_key {
        Some(fk) => fk.table,
        None => panic!("a relationship's column must be a foreign key"),
    }
}

/// The tables in foreign-key order: a table only references tables before it (or itself),
/// so inserts run in this order and deletes in reverse.
pub static TABLES: [Table; 5] = [
    Table {
        name: "sessions",
        model: "Session",
        columns: SESSIONS_COLUMNS,
        repr: &["name", "status"],
        to_dict: None,
        indexes: &[
            index("ix_sessions_user_id", &["user_id"]),
            index("ix_sessions_status", &["status"]),
            index("idx_sessions_user_status", &["user_id", "status"]),
        ],
        since: 0,
        relationships: &[
            to_children("session_states", SESSION_STATES, "session_id", true),
            to_children("workflow_runs", WORKFLOW_RUNS, "session_id", true),
            to_children("approval_requests", APPROVAL_REQUESTS, "session_id", false),
        ],
    },
    Table {
        name: "workflow_runs",
        model: "WorkflowRun",
        columns: WORKFLOW_RUNS_COLUMNS,
        repr: &["session_id", "status"],
        to_dict: None,
        indexes: &[
            index("ix_workflow_runs_session_id", &["session_id"]),
            index("ix_workflow_runs_mode", &["mode"]),
            index("ix_workflow_runs_agent", &["agent"]),
            index("ix_workflow_runs_status", &["status"]),
            index("ix_workflow_runs_branch_parent_id", &["branch_parent_id"]),
            index(
                "idx_workflow_runs_session_status",
                &["session_id", "status"],
            ),
            index("idx_workflow_runs_agent_status", &["agent", "status"]),
            index_since(
                index("ix_workflow_runs_parent_run_id", &["parent_run_id"]),
                3,
            ),
        ],
        since: 0,
        relationships: &[
            to_parent("session", WORKFLOW_RUNS, "session_id"),
            to_children("approval_requests", APPROVAL_REQUESTS, "run_id", true),
        ],
    },
    Table {
        name: "session_states",
        model: "SessionState",
        columns: SESSION_STATES_COLUMNS,
        repr: &["session_id", "mode", "status"],
        to_dict: Some(&[
            ("id", NullAs::None),
            ("session_id", NullAs::None),
            ("mode", NullAs::None),
            ("conversation_history", NullAs::EmptyList),
            ("context_variables", NullAs::EmptyDict),
            ("plan_data", NullAs::None),
            ("current_phase", NullAs::None),
            ("current_step", NullAs::None),
            ("status", NullAs::None),
            ("created_at", NullAs::None),
            ("updated_at", NullAs::None),
            ("version", NullAs::None),
        ]),
        indexes: &[
            index("ix_session_states_session_id", &["session_id"]),
            index("ix_session_states_status", &["status"]),
            index(
                "idx_session_states_session_status",
                &["session_id", "status"],
            ),
            index("ix_session_states_mode", &["mode"]),
            index("ix_session_states_updated_at", &["updated_at"]),
        ],
        since: 1,
        relationships: &[to_parent("session", SESSION_STATES, "session_id")],
    },
    Table {
        name: "approval_requests",
        model: "ApprovalRequest",
        columns: APPROVAL_REQUESTS_COLUMNS,
        repr: &["run_id", "approval_type", "status"],
        // cmbagent's to_dict(): the durable-approval columns plus step_id.
        to_dict: Some(&[
            ("id", NullAs::None),
            ("run_id", NullAs::None),
            ("session_id", NullAs::None),
            ("step_id", NullAs::None),
            ("approval_type", NullAs::None),
            ("context", NullAs::None),
            ("status", NullAs::None),
            ("resolution", NullAs::None),
            ("result", NullAs::None),
            ("created_at", NullAs::None),
            ("expires_at", NullAs::None),
            ("resolved_at", NullAs::None),
        ]),
        indexes: &[
            index("idx_approval_run_status", &["run_id", "status"]),
            index("idx_approval_session_id", &["session_id"]),
            Index {
                predicate: Some("status = 'pending'"),
                ..index("idx_approval_expires", &["expires_at"])
            },
        ],
        since: 2,
        // `run` is cmbagent's name and `workflow_run` the other one in use: the same
        // attribute under two names.
        relationships: &[
            to_parent("run", APPROVAL_REQUESTS, "run_id"),
            to_parent("workflow_run", APPROVAL_REQUESTS, "run_id"),
            to_parent("session", APPROVAL_REQUESTS, "session_id"),
        ],
    },
    Table {
        name: "active_connections",
        model: "ActiveConnection",
        columns: ACTIVE_CONNECTIONS_COLUMNS,
        repr: &["task_id", "server_instance"],
        // The seed's to_dict(): every column, in order.
        to_dict: None,
        indexes: &[
            Index {
                unique: true,
                ..index("idx_connection_task_id", &["task_id"])
            },
            index("idx_connection_session_id", &["session_id"]),
            index("idx_connection_heartbeat", &["last_heartbeat"]),
        ],
        since: 2,
        relationships: &[],
    },
];

pub fn table_by_name(name: &str) -> Option<TableId> {
    TableId::all()
        .find(|(_, t)| t.name == name)
        .map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_in_foreign_key_order() {
        for (i, t) in TableId::all() {
            for c in t.columns {
                if let Some(fk) = c.foreign_key {
                    assert!(
                        fk.table <= i,
                        "{}.{} references a later table",
                        t.name,
                        c.name
                    );
                }
            }
        }
    }

    #[test]
    fn every_table_has_id_first_and_to_dict_names_real_columns() {
        for t in &TABLES {
            assert_eq!(t.columns[Table::PK].name, "id");
            assert!(
                t.columns.len() <= 64,
                "dirty tracking keeps one bit per column"
            );
            for (name, _) in t.to_dict.unwrap_or(&[]) {
                assert!(t.column_index(name).is_some(), "{}.{name}", t.name);
            }
            for name in t.repr {
                assert!(t.column_index(name).is_some(), "{}.{name}", t.name);
            }
            for r in t.relationships {
                assert_eq!(
                    TABLES[r.child].columns[r.column]
                        .foreign_key
                        .map(|fk| fk.table),
                    Some(r.parent)
                );
                assert!(
                    t.column_index(r.name).is_none(),
                    "{}.{} is a column too",
                    t.name,
                    r.name
                );
            }
        }
    }

    #[test]
    fn compile_time_column_indexes_agree_with_the_tables() {
        for (id, t) in TableId::all() {
            for (i, c) in t.columns.iter().enumerate() {
                assert_eq!(column_index_of(id, c.name), i, "{}.{}", t.name, c.name);
            }
        }
        let status = crate::col!(APPROVAL_REQUESTS, "status");
        assert_eq!(status.qualified(), "approval_requests.status");
    }
}
