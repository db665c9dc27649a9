//! The bank example with three replicas on one broker: 10,000 random commands from concurrent
//! clients, spread over all three replicas, leave byte-identical state and no negative balance.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use lockstep::{Client, Runtime, StateHandle, state_hash};
use lockstep_e2e::{TestBroker, wait_until};
use lockstep_example_bank::{Accounts, Bank, Service, router};
use serde_json::json;
use tokio::sync::oneshot;

const ACCOUNTS: usize = 12;
const COMMANDS: usize = 10_000;
const CLIENTS: usize = 16;

struct BankReplica {
    url: String,
    state: StateHandle<Accounts>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), lockstep::RuntimeError>>,
    _dir: tempfile::TempDir,
}

async fn start_replica(broker: &TestBroker, id: &str) -> BankReplica {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::builder(&broker.url)
        .service("bank")
        .replica(id)
        .types(["account.*", "funds.*"])
        .state_dir(dir.path())
        .snapshot_every(2_000)
        .build::<Bank>()
        .unwrap();
    let service = Service {
        client: Client::new(&broker.url).unwrap(),
        state: runtime.state(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(service)).await });
    let state = runtime.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    BankReplica {
        url,
        state,
        stop,
        task,
        _dir: dir,
    }
}

/// A tiny deterministic generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_agree_after_ten_thousand_random_commands() {
    let broker = TestBroker::start().await;
    let mut replicas = Vec::new();
    for id in ["bank-1", "bank-2", "bank-3"] {
        replicas.push(start_replica(&broker, id).await);
    }
    let urls: Arc<Vec<String>> = Arc::new(replicas.iter().map(|r| r.url.clone()).collect());
    let http = reqwest::Client::new();
    for a in 0..ACCOUNTS {
        let url = &urls[a % urls.len()];
        let response = http
            .post(format!("{url}/accounts/a{a}"))
            .json(&json!({"owner": format!("owner {a}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    // Every replica must know every account before transfers name them.
    for replica in &replicas {
        let state = replica.state.clone();
        wait_until(Duration::from_secs(20), "accounts on every replica", || {
            let state = state.clone();
            async move { state.read(|accounts, _| accounts.len()) == ACCOUNTS }
        })
        .await;
    }

    let deposited = Arc::new(AtomicI64::new(0));
    let withdrawn = Arc::new(AtomicI64::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (http, urls) = (http.clone(), Arc::clone(&urls));
        let (deposited, withdrawn, refused) = (
            Arc::clone(&deposited),
            Arc::clone(&withdrawn),
            Arc::clone(&refused),
        );
        clients.spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
            for _ in 0..COMMANDS / CLIENTS {
                let url = &urls[rng.below(urls.len() as u64) as usize];
                let account = format!("a{}", rng.below(ACCOUNTS as u64));
                let amount = 1 + rng.below(100) as i64;
                let (path, body) = match rng.below(10) {
                    0..=3 => ("deposit", json!({"amount": amount})),
                    4..=7 => ("withdraw", json!({"amount": amount})),
                    _ => {
                        let to = format!("a{}", rng.below(ACCOUNTS as u64));
                        if to == account {
                            continue;
                        }
                        ("transfer", json!({"to": to, "amount": amount}))
                    }
                };
                let response = http
                    .post(format!("{url}/accounts/{account}/{path}"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                match (response.status().as_u16(), path) {
                    (200, "deposit") => {
                        deposited.fetch_add(amount, Relaxed);
                    }
                    (200, "withdraw") => {
                        withdrawn.fetch_add(amount, Relaxed);
                    }
                    (200, _) => {}
                    (409, _) => {
                        refused.fetch_add(1, Relaxed); // insufficient funds or contention
                    }
                    (status, _) => panic!("{path} answered {status}"),
                }
            }
        });
    }
    while let Some(done) = clients.join_next().await {
        done.unwrap();
    }

    let head = broker.head().await.position;
    for replica in &replicas {
        let state = replica.state.clone();
        wait_until(Duration::from_secs(60), "every replica at the head", || {
            let state = state.clone();
            async move { state.position() == head }
        })
        .await;
    }
    let hashes: Vec<String> = replicas
        .iter()
        .map(|r| {
            r.state
                .read(|s, _| state_hash(s).unwrap().to_hex().to_string())
        })
        .collect();
    assert_eq!(hashes[0], hashes[1]);
    assert_eq!(hashes[0], hashes[2]);
    let (total, lowest) = replicas[0].state.read(|accounts, _| {
        (
            accounts.values().map(|a| a.balance).sum::<i64>(),
            accounts.values().map(|a| a.balance).min().unwrap(),
        )
    });
    assert!(lowest >= 0, "a balance went negative: {lowest}");
    assert_eq!(
        total,
        deposited.load(Relaxed) - withdrawn.load(Relaxed),
        "money was created or lost"
    );
    assert!(
        head > (COMMANDS / 2) as u64,
        "most commands became events ({head})"
    );
    println!(
        "head {head}, {} commands refused (funds or contention), state hash {}",
        refused.load(Relaxed),
        hashes[0]
    );
    for replica in replicas {
        let _ = replica.stop.send(());
        replica.task.await.unwrap().unwrap();
    }
}
