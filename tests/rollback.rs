//! Rollback, pause, redrive and verified-snapshot bootstrap, against a real broker over HTTP.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lockstep::{
    ApplyError, Bootstrap, Client, EventMeta, ExternalReplica, ReadRequest, Replica, RollbackTo,
    Runtime, RuntimeError, StateHandle,
};
use lockstep_e2e::{TestBroker, error_of, refused, verify_chain, wait_until};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum Event {
    #[serde(rename = "counter.added")]
    Added { n: i64 },
}

/// Per key: the sum of the numbers added.
struct Sums;

impl Replica for Sums {
    type State = BTreeMap<String, i64>;
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let Event::Added { n } = event;
        *state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default() += n;
        Ok(())
    }
}

fn adds(from: i64, to: i64) -> serde_json::Value {
    let events: Vec<_> = (from..=to)
        .map(|n| json!({"type": "counter.added", "key": format!("k{}", n % 3), "data": {"n": n}}))
        .collect();
    json!(events)
}

/// The state `Sums` holds after the additions of `numbers`.
fn sums(numbers: impl IntoIterator<Item = i64>) -> BTreeMap<String, i64> {
    let mut state = BTreeMap::new();
    for n in numbers {
        *state.entry(format!("k{}", n % 3)).or_default() += n;
    }
    state
}

fn builder(broker: &TestBroker, id: &str, dir: &std::path::Path) -> lockstep::RuntimeBuilder {
    Runtime::builder(&broker.url)
        .service("sums")
        .replica(id)
        .types(["counter.*"])
        .state_dir(dir)
}

/// A running replica's off switch: stops it and waits until it has let go of its state.
struct Stopper {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), RuntimeError>>,
}

impl Stopper {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Starts a runtime; returns its state and its off switch.
fn start(runtime: Runtime<Sums>) -> (StateHandle<BTreeMap<String, i64>>, Stopper) {
    let state = runtime.state();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    (state, Stopper { stop, task })
}

async fn reaches(state: &StateHandle<BTreeMap<String, i64>>, position: u64, what: &str) {
    wait_until(Duration::from_secs(20), what, || async {
        state.position() >= position
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_supersedes_without_deleting_and_survives_a_restart() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    broker.publish(&adds(1, 10)).await;
    let http = reqwest::Client::new();
    // Subscribed before the rollback, it has seen nothing yet.
    http.post(broker.at("/v1/subscriptions"))
        .json(&json!({"service": "audit", "replica": "r", "types": ["counter.*"], "start": "beginning"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let rollback = client
        .rollback(RollbackTo::Position(4), Some("bad deploy"))
        .await
        .unwrap();
    assert_eq!((rollback.target, rollback.position), (4, 11));

    let live: Vec<u64> = broker
        .read_all(100)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(live, [1, 2, 3, 4, 11]);
    let pulled: serde_json::Value = http
        .get(broker.at("/v1/subscriptions/audit/r/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let delivered: Vec<u64> = pulled["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(delivered, [1, 2, 3, 4, 11], "never delivered live again");
    let info: serde_json::Value = http
        .get(broker.at("/v1/subscriptions/audit/r"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["lag_events"], 5, "superseded events are no lag");

    let check = |broker: TestBroker| async move {
        let client = Client::new(&broker.url).unwrap();
        let all = client
            .read(&ReadRequest::after(0).include_superseded())
            .await
            .unwrap()
            .events;
        verify_chain(&all);
        let superseded: Vec<u64> = all
            .iter()
            .filter(|e| e.superseded)
            .map(|e| e.position)
            .collect();
        assert_eq!(superseded, [5, 6, 7, 8, 9, 10], "kept, and marked");
        let list = client.rollbacks().await.unwrap();
        assert_eq!(list.superseded_events, 6);
        assert_eq!(list.rollbacks.len(), 1);
        assert_eq!(list.rollbacks[0].reason.as_deref(), Some("bad deploy"));
        broker
    };
    let broker = check(broker).await;
    let broker = check(broker.restart().await).await;
    let client = Client::new(&broker.url).unwrap();

    // Targets a rollback cannot return to change nothing.
    let post = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(broker.at("/v1/rollbacks"))
            .json(&body)
    };
    let e = refused(
        &broker,
        "superseded target",
        post(json!({"to": {"position": 7}})),
        StatusCode::CONFLICT,
        "refused",
    )
    .await;
    assert!(e.message.contains("superseded"), "{}", e.message);
    refused(
        &broker,
        "past the head",
        post(json!({"to": {"position": 99}})),
        StatusCode::CONFLICT,
        "refused",
    )
    .await;
    refused(
        &broker,
        "the head itself",
        post(json!({"to": {"position": 11}})),
        StatusCode::CONFLICT,
        "refused",
    )
    .await;
    refused(
        &broker,
        "unknown mark",
        post(json!({"to": {"mark": "nope"}})),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    refused(
        &broker,
        "malformed",
        post(json!({"to": 3})),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;

    // A second rollback to before the first supersedes its record too.
    broker.publish(&adds(12, 13)).await;
    let second = client
        .rollback(RollbackTo::Position(2), None)
        .await
        .unwrap();
    assert_eq!(second.position, 14);
    let live: Vec<u64> = broker
        .read_all(100)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(live, [1, 2, 14]);
    assert_eq!(client.rollbacks().await.unwrap().superseded_events, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_answers_503_with_retry_after_until_resume_even_across_a_restart() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    broker.publish(&adds(1, 2)).await;
    let state = client.pause(Some("rolling back")).await.unwrap();
    assert!(state.paused);
    let publish = || {
        reqwest::Client::new()
            .post(broker.at("/v1/events"))
            .json(&json!({"type": "counter.added", "data": {"n": 1}}))
    };
    let response = publish().send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "2");
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error.code.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "paused")
    );
    assert!(error.message.contains("rolling back"), "{}", error.message);
    // The broker's own records still go in: an operator can roll back while paused.
    client
        .rollback(RollbackTo::Position(1), None)
        .await
        .unwrap();

    let broker = broker.restart().await;
    let client = Client::new(&broker.url).unwrap();
    assert!(
        client.pause_state().await.unwrap().paused,
        "a pause survives a restart"
    );
    let again = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .json(&json!({"type": "counter.added", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!client.resume().await.unwrap().paused);
    broker.publish(&adds(3, 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_publishes_superseded_events_again_except_the_named_ones_once() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let acks = broker.publish(&adds(1, 6)).await;
    client
        .rollback(RollbackTo::Position(2), None)
        .await
        .unwrap();
    let bad = acks[3].id.clone();
    let result = client.redrive(1, 7, vec![bad]).await.unwrap();
    assert_eq!(result.excepted, 1);
    let originals: Vec<u64> = result.redriven.iter().map(|r| r.original).collect();
    assert_eq!(
        originals,
        [3, 5, 6],
        "only superseded events, in order, minus the bad one"
    );
    let positions: Vec<u64> = result.redriven.iter().map(|r| r.position).collect();
    assert_eq!(positions, [8, 9, 10]);
    let live = broker.read_all(100).await;
    let redriven: Vec<&str> = live[3..]
        .iter()
        .map(|e| e.data.as_ref().unwrap().get())
        .collect();
    assert_eq!(redriven, [r#"{"n":3}"#, r#"{"n":5}"#, r#"{"n":6}"#]);
    assert_eq!(live[3].key.as_deref(), Some("k0"), "the key is kept");

    // Once only: a repeated redrive finds them published already.
    let again = client
        .redrive(1, 7, vec![acks[3].id.clone()])
        .await
        .unwrap();
    assert!(again.redriven.iter().all(|r| r.duplicate));
    assert_eq!(broker.head().await.position, 10);

    let post = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(broker.at("/v1/redrive"))
            .json(&body)
    };
    refused(
        &broker,
        "reversed range",
        post(json!({"from": 5, "to": 2})),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
    refused(
        &broker,
        "past the head",
        post(json!({"from": 1, "to": 500})),
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_roll_back_to_a_position_between_snapshots_and_a_late_replica_agrees() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Snapshots every 7 events: the target, 25, falls between two of them.
    let (a, _stop_a) = start(
        builder(&broker, "a", dirs[0].path())
            .snapshot_every(7)
            .build()
            .unwrap(),
    );
    broker.publish(&adds(1, 25)).await;
    let acks = broker.publish(&adds(26, 40)).await;
    reaches(&a, acks.last().unwrap().position, "a applies everything").await;

    let rollback = client
        .rollback(RollbackTo::Position(25), None)
        .await
        .unwrap();
    reaches(&a, rollback.position, "a passes the rollback").await;
    assert_eq!(a.read(|s, _| s.clone()), sums(1..=25));

    // Live again after the rollback.
    let more = broker.publish(&adds(100, 101)).await;
    reaches(&a, more[1].position, "a applies the new events").await;
    let expected = sums((1..=25).chain(100..=101));
    assert_eq!(a.read(|s, _| s.clone()), expected);

    // A replica replaying history never sees the superseded events: the same state.
    let (b, _stop_b) = start(builder(&broker, "b", dirs[1].path()).build().unwrap());
    reaches(&b, more[1].position, "b catches up").await;
    assert_eq!(b.read(|s, _| s.clone()), expected);

    // A replica that stopped in the middle of the superseded range rolls back on restart.
    let head = broker.head().await.position;
    let (c, stop_c) = start(
        builder(&broker, "c", dirs[2].path())
            .snapshot_every(1)
            .build()
            .unwrap(),
    );
    reaches(&c, head, "c catches up").await;
    stop_c.stop().await;
    let second = broker.publish(&adds(200, 209)).await;
    let target = second[4].position;
    client
        .rollback(RollbackTo::Position(target), None)
        .await
        .unwrap();
    let (c, _stop_c) = start(builder(&broker, "c", dirs[2].path()).build().unwrap());
    let head = broker.head().await.position;
    reaches(&c, head, "c passes the second rollback").await;
    reaches(&a, head, "a passes the second rollback").await;
    let expected = sums((1..=25).chain(100..=101).chain(200..=204));
    assert_eq!(c.read(|s, _| s.clone()), expected);
    assert_eq!(a.read(|s, _| s.clone()), expected);
}

#[derive(Default)]
struct Db {
    position: u64,
    total: i64,
}

struct External(Arc<std::sync::Mutex<Db>>);

impl ExternalReplica for External {
    type Event = Event;

    fn resume_after(&self) -> Result<u64, ApplyError> {
        Ok(self.0.lock().unwrap().position)
    }

    fn apply(&self, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let Event::Added { n } = event;
        let mut db = self.0.lock().unwrap();
        db.total += n;
        db.position = meta.position;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_replica_that_cannot_roll_back_stops_rather_than_diverge() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    broker.publish(&adds(1, 5)).await;
    let db = Arc::new(std::sync::Mutex::new(Db::default()));
    let runtime = Runtime::builder(&broker.url)
        .service("external")
        .replica("x")
        .types(["counter.*"])
        .build_external(External(Arc::clone(&db)))
        .unwrap();
    let running = tokio::spawn(runtime.run(std::future::pending()));
    wait_until(Duration::from_secs(10), "x applies", || async {
        db.lock().unwrap().position == 5
    })
    .await;
    client
        .rollback(RollbackTo::Position(2), None)
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the runtime stops")
        .unwrap();
    let Err(RuntimeError::Rollback(message)) = stopped else {
        panic!("expected a rollback error, got {stopped:?}");
    };
    assert!(message.contains("roll_back"), "{message}");
    assert_eq!(db.lock().unwrap().total, 15, "nothing further was applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_from_the_verified_snapshot_matches_replay_and_refuses_a_tampered_blob() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut stops = Vec::new();
    let mut states = Vec::new();
    for (i, id) in ["a", "b"].iter().enumerate() {
        let (state, stop) = start(
            builder(&broker, id, dirs[i].path())
                .upload_snapshots(true)
                .build()
                .unwrap(),
        );
        states.push(state);
        stops.push(stop);
    }
    broker.publish(&adds(1, 300)).await;
    let barrier = client.barrier().await.unwrap();
    wait_until(Duration::from_secs(20), "a verified snapshot", || async {
        client
            .verified_snapshot("sums", None)
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let verified = client
        .verified_snapshot("sums", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((verified.position, verified.replicas), (barrier, 2));
    let tail = broker.publish(&adds(301, 310)).await;

    let runtime = builder(&broker, "c", dirs[2].path())
        .bootstrap(Bootstrap::Verified)
        .build::<Sums>()
        .unwrap();
    assert_eq!(runtime.bootstrap_now().await.unwrap(), Some(barrier));
    assert_eq!(runtime.state().position(), barrier);
    let (c, _stop_c) = start(runtime);
    reaches(&c, tail[9].position, "c replays the tail").await;
    reaches(&states[0], tail[9].position, "a applies the tail").await;
    assert_eq!(c.read(|s, _| s.clone()), states[0].read(|s, _| s.clone()));
    assert_eq!(c.read(|s, _| s.clone()), sums(1..=310));

    // Damage the stored blob: the broker refuses to serve it, the replica refuses to use it.
    let blob = broker
        .data_dir()
        .join("snapshots")
        .join(&verified.state_hash);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let fresh = builder(&broker, "d", dirs[3].path())
        .build::<Sums>()
        .unwrap();
    let refused_blob = fresh.bootstrap_now().await.unwrap_err();
    assert!(
        refused_blob.to_string().contains("damaged"),
        "{refused_blob}"
    );
    assert_eq!(fresh.state().position(), 0, "nothing was restored");
    let (status, error) = error_of(
        reqwest::get(broker.at(&format!("/v1/snapshots/{}", verified.state_hash)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status.as_u16(), error.code.as_str()),
        (500, "snapshot_damaged")
    );

    // An upload must hash to its address.
    let put = reqwest::Client::new()
        .put(broker.at(&format!("/v1/snapshots/{}", "0".repeat(64))))
        .body(b"not that".to_vec())
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(put).await;
    assert_eq!(
        (status.as_u16(), error.code.as_str()),
        (400, "invalid_snapshot")
    );
    drop(fresh);
    // With Bootstrap::Verified, a refused snapshot means a full replay, to the same state.
    let (d, _stop_d) = start(
        builder(&broker, "d", dirs[3].path())
            .bootstrap(Bootstrap::Verified)
            .build()
            .unwrap(),
    );
    reaches(&d, tail[9].position, "d replays everything").await;
    assert_eq!(d.read(|s, _| s.clone()), sums(1..=310));
}

/// `Sums`, except that the number 13 cannot be applied: a poison event.
struct Superstitious;

impl Replica for Superstitious {
    type State = BTreeMap<String, i64>;
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let Event::Added { n } = event;
        if n == 13 {
            return Err(ApplyError::new("13 is unlucky"));
        }
        Sums::apply(state, Event::Added { n }, meta)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stuck_on_a_poison_event_moves_on_when_a_rollback_supersedes_it() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let runtime = builder(&broker, "s", dir.path())
        .build::<Superstitious>()
        .unwrap();
    let state = runtime.state();
    tokio::spawn(runtime.run(std::future::pending()));
    broker.publish(&adds(10, 15)).await;
    wait_until(Duration::from_secs(10), "stuck before 13", || async {
        let subs = client.subscriptions().await.unwrap();
        subs.subscriptions
            .iter()
            .any(|s| s.stuck.as_ref().is_some_and(|st| st.position == 4))
    })
    .await;
    assert_eq!(state.position(), 3, "never skips the poison event");
    let rollback = client
        .rollback(RollbackTo::Position(3), Some("poison"))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "past the rollback", || async {
        state.position() >= rollback.position
    })
    .await;
    assert_eq!(state.read(|s, _| s.clone()), sums(10..=12));
    let more = broker.publish(&adds(20, 21)).await;
    wait_until(Duration::from_secs(10), "live again", || async {
        state.position() >= more[1].position
    })
    .await;
    assert_eq!(state.read(|s, _| s.clone()), sums((10..=12).chain(20..=21)));
    let subs = client.subscriptions().await.unwrap();
    assert!(
        subs.subscriptions.iter().all(|s| s.stuck.is_none()),
        "no longer stuck"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_keys_and_ids_answer_for_the_live_log() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let keyed = |key: &str, id: &str| json!({"type": "counter.added", "key": key, "id": id, "data": {"n": 1}});
    // a: 1, 2 | b: 3 | a: 4, c: 5 (superseded)
    broker
        .publish(&json!([
            keyed("a", "e1"),
            keyed("a", "e2"),
            keyed("b", "e3")
        ]))
        .await;
    broker
        .publish(&json!([keyed("a", "e4"), keyed("c", "e5")]))
        .await;
    client
        .rollback(RollbackTo::Position(3), None)
        .await
        .unwrap();

    // expected_position sees the live log: a's last live event is 2 again, c has none.
    let publish = |body: serde_json::Value| {
        reqwest::Client::new()
            .post(broker.at("/v1/events"))
            .json(&body)
    };
    let stale = publish(
        json!({"type": "counter.added", "key": "a", "data": {"n": 1}, "expected_position": 4}),
    );
    let (status, error) = error_of(stale.send().await.unwrap()).await;
    assert_eq!((status, error.current), (StatusCode::CONFLICT, Some(2)));
    let fresh = publish(
        json!({"type": "counter.added", "key": "c", "data": {"n": 1}, "expected_position": 0}),
    );
    assert_eq!(fresh.send().await.unwrap().status(), StatusCode::OK);
    let live = publish(
        json!({"type": "counter.added", "key": "a", "data": {"n": 1}, "expected_position": 2}),
    );
    assert_eq!(live.send().await.unwrap().status(), StatusCode::OK);

    // A superseded event's id still names it, and the answer says it is not live.
    let again = broker.publish(&json!(keyed("a", "e4"))).await;
    assert!(again[0].duplicate && again[0].superseded, "{again:?}");
    assert_eq!(again[0].position, 4);
    let single: serde_json::Value = reqwest::get(broker.at("/v1/events/4"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(single["superseded"], true);
    let live_one: serde_json::Value = reqwest::get(broker.at("/v1/events/2"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(live_one.get("superseded").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_latest_verified_snapshots_and_those_marks_need() {
    let broker = TestBroker::start().await;
    let client = Client::new(&broker.url).unwrap();
    let mut hashes = Vec::new();
    for i in 0..5 {
        broker.publish(&adds(i, i)).await;
        let barrier = client.barrier().await.unwrap();
        let hash = client
            .upload_snapshot(format!("state {i}").into_bytes())
            .await
            .unwrap();
        for replica in ["a", "b"] {
            let report = lockstep::StateReport {
                service: "svc".into(),
                replica: replica.into(),
                position: barrier,
                state_hash: hash.clone(),
                chain_hash: "0".repeat(64),
                buckets: None,
            };
            client.report_state(&report).await.unwrap();
        }
        if i == 0 {
            let at = lockstep::MarkAt::Position { position: barrier };
            client.create_mark("first", at).await.unwrap();
        }
        hashes.push(hash);
    }
    let stray = client.upload_snapshot(b"nobody's".to_vec()).await.unwrap();
    let gc = |body: serde_json::Value| {
        let url = broker.at("/v1/snapshots/gc");
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    // Just written: kept whatever, within the default grace.
    let first = gc(json!({})).await;
    assert_eq!(
        (first["kept"].as_u64(), first["removed"].as_u64()),
        (Some(6), Some(0))
    );
    let second = gc(json!({"grace_seconds": 0})).await;
    assert_eq!(
        (second["kept"].as_u64(), second["removed"].as_u64()),
        (Some(4), Some(2))
    );
    for (i, hash) in hashes.iter().enumerate() {
        let kept = i != 1; // the mark's (0) and the newest three verified (2, 3, 4)
        assert_eq!(
            client.has_snapshot(hash).await.unwrap(),
            kept,
            "snapshot {i}"
        );
    }
    assert!(!client.has_snapshot(&stray).await.unwrap());
    // A rollback to the mark still finds its verified snapshot.
    let found = client
        .verified_snapshot("svc", Some(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.state_hash, hashes[0]);
}
