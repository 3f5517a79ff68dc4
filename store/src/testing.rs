//! A throwaway PostgreSQL server for tests: `initdb` into a folder, `pg_ctl start` on 127.0.0.1
//! on a free port, one database. Stopped (immediate) on drop.
//!
//! The binaries are found through `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`, else `PATH`; `scripts/test.sh` installs them when none is found.
//! PostgreSQL refuses to run as root: under euid 0 every command runs as the `postgres` user
//! through `runuser` (util-linux), in a folder chowned to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The database the server is created with.
const DB: &str = "mdbus";
/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A PostgreSQL server of its own for one test.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    /// Holds `data/`, the log and the Unix socket.
    dir: PathBuf,
    /// A folder of our own under the temp dir (root, and `dir` out of the postgres user's reach).
    own_dir: Option<PathBuf>,
    as_postgres: bool,
    port: u16,
    running: bool,
}

/// The database a measuring program names by `target`: `sqlite` (a file in `dir`), `postgres` (a
/// throwaway server in `dir`, returned to be kept alive while it is used) or a URL of its own.
pub fn scratch_db(target: &str, dir: &Path) -> Result<(crate::DbUrl, Option<PgServer>), String> {
    match target {
        "sqlite" => Ok((crate::DbUrl::Sqlite(dir.join("klines.db")), None)),
        "postgres" => {
            let pg = PgServer::start(dir)?;
            let url = pg.url().parse().map_err(|e| format!("{e}"))?;
            Ok((url, Some(pg)))
        }
        url => Ok((url.parse().map_err(|e| format!("{url}: {e}"))?, None)),
    }
}

/// The folder with `initdb`, `pg_ctl` and `postgres`, if PostgreSQL's server is installed.
pub fn postgres_bindir() -> Option<PathBuf> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&dir) {
            return Some(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.split('.').next()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has_server(d))
}

fn describe(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| format!("finding a free port: {e}"))
}

impl PgServer {
    /// Creates a cluster under `dir` (created if missing) and starts it; see the module docs.
    pub fn start(dir: &Path) -> Result<PgServer, String> {
        let bin = postgres_bindir().ok_or(
            "no PostgreSQL server binaries (initdb, pg_ctl) found via `pg_config --bindir`, \
             /usr/lib/postgresql/*/bin or PATH: run the tests with scripts/test.sh, which installs them \
             (apt-get install postgresql)",
        )?;
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        let as_postgres = rustix::process::geteuid().is_root();
        let mut server = PgServer { bin, dir, own_dir: None, as_postgres, port: 0, running: false };
        if as_postgres {
            server.hand_to_postgres_user()?;
        }
        server.initdb()?;
        let mut last = String::new();
        // A free port can be taken between our check and the server's bind: try a few.
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl_start() {
                Ok(()) => {
                    server.create_database()?;
                    return Ok(server);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `postgres://postgres@127.0.0.1:PORT/mdbus` (trust authentication, no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DB}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Fast shutdown: sessions are ended, the data stays.
    pub fn stop(&mut self) -> Result<(), String> {
        self.pg_ctl_stop("fast")
    }

    /// Starts the stopped server again, same port and data.
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.running {
            return Ok(());
        }
        self.pg_ctl_start()
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        // The postgres user may not be allowed into the caller's working directory.
        c.current_dir(&self.dir);
        c
    }

    fn run(&self, what: &str, mut c: Command) -> Result<(), String> {
        let out = c.output().map_err(|e| format!("{what}: cannot run {:?}: {e}", c.get_program()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed ({}): {}", out.status, describe(&out)))
        }
    }

    /// Running as root: the server runs as `postgres`, in a folder it owns and can reach.
    fn hand_to_postgres_user(&mut self) -> Result<(), String> {
        let known = Command::new("id").args(["-u", "postgres"]).output().is_ok_and(|o| o.status.success());
        if !known {
            return Err("running as root, and PostgreSQL will not run as root: it needs a `postgres` user \
                        to run as (scripts/test.sh installs the postgresql package, which creates it)"
                .into());
        }
        if self.postgres_can_use(&self.dir.clone()).is_err() {
            // Some folder above is closed to others (a home under /root, say): use our own.
            static N: AtomicU32 = AtomicU32::new(0);
            let own = std::env::temp_dir().join(format!(
                "mdbus-pg-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&own);
            std::fs::create_dir_all(&own).map_err(|e| format!("creating {}: {e}", own.display()))?;
            self.postgres_can_use(&own)?;
            self.dir = own.clone();
            self.own_dir = Some(own);
        }
        Ok(())
    }

    fn postgres_can_use(&self, dir: &Path) -> Result<(), String> {
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:"]).arg(dir);
        self.run("chown", chown)?;
        let mut test = Command::new("runuser");
        test.args(["-u", "postgres", "--", "test", "-w"]).arg(dir).current_dir("/");
        self.run(&format!("checking that the postgres user can write {}", dir.display()), test)
    }

    fn initdb(&self) -> Result<(), String> {
        let mut c = self.command("initdb");
        c.arg("-D").arg(self.data()).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "-N"]);
        self.run("initdb", c)
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        // Settings in a file of their own (paths with spaces need no shell quoting).
        let socket_dir = if self.dir.as_os_str().len() + 20 <= MAX_SOCKET_PATH {
            self.dir.display().to_string().replace('\'', "''")
        } else {
            String::new() // TCP only: the path is too long for a socket
        };
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{socket_dir}'\n\
             max_connections = 40\nshared_buffers = 32MB\n",
            self.port
        );
        let data = self.data();
        let main_conf = data.join("postgresql.conf");
        let text = std::fs::read_to_string(&main_conf).map_err(|e| format!("{}: {e}", main_conf.display()))?;
        if !text.contains("include 'mdbus.conf'") {
            std::fs::write(&main_conf, format!("{text}\ninclude 'mdbus.conf'\n"))
                .map_err(|e| format!("{}: {e}", main_conf.display()))?;
        }
        std::fs::write(data.join("mdbus.conf"), conf).map_err(|e| format!("{}: {e}", data.display()))?;
        let log = self.dir.join("postgres.log");
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(&data).arg("-l").arg(&log).args(["-w", "-t", "60", "start"]);
        match self.run("pg_ctl start", c) {
            Ok(()) => {
                self.running = true;
                Ok(())
            }
            Err(e) => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                // A start that timed out may still come up later: make sure it does not.
                let _ = self.pg_ctl_stop("immediate");
                Err(format!("{e}\n{}", tail.join("\n")))
            }
        }
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), String> {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(self.data()).args(["-m", mode, "-w", "-t", "60", "stop"]);
        let r = self.run("pg_ctl stop", c);
        if r.is_ok() {
            self.running = false;
        }
        r
    }

    fn create_database(&self) -> Result<(), String> {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.port);
        let mut client =
            postgres::Client::connect(&url, postgres::NoTls).map_err(|e| format!("connecting to {url}: {e}"))?;
        client.batch_execute(&format!("CREATE DATABASE {DB}")).map_err(|e| format!("creating database {DB}: {e}"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl_stop("immediate");
        }
        if let Some(own) = &self.own_dir {
            let _ = std::fs::remove_dir_all(own);
        }
    }
}
