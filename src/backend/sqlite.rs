//! SQLite through rusqlite, linked against the system's libsqlite3: the same library Python's
//! `sqlite3` module (and so SQLAlchemy) loads, so one process holds one copy of SQLite and
//! the two can share a database file safely (see the `bundled-sqlite` feature).

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params_from_iter, Connection, OpenFlags, ToSql};

use super::{Row, Shape};
use crate::dbapi;
use crate::error::{Error, Result};
use crate::schema::ColType;
use crate::url::{Access, SqlitePath, Synchronous};
use crate::value::{format_sqlite_timestamp, parse_sqlite_timestamp, Value};

/// Prepared statements kept per connection; a session uses a few dozen distinct shapes.
const STATEMENT_CACHE: usize = 128;

/// RETURNING, which bulk updates and deletes use, arrived in SQLite 3.35.
const MIN_VERSION: i32 = 3_035_000;

/// The SQLite library this module's calls go to, as the dynamic loader bound them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// The file that holds it (a `libsqlite3.so`, or this module itself when SQLite is
    /// compiled in); `None` where the platform cannot tell.
    pub file: Option<String>,
    pub version: &'static str,
    /// The address of its `sqlite3_libversion`: two copies of SQLite in one process are told
    /// apart by it, whatever their files are called.
    pub address: usize,
}

/// Which SQLite library this process's calls through this module reach.
pub fn library() -> Library {
    let function: unsafe extern "C" fn() -> *const std::ffi::c_char =
        rusqlite::ffi::sqlite3_libversion;
    let address = function as usize;
    Library {
        file: file_of(address),
        version: rusqlite::version(),
        address,
    }
}

#[cfg(unix)]
fn file_of(address: usize) -> Option<String> {
    // SAFETY: dladdr only reads the loader's tables and fills `info`; a zeroed Dl_info is a
    // valid initial value (null pointers), and `dli_fname` is checked before it is read.
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    let found = unsafe { libc::dladdr(address as *const libc::c_void, &mut info) } != 0;
    if !found || info.dli_fname.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    Some(name.to_string_lossy().into_owned()).filter(|n| !n.is_empty())
}

#[cfg(not(unix))]
fn file_of(_address: usize) -> Option<String> {
    None
}

pub fn open(
    path: &SqlitePath,
    busy_timeout: Duration,
    sync: Synchronous,
    access: Access,
) -> Result<Connection> {
    if rusqlite::version_number() < MIN_VERSION {
        return Err(Error::not_supported(format!(
            "SQLite {} is too old: cmbagent-db needs 3.35 or newer (build with the bundled-sqlite feature to carry its own)",
            rusqlite::version()
        )));
    }
    let flags = match access {
        Access::ReadWrite => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Access::ReadOnly | Access::Immutable => {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI
        }
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let (conn, shown) = match path {
        SqlitePath::Memory => (
            Connection::open_in_memory_with_flags(flags),
            ":memory:".into(),
        ),
        SqlitePath::File(p) => {
            let shown = p.display().to_string();
            let parent = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if p.is_dir() {
                return Err(Error::operational(format!(
                    "cannot open SQLite database {shown}: it is a directory, not a database file"
                )));
            }
            if !parent.is_dir() {
                return Err(Error::operational(format!(
                    "cannot open SQLite database {shown}: directory {} does not exist",
                    parent.display()
                )));
            }
            let opened = match access {
                Access::ReadWrite => Connection::open_with_flags(p, flags),
                Access::ReadOnly if !p.exists() => {
                    return Err(Error::operational(format!(
                        "cannot open SQLite database {shown} read-only: the file does not exist"
                    )))
                }
                Access::ReadOnly => Connection::open_with_flags(file_uri(p, "mode=ro"), flags),
                Access::Immutable => Connection::open_with_flags(file_uri(p, "immutable=1"), flags),
            };
            (opened, shown)
        }
    };
    let ctx = |e: rusqlite::Error| {
        let mut e = Error::from(e);
        // SQLite may end its own message with the path: say it once.
        if let Some(m) = e.message.strip_suffix(&format!(": {shown}")) {
            e.message = m.to_string();
        }
        e.context(format!("SQLite database {shown}"))
    };
    let conn = conn.map_err(ctx)?;
    conn.busy_timeout(busy_timeout).map_err(ctx)?;
    // WAL: readers never block the writer, the writer never blocks readers.
    // foreign_keys: ON DELETE CASCADE / SET NULL and missing parents are enforced.
    // synchronous: FULL keeps a committed approval through a power cut, as SQLAlchemy's
    // default does; NORMAL / OFF only when the URL asks for them.
    if access.writable() {
        // Read-only connections take the journal mode the file has.
        set_wal(&conn, busy_timeout).map_err(ctx)?;
    }
    // cache_size: 16 MiB of pages per connection instead of SQLite's 2 MiB, so lookups in
    // a table of 100,000 approvals stay in memory. (Memory-mapped I/O would be faster still,
    // but an I/O error on a mapped file kills the process with SIGBUS.)
    conn.execute_batch(&format!(
        "PRAGMA foreign_keys=ON; PRAGMA synchronous={}; PRAGMA cache_size=-16384;",
        sync.pragma()
    ))
    .map_err(ctx)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    super::checkpoint::install(&conn);
    Ok(conn)
}

/// Switches the file to WAL (a lasting property of the file) unless it is already in it.
/// The switch needs a moment of exclusive access and, unlike other statements, does not
/// wait through the busy handler: when several processes open a new file at once, retry
/// it until the busy timeout runs out.
fn set_wal(conn: &Connection, busy_timeout: Duration) -> rusqlite::Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") || mode.eq_ignore_ascii_case("memory") {
            return Ok(());
        }
        match conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(())) {
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ffi::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

impl ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*b as i64)),
            Value::Int(i) => ToSqlOutput::Owned(rusqlite::types::Value::Integer(*i)),
            Value::Float(f) => ToSqlOutput::Owned(rusqlite::types::Value::Real(*f)),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            // A column declared JSON has NUMERIC affinity: SQLite would turn the text of a
            // bare number into an INTEGER or REAL (1.0 -> 1, 2**63 -> 9.2e18). A BLOB is
            // never converted; everything else stays text, as SQLAlchemy writes it.
            Value::Json(s) if s.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
                ToSqlOutput::Borrowed(ValueRef::Blob(s.as_bytes()))
            }
            Value::Json(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Timestamp(t) => {
                ToSqlOutput::Owned(rusqlite::types::Value::Text(format_sqlite_timestamp(t)))
            }
            Value::Array(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no array type; bind each member as its own parameter".into(),
                ))
            }
        })
    }
}

pub fn execute(c: &Connection, sql: &str, params: &[Value]) -> Result<u64> {
    let mut stmt = c.prepare_cached(sql)?;
    Ok(stmt.execute(params_from_iter(params))? as u64)
}

pub fn query(c: &Connection, sql: &str, params: &[Value], shape: Shape) -> Result<Vec<Row>> {
    let mut stmt = c.prepare_cached(sql)?;
    let mut rows = stmt.query(params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(shape.len());
        for (i, (name, ty)) in shape.iter().enumerate() {
            values.push(decode(row.get_ref(i)?, *ty, name)?);
        }
        out.push(values);
    }
    Ok(out)
}

/// Any statement, rows decoded by each value's storage class (as `sqlite3` returns them).
pub fn run_any(c: &Connection, sql: &str, params: &[Value]) -> Result<dbapi::Outcome> {
    let mut stmt = c.prepare_cached(sql)?;
    let columns: Vec<dbapi::Column> = stmt
        .column_names()
        .into_iter()
        .map(|name| dbapi::Column {
            name: name.to_string(),
            type_oid: None,
            read_as: dbapi::ReadAs::Native,
        })
        .collect();
    let mut out = Vec::new();
    {
        let mut rows = stmt.query(params_from_iter(params))?;
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns.len());
            for (i, column) in columns.iter().enumerate() {
                values.push(match row.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(f) => Value::Float(f),
                    ValueRef::Text(t) => Value::Text(text(t, &column.name)?),
                    ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
                });
            }
            out.push(values);
        }
    }
    let keyword = dbapi::leading_keyword(sql);
    let dml = !stmt.readonly()
        && matches!(
            keyword.as_str(),
            "INSERT" | "UPDATE" | "DELETE" | "REPLACE" | "WITH"
        );
    Ok(dbapi::Outcome {
        columns,
        rows: out,
        rowcount: if dml { c.changes() as i64 } else { -1 },
        lastrowid: (dml && matches!(keyword.as_str(), "INSERT" | "REPLACE"))
            .then(|| c.last_insert_rowid()),
    })
}

/// `file:` URI of a path with a query (`mode=ro`), percent-encoding what a URI reserves.
fn file_uri(path: &Path, query: &str) -> String {
    let mut uri = String::from("file:");
    for b in path.to_string_lossy().bytes() {
        match b {
            b'?' | b'#' | b'%' => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(char::from(b)),
        }
    }
    uri.push('?');
    uri.push_str(query);
    uri
}

fn not_utf8(column: &str) -> Error {
    Error::data(format!(
        "column {column} holds text that is not valid UTF-8"
    ))
}

fn text(bytes: &[u8], column: &str) -> Result<String> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| not_utf8(column))
}

/// SQLite keeps whatever was written; decode it by the column's declared type, accepting
/// the forms SQLAlchemy and SQLite themselves write.
fn decode(v: ValueRef<'_>, ty: ColType, column: &str) -> Result<Value> {
    let bad = |what: &str| Error::data(format!("column {column} holds {what}, not a {ty:?} value"));
    Ok(match (ty, v) {
        (_, ValueRef::Null) => Value::Null,
        (ColType::Str(_) | ColType::Text, ValueRef::Text(b) | ValueRef::Blob(b)) => {
            Value::Text(text(b, column)?)
        }
        (ColType::Str(_) | ColType::Text, ValueRef::Integer(i)) => Value::Text(i.to_string()),
        (ColType::Str(_) | ColType::Text, ValueRef::Real(f)) => Value::Text(f.to_string()),
        (ColType::Integer | ColType::BigInt, ValueRef::Integer(i)) => Value::Int(i),
        (ColType::Boolean, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (ColType::Timestamp { .. }, ValueRef::Text(b)) => {
            let s = std::str::from_utf8(b).map_err(|_| not_utf8(column))?;
            Value::Timestamp(
                parse_sqlite_timestamp(s).ok_or_else(|| bad(&format!("the text {s:?}")))?,
            )
        }
        (ColType::Json, ValueRef::Text(b) | ValueRef::Blob(b)) => Value::Json(text(b, column)?),
        (ColType::Json, ValueRef::Integer(i)) => Value::Json(i.to_string()),
        (ColType::Json, ValueRef::Real(f)) => Value::Json(f.to_string()),
        (_, ValueRef::Integer(i)) => return Err(bad(&format!("the integer {i}"))),
        (_, ValueRef::Real(f)) => return Err(bad(&format!("the number {f}"))),
        (_, ValueRef::Text(_)) => return Err(bad("text")),
        (_, ValueRef::Blob(_)) => return Err(bad("a blob")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names_the_file_its_calls_reach() {
        let lib = library();
        assert_eq!(lib.version, rusqlite::version());
        let file = lib.file.expect("dladdr names the library");
        assert!(Path::new(&file).exists(), "{file}");
        // Linked against the system's library unless SQLite is compiled in.
        #[cfg(not(feature = "bundled-sqlite"))]
        assert!(file.contains("libsqlite3"), "{file}");
        assert_eq!(library().address, lib.address);
    }

    #[test]
    fn values_round_trip_through_sqlite() {
        let c = open(
            &SqlitePath::Memory,
            Duration::from_secs(1),
            Synchronous::Full,
            Access::ReadWrite,
        )
        .unwrap();
        c.execute_batch("CREATE TABLE t(s TEXT, i INTEGER, b BOOLEAN, ts TIMESTAMP, j JSON)")
            .unwrap();
        let now = chrono::Utc::now();
        let row = vec![
            Value::Text("it's \"quoted\" \\ \u{0}nul".into()),
            Value::Int(-5),
            Value::Bool(true),
            Value::Timestamp(now),
            Value::Json("{\"a\": [1, 2]}".into()),
        ];
        execute(&c, "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)", &row).unwrap();
        let shape = [
            ("s", ColType::Text),
            ("i", ColType::Integer),
            ("b", ColType::Boolean),
            ("ts", ColType::Timestamp { tz: true }),
            ("j", ColType::Json),
        ];
        let got = query(&c, "SELECT s, i, b, ts, j FROM t", &[], &shape).unwrap();
        // Microsecond precision is what SQLAlchemy stores, and what we keep.
        let mut expected = row;
        expected[3] =
            Value::Timestamp(parse_sqlite_timestamp(&format_sqlite_timestamp(&now)).unwrap());
        assert_eq!(got, vec![expected]);
    }

    #[test]
    fn bare_json_numbers_keep_their_text_in_a_json_column() {
        let c = open(
            &SqlitePath::Memory,
            Duration::from_secs(1),
            Synchronous::Full,
            Access::ReadWrite,
        )
        .unwrap();
        c.execute_batch("CREATE TABLE t(j JSON)").unwrap();
        let texts = ["1.0", "-0.0", "9223372036854775808", "1e16", "{\"a\": 1}"];
        for t in texts {
            execute(&c, "INSERT INTO t VALUES (?1)", &[Value::Json(t.into())]).unwrap();
        }
        let got = query(&c, "SELECT j FROM t", &[], &[("j", ColType::Json)]).unwrap();
        let got: Vec<Value> = got.into_iter().map(|mut r| r.remove(0)).collect();
        let want: Vec<Value> = texts.iter().map(|t| Value::Json(t.to_string())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn undecodable_timestamp_names_the_column() {
        let c = open(
            &SqlitePath::Memory,
            Duration::from_secs(1),
            Synchronous::Full,
            Access::ReadWrite,
        )
        .unwrap();
        let e = query(
            &c,
            "SELECT 'garbage'",
            &[],
            &[(
                "approval_requests.expires_at",
                ColType::Timestamp { tz: true },
            )],
        )
        .unwrap_err();
        assert!(e.message.contains("approval_requests.expires_at"), "{e}");
    }

    #[test]
    fn missing_directory_is_named() {
        let e = open(
            &SqlitePath::File("/no/such/dir/x.db".into()),
            Duration::from_secs(1),
            Synchronous::Full,
            Access::ReadWrite,
        )
        .unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Operational);
        assert!(e.message.contains("/no/such/dir"), "{e}");
    }
}
