//! Reading over HTTP: positions, type filters, time bounds and long-polling.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use lockstep_e2e::{TestBroker, verify_chain};
use lockstep_proto::wire::{Event, ReadResponse};
use serde_json::json;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn positions(page: &ReadResponse) -> Vec<u64> {
    page.events.iter().map(|e| e.position).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_and_single_events() {
    let broker = TestBroker::start().await;
    let empty = broker.head().await;
    assert_eq!(empty.position, 0);
    assert_eq!(empty.hash, "0".repeat(64));
    assert_eq!(empty.time, None);
    let page = broker.read(&[]).await;
    assert!(page.events.is_empty());
    assert_eq!((page.head, page.next_after, page.complete), (0, 0, false));

    let acks = broker
        .publish(&json!([{"type": "a.b", "id": "one"}, {"type": "a.c", "id": "two"}]))
        .await;
    let head = broker.head().await;
    assert_eq!(head.position, 2);
    assert_eq!(head.hash, acks[1].hash);
    assert_eq!(head.time, Some(acks[1].time));

    let all = broker.read(&[]).await;
    assert_eq!(positions(&all), [1, 2]);
    assert_eq!((all.head, all.next_after), (2, 2));
    for event in &all.events {
        let one: Event = reqwest::get(broker.at(&format!("/v1/events/{}", event.position)))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            serde_json::to_value(&one).unwrap(),
            serde_json::to_value(event).unwrap()
        );
    }
    let rest = broker.read(&[("after", "1")]).await;
    assert_eq!(positions(&rest), [2]);
    let none = broker.read(&[("after", "2")]).await;
    assert!(none.events.is_empty());
    assert_eq!(none.next_after, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_limit_and_next_after() {
    let broker = TestBroker::start().await;
    let batch: Vec<_> = (0..25).map(|i| json!({"type": "n.m", "data": i})).collect();
    broker.publish(&json!(batch)).await;
    let page = broker.read(&[("limit", "10")]).await;
    assert_eq!(positions(&page), (1..=10).collect::<Vec<_>>());
    assert_eq!((page.head, page.next_after), (25, 10));
    let page = broker.read(&[("after", "20"), ("limit", "10")]).await;
    assert_eq!(positions(&page), (21..=25).collect::<Vec<_>>());
    assert_eq!(page.next_after, 25);
    let page = broker.read(&[("limit", "10000")]).await;
    assert_eq!(page.events.len(), 25);
    let all = broker.read_all(4).await;
    assert_eq!(all.len(), 25);
    verify_chain(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_filters_select_by_pattern() {
    let broker = TestBroker::start().await;
    let types = [
        "account.opened",       // 1
        "account.closed",       // 2
        "account.fee.charged",  // 3
        "billing.invoice.sent", // 4
        "billing.paid",         // 5
        "shipping.sent",        // 6
        "account",              // 7
        "accounting.opened",    // 8
    ];
    let batch: Vec<_> = types.iter().map(|t| json!({"type": t})).collect();
    broker.publish(&json!(batch)).await;

    let cases: [(&str, &[u64]); 11] = [
        ("account.*", &[1, 2]),
        ("account.>", &[1, 2, 3]),
        ("account", &[7]),
        ("*", &[1, 2, 3, 4, 5, 6, 7, 8]),
        (">", &[1, 2, 3, 4, 5, 6, 7, 8]),
        ("*.sent", &[6]),
        ("*.*.sent", &[4]),
        ("*.opened", &[1, 8]),
        ("account.*,billing.>", &[1, 2, 4, 5]),
        ("billing.paid, shipping.sent", &[5, 6]),
        ("nothing.matches", &[]),
    ];
    for (pattern, expected) in cases {
        let page = broker.read(&[("types", pattern)]).await;
        assert_eq!(positions(&page), expected, "types={pattern}");
        for event in &page.events {
            assert_eq!(event.event_type, types[event.position as usize - 1]);
        }
        // The whole log was scanned: the next read continues after the head.
        assert_eq!(page.next_after, 8, "next_after of types={pattern}");
    }

    // A filtered page stops at its limit; next_after is the last event returned.
    let page = broker.read(&[("types", "account.>"), ("limit", "2")]).await;
    assert_eq!(positions(&page), [1, 2]);
    assert_eq!(page.next_after, 2);
    // Following next_after one event at a time finds the same events as one read.
    let mut after = 0;
    let mut found = Vec::new();
    loop {
        let page = broker
            .read(&[
                ("types", "billing.>,account"),
                ("limit", "1"),
                ("after", &after.to_string()),
            ])
            .await;
        assert!(page.next_after >= after, "next_after went backwards");
        found.extend(positions(&page));
        if page.events.is_empty() {
            assert_eq!(page.next_after, page.head);
            break;
        }
        after = page.next_after;
    }
    assert_eq!(found, [4, 5, 7]);
}

/// Publishes `n` events one request at a time (one commit each), returning their acks.
async fn publish_one_by_one(
    broker: &TestBroker,
    prefix: &str,
    n: usize,
) -> Vec<lockstep_proto::wire::PublishAck> {
    let mut acks = Vec::new();
    for i in 0..n {
        let ack = broker
            .publish(&json!({"type": "tick.tocked", "id": format!("{prefix}-{i}")}))
            .await;
        acks.extend(ack);
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_and_until_pick_events_by_broker_time() {
    let broker = TestBroker::start().await;
    publish_one_by_one(&broker, "before", 4).await;
    let marker = broker
        .publish(&json!({"type": "tick.marked", "id": "marker"}))
        .await
        .remove(0);
    publish_one_by_one(&broker, "after", 4).await;
    let all = broker.read_all(1000).await;
    assert_eq!(all.len(), 9);
    let t = marker.time;
    let m = marker.position;
    assert_eq!(m, 5);
    // Separate commits get increasing times; the assertions below rely on it.
    assert!(
        all[..4].iter().all(|e| e.time < t),
        "an earlier commit has the marker's time"
    );
    assert!(
        all[5..].iter().all(|e| e.time > t),
        "a later commit has the marker's time"
    );

    let since = broker.read(&[("since", &rfc3339(t))]).await;
    assert_eq!(
        positions(&since),
        (5..=9).collect::<Vec<_>>(),
        "since=marker's time"
    );
    assert_eq!(since.events[0].id, "marker");
    assert!(!since.complete, "no until, never complete");

    let just_after = t + chrono::Duration::nanoseconds(1);
    let since = broker.read(&[("since", &rfc3339(just_after))]).await;
    assert_eq!(
        positions(&since),
        (6..=9).collect::<Vec<_>>(),
        "since=marker's time + 1ns"
    );

    // The same instant written in another time zone.
    let zoned = t.with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap());
    let since = broker
        .read(&[("since", &zoned.to_rfc3339_opts(SecondsFormat::Nanos, false))])
        .await;
    assert_eq!(positions(&since)[0], m, "since with a +02:00 offset");

    // `since` and `after` together: whichever starts later wins.
    let page = broker.read(&[("since", &rfc3339(t)), ("after", "7")]).await;
    assert_eq!(positions(&page), [8, 9]);
    let page = broker.read(&[("since", &rfc3339(t)), ("after", "2")]).await;
    assert_eq!(positions(&page), (5..=9).collect::<Vec<_>>());

    let page = broker.read(&[("since", &rfc3339(t)), ("limit", "2")]).await;
    assert_eq!(positions(&page), [5, 6]);
    assert_eq!(page.next_after, 6);

    // `until` includes the event at exactly that time and stops before the next.
    let until = broker.read(&[("until", &rfc3339(t))]).await;
    assert_eq!(
        positions(&until),
        (1..=5).collect::<Vec<_>>(),
        "until=marker's time"
    );
    assert!(until.complete, "later events exist past until");
    assert_eq!(until.next_after, 5);

    let exactly = broker
        .read(&[("since", &rfc3339(t)), ("until", &rfc3339(t))])
        .await;
    assert_eq!(positions(&exactly), [m]);
    assert!(exactly.complete);

    let before = broker
        .read(&[("until", &rfc3339(t - chrono::Duration::nanoseconds(1)))])
        .await;
    assert_eq!(positions(&before), (1..=4).collect::<Vec<_>>());
    assert!(before.complete);

    // A page cut short by its limit before reaching `until` is not complete.
    let page = broker.read(&[("until", &rfc3339(t)), ("limit", "3")]).await;
    assert_eq!(positions(&page), [1, 2, 3]);
    assert!(!page.complete);
    let page = broker
        .read(&[
            ("until", &rfc3339(t)),
            ("after", &page.next_after.to_string()),
        ])
        .await;
    assert_eq!(positions(&page), [4, 5]);
    assert!(page.complete);

    // `since` past every event: nothing, and the next read starts after the head.
    let later = all[8].time + chrono::Duration::nanoseconds(1);
    let page = broker.read(&[("since", &rfc3339(later))]).await;
    assert!(page.events.is_empty());
    assert_eq!((page.next_after, page.head), (9, 9));
    let page = broker.read(&[("since", "1970-01-01T00:00:00Z")]).await;
    assert_eq!(page.events.len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_says_whether_until_can_still_match() {
    let broker = TestBroker::start().await;
    publish_one_by_one(&broker, "e", 3).await;
    let last = broker.head().await.time.unwrap();

    // until is in the past and every event up to the head was read: nothing more can match.
    let page = broker.read(&[("until", &rfc3339(last))]).await;
    assert_eq!(positions(&page), [1, 2, 3]);
    assert!(page.complete);
    let page = broker.read(&[("until", "2000-01-01T00:00:00Z")]).await;
    assert!(page.events.is_empty());
    assert!(page.complete, "until before the first event");

    // until is in the future: new events may still fall before it.
    let future = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let page = broker.read(&[("until", &future)]).await;
    assert_eq!(positions(&page), [1, 2, 3]);
    assert!(!page.complete);
    let acks = broker.publish(&json!({"type": "tick.tocked"})).await;
    let page = broker.read(&[("until", &future), ("after", "3")]).await;
    assert_eq!(positions(&page), [acks[0].position]);
    assert!(!page.complete);

    // The serialized form omits complete when false.
    let (_, body) = broker.get_events(&[("until", &future)]).await;
    assert!(body.get("complete").is_none(), "{body}");
    let (_, body) = broker.get_events(&[("until", &rfc3339(last))]).await;
    assert_eq!(body["complete"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_reader_wakes_on_publish() {
    let broker = TestBroker::start().await;
    broker.publish(&json!({"type": "x.y"})).await;
    let url = broker.at("/v1/events");
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let page: ReadResponse = reqwest::Client::new()
            .get(url)
            .query(&[("after", "1"), ("wait_ms", "10000")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (page, Instant::now())
    });
    // Not waiting for a condition: this lets the reader's request reach its wait, and checks
    // that a long-poll with nothing to return is still open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reader.is_finished(),
        "the long-poll returned with nothing to return"
    );

    let published = Instant::now();
    let ack = broker
        .publish(&json!({"type": "x.y", "id": "wake"}))
        .await
        .remove(0);
    let (page, returned) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the reader was not woken")
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].id, "wake");
    assert_eq!(page.events[0].hash, ack.hash);
    assert_eq!((page.head, page.next_after), (2, 2));
    let woke_in = returned.duration_since(published);
    assert!(
        woke_in < Duration::from_secs(2),
        "woke {woke_in:?} after the publish"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the reader waited out its wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_waiting_reader_skips_other_types() {
    let broker = TestBroker::start().await;
    let url = broker.at("/v1/events");
    let reader = tokio::spawn(async move {
        let page: ReadResponse = reqwest::Client::new()
            .get(url)
            .query(&[("types", "wanted.*"), ("wait_ms", "10000")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page
    });
    // Lets the reader reach its wait before the unwanted events, the path this test is about;
    // the answer must be the same whichever comes first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.publish(&json!({"type": "unwanted.thing"})).await;
    broker.publish(&json!({"type": "unwanted.other"})).await;
    let started = Instant::now();
    broker.publish(&json!({"type": "wanted.thing"})).await;
    let page = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the reader was not woken by the matching event")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(positions(&page), [3]);
    assert_eq!(page.events[0].event_type, "wanted.thing");
    assert_eq!(page.next_after, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_with_nothing_to_read_ends_after_wait_ms() {
    let broker = TestBroker::start().await;
    broker.publish(&json!({"type": "x.y"})).await;
    let started = Instant::now();
    let page = broker.read(&[("after", "1"), ("wait_ms", "700")]).await;
    let took = started.elapsed();
    assert!(page.events.is_empty());
    assert_eq!((page.head, page.next_after), (1, 1));
    assert!(
        took >= Duration::from_millis(650),
        "returned after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "returned after {took:?}");

    // Events already there: no waiting at all.
    let started = Instant::now();
    let page = broker.read(&[("wait_ms", "10000")]).await;
    assert_eq!(positions(&page), [1]);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unencoded_plus_in_a_time_still_reads_as_an_offset() {
    let broker = TestBroker::start().await;
    publish_one_by_one(&broker, "e", 3).await;
    let all = broker.read_all(100).await;
    let zoned = all[1]
        .time
        .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(SecondsFormat::Nanos, false);
    assert!(zoned.contains('+'));
    // Written into the URL as is: the query string decodes '+' to a space.
    let response = reqwest::get(format!("{}?since={zoned}", broker.at("/v1/events")))
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let page: ReadResponse = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(positions(&page), [2, 3]);
}

/// Guards against a long-poll with `since` in the future returning events from before `since`:
/// the time bound was turned into a start position once, before the wait (regression).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_never_returns_events_before_since() {
    let broker = TestBroker::start().await;
    broker.publish(&json!({"type": "x.y"})).await;
    let since = rfc3339(Utc::now() + chrono::Duration::hours(1));
    let url = broker.at("/v1/events");
    let query = since.clone();
    let reader = tokio::spawn(async move {
        let page: ReadResponse = reqwest::Client::new()
            .get(url)
            .query(&[("since", query.as_str()), ("wait_ms", "1500")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        page
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker
        .publish(&json!({"type": "x.y", "id": "too-early"}))
        .await;
    let page = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .unwrap()
        .unwrap();
    let since = DateTime::parse_from_rfc3339(&since).unwrap();
    for event in &page.events {
        assert!(
            event.time >= since,
            "event {} at {} is before since={since}",
            event.id,
            event.time
        );
    }
    // The same read without waiting agrees.
    let now = broker.read(&[("since", &rfc3339(since.to_utc()))]).await;
    assert!(now.events.is_empty());
}
