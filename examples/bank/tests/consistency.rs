//! Consistency with real processes: three bank replicas, one deliberately nondeterministic for
//! withdrawals. Verification names it at the first barrier after a withdrawal; a rollback to a
//! mark taken before returns all three to the mark's state hash; the superseded withdrawals stay
//! readable; replicas started afterwards, by replay or from the verified snapshot, agree.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Killed, free_port, start_bank, start_broker};
use lockstep::{Client, MarkAt, MarkAtName, NewEvent, ReadRequest, RollbackTo, Verdict};

const ACCOUNTS: usize = 6;

fn event(t: &str, account: usize, data: serde_json::Value) -> NewEvent {
    NewEvent {
        key: Some(format!("a{account}")),
        ..NewEvent::json(t, &data).unwrap()
    }
}

/// The state hash each replica reported at `barrier`, once all of `replicas` have.
async fn reports_at(client: &Client, barrier: u64, replicas: &[&str]) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = client.verify(Some("bank")).await.unwrap();
        let got: BTreeMap<String, String> = v
            .services
            .iter()
            .flat_map(|s| &s.replicas)
            .filter(|r| r.position == barrier && replicas.contains(&r.replica.as_str()))
            .map(|r| (r.replica.clone(), r.state_hash.clone()))
            .collect();
        if got.len() == replicas.len() {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "replicas {replicas:?} did not all report at barrier {barrier}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `lockstep` binary, when this build has it (`cargo test --workspace` builds it).
fn lockstep_cli() -> Option<std::path::PathBuf> {
    let bank = std::path::PathBuf::from(env!("CARGO_BIN_EXE_bank"));
    let cli = bank.with_file_name(format!("lockstep{}", std::env::consts::EXE_SUFFIX));
    cli.exists().then_some(cli)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn divergence_is_named_and_a_rollback_to_a_mark_restores_every_replica() {
    let data = tempfile::tempdir().unwrap();
    let (url, client) = start_broker(data.path()).await;
    let home = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for (name, env) in [
        ("bank-1", vec![]),
        ("bank-2", vec![]),
        ("bank-3", vec![("BANK_MISAPPLY", "funds.withdrawn")]),
    ] {
        let (child, restored) = start_bank(home.path(), name, free_port(), &url, &env);
        assert_eq!(restored, 0);
        replicas.push(Killed(child));
    }
    let three = ["bank-1", "bank-2", "bank-3"];

    // Accounts and deposits: every replica applies these alike.
    let mut events: Vec<_> = (0..ACCOUNTS)
        .map(|a| event("account.opened", a, serde_json::json!({"owner": "o"})))
        .collect();
    events.extend((0..ACCOUNTS * 5).map(|i| {
        event(
            "funds.deposited",
            i % ACCOUNTS,
            serde_json::json!({"amount": 100 + i}),
        )
    }));
    client.publish(&events).await.unwrap();
    let good = client.barrier().await.unwrap();
    let at_good = reports_at(&client, good, &three).await;
    let good_hash = at_good["bank-1"].clone();
    assert!(at_good.values().all(|h| *h == good_hash), "{at_good:?}");
    let mark = client
        .create_mark("release-42", MarkAt::Named(MarkAtName::Verified))
        .await
        .unwrap();
    assert_eq!(mark.position, good);

    // The bad events: withdrawals from two accounts, which bank-3 applies wrongly.
    let withdrawals: Vec<_> = [1, 4, 1]
        .into_iter()
        .map(|a| event("funds.withdrawn", a, serde_json::json!({"amount": 7})))
        .collect();
    let acks = client.publish(&withdrawals).await.unwrap();
    let bad = client.barrier().await.unwrap();
    let at_bad = reports_at(&client, bad, &three).await;
    assert_eq!(at_bad["bank-1"], at_bad["bank-2"]);
    assert_ne!(at_bad["bank-1"], at_bad["bank-3"]);
    let v = client.verify(Some("bank")).await.unwrap();
    let bank = &v.services[0];
    assert_eq!(bank.verdict, Verdict::Diverged);
    for r in &bank.replicas {
        if r.replica == "bank-3" {
            assert!(!r.agrees);
            assert_eq!(r.diverged_at, Some(bad), "split at the first barrier after");
        } else {
            assert!(r.agrees, "{} agrees with the majority", r.replica);
        }
    }

    // Forensics: the accounts that differ, and the events that touched them since bank-3 last
    // agreed. Every replica has sent its entries by its next barrier.
    let next = client.barrier().await.unwrap();
    reports_at(&client, next, &three).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let explanation = loop {
        let e = client.explain("bank").await.unwrap();
        if e.waiting_for.is_empty() && !e.odd.is_empty() {
            break e;
        }
        assert!(Instant::now() < deadline, "no complete explanation: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(explanation.majority, ["bank-1", "bank-2"]);
    assert_eq!(explanation.odd.len(), 1);
    assert_eq!(explanation.odd[0].replica, "bank-3");
    let keys: Vec<&str> = explanation.odd[0]
        .keys
        .iter()
        .map(|k| k.key.as_str())
        .collect();
    assert_eq!(keys, ["a1", "a4"], "exactly the accounts withdrawn from");
    let a1 = &explanation.odd[0].keys[0];
    assert_eq!(a1.touched_by, [acks[0].position, acks[2].position]);
    assert_eq!(explanation.odd[0].keys[1].touched_by, [acks[1].position]);
    if let Some(cli) = lockstep_cli() {
        let out = std::process::Command::new(&cli)
            .args(["--url", &url, "verify"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "verify exits 1 on divergence");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("bank-3"), "names the odd replica: {stderr}");
        let out = std::process::Command::new(&cli)
            .args(["--url", &url, "verify", "--explain"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("bank-3 differs in 2 key(s)"), "{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with("a1 "))
            .unwrap();
        assert!(
            line.contains(&format!(
                "touched by events at {}, {}",
                acks[0].position, acks[2].position
            )),
            "{line}"
        );
    }

    // Roll back to the mark: every replica returns to the mark's state.
    let rollback = client
        .rollback(
            RollbackTo::Mark("release-42".into()),
            Some("bad withdrawals"),
        )
        .await
        .unwrap();
    assert_eq!(rollback.target, good);
    let after = client.barrier().await.unwrap();
    let at_after = reports_at(&client, after, &three).await;
    for (replica, hash) in &at_after {
        assert_eq!(*hash, good_hash, "{replica} holds the mark's state again");
    }
    let v = client.verify(Some("bank")).await.unwrap();
    assert_eq!(v.services[0].verdict, Verdict::Verified);
    assert!(
        v.services[0]
            .replicas
            .iter()
            .all(|r| r.diverged_at.is_none())
    );

    // The withdrawals are superseded, not deleted.
    let live = client.read(&ReadRequest::after(good)).await.unwrap();
    assert!(
        live.events
            .iter()
            .all(|e| e.event_type != "funds.withdrawn")
    );
    let audit = client
        .read(&ReadRequest::after(good).include_superseded())
        .await
        .unwrap();
    let superseded: Vec<u64> = audit
        .events
        .iter()
        .filter(|e| e.superseded)
        .map(|e| e.position)
        .collect();
    let withdrawn: Vec<u64> = acks.iter().map(|a| a.position).collect();
    assert!(withdrawn.iter().all(|p| superseded.contains(p)));
    assert!(
        superseded.contains(&bad),
        "the bad barrier is superseded too"
    );

    // New replicas: one replays everything, one starts from the verified snapshot.
    let deadline = Instant::now() + Duration::from_secs(30);
    let verified = loop {
        if let Some(s) = client.verified_snapshot("bank", None).await.unwrap() {
            if s.position == after {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no verified snapshot was uploaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(verified.state_hash, good_hash);
    let (replayer, restored) = start_bank(home.path(), "bank-4", free_port(), &url, &[]);
    assert_eq!(restored, 0);
    let (bootstrapped, restored) = start_bank(
        home.path(),
        "bank-5",
        free_port(),
        &url,
        &[("BANK_BOOTSTRAP", "verified")],
    );
    assert_eq!(restored, after, "bootstrapped from the verified snapshot");
    let _late = [Killed(replayer), Killed(bootstrapped)];
    let last = client.barrier().await.unwrap();
    let everyone = ["bank-1", "bank-2", "bank-3", "bank-4", "bank-5"];
    let at_last = reports_at(&client, last, &everyone).await;
    for (replica, hash) in &at_last {
        assert_eq!(*hash, good_hash, "{replica} converged on the mark's state");
    }
    drop(replicas);
}
