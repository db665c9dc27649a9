//! A real `lockstep serve` child process on an ephemeral port, for crash and CLI tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Output;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `lockstep` binary under test.
pub fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// A broker child process. Killed (SIGKILL) on drop if still running.
pub struct BrokerProcess {
    pub child: Child,
    pub url: String,
}

impl BrokerProcess {
    /// Starts `lockstep serve` on `data` and waits until it listens.
    pub fn start(data: &Path) -> Self {
        let mut child = lockstep()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(data)
            .env("RUST_LOG", "info")
            // Tests count the events they publish: no automatic barriers.
            .env("LOCKSTEP_BARRIER_EVERY", "0")
            .env("LOCKSTEP_BARRIER_INTERVAL_MS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lockstep serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent && let Some(addr) = line.split("addr=").nth(1) {
                    let addr = addr
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("broker did not report its address within 30 s");
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }

    /// Kills the broker with SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the broker with SIGTERM and waits for it to exit cleanly.
    pub fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "broker exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "broker did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `lockstep --url URL ARGS…` and returns what it printed.
pub fn run(url: &str, args: &[&str]) -> Output {
    lockstep()
        .arg("--url")
        .arg(url)
        .args(args)
        .output()
        .unwrap()
}

/// A command's standard output.
pub fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A failed command prints exactly one line, starting with "error:", and exits non-zero.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure: {}", stdout(out));
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.lines().count(), 1, "one line, got: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}
