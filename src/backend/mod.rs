//! One connection type over both engines. Everything above this module speaks in
//! [`Value`]s and SQL text rendered for [`Conn::dialect`].

mod checkpoint;
mod libpq;
mod postgres;
mod sqlite;
mod tls;

pub use sqlite::library as sqlite_library;

use crate::dbapi;
use crate::dialect::Dialect;
use crate::error::Result;
use crate::query;
use crate::schema::{ColType, TableId};
use crate::trace::{traced, Echo};
use crate::url::{DbUrl, SqlitePath, Target};
use crate::value::Value;

/// The name and type of each column a query returns, so rows decode to the right values
/// (SQLite stores timestamps and JSON as text) and decode errors name the column.
pub type Shape<'a> = &'a [(&'a str, ColType)];

pub type Row = Vec<Value>;

/// Rows per INSERT statement: well under SQLite's 32,766 parameters and PostgreSQL's 65,535
/// for the widest table (16 columns).
pub const INSERT_BATCH: usize = 100;

enum Inner {
    Sqlite(rusqlite::Connection),
    // Boxed: the client is several times larger than a SQLite handle.
    Postgres(Box<postgres::PgConn>),
}

/// An open connection, with whether a transaction is open on it.
pub struct Conn {
    inner: Inner,
    in_transaction: bool,
    echo: Echo,
    /// A SQLite database file, whose WAL the background checkpoint drains.
    wal_database: Option<checkpoint::WalFile>,
}

impl Conn {
    pub fn open(url: &DbUrl) -> Result<Conn> {
        let inner = match &url.target {
            Target::Sqlite {
                path,
                busy_timeout,
                synchronous,
                access,
            } => Inner::Sqlite(sqlite::open(path, *busy_timeout, *synchronous, *access)?),
            Target::Postgres {
                conninfo,
                timeouts,
                tls,
                statements,
            } => Inner::Postgres(Box::new(postgres::PgConn::open(
                conninfo,
                *timeouts,
                tls,
                *statements,
                &url.display,
            )?)),
        };
        let wal_database = match &url.target {
            // Absolute, so a later chdir of the process cannot point the checkpoint
            // thread at another file.
            Target::Sqlite {
                path: SqlitePath::File(p),
                synchronous,
                ..
            } => Some(checkpoint::WalFile {
                path: std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                synchronous: *synchronous,
            }),
            _ => None,
        };
        Ok(Conn {
            inner,
            in_transaction: false,
            echo: url.echo,
            wal_database,
        })
    }

    pub fn dialect(&self) -> Dialect {
        match self.inner {
            Inner::Sqlite(_) => Dialect::Sqlite,
            Inner::Postgres(_) => Dialect::Postgres,
        }
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Runs one statement; returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let inner = &mut self.inner;
        let out = traced(self.echo, sql, params, || match inner {
            Inner::Sqlite(c) => sqlite::execute(c, sql, params),
            Inner::Postgres(c) => c.execute(sql, params),
        });
        self.after_statement();
        out
    }

    /// A statement may have committed: hand a grown WAL to the background checkpoint.
    fn after_statement(&self) {
        if let (Some(file), Inner::Sqlite(c)) = (&self.wal_database, &self.inner) {
            checkpoint::after_statement(c, file);
        }
    }

    /// Inserts rows of `columns` values with up to `INSERT_BATCH` rows per INSERT
    /// statement: one round trip and one statement step per batch, not per row, and the
    /// batch sizes repeat, so their statements stay prepared.
    pub fn insert_rows(
        &mut self,
        table: TableId,
        columns: &[usize],
        rows: Vec<Row>,
    ) -> Result<u64> {
        let dialect = self.dialect();
        let mut inserted = 0;
        // Rendered once per call: every batch but the last is full.
        let mut full_batch_sql = None;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let batch: Vec<Row> = rows.by_ref().take(INSERT_BATCH).collect();
            let n = batch.len();
            let values: Vec<Value> = batch.into_iter().flatten().collect();
            let tail_sql;
            let sql = if n == INSERT_BATCH {
                full_batch_sql.get_or_insert_with(|| query::insert(dialect, table, columns, n))
            } else {
                tail_sql = query::insert(dialect, table, columns, n);
                &tail_sql
            };
            inserted += self.execute(sql, &values)?;
        }
        Ok(inserted)
    }

    pub fn query(&mut self, sql: &str, params: &[Value], shape: Shape) -> Result<Vec<Row>> {
        let inner = &mut self.inner;
        let out = traced(self.echo, sql, params, || match inner {
            Inner::Sqlite(c) => sqlite::query(c, sql, params, shape),
            Inner::Postgres(c) => c.query(sql, params, shape),
        });
        self.after_statement();
        out
    }

    /// Runs any one statement (the DB-API's `execute`): its columns, every row it returns
    /// decoded by what the column holds, and its counts. The transaction state follows
    /// what the statement did (a `COMMIT` or `BEGIN` typed by the caller included).
    pub fn run_any(&mut self, sql: &str, params: &[Value]) -> Result<dbapi::Outcome> {
        let in_transaction = self.in_transaction;
        let inner = &mut self.inner;
        let out = traced(self.echo, sql, params, || match inner {
            Inner::Sqlite(c) => sqlite::run_any(c, sql, params),
            Inner::Postgres(c) => c.run_any(sql, params, in_transaction),
        });
        match &self.inner {
            Inner::Sqlite(c) => self.in_transaction = !c.is_autocommit(),
            Inner::Postgres(_) => {
                if let (Ok(_), Some(open)) = (&out, dbapi::transaction_effect(sql)) {
                    self.in_transaction = open;
                }
            }
        }
        self.after_statement();
        out
    }

    /// Whether `sql` would write (SQLite's `sqlite3_stmt_readonly`); every statement
    /// counts as one that may write on PostgreSQL.
    pub fn statement_writes(&mut self, sql: &str) -> Result<bool> {
        match &self.inner {
            Inner::Sqlite(c) => Ok(!c.prepare_cached(sql)?.readonly()),
            Inner::Postgres(_) => Ok(true),
        }
    }

    /// Runs a script of several statements without parameters (migrations).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        let inner = &mut self.inner;
        let out = traced(self.echo, sql, &[], || match inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(c) => c.batch(sql),
        });
        self.after_statement();
        out
    }

    /// Transaction control: on SQLite a statement prepared once per connection (not parsed
    /// anew for every transaction), on PostgreSQL the simple protocol, one round trip.
    fn control(&mut self, sql: &str) -> Result<()> {
        match self.dialect() {
            Dialect::Sqlite => self.execute(sql, &[]).map(drop),
            Dialect::Postgres => self.batch(sql),
        }
    }

    pub fn begin_write(&mut self) -> Result<()> {
        if !self.in_transaction {
            let sql = match &self.inner {
                Inner::Postgres(c) => c.begin_sql(),
                Inner::Sqlite(_) => self.dialect().begin_write().into(),
            };
            self.control(&sql)?;
            self.in_transaction = true;
        }
        Ok(())
    }

    pub fn commit(&mut self) -> Result<()> {
        if self.in_transaction {
            self.control("COMMIT")?;
            self.in_transaction = false;
        }
        Ok(())
    }

    pub fn rollback(&mut self) -> Result<()> {
        if self.in_transaction {
            self.in_transaction = false;
            // A connection that died took its transaction with it.
            if !self.is_broken() {
                self.control("ROLLBACK")?;
            }
        }
        Ok(())
    }

    /// Whether the server dropped this connection (it must not go back to the pool).
    pub fn is_broken(&self) -> bool {
        match &self.inner {
            Inner::Sqlite(_) => false,
            Inner::Postgres(c) => c.is_closed(),
        }
    }

    /// How long a statement waits for a lock held by another connection before failing
    /// (SQLite's busy timeout, PostgreSQL's `lock_timeout`).
    pub fn set_lock_timeout(&mut self, wait: std::time::Duration) -> Result<()> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(c.busy_timeout(wait)?),
            Inner::Postgres(c) => c.set_lock_timeout(wait),
        }
    }

    /// The SQLite database file (absolute), when the connection is to one.
    pub fn database_file(&self) -> Option<&std::path::Path> {
        self.wal_database.as_ref().map(|w| w.path.as_path())
    }

    /// Whether this connection can LISTEN for notifications: a PostgreSQL connection whose
    /// session stays its own (not one behind a pooler in transaction mode).
    pub fn can_listen(&self) -> bool {
        match &self.inner {
            Inner::Sqlite(_) => false,
            Inner::Postgres(c) => !c.per_transaction(),
        }
    }

    /// SQLite's `PRAGMA data_version`: changes whenever another connection commits to the
    /// database. `None` on PostgreSQL, which pushes changes with NOTIFY instead.
    pub fn data_version(&mut self) -> Result<Option<i64>> {
        match &mut self.inner {
            Inner::Sqlite(c) => Ok(Some(c.query_row("PRAGMA data_version", [], |r| r.get(0))?)),
            Inner::Postgres(_) => Ok(None),
        }
    }

    /// Blocks up to `timeout` for a NOTIFY on a channel this connection LISTENs to;
    /// returns the payloads received (empty on timeout, and always on SQLite).
    pub fn notifications(&mut self, timeout: std::time::Duration) -> Result<Vec<String>> {
        match &mut self.inner {
            Inner::Sqlite(_) => Ok(Vec::new()),
            Inner::Postgres(c) => c.notifications(timeout),
        }
    }
}
