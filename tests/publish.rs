//! Publishing over HTTP: ordering under concurrency, idempotency, optimistic concurrency,
//! binary data and durability across a restart.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use lockstep_e2e::{TestBroker, error_of, verify_chain};
use lockstep_proto::wire::{Event, PublishAck};
use serde_json::{Value, json};

const PUBLISHERS: usize = 32;
/// Requests per publisher; every other one is a batch of two, so each publishes 45 events.
const REQUESTS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_get_one_gapless_verified_order() {
    let broker = TestBroker::start().await;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let url = broker.at("/v1/events");
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acks: Vec<(usize, PublishAck)> = Vec::new();
            let mut seq = 0;
            for r in 0..REQUESTS {
                let count = if r % 2 == 0 { 1 } else { 2 };
                let events: Vec<Value> = (0..count)
                    .map(|i| {
                        json!({
                            "type": "load.published",
                            "id": format!("p{p}-{}", seq + i),
                            "source": format!("publisher-{p}"),
                            "key": format!("pub-{p}"),
                            "data": {"publisher": p, "seq": seq + i},
                        })
                    })
                    .collect();
                let response = client.post(&url).json(&events).send().await.unwrap();
                assert_eq!(response.status(), reqwest::StatusCode::OK);
                let answer: lockstep_proto::wire::PublishResponse = response.json().await.unwrap();
                assert_eq!(answer.events.len(), count, "one ack per event");
                for (i, ack) in answer.events.iter().enumerate() {
                    assert_eq!(ack.id, format!("p{p}-{}", seq + i), "acks in input order");
                    assert!(!ack.duplicate);
                }
                if count == 2 {
                    assert_eq!(
                        answer.events[1].position,
                        answer.events[0].position + 1,
                        "a batch is appended in one piece"
                    );
                }
                acks.extend(
                    answer
                        .events
                        .into_iter()
                        .enumerate()
                        .map(|(i, a)| (seq + i, a)),
                );
                seq += count;
            }
            acks
        }));
    }
    let mut acks_by_id: HashMap<String, PublishAck> = HashMap::new();
    for task in tasks {
        for (_, ack) in task.await.unwrap() {
            assert!(
                acks_by_id.insert(ack.id.clone(), ack).is_none(),
                "id acked twice"
            );
        }
    }
    let total = PUBLISHERS * (REQUESTS / 2) * 3;
    assert_eq!(acks_by_id.len(), total);

    let events = broker.read_all(97).await;
    assert_eq!(
        events.len(),
        total,
        "every acked event is in the log, and nothing else"
    );
    let last_hash = verify_chain(&events);
    let head = broker.head().await;
    assert_eq!(head.position, total as u64);
    assert_eq!(head.hash, last_hash.to_hex());

    let mut last_seq: HashMap<u64, i64> = HashMap::new();
    for event in &events {
        let ack = &acks_by_id[&event.id];
        assert_eq!(ack.position, event.position, "ack position of {}", event.id);
        assert_eq!(ack.hash, event.hash, "ack hash of {}", event.id);
        assert_eq!(ack.time, event.time, "ack time of {}", event.id);
        let data: Value = event.data_as().unwrap();
        let publisher = data["publisher"].as_u64().unwrap();
        let seq = data["seq"].as_i64().unwrap();
        let previous = last_seq.insert(publisher, seq).unwrap_or(-1);
        assert_eq!(
            seq,
            previous + 1,
            "publisher {publisher}'s events out of its order"
        );
    }
    assert!(
        events.windows(2).all(|w| w[0].time <= w[1].time),
        "broker time decreased along positions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_returns_the_original_and_writes_nothing() {
    let broker = TestBroker::start().await;
    let first = broker
        .publish(&json!({"type": "order.placed", "id": "order-1", "data": {"n": 1}}))
        .await;
    assert!(!first[0].duplicate);
    assert_eq!(first[0].position, 1);

    // Different data under the same id: still the original, nothing written.
    let again = broker
        .publish(&json!({"type": "order.placed", "id": "order-1", "data": {"n": 2}}))
        .await;
    assert!(again[0].duplicate);
    assert_eq!(
        (again[0].position, &again[0].hash, again[0].time),
        (first[0].position, &first[0].hash, first[0].time)
    );
    assert_eq!(broker.head().await.position, 1);
    let stored: Event = reqwest::get(broker.at("/v1/events/1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored.data_as::<Value>().unwrap(), json!({"n": 1}));

    // A retried batch: the known id is acked as a duplicate, the new ones are written.
    let batch = broker
        .publish(&json!([
            {"type": "order.placed", "id": "order-2"},
            {"type": "order.placed", "id": "order-1"},
            {"type": "order.placed", "id": "order-3"},
        ]))
        .await;
    let shape: Vec<(u64, bool)> = batch.iter().map(|a| (a.position, a.duplicate)).collect();
    assert_eq!(shape, [(2, false), (1, true), (3, false)]);
    assert_eq!(batch[1].hash, first[0].hash);
    assert_eq!(broker.head().await.position, 3);
}

/// Guards against `serve` returning while a connection task still holds the database, which made
/// an immediate restart on the same directory fail with "Database already open".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_broker_frees_its_directory_at_once() {
    let mut broker = TestBroker::start().await;
    for round in 1..=100u64 {
        broker.publish(&json!({"type": "x.y"})).await;
        assert_eq!(broker.head().await.position, round);
        broker = broker.restart().await;
    }
    assert_eq!(broker.head().await.position, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_within_one_batch_is_written_once() {
    let broker = TestBroker::start().await;
    broker
        .publish(&json!({"type": "x.y", "id": "before"}))
        .await;
    let acks = broker
        .publish(&json!([
            {"type": "x.y", "id": "dup", "data": 1},
            {"type": "x.y", "id": "other"},
            {"type": "x.y", "id": "dup", "data": 2},
        ]))
        .await;
    let shape: Vec<(u64, bool)> = acks.iter().map(|a| (a.position, a.duplicate)).collect();
    assert_eq!(shape, [(2, false), (3, false), (2, true)]);
    assert_eq!(acks[2].hash, acks[0].hash);
    assert_eq!(acks[2].id, "dup");
    let events = broker.read_all(1000).await;
    assert_eq!(events.len(), 3);
    verify_chain(&events);
    assert_eq!(events[1].data_as::<Value>().unwrap(), json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_still_known_after_a_restart() {
    let broker = TestBroker::start().await;
    let first = broker
        .publish(&json!([{"type": "x.y", "id": "a"}, {"type": "x.y", "id": "b"}]))
        .await;
    let broker = broker.restart().await;
    let again = broker
        .publish(&json!([
            {"type": "x.y", "id": "b"},
            {"type": "x.y", "id": "c"},
            {"type": "x.y", "id": "a"},
        ]))
        .await;
    let shape: Vec<(u64, bool)> = again.iter().map(|a| (a.position, a.duplicate)).collect();
    assert_eq!(shape, [(2, true), (3, false), (1, true)]);
    assert_eq!(
        (&again[0].hash, again[0].time),
        (&first[1].hash, first[1].time)
    );
    assert_eq!(
        (&again[2].hash, again[2].time),
        (&first[0].hash, first[0].time)
    );
    assert_eq!(broker.head().await.position, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_head_guards_the_whole_log() {
    let broker = TestBroker::start().await;
    let acks = broker
        .publish(&json!({"type": "x.y", "expected_head": 0}))
        .await;
    assert_eq!(acks[0].position, 1);
    // Within a batch, each event's expectation is the head just before it.
    let acks = broker
        .publish(&json!([
            {"type": "x.y", "expected_head": 1},
            {"type": "x.y"},
            {"type": "x.y", "expected_head": 3},
        ]))
        .await;
    assert_eq!(
        acks.iter().map(|a| a.position).collect::<Vec<_>>(),
        [2, 3, 4]
    );

    let head = broker.head().await;
    let response = broker
        .post_json(&json!({"type": "x.y", "expected_head": 3}))
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    assert_eq!(error.code, "head_conflict");
    assert_eq!(error.current, Some(4));
    assert_eq!(broker.head().await, head, "a conflict writes nothing");

    // The conflict is in the last event: the events before it are not written either.
    let response = broker
        .post_json(&json!([
            {"type": "x.y", "id": "ok-1", "expected_head": 4},
            {"type": "x.y", "id": "ok-2"},
            {"type": "x.y", "id": "late", "expected_head": 5},
        ]))
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    assert_eq!(error.code, "head_conflict");
    assert_eq!(
        error.current,
        Some(6),
        "the head just before the failing event"
    );
    assert_eq!(error.index, Some(2));
    assert_eq!(
        broker.head().await,
        head,
        "a conflicting batch writes nothing"
    );
    assert_eq!(broker.read_all(1000).await.len(), 4);

    // Nothing of the refused batch was kept: its ids are still free.
    let acks = broker
        .publish(&json!({"type": "x.y", "id": "ok-1", "expected_head": 4}))
        .await;
    assert_eq!((acks[0].position, acks[0].duplicate), (5, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_position_guards_one_key() {
    let broker = TestBroker::start().await;
    let opened = broker
        .publish(&json!({"type": "account.opened", "key": "acct-1", "expected_position": 0}))
        .await;
    assert_eq!(opened[0].position, 1);
    broker
        .publish(&json!({"type": "other.thing", "key": "acct-2"}))
        .await;

    // Another key's events do not move acct-1's position; a batch sees its own earlier events.
    let acks = broker
        .publish(&json!([
            {"type": "funds.deposited", "key": "acct-1", "expected_position": 1},
            {"type": "funds.deposited", "key": "acct-1", "expected_position": 3},
            {"type": "account.opened", "key": "acct-3", "expected_position": 0},
        ]))
        .await;
    assert_eq!(
        acks.iter().map(|a| a.position).collect::<Vec<_>>(),
        [3, 4, 5]
    );

    let head = broker.head().await;
    let (status, error) = error_of(
        broker
            .post_json(&json!({"type": "funds.deposited", "key": "acct-1", "expected_position": 3}))
            .await,
    )
    .await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT);
    assert_eq!(error.code, "key_conflict");
    assert_eq!(error.current, Some(4));
    assert_eq!(broker.head().await, head);

    // "No event with this key yet" fails once the key has one.
    let (status, error) = error_of(
        broker
            .post_json(&json!({"type": "account.opened", "key": "acct-2", "expected_position": 0}))
            .await,
    )
    .await;
    assert_eq!(
        (status.as_u16(), error.code.as_str()),
        (409, "key_conflict")
    );
    assert_eq!(error.current, Some(2));

    // A batch whose last event conflicts writes none of its events.
    let (status, error) = error_of(
        broker
            .post_json(&json!([
                {"type": "funds.deposited", "key": "acct-9", "expected_position": 0},
                {"type": "funds.deposited", "key": "acct-1", "expected_position": 4},
                {"type": "funds.deposited", "key": "acct-9", "expected_position": 0},
            ]))
            .await,
    )
    .await;
    assert_eq!(
        (status.as_u16(), error.code.as_str()),
        (409, "key_conflict")
    );
    assert_eq!(
        error.current,
        Some(6),
        "acct-9's position from earlier in the batch"
    );
    assert_eq!(error.index, Some(2));
    assert_eq!(
        broker.head().await,
        head,
        "a conflicting batch writes nothing"
    );

    // acct-9 really has no event: the refused batch left no trace in the key index.
    let acks = broker
        .publish(&json!({"type": "funds.deposited", "key": "acct-9", "expected_position": 0}))
        .await;
    assert_eq!(acks[0].position, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_expectations_let_exactly_one_publisher_win() {
    let broker = TestBroker::start().await;
    broker
        .publish(&json!([{"type": "x.y"}, {"type": "acct.opened", "key": "acct"}]))
        .await;
    // Both races expect the state left by the one before: the head race's winner is at 3 and
    // has no key, so acct's last event is still at 2.
    for (field, code, body, winner) in [
        (
            "head",
            "head_conflict",
            json!({"type": "x.y", "expected_head": 2}),
            3,
        ),
        (
            "key",
            "key_conflict",
            json!({"type": "acct.debited", "key": "acct", "expected_position": 2}),
            4,
        ),
    ] {
        let before = broker.head().await.position;
        let mut racers = Vec::new();
        for _ in 0..16 {
            let request = broker.post_json_request(&body);
            racers.push(tokio::spawn(error_or_ack(request)));
        }
        let mut winners = Vec::new();
        for racer in racers {
            match racer.await.unwrap() {
                Ok(ack) => winners.push(ack),
                Err((status, error)) => {
                    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{field}");
                    assert_eq!(error.code, code);
                    assert_eq!(
                        error.current,
                        Some(winner),
                        "{field}: the winner's position"
                    );
                }
            }
        }
        assert_eq!(winners.len(), 1, "{field}: exactly one racer may win");
        assert_eq!(winners[0].position, winner);
        assert_eq!(broker.head().await.position, before + 1);
    }
}

async fn error_or_ack(
    request: reqwest::RequestBuilder,
) -> Result<PublishAck, (reqwest::StatusCode, lockstep_proto::wire::ErrorDetail)> {
    let response = request.send().await.unwrap();
    if response.status().is_success() {
        let answer: lockstep_proto::wire::PublishResponse = response.json().await.unwrap();
        Ok(answer.events.into_iter().next().unwrap())
    } else {
        Err(error_of(response).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_data_is_stored_byte_for_byte() {
    let broker = TestBroker::start().await;
    let data = r#"{ "z" : 1,  "a" : [ 2, 1.50, "\u00e9" ] }"#;
    let response = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"type": "x.y", "data": {data}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let text = reqwest::get(broker.at("/v1/events/1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let event: Event = serde_json::from_str(&text).unwrap();
    assert_eq!(event.data.as_ref().unwrap().get(), data);
    verify_chain(&broker.read_all(10).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_data_round_trips_byte_for_byte() {
    let broker = TestBroker::start().await;
    let bytes: Vec<u8> = (0..=255u8).rev().chain([0, 0, 159, 146, 150]).collect();
    let b64 = base64(&bytes);
    let acks = broker
        .publish(&json!([
            {"type": "blob.stored", "data_base64": b64},
            {"type": "image.stored", "data_base64": "iVBORw==", "content_type": "image/png"},
            {"type": "text.stored", "data": "just json", "content_type": "application/vnd.x+json"},
        ]))
        .await;
    assert_eq!(acks.len(), 3);
    let events = broker.read_all(10).await;
    verify_chain(&events);
    assert_eq!(events[0].data_base64.as_deref(), Some(b64.as_str()));
    assert!(events[0].data.is_none());
    assert_eq!(
        events[0].content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(events[1].content_type.as_deref(), Some("image/png"));
    assert_eq!(events[1].data_base64.as_deref(), Some("iVBORw=="));
    assert_eq!(
        events[2].content_type.as_deref(),
        Some("application/vnd.x+json")
    );
    assert_eq!(events[2].data.as_ref().unwrap().get(), r#""just json""#);

    // The single-event route answers the same event.
    let one: Event = reqwest::get(broker.at("/v1/events/1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one.data_base64.as_deref(), Some(b64.as_str()));
    assert_eq!(one.hash, acks[0].hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_fields_are_readable_after_a_restart() {
    let broker = TestBroker::start().await;
    let acks = broker
        .publish(&json!([
            {
                "type": "account.opened",
                "id": "e-1",
                "source": "bank",
                "key": "acct-1",
                "occurred_at": "2026-11-01T10:00:00.123456789Z",
                "data": {"owner": "ann", "nested": [1, 2, {"x": null}]},
            },
            {"type": "blob.stored", "data_base64": "AAEC"},
            {"type": "bare.event"},
        ]))
        .await;
    let before = broker.read_all(1000).await;
    let head_before = broker.head().await;

    let broker = broker.restart().await;
    assert_eq!(broker.head().await, head_before);
    let after = broker.read_all(1000).await;
    assert_eq!(
        serde_json::to_value(&after).unwrap(),
        serde_json::to_value(&before).unwrap(),
        "the log reads back identically after a restart"
    );
    verify_chain(&after);
    for (event, ack) in after.iter().zip(&acks) {
        assert_eq!((event.position, &event.hash), (ack.position, &ack.hash));
    }
    let first = &after[0];
    assert_eq!(first.id, "e-1");
    assert_eq!(first.event_type, "account.opened");
    assert_eq!(first.source, "bank");
    assert_eq!(first.key.as_deref(), Some("acct-1"));
    assert_eq!(
        first
            .occurred_at
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "2026-11-01T10:00:00.123456789Z"
    );
    assert_eq!(
        first.data_as::<Value>().unwrap(),
        json!({"owner": "ann", "nested": [1, 2, {"x": null}]})
    );
    assert!(after[2].data.is_none() && after[2].data_base64.is_none());

    // The chain continues from the restored head.
    let next = broker.publish(&json!({"type": "x.y"})).await;
    assert_eq!(next[0].position, 4);
    let all = broker.read_all(1000).await;
    assert_eq!(verify_chain(&all).to_hex(), next[0].hash);
}

/// Standard base64 with padding; the broker's `data_base64` alphabet.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn test_base64_matches_known_vectors() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(&[0, 1, 2, 253, 254, 255]), "AAEC/f7/");
}
