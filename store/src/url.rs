//! Database URLs: `sqlite:PATH` or `postgres://…`, parsed once from the command line or the config
//! file, and printed without the password.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the K-lines live.
#[derive(Clone, PartialEq, Eq)]
pub enum DbUrl {
    /// A SQLite database file (created with its folder if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?…]`), as given;
    /// connections are plain TCP or a Unix socket, without TLS.
    Postgres(String),
}

/// The database URL could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DbUrlParseError(String);

const EXPECTED: &str = "expected sqlite:PATH or postgres://USER@HOST:PORT/DB";

impl FromStr for DbUrl {
    type Err = DbUrlParseError;

    fn from_str(s: &str) -> Result<DbUrl, DbUrlParseError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("sqlite://").or_else(|| s.strip_prefix("sqlite:")) {
            if rest.is_empty() {
                return Err(DbUrlParseError(format!("database URL {s:?} names no file ({EXPECTED})")));
            }
            return Ok(DbUrl::Sqlite(PathBuf::from(rest)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            // Check it now, so that a typo fails at start-up rather than at the first write.
            return match postgres::Config::from_str(s) {
                Ok(_) => Ok(DbUrl::Postgres(s.to_owned())),
                Err(e) => Err(DbUrlParseError(format!("invalid PostgreSQL URL {}: {e}", redact(s)))),
            };
        }
        // Print only the scheme: the rest may hold a password.
        let scheme = s.split_once(':').map_or("", |(scheme, _)| scheme);
        if scheme.is_empty() {
            Err(DbUrlParseError(format!("database URL without a scheme ({EXPECTED})")))
        } else {
            Err(DbUrlParseError(format!("unsupported database URL scheme {scheme:?} ({EXPECTED})")))
        }
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            DbUrl::Postgres(u) => f.write_str(&redact(u)),
        }
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

/// `url` with the password (in the user info or a `password=` query parameter) replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let mut out = format!("{scheme}://");
    match main.rfind('@') {
        Some(at) => {
            let (userinfo, host) = (&main[..at], &main[at..]);
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push_str(":***");
                }
                None => out.push_str(userinfo),
            }
            out.push_str(host);
        }
        None => out.push_str(main),
    }
    if let Some(q) = query {
        out.push('?');
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sqlite_urls_parse_with_one_or_two_slashes() {
        assert_eq!("sqlite:data/k.db".parse::<DbUrl>().unwrap(), DbUrl::Sqlite("data/k.db".into()));
        assert_eq!("sqlite:///tmp/k.db".parse::<DbUrl>().unwrap(), DbUrl::Sqlite("/tmp/k.db".into()));
        assert_eq!("sqlite:/tmp/k.db".parse::<DbUrl>().unwrap(), DbUrl::Sqlite("/tmp/k.db".into()));
        assert!("sqlite:".parse::<DbUrl>().is_err());
        assert_eq!(DbUrl::Sqlite("/tmp/k.db".into()).to_string(), "sqlite:/tmp/k.db");
    }

    #[test]
    fn postgres_urls_parse_and_print_without_the_password() {
        let u: DbUrl = "postgres://md:s3cret@db.local:5433/market?application_name=x".parse().unwrap();
        assert_eq!(u, DbUrl::Postgres("postgres://md:s3cret@db.local:5433/market?application_name=x".into()));
        assert_eq!(u.to_string(), "postgres://md:***@db.local:5433/market?application_name=x");
        assert!(!format!("{u:?}").contains("s3cret"));
        let u: DbUrl = "postgresql://md@localhost/market?password=hunter2&sslmode=disable".parse().unwrap();
        assert_eq!(u.to_string(), "postgresql://md@localhost/market?password=***&sslmode=disable");
        assert_eq!("postgres://127.0.0.1:5432/x".parse::<DbUrl>().unwrap().to_string(), "postgres://127.0.0.1:5432/x");
    }

    #[test]
    fn other_urls_are_refused_without_echoing_credentials() {
        let e = "mysql://root:topsecret@h/db".parse::<DbUrl>().unwrap_err().to_string();
        assert!(e.contains("\"mysql\"") && e.contains("sqlite:PATH") && !e.contains("topsecret"), "{e}");
        assert!("k.db".parse::<DbUrl>().is_err());
        let e = "postgres://u:pw@h:notaport/db".parse::<DbUrl>().unwrap_err().to_string();
        assert!(!e.contains(":pw@"), "{e}");
    }
}
