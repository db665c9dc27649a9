//! A bank replica killed with SIGKILL mid-stream restarts from its snapshot and converges.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{balances, free_port, start_bank};

use lockstep::{Client, NewEvent, Runtime};
use lockstep_example_bank::Bank;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_restarts_from_its_snapshot_and_converges() {
    let data = tempfile::tempdir().unwrap();
    let broker =
        lockstep_broker::Broker::open(lockstep_broker::Config::with_data_dir(data.path())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(lockstep_broker::serve(
        listener,
        broker,
        std::future::pending(),
    ));
    let client = Client::new(&url).unwrap();

    const ACCOUNTS: usize = 8;
    let event = |t: &str, key: usize, data: serde_json::Value| NewEvent {
        key: Some(format!("a{key}")),
        ..NewEvent::json(t, &data).unwrap()
    };
    let opens: Vec<_> = (0..ACCOUNTS)
        .map(|a| event("account.opened", a, serde_json::json!({"owner": "o"})))
        .collect();
    client.publish(&opens).await.unwrap();

    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut bank, restored) = start_bank(
        home.path(),
        "bank-k",
        port,
        &url,
        &[("BANK_SNAPSHOT_EVERY", "100")],
    );
    assert_eq!(restored, 0, "a new replica starts empty");
    // Publish deposits in the background while the replica applies them.
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for round in 0..60 {
                let batch: Vec<_> = (0..50)
                    .map(|i| {
                        event(
                            "funds.deposited",
                            (round + i) % ACCOUNTS,
                            serde_json::json!({"amount": i + 1}),
                        )
                    })
                    .collect();
                client.publish(&batch).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Kill it once it has applied a good part of the stream, while events still arrive.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the replica never got going");
        if let Some(b) = balances(port, ACCOUNTS).await {
            if b.iter().sum::<i64>() > 5_000 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bank.kill().unwrap();
    bank.wait().unwrap();
    let snapshots = home.path().join("bank-state/bank-k/replica.redb");
    assert!(snapshots.exists(), "the replica kept snapshots");
    publisher.await.unwrap();

    // A reference replica in this process, from the beginning.
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = Runtime::builder(&url)
        .service("bank")
        .replica("reference")
        .types(["account.*", "funds.*"])
        .state_dir(reference_dir.path())
        .build::<Bank>()
        .unwrap();
    let reference_state = reference.state();
    tokio::spawn(reference.run(std::future::pending()));

    let (mut bank, restored) = start_bank(
        home.path(),
        "bank-k",
        port,
        &url,
        &[("BANK_SNAPSHOT_EVERY", "100")],
    );
    assert!(restored > 0, "the restarted replica restores its snapshot");
    let head = client.head().await.unwrap().position;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "the restarted replica did not converge"
        );
        let expected: Option<Vec<i64>> = reference_state.read(|accounts, position| {
            (position == head).then(|| accounts.values().map(|a| a.balance).collect())
        });
        if let (Some(expected), Some(got)) = (expected, balances(port, ACCOUNTS).await) {
            if expected == got {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bank.kill().unwrap();
    bank.wait().unwrap();
}
