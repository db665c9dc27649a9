//! Barriers and verification with real replicas: a replica made nondeterministic for one event
//! type is reported diverged at the first barrier after that event, by name, while the others
//! agree.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use lockstep::{ApplyError, Client, EventMeta, Replica, Runtime, Verdict};
use lockstep_e2e::{TestBroker, wait_until};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum Event {
    #[serde(rename = "counter.incremented")]
    Incremented { by: i64 },
    #[serde(rename = "counter.doubled")]
    Doubled,
}

struct Counters;

impl Replica for Counters {
    type State = BTreeMap<String, i64>;
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let entry = state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default();
        match event {
            Event::Incremented { by } => *entry += by,
            Event::Doubled => *entry *= 2,
        }
        Ok(())
    }
}

/// The same, except that it gets `counter.doubled` wrong: a deploy with a bug.
struct BuggyCounters;

impl Replica for BuggyCounters {
    type State = BTreeMap<String, i64>;
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let entry = state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default();
        match event {
            Event::Incremented { by } => *entry += by,
            Event::Doubled => *entry *= 3,
        }
        Ok(())
    }
}

fn run<R: Replica>(broker: &TestBroker, id: &str, dir: &std::path::Path) -> oneshot::Sender<()> {
    let runtime = Runtime::builder(&broker.url)
        .service("counter")
        .replica(id)
        .types(["counter.*"])
        .state_dir(dir)
        .build::<R>()
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buggy_replica_is_named_at_the_first_barrier_after_the_bad_event() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let _a = run::<Counters>(&broker, "c-1", dirs[0].path());
    let _b = run::<Counters>(&broker, "c-2", dirs[1].path());
    let _c = run::<BuggyCounters>(&broker, "c-3", dirs[2].path());

    let increments: Vec<_> = (1..=20)
        .map(|i| json!({"type": "counter.incremented", "key": format!("k{}", i % 3), "data": {"by": i}}))
        .collect();
    broker.publish(&json!(increments)).await;
    let good = client.barrier().await.unwrap();
    let reported = |position: u64| {
        let client = client.clone();
        async move {
            let v = client.verify(Some("counter")).await.unwrap();
            v.services.first().is_some_and(|s| {
                s.replicas.len() == 3 && s.replicas.iter().all(|r| r.position == position)
            })
        }
    };
    wait_until(
        Duration::from_secs(20),
        "three reports at the first barrier",
        || reported(good),
    )
    .await;
    let first = client.verify(Some("counter")).await.unwrap();
    assert_eq!(first.services[0].verdict, Verdict::Verified);
    assert_eq!(first.services[0].last_verified_barrier, Some(good));

    // Name the known-good position.
    let mark = client
        .create_mark(
            "release-42",
            lockstep::MarkAt::Named(lockstep::MarkAtName::Verified),
        )
        .await
        .unwrap();
    assert_eq!(mark.position, good);

    broker
        .publish(&json!({"type": "counter.doubled", "key": "k1"}))
        .await;
    let bad = client.barrier().await.unwrap();
    wait_until(
        Duration::from_secs(20),
        "three reports at the second barrier",
        || reported(bad),
    )
    .await;
    let second = client.verify(Some("counter")).await.unwrap();
    let service = &second.services[0];
    assert_eq!(service.verdict, Verdict::Diverged);
    assert_eq!(service.barrier, Some(bad));
    assert_eq!(service.last_verified_barrier, Some(good));
    let odd: Vec<_> = service.replicas.iter().filter(|r| !r.agrees).collect();
    assert_eq!(odd.len(), 1);
    assert_eq!(odd[0].replica, "c-3");
    assert_eq!(odd[0].diverged_at, Some(bad));
    let agreeing: Vec<_> = service.replicas.iter().filter(|r| r.agrees).collect();
    assert_eq!(agreeing.len(), 2);
    assert_eq!(agreeing[0].state_hash, agreeing[1].state_hash);

    // Marks never move: the same again is fine, another position is a conflict.
    let again = client
        .create_mark("release-42", lockstep::MarkAt::Position { position: good })
        .await
        .unwrap();
    assert_eq!(again, mark);
    let moved = client
        .create_mark(
            "release-42",
            lockstep::MarkAt::Named(lockstep::MarkAtName::Head),
        )
        .await
        .unwrap_err();
    assert!(moved.is_conflict(), "{moved}");
    let past = client
        .create_mark("later", lockstep::MarkAt::Position { position: 10_000 })
        .await
        .unwrap_err();
    assert!(past.to_string().contains("past the head"), "{past}");
    let bad_name = client
        .create_mark("a/b", lockstep::MarkAt::Named(lockstep::MarkAtName::Head))
        .await
        .unwrap_err();
    assert!(bad_name.to_string().contains("mark name"), "{bad_name}");
    let marks = client.marks().await.unwrap();
    assert_eq!(marks.marks, [mark]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_appends_barriers_by_count_and_refuses_bad_reports() {
    let broker = TestBroker::start_with(|c| {
        c.barrier_every = 10;
        c.barrier_interval_ms = 0;
    })
    .await;
    let barriers = || async {
        broker
            .read_all(1000)
            .await
            .iter()
            .filter(|e| e.event_type == "lockstep.barrier")
            .count()
    };
    for round in 1..=2 {
        let events: Vec<_> = (0..12)
            .map(|i| json!({"type": "x.happened", "data": i}))
            .collect();
        broker.publish(&json!(events)).await;
        wait_until(
            Duration::from_secs(10),
            "a barrier after ten events",
            || async { barriers().await == round },
        )
        .await;
    }
    // No traffic, no barriers: a quiet log does not fill with them.
    let head = broker.head().await.position;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.head().await.position, head);
    let http = reqwest::Client::new();
    let bad = [
        json!({"service": "a/b", "replica": "r", "position": 1, "state_hash": "00", "chain_hash": "00"}),
        json!({"service": "a", "replica": "r", "position": 999, "state_hash": "0".repeat(64), "chain_hash": "0".repeat(64)}),
        json!({"service": "a", "replica": "r", "position": 1, "state_hash": "zz", "chain_hash": "0".repeat(64)}),
        json!({"service": "a", "replica": "r", "position": 1}),
    ];
    for body in bad {
        let response = http
            .post(broker.at("/v1/reports"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
    }
    let v: serde_json::Value = reqwest::get(broker.at("/v1/verify"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["services"], json!([]), "nothing was stored");
}
