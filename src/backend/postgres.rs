//! PostgreSQL through `tokio-postgres`, driven by a single-threaded runtime per connection.
//!
//! Driving the asynchronous client ourselves (rather than through the blocking `postgres`
//! wrapper) is what lets a whole connection attempt, start-up and authentication included,
//! and each statement be bounded in time: a server that accepts TCP and then never answers
//! costs `connect_timeout`, not forever.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDateTime, Utc};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Statement};

use super::{Row, Shape};
use crate::error::{Error, ErrorKind, Result};
use crate::url::PgTimeouts;
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
}

/// The runtime that moves a connection's bytes, and the bounds on waiting for them.
struct Driver {
    runtime: Runtime,
    /// The task that moves the connection's bytes.
    connection: tokio::task::JoinHandle<()>,
    timeouts: PgTimeouts,
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
                    tokio::time::timeout(grace, token.cancel_query(NoTls)).await
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

/// How long dropping a connection waits for its Terminate message to go out.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl PgConn {
    pub fn open(conninfo: &str, timeouts: PgTimeouts, display: &str) -> Result<PgConn> {
        let mut config = Config::from_str(conninfo)
            .map_err(|e| Error::interface(format!("malformed PostgreSQL URL {display}: {e}")))?;
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
        let attempt = config.connect(NoTls);
        let outcome = runtime.block_on(async {
            match timeouts.connect {
                Some(limit) => tokio::time::timeout(limit, attempt)
                    .await
                    .map_err(|_| limit),
                None => Ok(attempt.await),
            }
        });
        // Whatever the server answers (a missing database is SQLSTATE 3D000, which would
        // otherwise read as a ProgrammingError), failing to connect is operational.
        let failed = |mut e: Error| {
            e.kind = ErrorKind::Operational;
            e.context(format!("cannot connect to PostgreSQL at {display}"))
        };
        let (client, mut connection) = match outcome {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(failed(Error::from(e))),
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
        Ok(PgConn {
            client,
            driver: Driver {
                runtime,
                connection,
                timeouts,
                abandoned: false,
            },
            notifications,
            statements: HashMap::new(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.driver.abandoned || self.client.is_closed()
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.driver.run(&self.client, self.client.prepare(sql))?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let stmt = self.prepared(sql)?;
        let params = as_params(params);
        self.driver
            .run(&self.client, self.client.execute(&stmt, &params))
    }

    pub fn query(&mut self, sql: &str, params: &[Value], shape: Shape) -> Result<Vec<Row>> {
        let stmt = self.prepared(sql)?;
        let params = as_params(params);
        let rows = self
            .driver
            .run(&self.client, self.client.query(&stmt, &params))?;
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

/// Binds by the type the server inferred for the parameter, so one `Value` serves
/// `varchar`, `json`, `timestamp` and `timestamptz` alike.
impl ToSql for Value {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Bool(b) => b.to_sql(ty, out),
            Value::Int(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
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
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
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
