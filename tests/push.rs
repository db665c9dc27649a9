//! Push delivery end to end: a real broker POSTs to a real receiver (an axum server in the test)
//! that fails, goes away and comes back, while the broker itself restarts.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use lockstep_e2e::{TestBroker, wait_until};
use lockstep_proto::wire::Event;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const TIMEOUT: Duration = Duration::from_secs(30);

/// One request the receiver answered 2xx.
#[derive(Debug, Clone)]
struct Delivery {
    /// The hook's name: the last segment of `/hook/{name}`.
    name: String,
    content_type: String,
    subscription: String,
    positions: String,
    body: Bytes,
}

/// What the receiver saw, and how it should answer; outlives the receiver's restarts.
#[derive(Default)]
struct Hook {
    deliveries: Mutex<Vec<Delivery>>,
    attempts: AtomicU64,
    /// Answer 500 to this many more requests.
    fail_next: AtomicU64,
    /// Answer 500 while true.
    failing: AtomicBool,
}

impl Hook {
    fn deliveries(&self, name: &str) -> Vec<Delivery> {
        let all = self.deliveries.lock().unwrap();
        all.iter().filter(|d| d.name == name).cloned().collect()
    }

    /// Positions of every event delivered to `name`, in arrival order (duplicates included).
    fn positions(&self, name: &str) -> Vec<u64> {
        self.deliveries(name)
            .iter()
            .flat_map(positions_of)
            .collect()
    }
}

async fn answer(
    State(hook): State<Arc<Hook>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    hook.attempts.fetch_add(1, SeqCst);
    let forced = hook
        .fail_next
        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if forced || hook.failing.load(SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    hook.deliveries.lock().unwrap().push(Delivery {
        name,
        content_type: header("content-type"),
        subscription: header("lockstep-subscription"),
        positions: header("lockstep-positions"),
        body,
    });
    StatusCode::OK
}

/// An HTTP server on 127.0.0.1 recording pushes into its [`Hook`].
struct Receiver {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Receiver {
    /// Starts on `addr` (port 0: any free port). The port of a stopped receiver can be taken
    /// again at once (tokio sets SO_REUSEADDR), but retry briefly anyway.
    async fn start(hook: &Arc<Hook>, addr: SocketAddr) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding {addr} again: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hook/{name}", post(answer))
            .route(
                "/moved/{name}",
                post(|Path(name): Path<String>| async move {
                    axum::response::Redirect::to(&format!("/hook/{name}"))
                }),
            )
            .with_state(Arc::clone(hook));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self { addr, stop, task }
    }

    /// Stops accepting and closes every connection (kept-alive ones too), so the broker's next
    /// attempt finds nobody listening.
    async fn stop(self) -> SocketAddr {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .expect("receiver stops")
            .unwrap();
        self.addr
    }

    fn url(&self, name: &str) -> String {
        format!("http://{}/hook/{name}", self.addr)
    }
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The positions of one delivery, either format, after checking its shape and headers.
fn positions_of(delivery: &Delivery) -> Vec<u64> {
    let positions: Vec<u64> = if delivery.content_type == "application/cloudevents-batch+json" {
        let batch: Vec<Value> = serde_json::from_slice(&delivery.body).unwrap();
        batch
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    } else {
        assert_eq!(delivery.content_type, "application/json");
        let batch: JsonBatch = serde_json::from_slice(&delivery.body).unwrap();
        let service = batch.subscription["service"].as_str().unwrap();
        let replica = batch.subscription["replica"].as_str().unwrap();
        assert_eq!(format!("{service}/{replica}"), delivery.subscription);
        batch.events.iter().map(|e| e.position).collect()
    };
    let (Some(first), Some(last)) = (positions.first(), positions.last()) else {
        panic!("an empty batch was pushed");
    };
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions out of order within a batch: {positions:?}"
    );
    assert_eq!(delivery.positions, format!("{first}-{last}"));
    positions
}

#[derive(serde::Deserialize)]
struct JsonBatch {
    subscription: Value,
    events: Vec<Event>,
}

/// Positions in arrival order with redeliveries removed, failing on a reorder: a position seen
/// for the first time must be past every position seen before it.
fn deduped(positions: &[u64]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &p in positions {
        match out.last() {
            Some(&last) if p <= last => {
                assert!(
                    out.contains(&p),
                    "position {p} arrived after {last}: reordered"
                )
            }
            _ => out.push(p),
        }
    }
    out
}

/// Positions of the log's events whose type `wanted` selects, in log order.
async fn matching(broker: &TestBroker, wanted: impl Fn(&str) -> bool) -> Vec<u64> {
    broker
        .read_all(1_000)
        .await
        .into_iter()
        .filter(|e| wanted(&e.event_type))
        .map(|e| e.position)
        .collect()
}

async fn subscribe(broker: &TestBroker, spec: Value) {
    let response = reqwest::Client::new()
        .post(broker.at("/v1/subscriptions"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::CREATED, "subscribe: {text}");
}

async fn subscription(broker: &TestBroker, service: &str, replica: &str) -> Value {
    let response = reqwest::get(broker.at(&format!("/v1/subscriptions/{service}/{replica}")))
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    response.json().await.unwrap()
}

fn events(kinds: &[&str], from: usize) -> Value {
    Value::Array(
        kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| json!({"type": kind, "data": {"n": from + i}}))
            .collect(),
    )
}

fn is_order(t: &str) -> bool {
    t.starts_with("order.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_vanishing_receiver_gets_every_event_once_in_order() {
    let broker = TestBroker::start().await;
    let hook = Arc::new(Hook::default());
    hook.fail_next.store(5, SeqCst);
    hook.failing.store(true, SeqCst);
    let receiver = Receiver::start(&hook, any_port()).await;
    subscribe(
        &broker,
        json!({"service": "shop", "replica": "r1", "types": ["order.*"], "start": "beginning",
               "push_url": receiver.url("orders"), "push_format": "json"}),
    )
    .await;

    let kinds = [
        "order.placed",
        "stock.counted",
        "order.paid",
        "stock.counted",
    ];
    broker.publish(&events(&kinds, 0)).await;
    wait_until(TIMEOUT, "the subscription to show as failing", || async {
        let info = subscription(&broker, "shop", "r1").await;
        info["state"] == "failing"
            && info["push_failures"].as_u64().unwrap() >= 3
            && info["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("500"))
    })
    .await;
    assert!(
        hook.deliveries("orders").is_empty(),
        "a failed batch counted"
    );

    hook.failing.store(false, SeqCst);
    let expected = matching(&broker, is_order).await;
    wait_until(TIMEOUT, "the first batch after the failures", || async {
        deduped(&hook.positions("orders")) == expected
    })
    .await;
    wait_until(TIMEOUT, "the subscription to recover", || async {
        let info = subscription(&broker, "shop", "r1").await;
        info["state"] == "live" && info["push_failures"] == 0 && info.get("last_error").is_none()
    })
    .await;
    assert!(
        hook.attempts.load(SeqCst) >= 6,
        "5 forced failures, then a delivery"
    );

    // The receiver goes away; events keep coming.
    let addr = receiver.stop().await;
    broker.publish(&events(&kinds, 10)).await;
    broker.publish(&events(&kinds[..2], 20)).await;
    wait_until(TIMEOUT, "failures to reach an absent receiver", || async {
        let info = subscription(&broker, "shop", "r1").await;
        info["state"] == "failing"
            && info["last_error"]
                .as_str()
                .is_some_and(|e| !e.contains("500"))
    })
    .await;
    let receiver = Receiver::start(&hook, addr).await;
    broker.publish(&events(&kinds, 30)).await;
    let expected = matching(&broker, is_order).await;
    assert_eq!(expected.len(), 7);
    wait_until(TIMEOUT, "every order event", || async {
        deduped(&hook.positions("orders")) == expected
    })
    .await;

    // No crash happened, so nothing was delivered twice: positions strictly increase across
    // every successful delivery, with no gap among the matching events.
    assert_eq!(hook.positions("orders"), expected);
    for delivery in hook.deliveries("orders") {
        assert_eq!(delivery.subscription, "shop/r1");
    }
    let head = broker.head().await.position;
    wait_until(TIMEOUT, "the position to reach the head", || async {
        subscription(&broker, "shop", "r1").await["position"] == head
    })
    .await;
    receiver.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_batches_are_filtered_and_keep_both_formats() {
    let broker = TestBroker::start().await;
    let hook = Arc::new(Hook::default());
    let receiver = Receiver::start(&hook, any_port()).await;
    for (replica, format) in [("plain", "json"), ("ce", "cloudevents")] {
        subscribe(
            &broker,
            json!({"service": "bank", "replica": replica, "types": ["account.*"],
                   "start": "beginning", "push_url": receiver.url(replica),
                   "push_format": format}),
        )
        .await;
    }
    // Raw text: the data's spaces must reach the receiver as published; its line break is
    // stored as a space (so the event fits one NDJSON line).
    let data = "{\"owner\": \"ann\",\n \"limits\": [1, 2]}";
    let stored = data.replace('\n', " ");
    let body = format!(
        r#"[{{"type":"account.opened","source":"bank","key":"acc-1","data":{data}}},
            {{"type":"audit.logged","data":{{"x":1}}}},
            {{"type":"account.closed","key":"acc-1","occurred_at":"2025-12-31T23:59:59.5Z",
              "content_type":"application/octet-stream","data_base64":"AAEC"}},
            {{"type":"audit.logged"}}]"#
    );
    let response = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    wait_until(TIMEOUT, "both subscriptions' events", || async {
        deduped(&hook.positions("plain")) == [1, 3] && deduped(&hook.positions("ce")) == [1, 3]
    })
    .await;
    let log = broker.read_all(100).await;

    // JSON: the events exactly as GET /v1/events gives them.
    let (_, page) = broker.get_events(&[("after", "0")]).await;
    let mut pushed = Vec::new();
    for delivery in hook.deliveries("plain") {
        assert_eq!(delivery.content_type, "application/json");
        assert_eq!(delivery.subscription, "bank/plain");
        let v: Value = serde_json::from_slice(&delivery.body).unwrap();
        assert_eq!(
            v["subscription"],
            json!({"service": "bank", "replica": "plain"})
        );
        pushed.extend(v["events"].as_array().unwrap().clone());
        let batch: JsonBatch = serde_json::from_slice(&delivery.body).unwrap();
        if batch.events[0].position == 1 {
            assert_eq!(batch.events[0].data.as_ref().unwrap().get(), stored);
        }
    }
    let read = page["events"].as_array().unwrap();
    assert_eq!(pushed, [read[0].clone(), read[2].clone()]);

    // CloudEvents: one object per event, mapped attribute by attribute.
    let mut pushed = Vec::new();
    for delivery in hook.deliveries("ce") {
        assert_eq!(delivery.content_type, "application/cloudevents-batch+json");
        assert_eq!(delivery.subscription, "bank/ce");
        let text = std::str::from_utf8(&delivery.body).unwrap();
        if text.contains("account.opened") {
            assert!(text.contains(&stored), "data reformatted: {text}");
        }
        let batch: Vec<Value> = serde_json::from_slice(&delivery.body).unwrap();
        pushed.extend(batch);
    }
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let (opened, closed) = (&pushed[0], &pushed[1]);
    assert_eq!(opened["specversion"], "1.0");
    assert_eq!(opened["id"], log[0].id.as_str());
    assert_eq!(opened["source"], "bank");
    assert_eq!(opened["type"], "account.opened");
    assert_eq!(opened["subject"], "acc-1");
    assert_eq!(time(&opened["time"]), log[0].time);
    assert_eq!(opened["datacontenttype"], "application/json");
    assert_eq!(opened["data"], json!({"owner": "ann", "limits": [1, 2]}));
    assert_eq!(opened["position"], 1);
    assert_eq!(opened["hash"], log[0].hash.as_str());
    assert!(opened.get("data_base64").is_none());

    assert_eq!(closed["specversion"], "1.0");
    assert_eq!(closed["id"], log[2].id.as_str());
    assert_eq!(closed["source"], "/lockstep", "an empty source");
    assert_eq!(closed["type"], "account.closed");
    assert_eq!(closed["subject"], "acc-1");
    assert_eq!(
        time(&closed["time"]),
        chrono::DateTime::parse_from_rfc3339("2025-12-31T23:59:59.5Z").unwrap(),
        "time is the client's occurred_at when it gave one"
    );
    assert_eq!(closed["datacontenttype"], "application/octet-stream");
    assert_eq!(closed["data_base64"], "AAEC");
    assert!(closed.get("data").is_none());
    assert_eq!(closed["position"], 3);
    assert_eq!(closed["hash"], log[2].hash.as_str());
    assert_eq!(pushed.len(), 2);

    // Filtered-out events need no delivery: the position still reaches the head.
    wait_until(TIMEOUT, "positions at the head", || async {
        subscription(&broker, "bank", "plain").await["position"] == 4
            && subscription(&broker, "bank", "ce").await["lag_events"] == 0
    })
    .await;
    receiver.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_delivery_survives_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    let hook = Arc::new(Hook::default());
    let receiver = Receiver::start(&hook, any_port()).await;
    subscribe(
        &broker,
        json!({"service": "audit", "replica": "a", "types": ["*"], "start": "beginning",
               "push_url": receiver.url("audit")}),
    )
    .await;
    let kinds = ["entry.made"; 5];
    broker.publish(&events(&kinds, 0)).await;
    broker.publish(&events(&kinds, 5)).await;
    wait_until(TIMEOUT, "the first events", || async {
        deduped(&hook.positions("audit")).len() == 10
    })
    .await;

    // Restart once with nothing pending, once while the receiver is failing (so events are
    // waiting at shutdown and the worker sleeps in its backoff).
    for round in 0..2 {
        if round == 1 {
            hook.failing.store(true, SeqCst);
            broker.publish(&events(&kinds, 100)).await;
            wait_until(TIMEOUT, "a failure before the restart", || async {
                subscription(&broker, "audit", "a").await["push_failures"]
                    .as_u64()
                    .unwrap()
                    >= 1
            })
            .await;
        }
        let started = Instant::now();
        broker = broker.restart().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a push worker held the broker open for {:?}",
            started.elapsed()
        );
        hook.failing.store(false, SeqCst);
        broker.publish(&events(&kinds, 10 * round)).await;
    }
    let expected = matching(&broker, |_| true).await;
    assert_eq!(expected, (1..=25).collect::<Vec<_>>());
    wait_until(TIMEOUT, "every event after the restarts", || async {
        deduped(&hook.positions("audit")) == expected
    })
    .await;
    wait_until(TIMEOUT, "the position to reach the head", || async {
        subscription(&broker, "audit", "a").await["position"] == 25
    })
    .await;
    receiver.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_push_subscription_stops_its_deliveries() {
    let broker = TestBroker::start().await;
    let hook = Arc::new(Hook::default());
    let receiver = Receiver::start(&hook, any_port()).await;
    for replica in ["gone", "kept"] {
        subscribe(
            &broker,
            json!({"service": "svc", "replica": replica, "types": ["*"], "start": "beginning",
                   "push_url": receiver.url(replica)}),
        )
        .await;
    }
    broker.publish(&events(&["thing.happened"; 5], 0)).await;
    wait_until(TIMEOUT, "both subscriptions' first events", || async {
        hook.positions("gone").len() == 5 && hook.positions("kept").len() == 5
    })
    .await;

    let response = reqwest::Client::new()
        .delete(broker.at("/v1/subscriptions/svc/gone"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    broker.publish(&events(&["thing.happened"; 5], 5)).await;
    assert_eq!(broker.head().await.position, 10);
    // The kept subscription getting the new events shows the workers had their chance; then a
    // grace period, in case the deleted one were merely slower.
    wait_until(TIMEOUT, "the kept subscription's new events", || async {
        hook.positions("kept").len() == 10
    })
    .await;
    let grace = Instant::now() + Duration::from_millis(500);
    while Instant::now() < grace {
        assert_eq!(
            hook.positions("gone"),
            [1, 2, 3, 4, 5],
            "pushed after delete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.stop().await;
    broker.stop().await;
}

/// Regression: reqwest follows a 303 by sending a bodiless GET, which must not count as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failure_not_a_delivery() {
    let broker = TestBroker::start().await;
    let hook = Arc::new(Hook::default());
    let receiver = Receiver::start(&hook, any_port()).await;
    subscribe(
        &broker,
        json!({"service": "svc", "replica": "moved", "types": ["*"], "start": "beginning",
               "push_url": format!("http://{}/moved/target", receiver.addr)}),
    )
    .await;
    broker.publish(&events(&["thing.happened"; 3], 0)).await;
    wait_until(TIMEOUT, "the redirect to show as failing", || async {
        let info = subscription(&broker, "svc", "moved").await;
        info["state"] == "failing"
            && info["position"] == 0
            && info["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("303"))
    })
    .await;
    assert!(hook.deliveries("target").is_empty());
    receiver.stop().await;
    broker.stop().await;
}
