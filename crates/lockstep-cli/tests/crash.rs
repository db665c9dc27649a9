//! Durability under kill -9: a broker child process is killed with SIGKILL while many clients
//! publish; after restart every acknowledged event is present at its position with the same hash,
//! and the chain verifies end to end.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::BrokerProcess;
use lockstep::{Client, Event, GENESIS_HASH, NewEvent, PublishAck, ReadRequest};

const PUBLISHERS: usize = 24;
const KILL_CYCLES: usize = 3;

/// Reads the whole log and checks the chain from the genesis hash.
async fn read_and_verify(client: &Client) -> Vec<Event> {
    let mut events = Vec::new();
    let mut prev = GENESIS_HASH;
    let mut request = ReadRequest::after(0).limit(10_000);
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
