//! Helpers for end-to-end tests: real `mdbus` processes on a unique bus each.
#![allow(dead_code, clippy::unwrap_used)]

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
        let _ = std::fs::remove_dir_all(&self.0);
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
