//! Database URLs: parsing, the default URL cmbagent uses, and redaction of passwords.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::trace::Echo;

/// How a SQLite URL opens its file: read-write (the default), `?mode=ro` (read-only; the
/// database's `-wal` / `-shm` files must exist or be creatable, as SQLite requires for a
/// WAL database), or `?immutable=1` (read-only, and SQLite assumes nobody changes the file:
/// no locks, no `-shm`; for a copy on read-only media).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    #[default]
    ReadWrite,
    ReadOnly,
    Immutable,
}

impl Access {
    pub fn writable(self) -> bool {
        self == Access::ReadWrite
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    Full,
    Normal,
    Off,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Off => "OFF",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SqlitePath {
    Memory,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Sqlite {
        path: SqlitePath,
        busy_timeout: Duration,
        synchronous: Synchronous,
        access: Access,
    },
    Postgres {
        /// A libpq-style URL `tokio-postgres` accepts (scheme normalised), without the TLS
        /// settings; what it leaves out is filled when a connection opens, as libpq does
        /// (`backend::libpq`).
        conninfo: String,
        timeouts: PgTimeouts,
        tls: TlsParams,
        statements: Statements,
    },
}

/// Whether a PostgreSQL connection keeps prepared statements from one transaction to the
/// next (URL parameter `prepared_statements=auto|true|false`).
///
/// A pooler in transaction mode (PgBouncer's `pool_mode = transaction`) hands each
/// transaction whichever server connection is free, so a statement prepared in one
/// transaction is missing in the next ("prepared statement \"s3\" does not exist"), and
/// session settings leak to other clients. With `PerTransaction` every statement goes
/// unnamed, parsed with its values in one round trip, and settings are made per
/// transaction (`SET LOCAL`). `Auto` chooses it when the server's own `port` setting is not
/// the port connected to, which is what a pooler in between looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Statements {
    #[default]
    Auto,
    Cached,
    PerTransaction,
}

impl Statements {
    fn parse(v: &str) -> Result<Statements> {
        if v.eq_ignore_ascii_case("auto") {
            return Ok(Statements::Auto);
        }
        Ok(if parse_bool("prepared_statements", v)? {
            Statements::Cached
        } else {
            Statements::PerTransaction
        })
    }
}

/// libpq's `sslmode`: whether a PostgreSQL connection uses TLS and what it checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Without TLS first; with TLS (unverified) when the server refuses that.
    Allow,
    /// TLS when the server offers it (unverified), else without. libpq's default.
    Prefer,
    /// TLS or nothing; the certificate is checked as `VerifyCa` when a root certificate
    /// file is there (libpq's rule), else not.
    Require,
    /// TLS, with the server's certificate chain checked against the root certificates.
    VerifyCa,
    /// `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    pub fn parse(v: &str) -> Result<SslMode> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(Error::interface(format!(
                    "sslmode={v:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate must chain to a trusted root.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The TLS settings a PostgreSQL URL gives (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
/// `sslcrl`); `None` is left to libpq's environment variables and default files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsParams {
    pub mode: Option<SslMode>,
    /// A file of PEM certificates, or `system` for the system's trusted roots.
    pub rootcert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub crl: Option<PathBuf>,
}

/// How long a PostgreSQL client waits for the server; `None` is no bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PgTimeouts {
    /// A whole connection attempt: DNS, TCP, TLS negotiation, start-up and authentication.
    pub connect: Option<Duration>,
    /// One statement's answer; past it the statement is cancelled and the connection closed.
    pub command: Option<Duration>,
}

/// A connection attempt gives up after this long unless the URL says otherwise
/// (`connect_timeout=0` waits for ever, as in libpq).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalives unless the URL sets them: an idle connection to a host that vanished is
/// found dead after about two minutes, not the system's default of two hours.
const DEFAULT_KEEPALIVES: &[(&str, &str)] = &[
    ("keepalives_idle", "60"),
    ("keepalives_interval", "10"),
    ("keepalives_retries", "6"),
];

/// A parsed URL, with what applies to every backend.
#[derive(Debug, Clone, PartialEq)]
pub struct DbUrl {
    pub target: Target,
    /// Bring the database to head on the first session of this URL in a process.
    pub auto_migrate: bool,
    /// What the connections log (`echo`, `hide_parameters`, as SQLAlchemy's engine takes them).
    pub echo: Echo,
    /// The URL with its password masked: the only form that goes into messages.
    pub display: String,
}

impl DbUrl {
    /// This URL for a connection that runs only short statements (a waiter's one-row reads
    /// and updates): unless the URL bounds statements itself, a server that stops answering
    /// ends the wait after the connect timeout instead of never.
    pub fn for_short_statements(&self) -> DbUrl {
        let mut url = self.clone();
        if let Target::Postgres { timeouts, .. } = &mut url.target {
            timeouts.command = timeouts.command.or(timeouts.connect);
        }
        url
    }

    /// Whether connections may write (a SQLite URL with `mode=ro` / `immutable=1` may not).
    pub fn writable(&self) -> bool {
        match self.target {
            Target::Sqlite { access, .. } => access.writable(),
            Target::Postgres { .. } => true,
        }
    }
}

/// The URL with any password replaced by `***`: the userinfo's and a `password=` query
/// parameter's. The userinfo ends at the last `@`, so a password with an unencoded `/`,
/// `?` or `@` is masked whole (masking too much of a malformed URL is safe; showing a
/// password is not).
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return redact_password_params(url);
    };
    let rest = &url[scheme_end + 3..];
    let rest = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}:***{}", &rest[..colon], &rest[at..]),
            None => rest.to_string(),
        },
        None => rest.to_string(),
    };
    format!(
        "{}{}",
        &url[..scheme_end + 3],
        redact_password_params(&rest)
    )
}

fn redact_password_params(s: &str) -> String {
    let Some(q) = s.find('?') else {
        return s.to_string();
    };
    let params: Vec<String> = s[q + 1..]
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_string(),
        })
        .collect();
    format!("{}?{}", &s[..q], params.join("&"))
}

fn parse_bool(name: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::interface(format!(
            "URL parameter {name}={v:?} is not a boolean (use true or false)"
        ))),
    }
}

/// A URL parameter in seconds: a finite, non-negative number; one beyond what a `Duration`
/// holds is as long as one can wait.
fn seconds(name: &str, v: &str) -> Result<Duration> {
    let secs: f64 = v
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            Error::interface(format!(
                "URL parameter {name}={v:?} is not a number of seconds"
            ))
        })?;
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// A time limit in seconds, where zero means none (as libpq reads `connect_timeout`).
fn limit(name: &str, v: &str) -> Result<Option<Duration>> {
    Ok(Some(seconds(name, v)?).filter(|d| !d.is_zero()))
}

/// A query value with its `%XX` escapes decoded (SQLAlchemy renders a path's `/` as
/// `%2F`); an escape that is not one is kept as written.
fn decoded(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| v.to_string())
}

fn split_query(s: &str) -> (&str, Vec<(&str, &str)>) {
    // A '?' inside the userinfo (an unencoded one in a password) does not start the query.
    let from = s.rfind('@').map_or(0, |at| at + 1);
    match s[from..]
        .find('?')
        .map(|q| (&s[..from + q], &s[from + q + 1..]))
    {
        Some((base, q)) => (
            base,
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect(),
        ),
        None => (s, Vec::new()),
    }
}

/// Query parameters that `tokio-postgres` understands and we pass through.
const PG_PARAMS: &[&str] = &[
    "application_name",
    "options",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "tcp_user_timeout",
    "hostaddr",
    "load_balance_hosts",
    "target_session_attrs",
    "channel_binding",
    "host",
    "port",
    "user",
    "password",
    "dbname",
];

pub fn parse(url: &str) -> Result<DbUrl> {
    let display = redact(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::interface(format!(
            "malformed database URL {display:?}: expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB"
        )));
    };
    let (rest, params) = split_query(rest);
    let mut auto_migrate = true;
    let mut echo = false;
    let mut hide_parameters = false;
    match scheme.to_ascii_lowercase().as_str() {
        "sqlite" | "sqlite+pysqlite" => {
            let mut busy_timeout = Duration::from_secs(5);
            let mut synchronous = Synchronous::Full;
            let mut access = Access::ReadWrite;
            for (k, v) in params {
                match k {
                    "timeout" => busy_timeout = seconds(k, v)?,
                    "synchronous" => {
                        synchronous = match v.to_ascii_uppercase().as_str() {
                            "FULL" | "2" => Synchronous::Full,
                            "NORMAL" | "1" => Synchronous::Normal,
                            "OFF" | "0" => Synchronous::Off,
                            _ => {
                                return Err(Error::interface(format!(
                                    "URL parameter synchronous={v:?}: use FULL, NORMAL or OFF"
                                )))
                            }
                        }
                    }
                    "auto_migrate" => auto_migrate = parse_bool(k, v)?,
                    "echo" => echo = parse_bool(k, v)?,
                    "hide_parameters" => hide_parameters = parse_bool(k, v)?,
                    "mode" => {
                        access = match v {
                            "ro" => Access::ReadOnly,
                            "rw" | "rwc" => Access::ReadWrite,
                            _ => {
                                return Err(Error::interface(format!(
                                    "URL parameter mode={v:?}: use ro (read-only) or rwc"
                                )))
                            }
                        }
                    }
                    "immutable" => {
                        if parse_bool(k, v)? {
                            access = Access::Immutable;
                        }
                    }
                    _ => {
                        return Err(Error::interface(format!(
                            "unknown URL parameter {k:?} in {display:?} (SQLite takes timeout, synchronous, auto_migrate, echo, hide_parameters, mode, immutable)"
                        )))
                    }
                }
            }
            // sqlite:///rel.db -> "/rel.db" after the scheme; sqlite:////abs.db -> "//abs.db".
            let path = match rest {
                "" | "/" | "/:memory:" => SqlitePath::Memory,
                p if p.starts_with('/') => SqlitePath::File(PathBuf::from(&p[1..])),
                _ => {
                    return Err(Error::interface(format!(
                        "malformed SQLite URL {display:?}: use sqlite:///relative.db, sqlite:////absolute/path.db or sqlite:///:memory:"
                    )))
                }
            };
            Ok(DbUrl {
                target: Target::Sqlite {
                    path,
                    busy_timeout,
                    synchronous,
                    access,
                },
                auto_migrate,
                echo: Echo::new(echo, hide_parameters),
                display,
            })
        }
        "postgresql" | "postgres" | "postgresql+psycopg2" | "postgresql+psycopg" => {
            let mut passed = Vec::new();
            let mut timeouts = PgTimeouts {
                connect: Some(DEFAULT_CONNECT_TIMEOUT),
                command: None,
            };
            if let Some(v) = std::env::var("PGCONNECT_TIMEOUT")
                .ok()
                .filter(|v| !v.is_empty())
            {
                timeouts.connect = limit("PGCONNECT_TIMEOUT", &v)?;
            }
            let mut tls = TlsParams::default();
            let mut statements = Statements::Auto;
            for (k, v) in &params {
                let (k, v) = (*k, *v);
                match k {
                    "sslmode" => tls.mode = Some(SslMode::parse(v)?),
                    "sslrootcert" => tls.rootcert = Some(decoded(v)),
                    "sslcert" => tls.cert = Some(decoded(v).into()),
                    "sslkey" => tls.key = Some(decoded(v).into()),
                    "sslcrl" => tls.crl = Some(decoded(v).into()),
                    "sslpassword" | "sslcrldir" | "sslsni" | "sslcompression" | "sslnegotiation"
                    | "ssl_min_protocol_version" | "ssl_max_protocol_version" | "gssencmode" => {
                        return Err(Error::not_supported(format!(
                            "URL parameter {k:?} is not supported (TLS takes sslmode, sslrootcert, sslcert, sslkey and sslcrl; a client key must not be encrypted)"
                        )))
                    }
                    "auto_migrate" => auto_migrate = parse_bool(k, v)?,
                    "echo" => echo = parse_bool(k, v)?,
                    "hide_parameters" => hide_parameters = parse_bool(k, v)?,
                    "connect_timeout" => timeouts.connect = limit(k, v)?,
                    "command_timeout" => timeouts.command = limit(k, v)?,
                    "prepared_statements" => statements = Statements::parse(v)?,
                    _ if PG_PARAMS.contains(&k) => passed.push(format!("{k}={v}")),
                    _ => {
                        return Err(Error::interface(format!(
                            "unknown URL parameter {k:?} in {display:?}"
                        )))
                    }
                }
            }
            for (k, v) in DEFAULT_KEEPALIVES {
                if !params.iter().any(|(given, _)| given == k) {
                    passed.push(format!("{k}={v}"));
                }
            }
            // What the URL leaves out (even the host: `postgresql://`) is filled when a
            // connection opens, from libpq's environment variables and defaults.
            let mut conninfo = format!("postgresql://{rest}");
            if !passed.is_empty() {
                conninfo.push('?');
                conninfo.push_str(&passed.join("&"));
            }
            Ok(DbUrl {
                target: Target::Postgres {
                    conninfo,
                    timeouts,
                    tls,
                    statements,
                },
                auto_migrate,
                echo: Echo::new(echo, hide_parameters),
                display,
            })
        }
        other => Err(Error::not_supported(format!(
            "database URL scheme {other:?} is not supported: use sqlite:// or postgresql://"
        ))),
    }
}

/// The URL a waiter on the database `key` LISTENs through, where it is not `key` itself:
/// `CMBAGENT_DATABASE_LISTEN_URL`, which names the PostgreSQL server directly for the
/// database that `CMBAGENT_DATABASE_URL` reaches through a pooler in transaction mode (a
/// pooler cannot relay LISTEN). It applies to that database's URL only, so a process
/// that opens others never waits on the wrong one.
pub fn listen_url(key: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<DbUrl>> {
    let Some(listen) = env("CMBAGENT_DATABASE_LISTEN_URL").filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if env("CMBAGENT_DATABASE_URL").as_deref() != Some(key) {
        return Ok(None);
    }
    let parsed = parse(&listen)
        .map_err(|e| e.context("CMBAGENT_DATABASE_LISTEN_URL is not a usable database URL"))?;
    if !matches!(parsed.target, Target::Postgres { .. }) {
        return Err(Error::interface(format!(
            "CMBAGENT_DATABASE_LISTEN_URL must be a postgresql:// URL, not {:?}",
            parsed.display
        )));
    }
    Ok(Some(parsed))
}

/// cmbagent's default: `CMBAGENT_DATABASE_URL`, else a SQLite file under the work dir
/// (`CMBAGENT_DEFAULT_WORK_DIR`, default `~/Desktop/cmbdir`), whose `database/` folder is
/// created if missing.
pub fn default_url() -> Result<String> {
    if let Ok(url) = std::env::var("CMBAGENT_DATABASE_URL") {
        if !url.is_empty() {
            return Ok(url);
        }
    }
    let work_dir = match std::env::var("CMBAGENT_DEFAULT_WORK_DIR") {
        Ok(d) if !d.is_empty() => expand_home(&d),
        _ => home_dir().join("Desktop").join("cmbdir"),
    };
    let dir = std::path::absolute(work_dir.join("database")).map_err(|e| {
        Error::operational(format!(
            "cannot resolve the work directory {work_dir:?}: {e}"
        ))
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        Error::operational(format!("cannot create the database directory {dir:?}: {e}"))
    })?;
    Ok(format!("sqlite:///{}", dir.join("cmbagent.db").display()))
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn expand_home(p: &str) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if p == "~" => home_dir(),
        None => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_path(url: &str) -> SqlitePath {
        match parse(url).unwrap().target {
            Target::Sqlite { path, .. } => path,
            t => panic!("not sqlite: {t:?}"),
        }
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite:///rel.db"),
            SqlitePath::File("rel.db".into())
        );
        assert_eq!(
            sqlite_path("sqlite:////abs/x.db"),
            SqlitePath::File("/abs/x.db".into())
        );
        assert_eq!(sqlite_path("sqlite:///:memory:"), SqlitePath::Memory);
        assert_eq!(sqlite_path("sqlite://"), SqlitePath::Memory);
    }

    #[test]
    fn sqlite_options_and_errors() {
        let u = parse("sqlite:////x.db?timeout=0.5&synchronous=normal&auto_migrate=false").unwrap();
        assert!(!u.auto_migrate);
        assert_eq!(
            u.target,
            Target::Sqlite {
                path: SqlitePath::File("/x.db".into()),
                busy_timeout: Duration::from_millis(500),
                synchronous: Synchronous::Normal,
                access: Access::ReadWrite,
            }
        );
        assert_eq!(
            parse("sqlite:////x.db?bogus=1").unwrap_err().kind,
            crate::error::ErrorKind::Interface
        );
        assert_eq!(
            parse("sqlite:/x").unwrap_err().kind,
            crate::error::ErrorKind::Interface
        );
        assert_eq!(
            parse("notaurl").unwrap_err().kind,
            crate::error::ErrorKind::Interface
        );
        assert_eq!(
            parse("mysql://u@h/db").unwrap_err().kind,
            crate::error::ErrorKind::NotSupported
        );
    }

    #[test]
    fn postgres_spellings_normalise() {
        for scheme in [
            "postgresql",
            "postgres",
            "postgresql+psycopg2",
            "postgresql+psycopg",
        ] {
            let u = parse(&format!("{scheme}://u:pw@h:5432/db?sslmode=disable")).unwrap();
            assert_eq!(
                u.target,
                Target::Postgres {
                    conninfo: "postgresql://u:pw@h:5432/db?keepalives_idle=60&keepalives_interval=10&keepalives_retries=6".into(),
                    timeouts: PgTimeouts {
                        connect: Some(DEFAULT_CONNECT_TIMEOUT),
                        command: None,
                    },
                    tls: TlsParams {
                        mode: Some(SslMode::Disable),
                        ..TlsParams::default()
                    },
                    statements: Statements::Auto,
                }
            );
            assert!(!u.display.contains("pw"));
        }
    }

    fn pg_target(query: &str) -> (String, PgTimeouts) {
        match parse(&format!("postgresql://u@h/db{query}"))
            .unwrap()
            .target
        {
            Target::Postgres {
                conninfo, timeouts, ..
            } => (conninfo, timeouts),
            t => panic!("not postgres: {t:?}"),
        }
    }

    #[test]
    fn the_listen_url_applies_to_cmbagents_database_only() {
        let pooled = "postgresql://u@pooler:6432/db";
        let env = |k: &str| match k {
            "CMBAGENT_DATABASE_URL" => Some(pooled.to_string()),
            "CMBAGENT_DATABASE_LISTEN_URL" => Some("postgresql://u:pw@server:5432/db".into()),
            _ => None,
        };
        let got = listen_url(pooled, &env).unwrap().unwrap();
        assert!(got.display.contains("server:5432") && !got.display.contains("pw"));
        assert!(listen_url("postgresql://u@elsewhere/db", &env)
            .unwrap()
            .is_none());
        assert!(listen_url(pooled, &|_| None).unwrap().is_none());
        let sqlite = |k: &str| match k {
            "CMBAGENT_DATABASE_LISTEN_URL" => Some("sqlite:///x.db".to_string()),
            _ => env(k),
        };
        let e = listen_url(pooled, &sqlite).unwrap_err();
        assert!(e.message.contains("postgresql://"), "{}", e.message);
    }

    #[test]
    fn prepared_statements_parameter() {
        let of = |q: &str| match parse(&format!("postgresql://u@h/db{q}")).map(|u| u.target) {
            Ok(Target::Postgres { statements, .. }) => Ok(statements),
            Ok(t) => panic!("not postgres: {t:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(of("").unwrap(), Statements::Auto);
        assert_eq!(of("?prepared_statements=auto").unwrap(), Statements::Auto);
        assert_eq!(of("?prepared_statements=true").unwrap(), Statements::Cached);
        assert_eq!(
            of("?prepared_statements=off").unwrap(),
            Statements::PerTransaction
        );
        let e = of("?prepared_statements=sometimes").unwrap_err();
        assert!(e.message.contains("prepared_statements"), "{}", e.message);
        // Ours alone: not passed on to the server as a connection option.
        assert_eq!(pg_target("?prepared_statements=false").0, pg_target("").0);
    }

    #[test]
    fn postgres_timeouts() {
        let (_, t) = pg_target("?connect_timeout=2.5&command_timeout=30");
        assert_eq!(t.connect, Some(Duration::from_millis(2500)));
        assert_eq!(t.command, Some(Duration::from_secs(30)));
        // As in libpq, zero is no limit; the default is DEFAULT_CONNECT_TIMEOUT.
        assert_eq!(pg_target("?connect_timeout=0").1.connect, None);
        assert_eq!(pg_target("").1.connect, Some(DEFAULT_CONNECT_TIMEOUT));
        for bad in [
            "?connect_timeout=soon",
            "?command_timeout=-1",
            "?connect_timeout=NaN",
        ] {
            let e = parse(&format!("postgresql://u@h/db{bad}")).unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::Interface, "{bad}");
            assert!(e.message.contains("seconds"), "{}", e.message);
        }
        // Our timeouts are applied by the driver, not passed on as connection options.
        assert_eq!(pg_target("?connect_timeout=2").0, pg_target("").0);
        // A waiter's connection bounds statements by the connect timeout unless told otherwise.
        let waiter = |q: &str| match parse(&format!("postgresql://u@h/db{q}"))
            .unwrap()
            .for_short_statements()
            .target
        {
            Target::Postgres { timeouts, .. } => timeouts.command,
            t => panic!("not postgres: {t:?}"),
        };
        assert_eq!(waiter(""), Some(DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(waiter("?command_timeout=3"), Some(Duration::from_secs(3)));
        assert_eq!(waiter("?connect_timeout=0"), None);
        // Keepalive settings the URL gives replace the defaults.
        let (conninfo, _) = pg_target("?keepalives_idle=5");
        assert!(conninfo.contains("keepalives_idle=5"), "{conninfo}");
        assert!(!conninfo.contains("keepalives_idle=60"), "{conninfo}");
    }

    #[test]
    fn postgres_tls_settings_are_read_not_passed_on() {
        let tls = |q: &str| match parse(&format!("postgresql://u@h/db{q}")).map(|u| u.target) {
            Ok(Target::Postgres { conninfo, tls, .. }) => {
                assert!(!conninfo.contains("ssl"), "{conninfo}");
                Ok(tls)
            }
            Ok(t) => panic!("not postgres: {t:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(tls("").unwrap(), TlsParams::default());
        let given = tls(
            "?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem&sslcrl=/r.pem",
        )
        .unwrap();
        assert_eq!(given.mode, Some(SslMode::VerifyFull));
        assert_eq!(given.rootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(given.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(given.key, Some(PathBuf::from("/k.pem")));
        assert_eq!(given.crl, Some(PathBuf::from("/r.pem")));
        for mode in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let parsed = tls(&format!("?sslmode={mode}")).unwrap().mode.unwrap();
            assert_eq!(parsed.name(), mode);
        }
        let bad = tls("?sslmode=always").unwrap_err();
        assert_eq!(bad.kind, crate::error::ErrorKind::Interface);
        assert!(bad.message.contains("verify-full"), "{}", bad.message);
        let encrypted = tls("?sslpassword=x").unwrap_err();
        assert_eq!(encrypted.kind, crate::error::ErrorKind::NotSupported);
        assert_eq!(decoded("100%"), "100%");
        assert_eq!(decoded("a%2Fb%zz"), "a/b%zz");
    }

    #[test]
    fn redaction_hides_only_the_password() {
        assert_eq!(
            redact("postgresql://u:secret@h:5/db"),
            "postgresql://u:***@h:5/db"
        );
        assert_eq!(redact("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            redact("postgresql://u:p@ss@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(redact("sqlite:////a:b/x.db"), "sqlite:////a:b/x.db");
        assert_eq!(
            redact("postgresql://u:ab/cd@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(
            redact("postgresql://u:ab?cd@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(
            redact("postgresql://u@h/db?sslmode=disable&password=SECRET"),
            "postgresql://u@h/db?sslmode=disable&password=***"
        );
        let e = parse("postgresql://u:ab?cd@h/db?bogus=1").unwrap_err();
        assert!(!e.message.contains("cd"), "{e}");
    }

    #[test]
    fn read_only_sqlite_urls() {
        let access = |u: &str| match parse(u).unwrap().target {
            Target::Sqlite { access, .. } => access,
            t => panic!("not sqlite: {t:?}"),
        };
        assert_eq!(access("sqlite:///x.db"), Access::ReadWrite);
        assert_eq!(access("sqlite:///x.db?mode=ro"), Access::ReadOnly);
        assert_eq!(access("sqlite:///x.db?immutable=1"), Access::Immutable);
        assert!(!parse("sqlite:///x.db?mode=ro").unwrap().writable());
        assert!(parse("postgresql://u@h/db").unwrap().writable());
        assert!(parse("sqlite:///x.db?mode=rox").is_err());
    }
}
