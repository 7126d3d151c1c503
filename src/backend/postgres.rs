//! PostgreSQL through the synchronous `postgres` crate.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::str::FromStr;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDateTime, Utc};
use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::{Client, Config, NoTls, Statement};

use super::{Row, Shape};
use crate::error::{Error, Result};
use crate::value::Value;

type BoxError = Box<dyn StdError + Sync + Send>;

pub struct PgConn {
    client: Client,
    /// Statements prepared on this connection, by SQL text.
    statements: HashMap<String, Statement>,
}

impl PgConn {
    pub fn open(conninfo: &str, display: &str) -> Result<PgConn> {
        let config = Config::from_str(conninfo)
            .map_err(|e| Error::interface(format!("malformed PostgreSQL URL {display}: {e}")))?;
        // Whatever the server answers (a missing database is SQLSTATE 3D000, which would
        // otherwise read as a ProgrammingError), failing to connect is operational.
        let client = config.connect(NoTls).map_err(|e| {
            let mut e =
                Error::from(e).context(format!("cannot connect to PostgreSQL at {display}"));
            e.kind = crate::error::ErrorKind::Operational;
            e
        })?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    fn prepared(&mut self, sql: &str) -> Result<Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_string(), s.clone());
        Ok(s)
    }

    pub fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let stmt = self.prepared(sql)?;
        Ok(self.client.execute(&stmt, &as_params(params))?)
    }

    pub fn query(&mut self, sql: &str, params: &[Value], shape: Shape) -> Result<Vec<Row>> {
        let stmt = self.prepared(sql)?;
        let rows = self.client.query(&stmt, &as_params(params))?;
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
        Ok(self.client.batch_execute(sql)?)
    }

    pub fn notifications(&mut self, timeout: std::time::Duration) -> Result<Vec<String>> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut out = Vec::new();
        let mut notes = self.client.notifications();
        if let Some(n) = notes.timeout_iter(timeout).next()? {
            out.push(n.payload().to_string());
        }
        // Whatever else already arrived, without waiting again.
        let mut rest = notes.iter();
        while let Some(n) = rest.next()? {
            out.push(n.payload().to_string());
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
