//! The SDK's publishing helpers against a real broker: the durable outbox across a broker outage
//! and a service crash, and the batching publisher under 256 concurrent callers.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lockstep::{Client, ClientError, NewEvent, Outbox, Publisher};
use lockstep_e2e::{TestBroker, verify_chain, wait_until};
use serde_json::{Value, json};

const OUTBOX_EVENTS: usize = 50;
const TASKS: usize = 256;
const EVENTS_PER_TASK: usize = 20;
/// The task that also publishes an invalid event, mid-way through its own.
const BAD_TASK: usize = 7;

fn data(event: &lockstep_proto::wire::Event) -> Value {
    serde_json::from_str(event.data.as_ref().expect("data").get()).unwrap()
}

/// Opens the outbox in `dir`, waiting for a dropped one's flusher to release the file.
async fn reopen(dir: &std::path::Path, client: &Client) -> Outbox {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Outbox::open(dir, client.clone()) {
            Ok(outbox) => return outbox,
            Err(e) => {
                assert!(Instant::now() < deadline, "reopening the outbox: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_holds_events_while_the_broker_is_stopped_and_delivers_them_once_in_order() {
    let broker = TestBroker::start().await;
    let addr: SocketAddr = broker.url.trim_start_matches("http://").parse().unwrap();
    let client = Client::new(&broker.url).unwrap();
    let state = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(state.path(), client.clone()).unwrap();
    let data_dir = broker.stop().await;

    let mut ids = Vec::new();
    for n in 0..OUTBOX_EVENTS {
        let receipt = outbox
            .publish(NewEvent::json("order.placed", &json!({ "n": n })).unwrap())
            .await
            .expect("the outbox takes events while the broker is down");
        ids.push(receipt.id);
    }
    assert_eq!(outbox.pending(), OUTBOX_EVENTS);

    // A crash of the service: the handle goes with events pending; they are on disk.
    drop(outbox);
    let outbox = reopen(state.path(), &client).await;
    assert_eq!(
        outbox.pending(),
        OUTBOX_EVENTS,
        "pending events survive a reopen"
    );

    let broker = TestBroker::start_on(data_dir, addr).await;
    wait_until(Duration::from_secs(30), "the outbox to drain", || async {
        outbox.pending() == 0
    })
    .await;

    let events = broker.read_all(1000).await;
    verify_chain(&events);
    let logged: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        logged, ids,
        "exactly the outbox's events, in order, each once"
    );
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| data(e)["n"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..OUTBOX_EVENTS as u64).collect::<Vec<_>>());

    // A flush with nothing pending publishes nothing.
    let head = broker.head().await;
    tokio::time::timeout(Duration::from_secs(10), outbox.flush())
        .await
        .expect("flush of an empty outbox");
    assert_eq!(broker.head().await, head);

    // With the broker up, a new event goes straight through.
    let late = outbox
        .publish(NewEvent::json("order.placed", &json!({ "n": OUTBOX_EVENTS })).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), outbox.flush())
        .await
        .expect("flush with the broker up");
    let events = broker.read_all(1000).await;
    assert_eq!(events.len(), OUTBOX_EVENTS + 1);
    assert_eq!(events[OUTBOX_EVENTS].id, late.id);
    assert!(outbox.dead_letters().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_publisher_answers_every_caller_and_fails_only_the_bad_event() {
    let broker = TestBroker::start().await;
    let publisher = Publisher::new(Client::new(&broker.url).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..TASKS {
        let publisher = publisher.clone();
        tasks.spawn(async move {
            let mut acks = Vec::new();
            let mut bad = None;
            for n in 0..EVENTS_PER_TASK {
                if task == BAD_TASK && n == EVENTS_PER_TASK / 2 {
                    let event = NewEvent::json("Bad.Type", &json!({})).unwrap();
                    bad = Some(publisher.publish(event).await);
                }
                let event =
                    NewEvent::json("load.tested", &json!({ "task": task, "n": n })).unwrap();
                let ack = publisher
                    .publish(event)
                    .await
                    .unwrap_or_else(|e| panic!("task {task} event {n}: {e}"));
                acks.push(ack);
            }
            (task, acks, bad)
        });
    }

    let mut positions = HashSet::new();
    let mut ids = HashSet::new();
    while let Some(done) = tasks.join_next().await {
        let (task, acks, bad) = done.unwrap();
        assert_eq!(acks.len(), EVENTS_PER_TASK);
        assert!(
            acks.windows(2).all(|w| w[0].position < w[1].position),
            "task {task}: its events are stored in its publish order"
        );
        for ack in &acks {
            assert!(
                positions.insert(ack.position),
                "position {} twice",
                ack.position
            );
            assert!(ids.insert(ack.id.clone()), "id {} twice", ack.id);
            assert!(!ack.duplicate);
        }
        match (task, bad) {
            (BAD_TASK, Some(Err(ClientError::Api { status, code, .. }))) => {
                assert_eq!((status, code.as_str()), (400, "invalid_event"));
            }
            (BAD_TASK, other) => panic!("the bad event was not refused: {other:?}"),
            (_, None) => {}
            (_, Some(_)) => unreachable!("only one task publishes a bad event"),
        }
    }

    let events = broker.read_all(10_000).await;
    verify_chain(&events);
    assert_eq!(events.len(), TASKS * EVENTS_PER_TASK);
    assert_eq!(positions.len(), TASKS * EVENTS_PER_TASK);
    assert!(
        events
            .iter()
            .all(|e| e.event_type == "load.tested" && ids.contains(&e.id))
    );
    let mut next = vec![0u64; TASKS];
    for event in &events {
        let data = data(event);
        let task = data["task"].as_u64().unwrap() as usize;
        assert_eq!(
            data["n"].as_u64().unwrap(),
            next[task],
            "task {task} out of order"
        );
        next[task] += 1;
    }
}
