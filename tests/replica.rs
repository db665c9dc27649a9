//! The SDK's replica runtime against a real broker: replicas converge to the same state hash,
//! restart from their snapshot, and a late replica catches up.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lockstep::{ApplyError, EventMeta, Replica, Runtime, StateHandle, state_hash};
use lockstep_e2e::{TestBroker, wait_until};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum Event {
    #[serde(rename = "counter.incremented")]
    Incremented { by: i64 },
    #[serde(rename = "counter.reset")]
    Reset,
}

struct Counters;

impl Replica for Counters {
    type State = BTreeMap<String, i64>;
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let key = meta.key.clone().unwrap_or_default();
        match event {
            Event::Incremented { by } => *state.entry(key).or_default() += by,
            Event::Reset => {
                state.remove(&key);
            }
        }
        Ok(())
    }
}

/// A runtime running in a task until its stop sender fires.
struct Running {
    state: StateHandle<BTreeMap<String, i64>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), lockstep::RuntimeError>>,
}

fn start(broker: &TestBroker, replica: &str, dir: &std::path::Path) -> Running {
    let runtime = Runtime::builder(&broker.url)
        .service("counter")
        .replica(replica)
        .types(["counter.*"])
        .state_dir(dir)
        .snapshot_every(50)
        .build::<Counters>()
        .unwrap();
    let state = runtime.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    Running { state, stop, task }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn publish_counts(broker: &TestBroker, from: usize, n: usize) {
    let events: Vec<_> = (from..from + n)
        .map(|i| {
            if i % 13 == 12 {
                json!({"type": "counter.reset", "key": format!("k{}", i % 5)})
            } else {
                json!({"type": "counter.incremented", "key": format!("k{}", i % 5), "data": {"by": i}})
            }
        })
        .collect();
    for chunk in events.chunks(40) {
        broker.publish(&json!(chunk)).await;
    }
    broker.publish(&json!({"type": "other.ignored"})).await;
}

async fn caught_up(broker: &TestBroker, running: &Running) {
    let head = broker.head().await.position;
    wait_until(
        Duration::from_secs(20),
        "the replica to catch up",
        || async {
            running.state.position() >= head - 1 // the last event is of a type it does not receive
        },
    )
    .await;
}

fn hash(running: &Running) -> String {
    running
        .state
        .read(|state, _| state_hash(state).unwrap().to_hex().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_restart_from_snapshots_and_late_ones_catch_up() {
    let broker = TestBroker::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    publish_counts(&broker, 0, 200).await;
    let a = start(&broker, "a", dirs[0].path());
    let b = start(&broker, "b", dirs[1].path());
    caught_up(&broker, &a).await;
    caught_up(&broker, &b).await;
    assert_eq!(hash(&a), hash(&b));
    let expected = a.state.read(|s, _| s.clone());
    assert!(!expected.is_empty());

    // Stop b (a final snapshot is written), publish more, start it again: it resumes from its
    // snapshot at once, then converges with a.
    let b_position = b.state.position();
    b.stop().await;
    publish_counts(&broker, 200, 130).await;
    let b = start(&broker, "b", dirs[1].path());
    assert_eq!(
        b.state.position(),
        b_position,
        "restored from the snapshot before streaming"
    );
    caught_up(&broker, &a).await;
    caught_up(&broker, &b).await;
    assert_eq!(hash(&a), hash(&b));

    // A replica that joins late replays everything and reaches the same state.
    let c = start(&broker, "c", dirs[2].path());
    caught_up(&broker, &c).await;
    assert_eq!(hash(&c), hash(&a));
    for running in [a, b, c] {
        running.stop().await;
    }
}

/// Fails to apply `poison.tested` events until `HEALED` is set.
static HEALED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum PoisonEvent {
    #[serde(rename = "poison.tested")]
    Tested { n: i64 },
}

struct Fragile;

impl Replica for Fragile {
    type State = Vec<i64>;
    type Event = PoisonEvent;

    fn apply(state: &mut Vec<i64>, event: PoisonEvent, _: &EventMeta) -> Result<(), ApplyError> {
        let PoisonEvent::Tested { n } = event;
        if n == 3 && !HEALED.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApplyError::new("cannot handle 3 yet"));
        }
        state.push(n);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_apply_is_retried_reported_stuck_and_never_skipped() {
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events: Vec<_> = (1..=5)
        .map(|n| json!({"type": "poison.tested", "data": {"n": n}}))
        .collect();
    broker.publish(&json!(events)).await;
    let runtime = Runtime::builder(&broker.url)
        .service("fragile")
        .replica("f-1")
        .types(["poison.*"])
        .state_dir(dir.path())
        .build::<Fragile>()
        .unwrap();
    let state = runtime.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    let info = || async {
        reqwest::get(broker.at("/v1/subscriptions/fragile/f-1"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    wait_until(
        Duration::from_secs(20),
        "the replica to report itself stuck",
        || async { info().await["state"] == "stuck" },
    )
    .await;
    let stuck = info().await;
    assert_eq!(stuck["stuck"]["position"], 3);
    assert!(
        stuck["stuck"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot handle 3")
    );
    assert_eq!(
        state.read(|s, p| (s.clone(), p)),
        (vec![1, 2], 2),
        "never skips event 3"
    );

    HEALED.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until(
        Duration::from_secs(20),
        "the replica to recover",
        || async { state.position() == 5 },
    )
    .await;
    assert_eq!(state.read(|s, _| s.clone()), [1, 2, 3, 4, 5]);
    wait_until(
        Duration::from_secs(10),
        "the stuck report to clear",
        || async { info().await.get("stuck").is_none() },
    )
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_with_a_start_time_gets_exactly_the_events_since() {
    let broker = TestBroker::start().await;
    publish_counts(&broker, 0, 30).await;
    let mark = broker
        .publish(&json!({"type": "counter.incremented", "key": "mark", "data": {"by": 1000}}))
        .await;
    publish_counts(&broker, 30, 30).await;
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::builder(&broker.url)
        .service("counter")
        .replica("late")
        .types(["counter.*"])
        .state_dir(dir.path())
        .start(lockstep_proto::subscription::Start::Time { time: mark[0].time })
        .build::<Counters>()
        .unwrap();
    let state = runtime.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    let head = broker.head().await.position;
    wait_until(
        Duration::from_secs(20),
        "the late replica to catch up",
        || async { state.position() >= head - 1 },
    )
    .await;
    // The same events applied by hand, from the mark on.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for event in broker.read_all(1000).await {
        if event.time < mark[0].time || !event.event_type.starts_with("counter.") {
            continue;
        }
        let meta = EventMeta {
            position: event.position,
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            key: event.key.clone(),
            time: event.time,
            hash: event.hash.clone(),
        };
        let decoded: Event = serde_json::from_value(json!({
            "type": event.event_type,
            "data": event.data.as_ref().map(|d| serde_json::from_str::<serde_json::Value>(d.get()).unwrap()),
        }))
        .unwrap();
        Counters::apply(&mut expected, decoded, &meta).unwrap();
    }
    assert_eq!(state.read(|s, _| s.clone()), expected);
    assert_eq!(expected.get("mark"), Some(&1000));
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// An "external database": the applied values and the position stored with them, changed
/// together as one transaction would.
#[derive(Default)]
struct Db {
    values: Vec<i64>,
    position: u64,
}

struct External(Arc<std::sync::Mutex<Db>>);

impl lockstep::ExternalReplica for External {
    type Event = PoisonEvent;

    fn resume_after(&self) -> Result<u64, ApplyError> {
        Ok(self.0.lock().unwrap().position)
    }

    fn apply(&self, event: PoisonEvent, meta: &EventMeta) -> Result<(), ApplyError> {
        let PoisonEvent::Tested { n } = event;
        let mut db = self.0.lock().unwrap();
        db.values.push(n);
        db.position = meta.position;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_state_replica_resumes_where_its_own_store_says() {
    let broker = TestBroker::start().await;
    let db = Arc::new(std::sync::Mutex::new(Db::default()));
    let publish = |from: i64, to: i64| {
        let events: Vec<_> = (from..=to)
            .map(|n| json!({"type": "poison.tested", "data": {"n": n}}))
            .collect();
        json!(events)
    };
    broker.publish(&publish(100, 109)).await;
    let run = |db: Arc<std::sync::Mutex<Db>>| {
        let runtime = Runtime::builder(&broker.url)
            .service("external")
            .replica("x-1")
            .types(["poison.*"])
            .build_external(External(db))
            .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run(async {
            let _ = stopped.await;
        }));
        (stop, task)
    };
    let (stop, task) = run(Arc::clone(&db));
    wait_until(Duration::from_secs(20), "the first ten", || async {
        db.lock().unwrap().position == 10
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    broker.publish(&publish(110, 114)).await;
    let (stop, task) = run(Arc::clone(&db));
    wait_until(Duration::from_secs(20), "the next five", || async {
        db.lock().unwrap().position == 15
    })
    .await;
    assert_eq!(
        db.lock().unwrap().values,
        (100..=114).collect::<Vec<_>>(),
        "each once, in order"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
