//! PostgreSQL through `tokio-postgres`, driven by a single-threaded runtime per connection.
//!
//! Driving the asynchronous client ourselves (rather than through the blocking `postgres`
//! wrapper) is what lets a whole connection attempt, start-up and authentication included,
//! and each statement be bounded in time: a server that accepts TCP and then never answers
//! costs `connect_timeout`, not forever.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use fallible_iterator::FallibleIterator;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::types::{to_sql_checked, Format, FromSql, IsNull, Kind, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{libpq, tls, Row, Shape};
use crate::dbapi;
use crate::error::{Error, ErrorKind, Result};
use crate::url::{PgTimeouts, SslMode, Statements, TlsParams};
use crate::value::Value;

type BoxError = Box<dyn StdError + Sync + Send>;

pub struct PgConn {
    /// Declared before `driver`, so it is dropped first: with the client gone the
    /// connection task sends the server a Terminate message, which `Driver`'s drop waits for.
    client: Client,
    driver: Driver,
    /// `NOTIFY` payloads, forwarded by the task that drives the connection.
    notifications: mpsc::UnboundedReceiver<String>,
    /// Statements prepared on this connection, by SQL text.
    statements: HashMap<String, Statement>,
    /// No statement or setting outlives its transaction (`url::Statements`): statements go
    /// unnamed, the cache above stays empty, and `lock_timeout` is set in each transaction.
    per_transaction: bool,
    /// The `lock_timeout` of each transaction, where it cannot be the session's.
    lock_timeout: Option<Duration>,
}

/// The runtime that moves a connection's bytes, and the bounds on waiting for them.
struct Driver {
    runtime: Runtime,
    /// The task that moves the connection's bytes.
    connection: tokio::task::JoinHandle<()>,
    timeouts: PgTimeouts,
    /// TLS for a cancel request, where the connection requires it. Otherwise the request
    /// goes without (the server takes it either way, and a plain one is written without
    /// waiting for the server's answer to a TLS request).
    cancel_tls: Option<MakeRustlsConnect>,
    /// Set when a statement outlived `command_timeout` (the connection's state is unknown)
    /// or the server ended the session with a FATAL error (an administrator's terminate, a
    /// shutdown): the pool must not hand the connection out again, even before the driver
    /// has read the end of the stream.
    abandoned: bool,
}

impl Driver {
    /// Runs one exchange with the server, bounded by `command_timeout` when one is set. A
    /// statement that outlives it is cancelled on the server, and the connection abandoned.
    fn run<T>(
        &mut self,
        client: &Client,
        work: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let Some(limit) = self.timeouts.command else {
            let result = self.runtime.block_on(work);
            return self.checked(result);
        };
        // The timer is made inside the runtime: it needs the runtime's clock.
        match self
            .runtime
            .block_on(async { tokio::time::timeout(limit, work).await })
        {
            Ok(result) => self.checked(result),
            Err(_) => {
                self.abandoned = true;
                let token = client.cancel_token();
                let grace = self.timeouts.connect.unwrap_or(limit);
                // Best effort: a server that does not answer may not take the cancel either.
                let _ = self.runtime.block_on(async {
                    match &self.cancel_tls {
                        Some(tls) => tokio::time::timeout(grace, token.cancel_query(tls.clone()))
                            .await
                            .map(|_| ()),
                        None => tokio::time::timeout(grace, token.cancel_query(NoTls))
                            .await
                            .map(|_| ()),
                    }
                });
                Err(Error::operational(format!(
                    "the server did not answer within command_timeout={}s; the statement was cancelled and the connection closed",
                    limit.as_secs_f64()
                )))
            }
        }
    }
}

impl Driver {
    /// A statement's outcome; an error that ended the server session abandons the connection.
    fn checked<T>(&mut self, result: std::result::Result<T, tokio_postgres::Error>) -> Result<T> {
        result.map_err(|e| {
            if e.as_db_error()
                .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
            {
                self.abandoned = true;
            }
            Error::from(e)
        })
    }
}

impl Drop for Driver {
    /// Closes the connection politely (the server then logs no lost client), unless it was
    /// abandoned: a server that stopped answering is not waited for again.
    fn drop(&mut self) {
        if self.abandoned {
            return;
        }
        let connection = &mut self.connection;
        self.runtime.block_on(async {
            // Whether it finished or not, the socket closes with the runtime.
            let _ = tokio::time::timeout(CLOSE_WAIT, connection).await;
        });
    }
}

/// Prepared statements kept per connection: the package's own statements are a few dozen
/// shapes; SQLAlchemy's through the DB-API a few hundred.
const STATEMENT_CACHE: usize = 512;

/// How long dropping a connection waits for its Terminate message to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl PgConn {
    pub fn open(
        conninfo: &str,
        timeouts: PgTimeouts,
        params: &TlsParams,
        statements: Statements,
        display: &str,
    ) -> Result<PgConn> {
        // Whatever the server answers (a missing database is SQLSTATE 3D000, which would
        // otherwise read as a ProgrammingError), failing to connect is operational.
        let failed = |mut e: Error| {
            e.kind = ErrorKind::Operational;
            e.context(format!("cannot connect to PostgreSQL at {display}"))
        };
        let settings =
            libpq::settings(conninfo, params, &|k| std::env::var(k).ok()).map_err(|mut e| {
                if e.kind == ErrorKind::Interface {
                    e.message = format!("{display}: {}", e.message);
                    e
                } else {
                    failed(e)
                }
            })?;
        let mut config = settings.config;
        let tls = tls::connector(&settings.tls).map_err(failed)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                Error::operational(format!("cannot start the PostgreSQL I/O driver: {e}"))
            })?;
        if let Some(limit) = timeouts.connect {
            // Each TCP attempt, then the whole exchange below.
            config.connect_timeout(limit);
        }
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        };
        let connect = |config: &Config| {
            let attempt = config.connect(tls.clone());
            runtime.block_on(async {
                match timeouts.connect {
                    Some(limit) => tokio::time::timeout(limit, attempt)
                        .await
                        .map_err(|_| limit),
                    None => Ok(attempt.await),
                }
            })
        };
        let mut outcome = connect(&config);
        if settings.tls.mode == SslMode::Allow
            && config.get_ssl_mode() == PgSslMode::Disable
            && matches!(&outcome, Ok(Err(e)) if e.as_db_error().is_some())
        {
            // `allow`: the server refused the connection without TLS; try once with it.
            config.ssl_mode(PgSslMode::Require);
            outcome = connect(&config);
        }
        let (client, mut connection) = match outcome {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                let explained = tls::explain(&e, &settings.tls, &host);
                let mut error = match explained {
                    Some(why) => Error::operational(why),
                    None => Error::from(e),
                };
                if error.message.contains("server does not support TLS") {
                    error.message.push_str(&format!(
                        " (sslmode={} needs TLS: turn ssl on in the server, or connect with sslmode=prefer)",
                        settings.tls.mode.name()
                    ));
                }
                if let Some(note) = &settings.password_note {
                    if error.message.contains("password") {
                        error.message.push_str(&format!(" ({note})"));
                    }
                }
                return Err(failed(error));
            }
            Err(limit) => {
                return Err(failed(Error::operational(format!(
                    "no answer within connect_timeout={}s (the server accepted the connection but did not complete start-up)",
                    limit.as_secs_f64()
                ))))
            }
        };
        let (sender, notifications) = mpsc::unbounded_channel();
        let connection = runtime.spawn(async move {
            // Ends when the connection closes or fails; the client's calls then fail too.
            while let Some(Ok(message)) =
                std::future::poll_fn(|cx| connection.poll_message(cx)).await
            {
                if let AsyncMessage::Notification(n) = message {
                    // A closed receiver means the connection is being dropped.
                    let _ = sender.send(n.payload().to_string());
                }
            }
        });
        let mut conn = PgConn {
            client,
            driver: Driver {
                runtime,
                connection,
                timeouts,
                cancel_tls: (config.get_ssl_mode() == PgSslMode::Require).then_some(tls),
                abandoned: false,
            },
            notifications,
            statements: HashMap::new(),
            per_transaction: statements == Statements::PerTransaction,
            lock_timeout: None,
        };
        if statements == Statements::Auto {
            // A server that cannot say (a pooler that answers SHOW itself) counts as direct.
            conn.per_transaction = conn.behind_pooler(config.get_ports()).unwrap_or(false);
        }
        Ok(conn)
    }

    /// Whether something between us and the server relays the connection: the server's
    /// `port` setting is none of the ports connected to (PgBouncer, pgcat, Odyssey and
    /// pgpool listen on their own). A port forward that renumbers looks the same; it costs
    /// only the statement cache.
    fn behind_pooler(&mut self, dialed: &[u16]) -> Result<bool> {
        let answer = self
            .driver
            .run(&self.client, self.client.simple_query("SHOW port"))?;
        let server_port = answer.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse::<u16>().ok(),
            _ => None,
        });
        Ok(match server_port {
            Some(port) if dialed.is_empty() => port != 5432,
            Some(port) => !dialed.contains(&port),
            None => false,
        })
    }

    pub fn per_transaction(&self) -> bool {
        self.per_transaction
    }

    /// `lock_timeout` for this connection's statements: the session's setting, or, behind
    /// a pooler, each transaction's.
    pub fn set_lock_timeout(&mut self, wait: Duration) -> Result<()> {
        let ms = wait.as_millis().max(1);
        if self.per_transaction {
            self.lock_timeout = Some(wait);
            return Ok(());
        }
        self.batch(&format!("SET lock_timeout = {ms}"))
    }

    /// The statement that begins a transaction, with its settings.
    pub fn begin_sql(&self) -> std::borrow::Cow<'static, str> {
        match self.lock_timeout {
            Some(wait) => format!(
                "BEGIN; SET LOCAL lock_timeout = {}",
                wait.as_millis().max(1)
            )
            .into(),
            None => "BEGIN".into(),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.driver.abandoned || self.client.is_closed()
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.driver.run(&self.client, self.client.prepare(sql))?;
        if self.statements.len() >= STATEMENT_CACHE {
            // SQL from the DB-API need not repeat (text with inlined values): bound the
            // cache; dropping a statement closes it on the server.
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        if self.per_transaction {
            let params = unnamed_params(params);
            return self
                .driver
                .run(&self.client, self.client.execute_typed(sql, &params));
        }
        let stmt = self.prepared(sql)?;
        let params = as_params(params);
        self.driver
            .run(&self.client, self.client.execute(&stmt, &params))
    }

    pub fn query(&mut self, sql: &str, params: &[Value], shape: Shape) -> Result<Vec<Row>> {
        let rows = if self.per_transaction {
            let params = unnamed_params(params);
            self.driver
                .run(&self.client, self.client.query_typed(sql, &params))?
        } else {
            let stmt = self.prepared(sql)?;
            let params = as_params(params);
            self.driver
                .run(&self.client, self.client.query(&stmt, &params))?
        };
        rows.iter()
            .map(|row| {
                (0..shape.len())
                    .map(|i| {
                        row.try_get::<_, Decoded>(i).map(|d| d.0).map_err(|e| {
                            Error::data(format!("column {} could not be read: {e}", shape[i].0))
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Any statement (the DB-API): its columns with their type OIDs, rows decoded by each
    /// column's server type, and the number of rows it changed or returned.
    pub fn run_any(
        &mut self,
        sql: &str,
        params: &[Value],
        in_transaction: bool,
    ) -> Result<dbapi::Outcome> {
        if self.per_transaction {
            return self.run_any_unnamed(sql, params, in_transaction);
        }
        let stmt = self.prepared(sql)?;
        if stmt.params().len() != params.len() {
            return Err(Error::new(
                ErrorKind::Programming,
                format!(
                    "the statement has {} parameters but {} values were given",
                    stmt.params().len(),
                    params.len()
                ),
            ));
        }
        let columns = described(stmt.columns());
        let bound = as_params(params);
        if columns.is_empty() {
            let changed = self
                .driver
                .run(&self.client, self.client.execute(&stmt, &bound))?;
            return Ok(dbapi::Outcome {
                columns,
                rows: Vec::new(),
                rowcount: i64::try_from(changed).unwrap_or(i64::MAX),
                lastrowid: None,
            });
        }
        let rows = self
            .driver
            .run(&self.client, self.client.query(&stmt, &bound))?;
        let rows = decoded_rows(&rows, &columns)?;
        Ok(dbapi::Outcome {
            rowcount: i64::try_from(rows.len()).unwrap_or(i64::MAX),
            columns,
            rows,
            lastrowid: None,
        })
    }

    /// `run_any` where no statement may outlive its transaction: the statement goes
    /// unnamed with its values (one round trip). Its columns come with its rows; a
    /// statement that may return rows and returned none is described by preparing it once
    /// more, inside a transaction (the caller's, or one of its own that it rolls back), so
    /// the prepared statement is closed before a pooler can hand the server to another
    /// client.
    fn run_any_unnamed(
        &mut self,
        sql: &str,
        params: &[Value],
        in_transaction: bool,
    ) -> Result<dbapi::Outcome> {
        let bound = unnamed_params(params);
        let (rows, affected) = self
            .driver
            .run(&self.client, async {
                let stream = self
                    .client
                    .query_typed_raw(sql, bound.iter().map(|(v, t)| (*v, t.clone())))
                    .await?;
                let mut stream = std::pin::pin!(stream);
                let mut rows = Vec::new();
                while let Some(row) = futures_util::StreamExt::next(&mut stream).await {
                    rows.push(row?);
                }
                Ok((rows, stream.rows_affected()))
            })
            .map_err(|mut e| {
                // What a prepared statement's parameter count says before running: the
                // caller's mistake, not the connection's.
                if e.message.contains("bind message supplies") {
                    e.kind = ErrorKind::Programming;
                }
                e
            })?;
        let columns = match rows.first() {
            Some(row) => described(row.columns()),
            None if dbapi::may_return_rows(sql) => {
                if !in_transaction {
                    self.batch("BEGIN")?;
                }
                let described_now = self
                    .driver
                    .run(&self.client, self.client.prepare(sql))
                    .map(|stmt| described(stmt.columns()));
                if !in_transaction {
                    self.batch("ROLLBACK")?;
                }
                described_now?
            }
            None => Vec::new(),
        };
        let decoded = decoded_rows(&rows, &columns)?;
        let rowcount = if columns.is_empty() {
            affected.unwrap_or(0)
        } else {
            decoded.len() as u64
        };
        Ok(dbapi::Outcome {
            rowcount: i64::try_from(rowcount).unwrap_or(i64::MAX),
            columns,
            rows: decoded,
            lastrowid: None,
        })
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        self.driver
            .run(&self.client, self.client.batch_execute(sql))
    }

    /// The payloads of `NOTIFY`s received, waiting up to `timeout` for the first.
    pub fn notifications(&mut self, timeout: Duration) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let first = self
            .driver
            .runtime
            .block_on(async { tokio::time::timeout(timeout, self.notifications.recv()).await });
        match first {
            Ok(Some(payload)) => out.push(payload),
            Ok(None) => return Err(Error::operational(
                "PostgreSQL connection error: the connection listening for notifications closed",
            )),
            Err(_) => return Ok(out),
        }
        // Whatever else already arrived, without waiting again.
        while let Ok(payload) = self.notifications.try_recv() {
            out.push(payload);
        }
        Ok(out)
    }
}

fn as_params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Values for an unnamed statement: each of unknown type, so the server infers it from
/// the statement as it does when preparing, and in PostgreSQL's text form, which every
/// type reads.
fn unnamed_params(values: &[Value]) -> Vec<(&(dyn ToSql + Sync), Type)> {
    values
        .iter()
        .map(|v| (v as &(dyn ToSql + Sync), Type::UNKNOWN))
        .collect()
}

/// The DB-API's description of a statement's result columns.
fn described(columns: &[tokio_postgres::Column]) -> Vec<dbapi::Column> {
    columns
        .iter()
        .map(|c| dbapi::Column {
            name: c.name().to_string(),
            type_oid: Some(c.type_().oid()),
            read_as: read_as(c.type_()),
        })
        .collect()
}

/// The Python type a column's values become; an array's members become its member type's.
fn read_as(ty: &Type) -> dbapi::ReadAs {
    if let Kind::Array(member) = ty.kind() {
        return read_as(member);
    }
    match *ty {
        Type::NUMERIC => dbapi::ReadAs::Decimal,
        Type::DATE => dbapi::ReadAs::Date,
        Type::TIME => dbapi::ReadAs::Time,
        Type::UUID => dbapi::ReadAs::Uuid,
        Type::TIMESTAMP => dbapi::ReadAs::NaiveDatetime,
        _ => dbapi::ReadAs::Native,
    }
}

/// Rows of any statement, each value decoded by its column's server type.
fn decoded_rows(rows: &[tokio_postgres::Row], columns: &[dbapi::Column]) -> Result<Vec<Row>> {
    rows.iter()
        .map(|row| {
            (0..columns.len())
                .map(|i| {
                    row.try_get::<_, AnyDecoded>(i).map(|d| d.0).map_err(|e| {
                        // The decoder's own text is the cause; the driver's names only the
                        // column number.
                        let why = StdError::source(&e).map_or(e.to_string(), |c| c.to_string());
                        Error::data(format!(
                            "column {} could not be read: {why}",
                            columns[i].name
                        ))
                    })
                })
                .collect::<Result<Row>>()
        })
        .collect()
}

/// Binds by the type the server inferred for the parameter, so one `Value` serves
/// `varchar`, `json`, `timestamp` and `timestamptz` alike. Where a value has no binary
/// encoding for that type (a number for `numeric`, text for `date` or `uuid`, as the DB-API
/// passes them), it goes in PostgreSQL's text format and the server parses it, as it
/// would a literal: a value it cannot read is the server's DataError. An array always goes
/// as its text literal, so one form serves every member type.
impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        if matches!(self.encode_format(ty), Format::Text) {
            return self.to_text(out);
        }
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Bool(b) => b.to_sql(ty, out),
            Value::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Float(f) => match *ty {
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => f.to_sql(ty, out),
            },
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
            Value::Text(s) | Value::Json(s) => match *ty {
                Type::JSON => {
                    out.put_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                Type::JSONB => {
                    out.put_u8(1);
                    out.put_slice(s.as_bytes());
                    Ok(IsNull::No)
                }
                _ => s.as_str().to_sql(ty, out),
            },
            Value::Timestamp(t) => match *ty {
                Type::TIMESTAMP => t.naive_utc().to_sql(ty, out),
                _ => t.to_sql(ty, out),
            },
            Value::Array(_) => self.to_text(out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn encode_format(&self, ty: &Type) -> Format {
        if *ty == Type::UNKNOWN && !matches!(self, Value::Null) {
            return Format::Text;
        }
        let binary = match self {
            Value::Null => true,
            Value::Bool(_) => *ty == Type::BOOL,
            Value::Int(_) => matches!(*ty, Type::INT2 | Type::INT4 | Type::INT8),
            Value::Float(_) => matches!(*ty, Type::FLOAT4 | Type::FLOAT8),
            Value::Bytes(_) => *ty == Type::BYTEA,
            Value::Text(_) | Value::Json(_) => {
                matches!(*ty, Type::JSON | Type::JSONB) || <&str as ToSql>::accepts(ty)
            }
            Value::Timestamp(_) => matches!(*ty, Type::TIMESTAMP | Type::TIMESTAMPTZ),
            Value::Array(_) => false,
        };
        if binary {
            Format::Binary
        } else {
            Format::Text
        }
    }

    to_sql_checked!();
}

impl Value {
    /// PostgreSQL's text input form of this value.
    fn to_text(&self, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        let text = match self {
            Value::Null => return Ok(IsNull::Yes),
            Value::Bool(b) => (if *b { "t" } else { "f" }).to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) if f.is_nan() => "NaN".to_string(),
            Value::Float(f) if f.is_infinite() => {
                (if *f > 0.0 { "Infinity" } else { "-Infinity" }).to_string()
            }
            Value::Float(f) => format!("{f:?}"),
            Value::Bytes(b) => {
                let mut hex = String::with_capacity(2 + 2 * b.len());
                hex.push_str("\\x");
                for byte in b {
                    hex.push_str(&format!("{byte:02x}"));
                }
                hex
            }
            Value::Text(s) | Value::Json(s) => {
                out.put_slice(s.as_bytes());
                return Ok(IsNull::No);
            }
            Value::Timestamp(t) => t.to_rfc3339(),
            Value::Array(members) => {
                array_literal(members, out)?;
                return Ok(IsNull::No);
            }
        };
        out.put_slice(text.as_bytes());
        Ok(IsNull::No)
    }
}

/// PostgreSQL's array literal of these members: `{...}` per dimension, each other member
/// double-quoted with `"` and `\` escaped (so text such as `NULL`, `a,b` or ` pad ` stays
/// itself), a null as `NULL`. Sub-lists of unequal length are the server's error.
fn array_literal(members: &[Value], out: &mut BytesMut) -> std::result::Result<(), BoxError> {
    out.put_u8(b'{');
    let mut text = BytesMut::new();
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        match member {
            Value::Null => out.put_slice(b"NULL"),
            Value::Array(inner) => array_literal(inner, out)?,
            _ => {
                text.clear();
                member.to_text(&mut text)?;
                out.put_u8(b'"');
                for &byte in text.iter() {
                    if matches!(byte, b'"' | b'\\') {
                        out.put_u8(b'\\');
                    }
                    out.put_u8(byte);
                }
                out.put_u8(b'"');
            }
        }
    }
    out.put_u8(b'}');
    Ok(())
}

/// A column value decoded by its actual server type (a database adopted from SQLAlchemy
/// may have `timestamp` where we would create `timestamptz`).
struct Decoded(Value);

impl<'a> FromSql<'a> for Decoded {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        Ok(Decoded(match *ty {
            Type::BOOL => Value::Bool(bool::from_sql(ty, raw)?),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)? as i64),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)? as i64),
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::TIMESTAMPTZ => Value::Timestamp(DateTime::<Utc>::from_sql(ty, raw)?),
            Type::TIMESTAMP => Value::Timestamp(NaiveDateTime::from_sql(ty, raw)?.and_utc()),
            Type::JSON => Value::Json(std::str::from_utf8(raw)?.to_string()),
            Type::JSONB => Value::Json(
                std::str::from_utf8(raw.get(1..).ok_or("empty jsonb value")?)?.to_string(),
            ),
            _ => Value::Text(String::from_sql(ty, raw)?),
        }))
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Self, BoxError> {
        Ok(Decoded(Value::Null))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::BOOL
                | Type::INT2
                | Type::INT4
                | Type::INT8
                | Type::TIMESTAMPTZ
                | Type::TIMESTAMP
                | Type::JSON
                | Type::JSONB
        ) || <String as FromSql>::accepts(ty)
    }
}

/// A value of any column the DB-API reads. Types Python has no plain value for here go as
/// text the binding converts as the column's `dbapi::ReadAs` says (numeric to `Decimal`,
/// date, time, uuid); an array of any of them (`int2vector` and `oidvector` too) is a
/// [`Value::Array`]; a type outside these is a DataError that says to cast it.
struct AnyDecoded(Value);

impl<'a> FromSql<'a> for AnyDecoded {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxError> {
        if let Kind::Array(member) = ty.kind() {
            return array_value(member, raw).map(AnyDecoded);
        }
        Ok(AnyDecoded(match *ty {
            Type::FLOAT4 => Value::Float(f64::from(f32::from_sql(ty, raw)?)),
            Type::FLOAT8 => Value::Float(f64::from_sql(ty, raw)?),
            Type::OID => Value::Int(i64::from(u32::from_sql(ty, raw)?)),
            Type::CHAR => Value::Text(char::from(i8::from_sql(ty, raw)? as u8).to_string()),
            Type::BYTEA => Value::Bytes(raw.to_vec()),
            Type::NUMERIC => Value::Text(numeric_text(raw)?),
            Type::DATE => Value::Text(NaiveDate::from_sql(ty, raw)?.to_string()),
            Type::TIME => Value::Text(NaiveTime::from_sql(ty, raw)?.to_string()),
            Type::UUID => Value::Text(uuid_text(raw)?),
            _ if <Decoded as FromSql>::accepts(ty) => Decoded::from_sql(ty, raw)?.0,
            _ => {
                return Err(format!(
                    "PostgreSQL type {ty} cannot be read through the DB-API; cast it in the query (for example ::text)"
                )
                .into())
            }
        }))
    }

    fn from_sql_null(_: &Type) -> std::result::Result<Self, BoxError> {
        Ok(AnyDecoded(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A binary array as nested [`Value::Array`]s: the members come in row-major order, so
/// each dimension after the first groups the level below it into lists of its length.
fn array_value(member: &Type, raw: &[u8]) -> std::result::Result<Value, BoxError> {
    let array = postgres_protocol::types::array_from_sql(raw)?;
    let lengths = array
        .dimensions()
        .map(|d| Ok(usize::try_from(d.len)?))
        .collect::<Vec<usize>>()?;
    let mut level = array
        .values()
        .map(|v| match v {
            Some(raw) => AnyDecoded::from_sql(member, raw).map(|d| d.0),
            None => Ok(Value::Null),
        })
        .collect::<Vec<Value>>()?;
    for &len in lengths.iter().skip(1).rev() {
        let mut members = level.into_iter();
        level = std::iter::from_fn(|| {
            let group: Vec<Value> = members.by_ref().take(len).collect();
            (!group.is_empty()).then_some(Value::Array(group))
        })
        .collect();
    }
    Ok(Value::Array(level))
}

/// The decimal text of a binary `numeric`: base-10000 digit groups, a weight (the power of
/// 10000 of the first group), a sign and the number of decimal places to show.
fn numeric_text(raw: &[u8]) -> std::result::Result<String, BoxError> {
    let word = |i: usize| -> std::result::Result<u16, BoxError> {
        let b = raw.get(i..i + 2).ok_or("truncated numeric value")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    let groups = usize::from(word(0)?);
    let weight = i32::from(word(2)? as i16);
    let sign = word(4)?;
    let scale = usize::from(word(6)?);
    match sign {
        0x0000 | 0x4000 => {}
        0xC000 => return Ok("NaN".into()),
        0xD000 => return Ok("Infinity".into()),
        0xF000 => return Ok("-Infinity".into()),
        _ => return Err("malformed numeric sign".into()),
    }
    let digits = (0..groups)
        .map(|i| word(8 + 2 * i))
        .collect::<std::result::Result<Vec<u16>, BoxError>>()?;
    // The group at power 10000^(weight - i) is digits[i]; absent ones are zero.
    let group = |i: i32| -> u16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut s = String::new();
    if sign == 0x4000 {
        s.push('-');
    }
    if weight < 0 {
        s.push('0');
    } else {
        s.push_str(&group(0).to_string());
        for i in 1..=weight {
            s.push_str(&format!("{:04}", group(i)));
        }
    }
    if scale > 0 {
        let mut fraction = String::with_capacity(scale + 4);
        let mut i = weight + 1;
        while fraction.len() < scale {
            fraction.push_str(&format!("{:04}", group(i)));
            i += 1;
        }
        fraction.truncate(scale);
        s.push('.');
        s.push_str(&fraction);
    }
    Ok(s)
}

/// The hyphenated text of a binary `uuid`.
fn uuid_text(raw: &[u8]) -> std::result::Result<String, BoxError> {
    if raw.len() != 16 {
        return Err("malformed uuid value".into());
    }
    let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(groups: &[u16], weight: i16, sign: u16, scale: u16) -> Vec<u8> {
        let mut raw = Vec::new();
        for w in [groups.len() as u16, weight as u16, sign, scale] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        for g in groups {
            raw.extend_from_slice(&g.to_be_bytes());
        }
        raw
    }

    #[test]
    fn numeric_binary_reads_as_its_decimal_text() {
        let cases: [(&[u16], i16, u16, u16, &str); 7] = [
            (&[], 0, 0, 0, "0"),
            (&[], 0, 0, 2, "0.00"),
            (&[12, 3400], 1, 0, 0, "123400"),
            (&[1, 2345], 0, 0x4000, 6, "-1.234500"),
            (&[5], -2, 0, 8, "0.00000005"),
            (&[9999, 9999, 9999], 0, 0, 8, "9999.99999999"),
            (&[1], 3, 0, 0, "1000000000000"),
        ];
        for (groups, weight, sign, scale, want) in cases {
            assert_eq!(
                numeric_text(&numeric(groups, weight, sign, scale)).unwrap(),
                want
            );
        }
        assert_eq!(numeric_text(&numeric(&[], 0, 0xC000, 0)).unwrap(), "NaN");
        assert!(numeric_text(&[0, 1]).is_err());
        assert!(numeric_text(&numeric(&[1], 0, 0x1234, 0)).is_err());
    }

    #[test]
    fn uuid_binary_reads_hyphenated() {
        let raw: Vec<u8> = (0..16).collect();
        assert_eq!(
            uuid_text(&raw).unwrap(),
            "00010203-0405-0607-0809-0a0b0c0d0e0f"
        );
        assert!(uuid_text(&raw[..3]).is_err());
    }

    /// A binary int4 array of these dimension lengths and members (None for a null).
    fn int4_array(lengths: &[i32], members: &[Option<i32>]) -> Vec<u8> {
        let mut raw = Vec::new();
        for w in [lengths.len() as i32, 1, Type::INT4.oid() as i32] {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        for len in lengths {
            raw.extend_from_slice(&len.to_be_bytes());
            raw.extend_from_slice(&1i32.to_be_bytes());
        }
        for m in members {
            match m {
                Some(v) => {
                    raw.extend_from_slice(&4i32.to_be_bytes());
                    raw.extend_from_slice(&v.to_be_bytes());
                }
                None => raw.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        raw
    }

    #[test]
    fn binary_arrays_read_as_nested_values_row_major() {
        let ints = |v: &[Option<i64>]| {
            Value::Array(
                v.iter()
                    .map(|m| m.map_or(Value::Null, Value::Int))
                    .collect(),
            )
        };
        let raw = int4_array(
            &[2, 3],
            &[Some(1), Some(2), None, Some(4), Some(5), Some(6)],
        );
        assert_eq!(
            array_value(&Type::INT4, &raw).unwrap(),
            Value::Array(vec![
                ints(&[Some(1), Some(2), None]),
                ints(&[Some(4), Some(5), Some(6)])
            ])
        );
        assert_eq!(
            array_value(&Type::INT4, &int4_array(&[3], &[Some(7), None, Some(9)])).unwrap(),
            ints(&[Some(7), None, Some(9)])
        );
        assert_eq!(
            array_value(&Type::INT4, &int4_array(&[], &[])).unwrap(),
            ints(&[])
        );
        // a cut-off buffer is an error, not a panic
        assert!(array_value(&Type::INT4, &raw[..raw.len() - 2]).is_err());
        assert!(array_value(&Type::INT4, &raw[..6]).is_err());
    }

    #[test]
    fn arrays_bind_as_quoted_literals() {
        let literal = |members: Vec<Value>| {
            let mut out = BytesMut::new();
            array_literal(&members, &mut out).unwrap();
            String::from_utf8(out.to_vec()).unwrap()
        };
        assert_eq!(
            literal(vec![
                Value::Int(-1),
                Value::Null,
                Value::Text(r#"a"b\c"#.into()),
                Value::Text("NULL".into()),
                Value::Bytes(vec![0, 255]),
            ]),
            r#"{"-1",NULL,"a\"b\\c","NULL","\\x00ff"}"#
        );
        assert_eq!(
            literal(vec![
                Value::Array(vec![Value::Bool(true)]),
                Value::Array(vec![]),
            ]),
            r#"{{"t"},{}}"#
        );
        assert_eq!(literal(vec![]), "{}");
    }
}
