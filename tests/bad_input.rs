//! Refused requests: each gets its status and JSON error code, and writes nothing.

#![allow(clippy::unwrap_used)]

use lockstep_e2e::{TestBroker, refused};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use serde_json::json;

/// A broker with two events, so "nothing was written" is checked against a non-empty log.
async fn broker_with_events() -> TestBroker {
    let broker = TestBroker::start().await;
    broker
        .publish(&json!([{"type": "seed.one"}, {"type": "seed.two", "key": "k"}]))
        .await;
    broker
}

fn post(
    broker: &TestBroker,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    let request = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .body(body);
    match content_type {
        Some(ct) => request.header(CONTENT_TYPE, ct),
        None => request,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_publish_bodies_are_invalid_json() {
    let broker = broker_with_events().await;
    let cases = [
        "",
        "   \n",
        "{",
        "42",
        "\"account.opened\"",
        "null",
        r#"{"data": 1}"#,
        r#"{"type": "a.b"} trailing"#,
        r#"{"type": "a.b"}{"type": "a.b"}"#,
        r#"[{"type": "a.b"}, {"data": 1}]"#,
        r#"[{"type": "a.b"},]"#,
        r#"{"type": 1}"#,
        r#"{"type": "a.b", "colour": "red"}"#,
        r#"{"type": "a.b", "occurred_at": "yesterday"}"#,
        r#"{"type": "a.b", "expected_head": -1}"#,
        r#"{"type": "a.b", "data": }"#,
    ];
    for body in cases {
        for content_type in [Some("application/json"), None] {
            let what = format!("{body:?} as {content_type:?}");
            refused(
                &broker,
                &what,
                post(&broker, content_type, body),
                StatusCode::BAD_REQUEST,
                "invalid_json",
            )
            .await;
        }
    }
    refused(
        &broker,
        "not UTF-8",
        post(
            &broker,
            Some("application/json"),
            b"{\"type\": \"a.\xff\"}".to_vec(),
        ),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_refused_whole() {
    let broker = broker_with_events().await;
    let long = "x".repeat(257);
    let cases = [
        json!({"type": ""}),
        json!({"type": "Account.opened"}),
        json!({"type": "account..opened"}),
        json!({"type": ".account"}),
        json!({"type": "account."}),
        json!({"type": "account opened"}),
        json!({"type": "account.*"}),
        json!({"type": "account.>"}),
        json!({"type": "-account.opened"}),
        json!({"type": "a".repeat(256)}),
        json!({"type": "lockstep.barrier"}),
        json!({"type": "lockstep.anything.else"}),
        json!({"type": "a.b", "id": ""}),
        json!({"type": "a.b", "id": long}),
        json!({"type": "a.b", "key": ""}),
        json!({"type": "a.b", "key": long}),
        json!({"type": "a.b", "source": long}),
        json!({"type": "a.b", "expected_position": 0}),
        json!({"type": "a.b", "data": 1, "data_base64": "AA=="}),
        json!({"type": "a.b", "data_base64": "!!"}),
        json!({"type": "a.b", "data_base64": "AAE"}),
        json!({"type": "a.b", "data": "hi", "content_type": "text/plain"}),
        json!({"type": "a.b", "data_base64": "AA==", "content_type": "application/json"}),
        json!({"type": "a.b", "content_type": "text/\u{1}plain"}),
        json!({"type": "a.b", "content_type": "text/plain\u{e9}"}),
        json!({"type": "a.b", "content_type": format!("text/{}", "x".repeat(124))}),
        json!({"type": "a.b", "occurred_at": "3000-01-01T00:00:00Z"}),
        json!([]),
    ];
    for body in &cases {
        let what = body.to_string();
        refused(
            &broker,
            &what,
            broker.post_json_request(body),
            StatusCode::BAD_REQUEST,
            "invalid_event",
        )
        .await;
        // The same event at index 1 of a batch: the valid event before it is not written.
        if body.is_object() {
            let batch = json!([{"type": "ok.event", "id": format!("ok-{}", what.len())}, body]);
            let error = refused(
                &broker,
                &format!("batch with {what}"),
                broker.post_json_request(&batch),
                StatusCode::BAD_REQUEST,
                "invalid_event",
            )
            .await;
            assert_eq!(error.index, Some(1), "{what}: the failing event's index");
        }
    }

    let too_many: Vec<_> = (0..10_001).map(|_| json!({"type": "a.b"})).collect();
    refused(
        &broker,
        "10001 events",
        broker.post_json_request(&json!(too_many)),
        StatusCode::BAD_REQUEST,
        "invalid_event",
    )
    .await;
    // The refused batches' ids stayed free.
    let acks = broker
        .publish(&json!({"type": "ok.event", "id": "ok-20"}))
        .await;
    assert!(!acks[0].duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_content_types_are_unsupported() {
    let broker = broker_with_events().await;
    let body = r#"{"type": "a.b"}"#;
    for content_type in [
        "text/plain",
        "application/xml",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ] {
        refused(
            &broker,
            content_type,
            post(&broker, Some(content_type), body),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
        )
        .await;
    }
    let request = reqwest::Client::new()
        .post(broker.at("/v1/events"))
        .header(
            CONTENT_TYPE,
            HeaderValue::from_bytes(b"application/j\xe9son").unwrap(),
        )
        .body(body);
    refused(
        &broker,
        "non-ASCII Content-Type",
        request,
        StatusCode::BAD_REQUEST,
        "bad_header",
    )
    .await;

    // Parameters and case do not matter for the accepted types.
    for content_type in ["application/json; charset=utf-8", "Application/JSON"] {
        let response = post(&broker, Some(content_type), body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{content_type}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_too_large() {
    let broker = TestBroker::start_with(|c| c.max_body_bytes = 1024).await;
    // A valid event of exactly `len` bytes.
    let event = |len: usize| {
        let frame = r#"{"type":"big.event","data":""}"#.len();
        format!(
            r#"{{"type":"big.event","data":"{}"}}"#,
            "x".repeat(len - frame)
        )
    };
    assert_eq!(event(1024).len(), 1024);
    let response = post(&broker, Some("application/json"), event(1024))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "a body of exactly the limit"
    );
    refused(
        &broker,
        "one byte over",
        post(&broker, Some("application/json"), event(1025)),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    // The limit holds whatever the content type claims.
    for content_type in [
        None,
        Some("application/cloudevents+json"),
        Some("text/plain"),
    ] {
        refused(
            &broker,
            &format!("{content_type:?} over the limit"),
            post(&broker, content_type, event(4096)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        )
        .await;
    }
    assert_eq!(broker.head().await.position, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_limit_is_four_mebibytes() {
    let broker = broker_with_events().await;
    let padding = "x".repeat(4 << 20);
    let body = format!(r#"{{"type":"big.event","data":"{padding}"}}"#);
    refused(
        &broker,
        "4 MiB of data",
        post(&broker, Some("application/json"), body),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    )
    .await;
    let body = format!(
        r#"{{"type":"big.event","data":"{}"}}"#,
        &padding[..(4 << 20) - 100]
    );
    let response = post(&broker, Some("application/json"), body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "just under the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_read_parameters_are_refused() {
    let broker = broker_with_events().await;
    let cases: [(&str, &str); 24] = [
        ("after=3", "after_past_head"),
        ("after=1000&wait_ms=10000", "after_past_head"),
        ("limit=0", "invalid_limit"),
        ("limit=10001", "invalid_limit"),
        ("limit=1000000", "invalid_limit"),
        ("types=a..b", "invalid_pattern"),
        ("types=A.*", "invalid_pattern"),
        ("types=a.>.b", "invalid_pattern"),
        ("types=a.**", "invalid_pattern"),
        ("types=account.opened,Bad", "invalid_pattern"),
        ("since=yesterday", "invalid_time"),
        ("since=", "invalid_time"),
        ("since=2026-11-01", "invalid_time"),
        ("until=2026-13-01T00:00:00Z", "invalid_time"),
        ("wait_ms=60001", "invalid_wait"),
        ("colour=red", "invalid_query"),
        ("after=1&after=2", "invalid_query"),
        ("after=-1", "invalid_query"),
        ("after=abc", "invalid_query"),
        ("limit=abc", "invalid_query"),
        ("limit=-1", "invalid_query"),
        ("wait_ms=soon", "invalid_query"),
        ("type=a.b", "invalid_query"),
        ("position=1", "invalid_query"),
    ];
    for (query, code) in cases {
        let request = reqwest::Client::new().get(format!("{}?{query}", broker.at("/v1/events")));
        refused(&broker, query, request, StatusCode::BAD_REQUEST, code).await;
    }
    // The edges of the valid ranges are accepted.
    for query in [
        "after=2",
        "limit=1",
        "limit=10000",
        "wait_ms=0",
        "types=",
        "types=*",
    ] {
        let response = reqwest::get(format!("{}?{query}", broker.at("/v1/events")))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_events_routes_and_methods() {
    let broker = broker_with_events().await;
    let get = |path: &str| reqwest::Client::new().get(broker.at(path));
    for path in [
        "/v1/events/0",
        "/v1/events/3",
        "/v1/events/18446744073709551615",
    ] {
        refused(&broker, path, get(path), StatusCode::NOT_FOUND, "not_found").await;
    }
    for path in [
        "/v1/events/abc",
        "/v1/events/-1",
        "/v1/events/1.5",
        "/v1/events/18446744073709551616",
    ] {
        refused(
            &broker,
            path,
            get(path),
            StatusCode::BAD_REQUEST,
            "invalid_position",
        )
        .await;
    }
    for path in ["/", "/v1", "/v2/events", "/v1/event", "/v1/events/1/extra"] {
        refused(&broker, path, get(path), StatusCode::NOT_FOUND, "not_found").await;
    }
    let client = reqwest::Client::new();
    let cases = [
        client
            .put(broker.at("/v1/events"))
            .json(&json!({"type": "a.b"})),
        client.delete(broker.at("/v1/events")),
        client
            .post(broker.at("/v1/events/1"))
            .json(&json!({"type": "a.b"})),
        client.delete(broker.at("/v1/events/1")),
        client
            .post(broker.at("/v1/head"))
            .json(&json!({"type": "a.b"})),
    ];
    for request in cases {
        let what = format!("{request:?}");
        refused(
            &broker,
            &what,
            request,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        )
        .await;
    }
}
