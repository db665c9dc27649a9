//! The registrar over HTTP: subscriptions, pull delivery (pages and streams), acks, restarts.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockstep_e2e::{TestBroker, refused, wait_until};
use lockstep_proto::subscription::{SubscriptionInfo, SubscriptionList};
use lockstep_proto::wire::{Event, ReadResponse};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn subscribe(broker: &TestBroker, spec: Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(broker.at("/v1/subscriptions"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

/// Pulls every event a subscription has to give, acknowledging each page, until caught up.
async fn drain(broker: &TestBroker, service: &str, replica: &str) -> Vec<Event> {
    let client = reqwest::Client::new();
    let mut events = Vec::new();
    loop {
        let text = client
            .get(broker.at(&format!(
                "/v1/subscriptions/{service}/{replica}/events?limit=7"
            )))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let page: ReadResponse = serde_json::from_str(&text).unwrap();
        let ack = client
            .post(broker.at(&format!("/v1/subscriptions/{service}/{replica}/ack")))
            .json(&json!({"position": page.next_after}))
            .send()
            .await
            .unwrap();
        assert_eq!(ack.status(), StatusCode::OK);
        let done = page.events.is_empty() && (page.next_after == page.head || page.complete);
        events.extend(page.events);
        if done {
            return events;
        }
    }
}

async fn info(broker: &TestBroker, service: &str, replica: &str) -> SubscriptionInfo {
    reqwest::get(broker.at(&format!("/v1/subscriptions/{service}/{replica}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn positions(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.position).collect()
}

const TYPES: [&str; 5] = [
    "account.opened",
    "account.closed",
    "funds.deposited",
    "funds.fee.charged",
    "audit.noted",
];

async fn publish_mix(broker: &TestBroker, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({"type": TYPES[i % TYPES.len()], "data": {"i": i}}))
        .collect();
    for chunk in events.chunks(50) {
        broker.publish(&json!(chunk)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_receive_exactly_their_events_in_log_order() {
    let broker = TestBroker::start().await;
    publish_mix(&broker, 120).await;
    let specs = [
        ("bank", "r1", vec!["account.*", "funds.>"]),
        ("bank", "r2", vec!["account.*", "funds.>"]),
        ("bank", "r3", vec!["account.*"]),
        ("audit", "a1", vec!["*"]),
    ];
    for (service, replica, types) in &specs {
        let (status, _) = subscribe(
            &broker,
            json!({"service": service, "replica": replica, "types": types, "start": "beginning"}),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    // Published while the subscriptions exist, interleaved with the pulls below.
    let publisher = {
        let url = broker.url.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..60 {
                client
                    .post(format!("{url}/v1/events"))
                    .json(&json!({"type": TYPES[i % TYPES.len()], "data": {"late": i}}))
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    publisher.await.unwrap();
    let log = broker.read_all(1000).await;
    assert_eq!(log.len(), 180);
    let mut received = Vec::new();
    for (service, replica, types) in &specs {
        let events = drain(&broker, service, replica).await;
        let filter = lockstep_proto::TypeFilter::from_patterns(types.iter().copied()).unwrap();
        let expected: Vec<u64> = log
            .iter()
            .filter(|e| filter.matches(&e.event_type))
            .map(|e| e.position)
            .collect();
        assert_eq!(positions(&events), expected, "{service}/{replica}");
        assert!(!expected.is_empty());
        received.push(events);
    }
    let hashes = |events: &[Event]| events.iter().map(|e| e.hash.clone()).collect::<Vec<_>>();
    assert_eq!(hashes(&received[0]), hashes(&received[1]), "replicas agree");
    let list: SubscriptionList = reqwest::get(broker.at("/v1/subscriptions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.subscriptions.len(), 4);
    assert!(
        list.subscriptions
            .iter()
            .all(|s| s.position == 180 && s.lag_events == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_records_reach_every_subscription() {
    let broker = TestBroker::start().await;
    subscribe(
        &broker,
        json!({"service": "bank", "replica": "r1", "types": ["account.*"], "start": "beginning"}),
    )
    .await;
    broker.publish(&json!({"type": "funds.deposited"})).await;
    let control = broker
        .broker
        .as_ref()
        .unwrap()
        .append_control("lockstep.barrier", &json!({"n": 1}))
        .await
        .unwrap();
    broker.publish(&json!({"type": "account.opened"})).await;
    let events = drain(&broker, "bank", "r1").await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["lockstep.barrier", "account.opened"]);
    assert_eq!(events[0].position, control.position);
    // The public endpoint still refuses to publish one.
    refused(
        &broker,
        "control record",
        broker.post_json_request(&json!({"type": "lockstep.barrier"})),
        StatusCode::BAD_REQUEST,
        "invalid_event",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_a_time_delivers_exactly_the_events_since() {
    let broker = TestBroker::start().await;
    publish_mix(&broker, 30).await;
    let mark = broker
        .publish(&json!({"type": "account.opened", "id": "mark"}))
        .await;
    publish_mix(&broker, 30).await;
    let since = mark[0].time.to_rfc3339();
    let (status, _) = subscribe(
        &broker,
        json!({"service": "late", "replica": "r", "types": ["*"], "start": {"time": since}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let events = drain(&broker, "late", "r").await;
    let log = broker.read_all(1000).await;
    let expected: Vec<u64> = log
        .iter()
        .filter(|e| e.time >= mark[0].time)
        .map(|e| e.position)
        .collect();
    assert_eq!(positions(&events), expected);
    assert_eq!(
        events[0].id, "mark",
        "the event at exactly that time is included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_range_completes() {
    let broker = TestBroker::start().await;
    publish_mix(&broker, 40).await;
    subscribe(
        &broker,
        json!({"service": "probe", "replica": "r", "types": ["funds.>"],
               "start": {"position": 10}, "end": {"position": 30}}),
    )
    .await;
    let events = drain(&broker, "probe", "r").await;
    let expected: Vec<u64> = (10..=30)
        .filter(|p| TYPES[(*p as usize - 1) % TYPES.len()].starts_with("funds."))
        .collect();
    assert_eq!(positions(&events), expected);
    let state = info(&broker, "probe", "r").await;
    assert_eq!(serde_json::to_value(state.state).unwrap(), "complete");
    // The stream of a finished range says so and ends.
    let body = reqwest::get(broker.at("/v1/subscriptions/probe/r/stream?after=9"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(body.lines().last().unwrap()).unwrap();
    assert_eq!(last, json!({"complete": true}));
    assert_eq!(body.lines().count(), expected.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_delivers_live_events_in_order() {
    let broker = TestBroker::start().await;
    subscribe(
        &broker,
        json!({"service": "s", "replica": "r", "types": ["account.*"], "start": "now"}),
    )
    .await;
    let mut response = reqwest::get(broker.at("/v1/subscriptions/s/r/stream"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    publish_mix(&broker, 50).await;
    let mut buffer = Vec::new();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 20 {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("stream delivered in time")
            .unwrap()
            .expect("stream still open");
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let event: Event = serde_json::from_slice(&line).unwrap();
            seen.push(event);
        }
    }
    let expected: Vec<u64> = (1..=50)
        .filter(|p| TYPES[(*p as usize - 1) % TYPES.len()].starts_with("account."))
        .collect();
    assert_eq!(positions(&seen), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_and_positions_survive_a_restart() {
    let broker = TestBroker::start().await;
    publish_mix(&broker, 25).await;
    subscribe(
        &broker,
        json!({"service": "bank", "replica": "r1", "types": ["account.*"], "start": "beginning"}),
    )
    .await;
    let client = reqwest::Client::new();
    let ack = client
        .post(broker.at("/v1/subscriptions/bank/r1/ack"))
        .json(&json!({"position": 12}))
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), StatusCode::OK);
    let broker = broker.restart().await;
    let after = info(&broker, "bank", "r1").await;
    assert_eq!(after.position, 12);
    assert_eq!(after.spec.types, ["account.*"]);
    let events = drain(&broker, "bank", "r1").await;
    // Account events are at positions 1, 2, 6, 7, 11, 12, 16, 17, 21, 22: delivery resumes after 12.
    assert_eq!(positions(&events), [16, 17, 21, 22]);
    wait_until(Duration::from_secs(5), "lag to reach zero", || async {
        info(&broker, "bank", "r1").await.lag_events == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_idempotent_and_conflicts_are_explicit() {
    let broker = TestBroker::start().await;
    let spec =
        json!({"service": "bank", "replica": "r1", "types": ["account.*"], "start": "beginning"});
    assert_eq!(
        subscribe(&broker, spec.clone()).await.0,
        StatusCode::CREATED
    );
    assert_eq!(subscribe(&broker, spec.clone()).await.0, StatusCode::OK);
    let different =
        json!({"service": "bank", "replica": "r1", "types": ["*"], "start": "beginning"});
    let (status, body) = subscribe(&broker, different.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "subscription_conflict");
    let replaced = reqwest::Client::new()
        .post(broker.at("/v1/subscriptions?replace=true"))
        .json(&different)
        .send()
        .await
        .unwrap();
    assert_eq!(replaced.status(), StatusCode::CREATED);
    assert_eq!(info(&broker, "bank", "r1").await.spec.types, ["*"]);
    let client = reqwest::Client::new();
    let deleted = client
        .delete(broker.at("/v1/subscriptions/bank/r1"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let again = client
        .delete(broker.at("/v1/subscriptions/bank/r1"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_and_acks_are_refused_and_change_nothing() {
    let broker = TestBroker::start().await;
    publish_mix(&broker, 3).await;
    let client = reqwest::Client::new();
    let post = |body: Value| client.post(broker.at("/v1/subscriptions")).json(&body);
    let base = json!({"service": "bank", "replica": "r1", "types": ["a.*"], "start": "beginning"});
    let with = |key: &str, value: Value| {
        let mut spec = base.clone();
        spec[key] = value;
        spec
    };
    let cases = [
        (
            "bad service name",
            with("service", json!("a/b")),
            "invalid_subscription",
        ),
        (
            "empty types",
            with("types", json!([])),
            "invalid_subscription",
        ),
        (
            "bad pattern",
            with("types", json!(["A.B"])),
            "invalid_subscription",
        ),
        (
            "bad start",
            with("start", json!("yesterday")),
            "invalid_json",
        ),
        (
            "start past head",
            with("start", json!({"position": 99})),
            "invalid_subscription",
        ),
        (
            "unknown field",
            with("colour", json!("red")),
            "invalid_json",
        ),
        (
            "bad push url",
            with("push_url", json!("ftp://x")),
            "invalid_subscription",
        ),
    ];
    for (what, body, code) in cases {
        let response = post(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{what}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
    }
    let list: SubscriptionList = reqwest::get(broker.at("/v1/subscriptions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.subscriptions.is_empty(), "nothing was registered");

    assert_eq!(
        post(base.clone()).send().await.unwrap().status(),
        StatusCode::CREATED
    );
    let ack = |body: Value| {
        client
            .post(broker.at("/v1/subscriptions/bank/r1/ack"))
            .json(&body)
    };
    let past = ack(json!({"position": 4})).send().await.unwrap();
    assert_eq!(past.status(), StatusCode::BAD_REQUEST);
    let malformed = ack(json!({"pos": 1})).send().await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let unknown = client
        .post(broker.at("/v1/subscriptions/bank/nobody/ack"))
        .json(&json!({"position": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(info(&broker, "bank", "r1").await.position, 0);
    let pull = reqwest::get(broker.at("/v1/subscriptions/bank/r1/events?limit=0"))
        .await
        .unwrap();
    assert_eq!(pull.status(), StatusCode::BAD_REQUEST);
}
