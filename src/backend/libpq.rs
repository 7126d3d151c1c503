//! libpq's conventions for what a PostgreSQL URL leaves out, applied when a connection
//! opens, as libpq (and so psycopg2) applies them: `PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, `PGAPPNAME`, the password file (`PGPASSFILE`, else
//! `~/.pgpass`), the server's default socket directory, and the TLS settings `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGSSLCRL` with their default files in
//! `~/.postgresql`. (`PGCONNECT_TIMEOUT` is read with the URL: `url::parse`.)

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres::Config;

use crate::error::{Error, Result};
use crate::url::{SslMode, TlsParams};

/// Where the server's certificate chain must lead.
#[derive(Debug, Clone, PartialEq)]
pub enum Roots {
    /// Nowhere: the certificate is not checked.
    Unchecked,
    /// The PEM certificates of this file.
    File(PathBuf),
    /// The system's trusted roots (`sslrootcert=system`).
    System,
}

/// What a connection's TLS does.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsPlan {
    pub mode: SslMode,
    pub roots: Roots,
    /// Whether the certificate must name the host (`verify-full`).
    pub check_name: bool,
    /// A client certificate (PEM chain) and its private key.
    pub client: Option<(PathBuf, PathBuf)>,
    /// Revoked certificates (a PEM file of CRLs).
    pub crl: Option<PathBuf>,
}

/// A connection's settings, with the URL's gaps filled.
pub struct Settings {
    pub config: Config,
    pub tls: TlsPlan,
    /// Said after a failed authentication: why the password file gave no password.
    pub password_note: Option<String>,
}

/// The settings for `conninfo` and `params` (a parsed URL's), with `var` giving the
/// environment.
pub fn settings(
    conninfo: &str,
    params: &TlsParams,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    let env_ports = var("PGPORT")
        .map(|ports| {
            ports
                .split(',')
                .map(|p| p.trim().parse::<u16>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| Error::interface(format!("PGPORT={ports:?} is not a port number")))
        })
        .transpose()?;
    let conninfo = with_ports(conninfo, env_ports.as_deref());
    let mut config = Config::from_str(&conninfo)
        .map_err(|e| Error::interface(format!("malformed PostgreSQL URL: {e}")))?;
    if config.get_ports().is_empty() {
        for port in env_ports.unwrap_or_default() {
            config.port(port);
        }
    }
    let port = config.get_ports().first().copied().unwrap_or(5432);
    if config.get_hosts().is_empty() {
        match var("PGHOST") {
            Some(hosts) => {
                for h in hosts.split(',') {
                    config.host(h.trim());
                }
            }
            None => {
                config.host(default_host(port));
            }
        }
    }
    if config.get_user().is_none() {
        let user = var("PGUSER")
            .or_else(|| var("USER"))
            .or_else(|| var("LOGNAME"))
            .ok_or_else(|| {
                Error::interface(
                    "no PostgreSQL user: give one in the URL (postgresql://USER@HOST/DB) or in PGUSER",
                )
            })?;
        config.user(&user);
    }
    let user = config.get_user().unwrap_or_default().to_string();
    if config.get_dbname().is_none() {
        config.dbname(var("PGDATABASE").as_deref().unwrap_or(&user));
    }
    if config.get_application_name().is_none() {
        if let Some(name) = var("PGAPPNAME") {
            config.application_name(&name);
        }
    }
    let mut password_note = None;
    if config.get_password().is_none() {
        if let Some(password) = var("PGPASSWORD") {
            config.password(password);
        } else {
            let file = var("PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| home(&var).map(|h| h.join(".pgpass")));
            if let Some(file) = file {
                let host = match config.get_hosts().first() {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => "localhost".to_string(),
                };
                let db = config.get_dbname().unwrap_or_default().to_string();
                match password_from_file(&file, &host, port, &db, &user) {
                    Ok(Some(password)) => {
                        config.password(password);
                    }
                    Ok(None) => {}
                    Err(note) => password_note = Some(note),
                }
            }
        }
    }
    let tls = tls_plan(params, &var)?;
    let over_sockets = config
        .get_hosts()
        .iter()
        .all(|h| !matches!(h, Host::Tcp(_)));
    // libpq never uses TLS on a Unix-domain socket (the server would refuse it there).
    config.ssl_mode(match tls.mode {
        _ if over_sockets => PgSslMode::Disable,
        SslMode::Disable | SslMode::Allow => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    Ok(Settings {
        config,
        tls,
        password_note,
    })
}

/// `conninfo` with a port for each host of the URL that names none: the URL's `port=`
/// parameter's, else `env_ports` (`PGPORT`'s). The URL parser would otherwise take 5432
/// for such a host (and add the `port=` ports after it).
fn with_ports(conninfo: &str, env_ports: Option<&[u16]>) -> String {
    let Some((scheme, rest)) = conninfo.split_once("://") else {
        return conninfo.to_string();
    };
    let (base, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
    let start = base.rfind('@').map_or(0, |at| at + 1);
    let end = start + base[start..].find('/').unwrap_or(base.len() - start);
    let hosts = &base[start..end];
    let params: Vec<&str> = query
        .trim_start_matches('?')
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    let given: Option<Vec<u16>> = params
        .iter()
        .find_map(|p| p.strip_prefix("port="))
        .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect());
    let Some(ports) = given.as_deref().or(env_ports).filter(|_| !hosts.is_empty()) else {
        return conninfo.to_string();
    };
    let filled: Vec<String> = hosts
        .split(',')
        .enumerate()
        .map(|(i, host)| {
            let after_ipv6 = host.rfind(']').map_or(host, |b| &host[b..]);
            match ports.get(i).or(ports.first()) {
                Some(port) if !after_ipv6.contains(':') => format!("{host}:{port}"),
                _ => host.to_string(),
            }
        })
        .collect();
    let kept: Vec<&str> = params
        .into_iter()
        .filter(|p| !p.starts_with("port="))
        .collect();
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    format!(
        "{scheme}://{}{}{}{query}",
        &base[..start],
        filled.join(","),
        &base[end..]
    )
}

fn home(var: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    var("HOME").map(PathBuf::from)
}

/// libpq's default host: the server's socket directory when its socket is there
/// (Debian's `/var/run/postgresql`, else `/tmp`), otherwise `localhost`.
fn default_host(port: u16) -> String {
    ["/var/run/postgresql", "/tmp"]
        .into_iter()
        .find(|dir| Path::new(dir).join(format!(".s.PGSQL.{port}")).exists())
        .unwrap_or("localhost")
        .to_string()
}

/// The TLS plan: the URL's settings, else the environment's, else libpq's defaults.
fn tls_plan(params: &TlsParams, var: &dyn Fn(&str) -> Option<String>) -> Result<TlsPlan> {
    let mode = match &params.mode {
        Some(m) => Some(*m),
        None => var("PGSSLMODE").map(|m| SslMode::parse(&m)).transpose()?,
    };
    let dot = home(var).map(|h| h.join(".postgresql"));
    let default_file = |name: &str| dot.as_ref().map(|d| d.join(name)).filter(|p| p.is_file());
    let rootcert = params.rootcert.clone().or_else(|| var("PGSSLROOTCERT"));
    let system = rootcert.as_deref() == Some("system");
    let mode = match mode {
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(m) if system && m != SslMode::VerifyFull => {
            return Err(Error::interface(format!(
                "sslrootcert=system needs sslmode=verify-full (not {}): the system's roots vouch for host names",
                m.name()
            )))
        }
        Some(m) => m,
    };
    let root_file = rootcert
        .filter(|_| !system)
        .map(PathBuf::from)
        .or_else(|| default_file("root.crt"));
    let roots = if system {
        Roots::System
    } else {
        match (mode, root_file) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                return Err(Error::operational(format!(
                    "sslmode={} checks the server's certificate, but there is no root certificate file \
                     (~/.postgresql/root.crt): give sslrootcert=FILE, or sslrootcert=system for the \
                     system's trusted roots, or use sslmode=require to connect without checking",
                    mode.name()
                )))
            }
            // A root certificate file makes `require` check the chain (libpq's rule).
            (SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull, Some(f)) => Roots::File(f),
            _ => Roots::Unchecked,
        }
    };
    let cert = params
        .cert
        .clone()
        .or_else(|| var("PGSSLCERT").map(PathBuf::from));
    let key = params
        .key
        .clone()
        .or_else(|| var("PGSSLKEY").map(PathBuf::from));
    let client = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (Some(c), None) => {
            let key = dot
                .as_ref()
                .map(|d| d.join("postgresql.key"))
                .ok_or_else(|| {
                    Error::interface("sslcert is given without sslkey: give the client key too")
                })?;
            Some((c, key))
        }
        (None, Some(k)) => {
            return Err(Error::interface(format!(
                "sslkey={} is given without sslcert: give the client certificate too",
                k.display()
            )))
        }
        (None, None) => default_file("postgresql.crt")
            .and_then(|c| default_file("postgresql.key").map(|k| (c, k))),
    };
    let crl = params
        .crl
        .clone()
        .or_else(|| var("PGSSLCRL").map(PathBuf::from))
        .or_else(|| default_file("root.crl"));
    Ok(TlsPlan {
        mode,
        check_name: mode == SslMode::VerifyFull,
        roots,
        client,
        crl,
    })
}

/// The password the password file gives for this connection: `Ok(None)` when no line
/// matches or there is no file, `Err(why)` when the file is not used (libpq ignores a file
/// that others can read, and warns).
fn password_from_file(
    file: &Path,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> std::result::Result<Option<String>, String> {
    let Ok(meta) = std::fs::metadata(file) else {
        return Ok(None);
    };
    if !meta.is_file() {
        return Err(format!(
            "the password file {} is not a plain file, so it was not read",
            file.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "the password file {} was not read: others can read it (chmod 0600 it)",
                file.display()
            ));
        }
    }
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!(
            "the password file {} could not be read: {e}",
            file.display()
        )
    })?;
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_fields(line);
        if fields.len() < 5 {
            continue;
        }
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Ok(Some(fields[4].clone()));
        }
    }
    Ok(None)
}

/// A password-file line's fields: split at `:`, with `\:` and `\\` standing for `:` and
/// `\`; the fifth field (the password) runs to the end of the line.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
            c => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env<'a>(vars: &'a HashMap<&str, String>) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.get(k).cloned()
    }

    fn settings_of(url: &str, vars: &HashMap<&str, String>) -> Result<Settings> {
        settings(url, &TlsParams::default(), &with_env(vars))
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let vars: HashMap<&str, String> = [
            ("PGHOST", "db.example,db2.example"),
            ("PGPORT", "6543"),
            ("PGUSER", "alice"),
            ("PGPASSWORD", "from-env"),
            ("PGDATABASE", "research"),
            ("PGAPPNAME", "cmbagent"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        let s = settings_of("postgresql://", &vars).unwrap();
        let c = &s.config;
        assert_eq!(
            c.get_hosts(),
            &[
                Host::Tcp("db.example".into()),
                Host::Tcp("db2.example".into())
            ]
        );
        assert_eq!(c.get_ports(), &[6543]);
        assert_eq!(c.get_user(), Some("alice"));
        assert_eq!(c.get_password(), Some(&b"from-env"[..]));
        assert_eq!(c.get_dbname(), Some("research"));
        assert_eq!(c.get_application_name(), Some("cmbagent"));
        // The URL wins over the environment.
        let s = settings_of("postgresql://bob:pw@h:1/db?application_name=x", &vars).unwrap();
        assert_eq!(s.config.get_user(), Some("bob"));
        assert_eq!(s.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(s.config.get_dbname(), Some("db"));
        assert_eq!(s.config.get_ports(), &[1]);
        assert_eq!(s.config.get_application_name(), Some("x"));
        // The database defaults to the user's name; a Unix socket directory is a host.
        let vars: HashMap<&str, String> = [("PGUSER", "carol"), ("PGHOST", "/run/pg")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        let s = settings_of("postgresql://", &vars).unwrap();
        assert_eq!(s.config.get_dbname(), Some("carol"));
        assert_eq!(s.config.get_hosts(), &[Host::Unix("/run/pg".into())]);
        assert_eq!(s.config.get_ssl_mode(), PgSslMode::Disable);
        // PGPORT applies to a host the URL gives without a port.
        let vars: HashMap<&str, String> = [("PGPORT", "6543"), ("PGUSER", "u")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        let ports = |url: &str| settings_of(url, &vars).unwrap().config.get_ports().to_vec();
        assert_eq!(ports("postgresql://u:p@h/db"), vec![6543]);
        assert_eq!(ports("postgresql://h:1,[::1]/db"), vec![1, 6543]);
        assert_eq!(ports("postgresql://h:7/db"), vec![7]);
        assert_eq!(ports("postgresql://h/db?port=8"), vec![8]);
        let bad: HashMap<&str, String> = [("PGPORT", "five"), ("PGUSER", "u")]
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        let e = settings_of("postgresql://h/db", &bad).err().unwrap();
        assert!(e.message.contains("PGPORT"), "{}", e.message);
        let e = settings_of("postgresql://h/db", &HashMap::new())
            .err()
            .unwrap();
        assert!(e.message.contains("PGUSER"), "{}", e.message);
    }

    #[test]
    fn the_password_file_is_read_as_libpq_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:5432:*:*:no\nh:5432:db:u\\:x:colon\nh:*:*:u:p\\\\w:d\n*:*:*:*:fallback\n",
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let lookup = |host: &str, user: &str| password_from_file(&file, host, 5432, "db", user);
        assert_eq!(lookup("h", "u:x"), Ok(Some("colon".into())));
        assert_eq!(lookup("h", "u"), Ok(Some("p\\w:d".into())));
        assert_eq!(lookup("elsewhere", "z"), Ok(Some("fallback".into())));
        let vars: HashMap<&str, String> = [("PGPASSFILE", file.display().to_string())]
            .into_iter()
            .collect();
        let s = settings_of("postgresql://u@h:5432/db", &vars).unwrap();
        assert_eq!(s.config.get_password(), Some(&b"p\\w:d"[..]));
        assert!(s.password_note.is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            let s = settings_of("postgresql://u@h:5432/db", &vars).unwrap();
            assert_eq!(s.config.get_password(), None);
            let note = s.password_note.unwrap();
            assert!(note.contains("chmod 0600"), "{note}");
            assert!(!note.contains("p\\w"), "{note}");
        }
        assert_eq!(
            password_from_file(&dir.path().join("none"), "h", 1, "d", "u"),
            Ok(None)
        );
    }

    #[test]
    fn tls_settings_follow_libpq() {
        let dir = tempfile::tempdir().unwrap();
        let dot = dir.path().join(".postgresql");
        std::fs::create_dir(&dot).unwrap();
        let home: HashMap<&str, String> = [("HOME", dir.path().display().to_string())]
            .into_iter()
            .collect();
        let plan =
            |params: TlsParams, vars: &HashMap<&str, String>| tls_plan(&params, &with_env(vars));
        let default = plan(TlsParams::default(), &home).unwrap();
        assert_eq!(default.mode, SslMode::Prefer);
        assert_eq!(default.roots, Roots::Unchecked);
        assert_eq!(default.client, None);
        let full = TlsParams {
            mode: Some(SslMode::VerifyFull),
            ..TlsParams::default()
        };
        let e = plan(full.clone(), &home).unwrap_err();
        assert!(e.message.contains("sslrootcert"), "{}", e.message);
        // The default files in ~/.postgresql are used when they are there.
        for f in ["root.crt", "postgresql.crt", "postgresql.key", "root.crl"] {
            std::fs::write(dot.join(f), "x").unwrap();
        }
        let p = plan(full, &home).unwrap();
        assert_eq!(p.roots, Roots::File(dot.join("root.crt")));
        assert!(p.check_name);
        assert_eq!(
            p.client,
            Some((dot.join("postgresql.crt"), dot.join("postgresql.key")))
        );
        assert_eq!(p.crl, Some(dot.join("root.crl")));
        // With a root certificate file, require checks the chain but not the name.
        let p = plan(
            TlsParams {
                mode: Some(SslMode::Require),
                ..TlsParams::default()
            },
            &home,
        )
        .unwrap();
        assert_eq!(p.roots, Roots::File(dot.join("root.crt")));
        assert!(!p.check_name);
        // PGSSLMODE applies when the URL gives no sslmode; sslrootcert=system means
        // verify-full.
        let mut vars = home.clone();
        vars.insert("PGSSLMODE", "disable".into());
        assert_eq!(
            plan(TlsParams::default(), &vars).unwrap().mode,
            SslMode::Disable
        );
        let system = TlsParams {
            rootcert: Some("system".into()),
            ..TlsParams::default()
        };
        assert_eq!(plan(system.clone(), &home).unwrap().roots, Roots::System);
        let e = plan(system, &vars).unwrap_err();
        assert!(e.message.contains("verify-full"), "{}", e.message);
    }
}
