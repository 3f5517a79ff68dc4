//! Helpers for end-to-end tests: real `mdbus` processes on a unique bus each.
#![allow(dead_code, clippy::unwrap_used)]

pub mod oracle;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_mdbus");

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A bus name no other test (or test run) uses.
pub fn unique_bus(tag: &str) -> String {
    format!("t{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), tag)
}

/// Where test processes keep bus data (write-ahead logs): never the user's home.
pub fn data_root() -> PathBuf {
    std::env::temp_dir().join("mdbus-test-data")
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("mdbus-test-{}-{}", unique_bus(tag), std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        // MDBUS_KEEP_TMP=1 keeps it (logs, databases, recordings) for a post-mortem.
        if std::env::var_os("MDBUS_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (SIGKILL) if the test ends without stopping it.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        let child = Command::new(EXE)
            .args(args)
            .env("RUST_LOG", "info")
            .env("MDBUS_DATA_DIR", data_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { child, name: name.to_owned() }
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGTERM, then wait (SIGKILL after `limit`). Returns (success, stderr).
    pub fn stop(self, limit: Duration) -> (bool, String) {
        self.signal(rustix::process::Signal::TERM);
        self.wait(limit)
    }

    /// Waits for exit (SIGKILL after `limit`). Returns (success, stderr).
    pub fn wait(mut self, limit: Duration) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status.is_some_and(|s| s.success()), err)
    }

    /// Stdout as a channel of lines, read on a thread.
    pub fn lines(&mut self) -> mpsc::Receiver<String> {
        let out: ChildStdout = self.child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Shared-memory files of `bus` other than iceoryx2's persistent node counter.
pub fn leftover_shm(bus: &str) -> Vec<String> {
    let prefix = format!("mdbus_{bus}_");
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && !n.ends_with(".global_mgmt"))
        .collect()
}

/// Removes the bus's persistent node counter and its data once a test is done with the bus.
pub fn forget_bus(bus: &str) {
    let _ = std::fs::remove_dir_all(data_root().join(bus));
    let prefix = format!("mdbus_{bus}_");
    if let Ok(d) = std::fs::read_dir("/dev/shm") {
        for e in d.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Receives lines until `pred` says stop, or panics after `limit`.
pub fn collect_until(
    rx: &mpsc::Receiver<String>,
    limit: Duration,
    mut pred: impl FnMut(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        let left = limit
            .checked_sub(start.elapsed())
            .unwrap_or_else(|| panic!("watchdog: gave up after {limit:?} with {} lines", got.len()));
        match rx.recv_timeout(left) {
            Ok(line) => {
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                let done = pred(&v);
                got.push(v);
                if done {
                    return got;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("watchdog: gave up after {limit:?} with {} lines", got.len())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("output ended after {} lines", got.len())
            }
        }
    }
}

/// The Python interpreter of a virtual environment with `tests/py/requirements.txt` installed
/// (the real, unmodified client packages the gateway tests drive). Created on first use under
/// the target directory and shared by all tests (a file lock serialises the set-up);
/// `MDBUS_PYTHON` names an existing interpreter instead.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MDBUS_PYTHON") {
        return PathBuf::from(p);
    }
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let reqs_path = manifest.join("tests/py/requirements.txt");
    let reqs = std::fs::read_to_string(&reqs_path).unwrap();
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyenv");
    let py = root.join("bin/python");
    let stamp = root.join(".installed");
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lock = std::fs::File::create(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyenv.lock")).unwrap();
    lock.lock().unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) && py.exists() {
        return py;
    }
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed (the gateway tests need python3 with venv and pip, and PyPI):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = std::fs::remove_dir_all(&root);
    run(Command::new("python3").arg("-m").arg("venv").arg(&root), "python3 -m venv");
    run(
        Command::new(&py).args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "-r"]).arg(&reqs_path),
        "pip install -r tests/py/requirements.txt",
    );
    std::fs::write(&stamp, &reqs).unwrap();
    py
}

/// A script under `tests/py/`.
pub fn py_script(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(name)
}

/// A running `mdbus gateway` on a free loopback port.
pub struct Gateway {
    pub proc: Proc,
    pub port: u16,
}

impl Proc {
    /// Spawns a server that prints `… ws://127.0.0.1:PORT …` when ready; returns it and the port.
    pub fn spawn_listening(name: &str, args: &[&str]) -> (Proc, u16) {
        let mut proc = Proc::spawn(name, args);
        let lines = proc.lines();
        let first = lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{name} did not start"));
        let port = first
            .split("ws://127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {first:?}"));
        // Keep draining stdout so that the process never blocks on it.
        std::thread::spawn(move || while lines.recv().is_ok() {});
        (proc, port)
    }
}

impl Gateway {
    pub fn start(bus: &str, extra: &[&str]) -> Gateway {
        let mut args = vec!["gateway", "--bus", bus, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (proc, port) = Proc::spawn_listening("gateway", &args);
        Gateway { proc, port }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// GET `path` over plain HTTP/1.1; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path, &[])
    }

    /// The counters from `/health`.
    pub fn stats(&self) -> serde_json::Value {
        let (status, body) = self.get("/health");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["stats"].clone()
    }
}

/// GET `path` on 127.0.0.1:`port` with extra headers; returns (status, body).
pub fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A config file for `mdbus demo` whose metrics endpoints take free ports (tests run demos side
/// by side; the embedded defaults would have them race for the same ports).
pub fn demo_config(dir: &TempDir) -> String {
    let path = dir.0.join("demo.toml");
    std::fs::write(
        &path,
        "[metrics]\nbroker = \"127.0.0.1:0\"\ngateway = \"127.0.0.1:0\"\nmock_exchange = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    path.display().to_string()
}
