//! Helpers shared by the bank's process tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::process::{Child, Command};

use lockstep::Client;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a broker in this process with automatic barriers off (tests append them); returns its
/// URL and a client.
pub async fn start_broker(data: &std::path::Path) -> (String, Client) {
    let mut config = lockstep_broker::Config::with_data_dir(data);
    config.barrier_every = 0;
    config.barrier_interval_ms = 0;
    let broker = lockstep_broker::Broker::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(lockstep_broker::serve(
        listener,
        broker,
        std::future::pending(),
    ));
    let client = Client::new(&url).unwrap();
    (url, client)
}

/// Starts the bank binary as replica `replica` in `dir` with extra environment; returns it and
/// the position it restored its state at.
pub fn start_bank(
    dir: &std::path::Path,
    replica: &str,
    port: u16,
    broker: &str,
    env: &[(&str, &str)],
) -> (Child, u64) {
    use std::io::BufRead as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_bank"))
        .args([replica, &port.to_string(), broker])
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let restored = line
        .rsplit("restored at position ")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    (child, restored)
}

/// Balances of accounts `a0..a{accounts}` as a replica serves them; `None` until it knows them all.
pub async fn balances(port: u16, accounts: usize) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    for a in 0..accounts {
        let response = reqwest::get(format!("http://127.0.0.1:{port}/accounts/a{a}"))
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body: serde_json::Value = response.json().await.ok()?;
        out.push(body["balance"].as_i64()?);
    }
    Some(out)
}

/// Kills the process when dropped, so a failing test leaves no replica behind.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
