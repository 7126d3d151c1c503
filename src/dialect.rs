//! What differs in the SQL text between SQLite and PostgreSQL.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgresql",
        }
    }

    /// The placeholder for the `n`-th parameter (1-based).
    pub fn placeholder(self, n: usize) -> String {
        let mut s = String::new();
        self.push_placeholder(&mut s, n);
        s
    }

    /// Appends the placeholder for the `n`-th parameter (1-based) to `sql`.
    pub fn push_placeholder(self, sql: &mut String, n: usize) {
        use std::fmt::Write;
        let _ = match self {
            Dialect::Sqlite => write!(sql, "?{n}"),
            Dialect::Postgres => write!(sql, "${n}"),
        };
    }

    /// Starts a transaction that will write. SQLite takes the write lock up front, so a
    /// writer waits (up to the busy timeout) instead of failing with SQLITE_BUSY when it
    /// upgrades a read transaction.
    pub fn begin_write(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }
}
