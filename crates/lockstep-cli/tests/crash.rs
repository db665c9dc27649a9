//! Durability under kill -9: a broker child process is killed with SIGKILL while many clients
//! publish; after restart every acknowledged event is present at its position with the same hash,
//! and the chain verifies end to end. The same for rollbacks and snapshot uploads.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::BrokerProcess;
use lockstep::{
    Client, ClientError, Event, GENESIS_HASH, NewEvent, PublishAck, ReadRequest, Rollback,
    RollbackTo,
};

const PUBLISHERS: usize = 24;
const KILL_CYCLES: usize = 3;

/// Reads the whole log, superseded events included, and checks the chain from the genesis hash.
async fn read_and_verify(client: &Client) -> Vec<Event> {
    let mut events = Vec::new();
    let mut prev = GENESIS_HASH;
    let mut request = ReadRequest::after(0).limit(10_000).include_superseded();
    loop {
        let page = client.read(&request).await.unwrap();
        if page.events.is_empty() {
            assert_eq!(page.next_after, page.head);
            break;
        }
        for event in page.events {
            assert_eq!(
                event.position,
                events.len() as u64 + 1,
                "positions are gapless"
            );
            prev = event.verify(&prev).unwrap();
            events.push(event);
        }
        request.after = page.next_after;
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<Vec<PublishAck>>> = Arc::default();
    let mut attempted_ids: Vec<String> = Vec::new();

    for cycle in 0..KILL_CYCLES {
        let broker = BrokerProcess::start(dir.path());
        let client = Client::new(&broker.url).unwrap();
        let start_count = acked.lock().unwrap().len();
        let mut tasks = tokio::task::JoinSet::new();
        for publisher in 0..PUBLISHERS {
            let (client, acked) = (client.clone(), Arc::clone(&acked));
            tasks.spawn(async move {
                let mut ids = Vec::new();
                for n in 0.. {
                    // Mix single events and batches of 5, all with ids we can look for later.
                    let size = if n % 3 == 0 { 5 } else { 1 };
                    let batch: Vec<NewEvent> = (0..size)
                        .map(|i| NewEvent {
                            id: Some(format!("c{cycle}-p{publisher}-n{n}-{i}")),
                            key: Some(format!("k{}", publisher % 4)),
                            ..NewEvent::json(
                                "crash.tested",
                                &serde_json::json!({"p": publisher, "n": n}),
                            )
                            .unwrap()
                        })
                        .collect();
                    ids.extend(batch.iter().filter_map(|e| e.id.clone()));
                    match client.publish(&batch).await {
                        Ok(acks) => acked.lock().unwrap().extend(acks),
                        Err(_) => break, // the broker died under us
                    }
                }
                ids
            });
        }
        // Let the publishers get well into their stride, then kill the broker mid-write.
        let target = start_count + 2_000;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < target {
            assert!(
                std::time::Instant::now() < deadline,
                "publishers made no progress"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        broker.kill9();
        while let Some(ids) = tasks.join_next().await {
            attempted_ids.extend(ids.unwrap());
        }
    }

    let broker = BrokerProcess::start(dir.path());
    let client = Client::new(&broker.url).unwrap();
    let events = read_and_verify(&client).await;
    let by_position: HashMap<u64, &Event> = events.iter().map(|e| (e.position, e)).collect();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= KILL_CYCLES * 2_000);
    for ack in &acked {
        let event = by_position
            .get(&ack.position)
            .unwrap_or_else(|| panic!("acknowledged position {} lost", ack.position));
        assert_eq!(
            event.id, ack.id,
            "position {} holds another event",
            ack.position
        );
        assert_eq!(event.hash, ack.hash, "hash changed at {}", ack.position);
        assert_eq!(event.time, ack.time);
    }
    let mut seen = HashSet::new();
    for event in &events {
        assert!(
            seen.insert(event.id.clone()),
            "id {} stored twice",
            event.id
        );
    }

    // Publishing every attempted id again is idempotent: stored ones return their original
    // position, the rest (never acknowledged, lost with the kill) are appended once.
    let head_before = events.len() as u64;
    let retried: Vec<NewEvent> = attempted_ids
        .iter()
        .map(|id| NewEvent {
            id: Some(id.clone()),
            ..NewEvent::json("crash.tested", &serde_json::json!({"retry": true})).unwrap()
        })
        .collect();
    let mut fresh = 0;
    for chunk in retried.chunks(1000) {
        for ack in client.publish(chunk).await.unwrap() {
            if ack.duplicate {
                assert_eq!(by_position[&ack.position].id, ack.id);
            } else {
                fresh += 1;
                assert!(!seen.contains(&ack.id));
            }
        }
    }
    let after = read_and_verify(&client).await;
    assert_eq!(after.len() as u64, head_before + fresh);
    assert_eq!(
        &after[..events.len()]
            .iter()
            .map(|e| &e.hash)
            .collect::<Vec<_>>(),
        &events.iter().map(|e| &e.hash).collect::<Vec<_>>()
    );
    broker.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_rollbacks_and_snapshots_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let client = Client::new(&broker.url).unwrap();
    let first: Vec<NewEvent> = (0..100)
        .map(|n| NewEvent::json("crash.tested", &serde_json::json!({"n": n})).unwrap())
        .collect();
    client.publish(&first).await.unwrap();
    let rollbacks: Arc<Mutex<Vec<Rollback>>> = Arc::default();
    let blobs: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..8 {
        let client = client.clone();
        tasks.spawn(async move {
            for n in 0.. {
                let event = NewEvent::json("crash.tested", &serde_json::json!({"p": p, "n": n}));
                match client.publish_one(&event.unwrap()).await {
                    Ok(_) => {}
                    // Held for a moment while a rollback is appended.
                    Err(ClientError::Api { status: 503, .. }) => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(_) => break, // the broker died under us
                }
            }
        });
    }
    {
        let (client, rollbacks) = (client.clone(), Arc::clone(&rollbacks));
        tasks.spawn(async move {
            loop {
                let Ok(head) = client.head().await else { break };
                match client
                    .rollback(RollbackTo::Position(head.position - 3), Some("crash test"))
                    .await
                {
                    Ok(r) => rollbacks.lock().unwrap().push(r),
                    // A target another rollback superseded meanwhile: pick again.
                    Err(e) if e.is_conflict() => {}
                    Err(_) => break,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    {
        let (client, blobs) = (client.clone(), Arc::clone(&blobs));
        tasks.spawn(async move {
            for i in 0.. {
                let bytes = format!("state {i} ").repeat(50_000).into_bytes();
                match client.upload_snapshot(bytes).await {
                    Ok(hash) => blobs.lock().unwrap().push(hash),
                    Err(_) => break,
                }
            }
        });
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rollbacks.lock().unwrap().len() < 20 || blobs.lock().unwrap().len() < 10 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker.kill9();
    while tasks.join_next().await.is_some() {}

    let broker = BrokerProcess::start(dir.path());
    let client = Client::new(&broker.url).unwrap();
    let all = read_and_verify(&client).await;
    let stored = client.rollbacks().await.unwrap();
    let acked = rollbacks.lock().unwrap().clone();
    for r in &acked {
        assert!(
            stored
                .rollbacks
                .iter()
                .any(|s| (s.position, s.target) == (r.position, r.target)),
            "acknowledged rollback at {} lost",
            r.position
        );
        for p in r.target + 1..r.position {
            assert!(all[p as usize - 1].superseded, "position {p} is superseded");
        }
    }
    let superseded = all.iter().filter(|e| e.superseded).count() as u64;
    assert_eq!(superseded, stored.superseded_events);
    let mut live = Vec::new();
    let mut request = ReadRequest::after(0).limit(10_000);
    loop {
        let page = client.read(&request).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        request.after = page.next_after;
        live.extend(page.events);
    }
    assert_eq!(live.len() + superseded as usize, all.len());
    assert!(live.iter().all(|e| !e.superseded));
    let blobs = blobs.lock().unwrap().clone();
    for hash in &blobs {
        client.download_snapshot(hash).await.unwrap();
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "partial uploads are cleaned up: {leftovers:?}"
    );
    broker.terminate();
}
