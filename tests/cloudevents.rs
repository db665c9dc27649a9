//! CloudEvents 1.0 over HTTP in its three content modes, mapped onto Lockstep's event fields.

#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Utc};
use lockstep_e2e::{TestBroker, refused, verify_chain};
use lockstep_proto::wire::{Event, PublishResponse};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn post(broker: &TestBroker, content_type: &str, body: &Value) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .header(CONTENT_TYPE, content_type)
        .body(body.to_string())
}

/// A binary-mode request: `ce-*` headers from `attributes`, the body as the data.
fn binary(
    broker: &TestBroker,
    attributes: &[(&str, &str)],
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    let mut request = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .body(body);
    for (name, value) in attributes {
        request = request.header(format!("ce-{name}"), *value);
    }
    if let Some(ct) = content_type {
        request = request.header(CONTENT_TYPE, ct);
    }
    request
}

async fn ok(request: reqwest::RequestBuilder) -> PublishResponse {
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "refused: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn event_at(broker: &TestBroker, position: u64) -> Event {
    let response = reqwest::get(broker.at(&format!("/v1/events/{position}")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_maps_every_attribute() {
    let broker = TestBroker::start().await;
    let answer = ok(post(
        &broker,
        STRUCTURED,
        &json!({
            "specversion": "1.0",
            "id": "ce-1",
            "source": "/bank/branch-7",
            "type": "account.opened",
            "subject": "acct-1",
            "time": "2026-11-01T10:00:00.5+01:00",
            "datacontenttype": "application/json",
            "data": {"owner": "ann"},
            "expectedposition": "0",
            "expectedhead": 0,
        }),
    ))
    .await;
    assert_eq!(answer.events.len(), 1);
    assert_eq!(
        (answer.events[0].position, answer.events[0].id.as_str()),
        (1, "ce-1")
    );

    let event = event_at(&broker, 1).await;
    assert_eq!(event.id, "ce-1");
    assert_eq!(event.source, "/bank/branch-7");
    assert_eq!(event.event_type, "account.opened");
    assert_eq!(event.key.as_deref(), Some("acct-1"));
    assert_eq!(event.occurred_at, Some(time("2026-11-01T09:00:00.5Z")));
    assert_eq!(event.content_type, None, "application/json is the default");
    assert_eq!(event.data_as::<Value>().unwrap(), json!({"owner": "ann"}));
    assert_eq!(event.hash, answer.events[0].hash);
    assert!(event.verify(&lockstep_proto::GENESIS_HASH).is_ok());

    // Non-JSON data: text in `data`, bytes in `data_base64`.
    ok(post(
        &broker,
        STRUCTURED,
        &json!({"specversion": "1.0", "id": "ce-2", "source": "s", "type": "note.taken",
                "datacontenttype": "text/plain", "data": "hello"}),
    ))
    .await;
    ok(post(
        &broker,
        "application/cloudevents+json; charset=utf-8",
        &json!({"specversion": "1.0", "id": "ce-3", "source": "s", "type": "blob.stored",
                "data_base64": "AAEC/f7/"}),
    ))
    .await;
    let text = event_at(&broker, 2).await;
    assert_eq!(text.content_type.as_deref(), Some("text/plain"));
    assert_eq!(text.data_base64.as_deref(), Some("aGVsbG8="));
    let blob = event_at(&broker, 3).await;
    assert_eq!(
        blob.content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(blob.data_base64.as_deref(), Some("AAEC/f7/"));
    assert_eq!(blob.key, None);
    assert_eq!(blob.occurred_at, None);

    // The CloudEvents id is the dedup key.
    let again = ok(post(
        &broker,
        STRUCTURED,
        &json!({"specversion": "1.0", "id": "ce-1", "source": "/bank/branch-7",
                "type": "account.opened", "expectedhead": 0}),
    ))
    .await;
    assert!(again.events[0].duplicate);
    assert_eq!(again.events[0].position, 1);
    assert_eq!(broker.head().await.position, 3);
    verify_chain(&broker.read_all(100).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_appends_in_order_and_atomically() {
    let broker = TestBroker::start().await;
    let answer = ok(post(
        &broker,
        BATCH,
        &json!([
            {"specversion": "1.0", "id": "b-1", "source": "s", "type": "order.placed",
             "subject": "order-1", "expectedposition": 0},
            {"specversion": "1.0", "id": "b-2", "source": "s", "type": "order.paid",
             "subject": "order-1", "expectedposition": "1", "data": [1, 2]},
            {"specversion": "1.0", "id": "b-1", "source": "s", "type": "order.placed"},
        ]),
    ))
    .await;
    let shape: Vec<(u64, &str, bool)> = answer
        .events
        .iter()
        .map(|a| (a.position, a.id.as_str(), a.duplicate))
        .collect();
    assert_eq!(
        shape,
        [(1, "b-1", false), (2, "b-2", false), (1, "b-1", true)]
    );
    let events = broker.read_all(100).await;
    assert_eq!(events.len(), 2);
    verify_chain(&events);
    assert_eq!(events[1].key.as_deref(), Some("order-1"));
    assert_eq!(events[1].data_as::<Value>().unwrap(), json!([1, 2]));

    // A conflict in the second event: the first is not written either.
    let error = refused(
        &broker,
        "key conflict in a batch",
        post(
            &broker,
            BATCH,
            &json!([
                {"specversion": "1.0", "id": "b-3", "source": "s", "type": "order.placed",
                 "subject": "order-2", "expectedposition": 0},
                {"specversion": "1.0", "id": "b-4", "source": "s", "type": "order.paid",
                 "subject": "order-1", "expectedposition": 1},
            ]),
        ),
        StatusCode::CONFLICT,
        "key_conflict",
    )
    .await;
    assert_eq!((error.current, error.index), (Some(2), Some(1)));
    let error = refused(
        &broker,
        "head conflict in a batch",
        post(
            &broker,
            BATCH,
            &json!([
                {"specversion": "1.0", "id": "b-3", "source": "s", "type": "order.placed",
                 "expectedhead": "2"},
                {"specversion": "1.0", "id": "b-4", "source": "s", "type": "order.paid",
                 "expectedhead": "2"},
            ]),
        ),
        StatusCode::CONFLICT,
        "head_conflict",
    )
    .await;
    assert_eq!((error.current, error.index), (Some(3), Some(1)));
    let error = refused(
        &broker,
        "unknown attribute in a batch",
        post(
            &broker,
            BATCH,
            &json!([
                {"specversion": "1.0", "id": "b-3", "source": "s", "type": "order.placed"},
                {"specversion": "1.0", "id": "b-4", "source": "s", "type": "order.paid",
                 "traceparent": "00-abc"},
            ]),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_event",
    )
    .await;
    assert_eq!(error.index, Some(1));
    assert!(error.message.contains("traceparent"), "{}", error.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_maps_headers_and_body() {
    let broker = TestBroker::start().await;
    let answer = ok(binary(
        &broker,
        &[
            ("specversion", "1.0"),
            ("id", "bin-1"),
            ("source", "%2Fbank%20one"),
            ("type", "account.opened"),
            ("subject", "acct-1"),
            ("time", "2026-11-01T10:00:00Z"),
            ("expectedhead", "0"),
            ("expectedposition", "0"),
        ],
        Some("application/json"),
        r#"{"owner": "ann"}"#,
    ))
    .await;
    assert_eq!(
        (answer.events[0].position, answer.events[0].id.as_str()),
        (1, "bin-1")
    );
    let event = event_at(&broker, 1).await;
    assert_eq!(event.source, "/bank one", "percent-decoded");
    assert_eq!(event.event_type, "account.opened");
    assert_eq!(event.key.as_deref(), Some("acct-1"));
    assert_eq!(event.occurred_at, Some(time("2026-11-01T10:00:00Z")));
    assert_eq!(
        event.data.as_ref().unwrap().get(),
        r#"{"owner": "ann"}"#,
        "stored as sent"
    );

    // Binary data with its own content type, byte for byte.
    let bytes: Vec<u8> = vec![0x89, b'P', b'N', b'G', 0, 0xff, 0xfe];
    ok(binary(
        &broker,
        &[
            ("specversion", "1.0"),
            ("id", "bin-2"),
            ("source", "cam"),
            ("type", "image.taken"),
        ],
        Some("image/png"),
        bytes,
    ))
    .await;
    let image = event_at(&broker, 2).await;
    assert_eq!(image.content_type.as_deref(), Some("image/png"));
    assert_eq!(image.data_base64.as_deref(), Some("iVBORwD//g=="));
    assert_eq!(image.key, None);

    // No Content-Type and no body: a JSON event without data.
    ok(binary(
        &broker,
        &[
            ("specversion", "1.0"),
            ("id", "bin-3"),
            ("source", "s"),
            ("type", "ping.sent"),
        ],
        None,
        "",
    ))
    .await;
    let ping = event_at(&broker, 3).await;
    assert!(ping.data.is_none() && ping.data_base64.is_none());
    assert_eq!(ping.content_type, None);
    verify_chain(&broker.read_all(100).await);

    // Optimistic concurrency through the extension headers.
    let error = refused(
        &broker,
        "binary expectedhead",
        binary(
            &broker,
            &[
                ("specversion", "1.0"),
                ("id", "bin-4"),
                ("source", "s"),
                ("type", "x.y"),
                ("expectedhead", "2"),
            ],
            None,
            "",
        ),
        StatusCode::CONFLICT,
        "head_conflict",
    )
    .await;
    assert_eq!(error.current, Some(3));
    let error = refused(
        &broker,
        "binary expectedposition",
        binary(
            &broker,
            &[
                ("specversion", "1.0"),
                ("id", "bin-4"),
                ("source", "s"),
                ("type", "x.y"),
                ("subject", "acct-1"),
                ("expectedposition", "0"),
            ],
            None,
            "",
        ),
        StatusCode::CONFLICT,
        "key_conflict",
    )
    .await;
    assert_eq!(error.current, Some(1));
    let acks = ok(binary(
        &broker,
        &[
            ("specversion", "1.0"),
            ("id", "bin-4"),
            ("source", "s"),
            ("type", "x.y"),
            ("subject", "acct-1"),
            ("expectedposition", "1"),
            ("expectedhead", "3"),
        ],
        None,
        "",
    ))
    .await;
    assert_eq!(acks.events[0].position, 4);

    // The same ce-id again is a duplicate.
    let again = ok(binary(
        &broker,
        &[
            ("specversion", "1.0"),
            ("id", "bin-2"),
            ("source", "cam"),
            ("type", "image.taken"),
        ],
        Some("image/png"),
        "other bytes",
    ))
    .await;
    assert!(again.events[0].duplicate);
    assert_eq!(again.events[0].position, 2);
    assert_eq!(broker.head().await.position, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_cloudevents() {
    let broker = TestBroker::start().await;
    broker.publish(&json!({"type": "seed.event"})).await;
    let base = json!({"specversion": "1.0", "id": "r-1", "source": "s", "type": "a.b"});
    let with = |field: &str, value: Value| {
        let mut event = base.clone();
        event[field] = value;
        event
    };
    let without = |field: &str| {
        let mut event = base.clone();
        event.as_object_mut().unwrap().remove(field);
        event
    };
    let structured_cases = [
        ("unknown extension", with("traceparent", json!("00-abc"))),
        ("dataschema", with("dataschema", json!("https://x/schema"))),
        ("specversion 0.3", with("specversion", json!("0.3"))),
        ("no specversion", without("specversion")),
        ("no id", without("id")),
        ("no source", without("source")),
        ("no type", without("type")),
        ("type not a string", with("type", json!(7))),
        ("bad type name", with("type", json!("Not.Valid"))),
        ("reserved type", with("type", json!("lockstep.barrier"))),
        ("bad time", with("time", json!("tuesday"))),
        ("bad expectedhead", with("expectedhead", json!("-1"))),
        (
            "expectedposition without subject",
            with("expectedposition", json!(0)),
        ),
        (
            "data and data_base64",
            with("data", json!(1))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("data_base64".into(), json!("AA=="));
                    Value::Object(o)
                })
                .unwrap(),
        ),
        (
            "non-JSON data not a string",
            with("datacontenttype", json!("text/plain"))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("data".into(), json!({"a": 1}));
                    Value::Object(o)
                })
                .unwrap(),
        ),
        ("an array in structured mode", json!([base.clone()])),
    ];
    for (what, body) in &structured_cases {
        refused(
            &broker,
            what,
            post(&broker, STRUCTURED, body),
            StatusCode::BAD_REQUEST,
            "invalid_event",
        )
        .await;
    }
    for (what, body) in [
        ("an object in batch mode", base.clone()),
        ("an empty batch", json!([])),
    ] {
        refused(
            &broker,
            what,
            post(&broker, BATCH, &body),
            StatusCode::BAD_REQUEST,
            "invalid_event",
        )
        .await;
    }
    refused(
        &broker,
        "malformed structured JSON",
        reqwest::Client::new()
            .post(broker.at("/v1/events"))
            .header(CONTENT_TYPE, STRUCTURED)
            .body(r#"{"specversion": "1.0","#),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;

    let headers = [
        ("specversion", "1.0"),
        ("id", "r-2"),
        ("source", "s"),
        ("type", "a.b"),
    ];
    let binary_cases = [
        (
            "unknown ce- header",
            [&headers[..], &[("colour", "red")]].concat(),
            None,
            "",
        ),
        (
            "ce-dataschema",
            [&headers[..], &[("dataschema", "x")]].concat(),
            None,
            "",
        ),
        (
            "specversion 0.3",
            vec![
                ("specversion", "0.3"),
                ("id", "r-2"),
                ("source", "s"),
                ("type", "a.b"),
            ],
            None,
            "",
        ),
        ("no ce-type", headers[..3].to_vec(), None, ""),
        (
            "bad percent escape",
            [&headers[..], &[("subject", "a%zz")]].concat(),
            None,
            "",
        ),
        (
            "body not the JSON its type says",
            headers.to_vec(),
            Some("application/json"),
            "{nope",
        ),
        (
            "bad ce-expectedhead",
            [&headers[..], &[("expectedhead", "soon")]].concat(),
            None,
            "",
        ),
    ];
    for (what, attributes, content_type, body) in binary_cases {
        refused(
            &broker,
            what,
            binary(&broker, &attributes, content_type, body),
            StatusCode::BAD_REQUEST,
            "invalid_event",
        )
        .await;
    }
    // Nothing above claimed an id.
    let acks = ok(post(&broker, STRUCTURED, &base)).await;
    assert!(!acks.events[0].duplicate);
    assert_eq!(acks.events[0].position, 2);
}
