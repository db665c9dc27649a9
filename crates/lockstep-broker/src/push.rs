//! Push delivery: for every push subscription, one task POSTs its events in batches, in log
//! order, to the subscription's URL.
//!
//! Invariants:
//! - One batch is in flight per subscription, and the next batch is only read once the subscriber
//!   answered 2xx and the position moved past the batch: events arrive in log order.
//! - The position never moves past an event that was not delivered. A failed batch (transport
//!   error, timeout, non-2xx) is tried again, from the acknowledged position, after a capped
//!   exponential backoff with jitter. Consecutive failures are counted in
//!   [`PushHealth`](crate::registry::PushHealth), so a subscriber that keeps failing is shown as
//!   failing (and keeps being retried), never silently dropped.
//! - Delivery is at-least-once: positions reach disk every
//!   [`CURSOR_FLUSH_INTERVAL`](crate::registry::CURSOR_FLUSH_INTERVAL), so after a crash the last
//!   batches may come again. Every event carries its `position` for receivers to dedupe.
//! - A worker holds its [`Broker`] only while the broker runs: it returns as soon as the broker
//!   stops or its subscription is deleted or replaced, since `serve` waits for every handle.
//!
//! Bodies: for [`PushFormat::Json`], `application/json`
//! `{"subscription":{"service","replica"},"events":[event, ...]}` with events exactly as
//! `GET /v1/events` gives them; for [`PushFormat::Cloudevents`],
//! `application/cloudevents-batch+json`, an array of CloudEvents 1.0 with the extension
//! attributes `position` and `hash`. Every request names the subscription in
//! [`SUBSCRIPTION_HEADER`] and the batch's first and last positions in [`POSITIONS_HEADER`].

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chrono::SecondsFormat;
use lockstep_proto::record::JSON_CONTENT_TYPE;
use lockstep_proto::subscription::PushFormat;
use lockstep_proto::wire::Event;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::Broker;
use crate::read::Layout;
use crate::registry::Subscription;

/// Most events in one pushed batch.
pub const PUSH_BATCH: usize = 1_000;
/// How long a caught-up worker long-polls the log for new events before reading again.
pub const PUSH_WAIT: Duration = Duration::from_secs(10);
/// How long one delivery (connecting, sending, the answer) may take before it counts as failed.
pub const PUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Delay before the first retry; it doubles with every consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest delay between retries.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Request header naming the subscription: `service/replica`.
pub const SUBSCRIPTION_HEADER: &str = "lockstep-subscription";
/// Request header with the batch's first and last positions: `first-last`.
pub const POSITIONS_HEADER: &str = "lockstep-positions";
/// Content type of a CloudEvents batch.
pub const CLOUDEVENTS_BATCH: &str = crate::cloudevents::BATCH;

/// Most bytes of a subscriber's answer read (and dropped) so its connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Longest `last_error` kept, in bytes.
const MAX_ERROR_LEN: usize = 512;

/// Starts the push worker of `sub`.
pub(crate) fn spawn(broker: Broker, sub: Arc<Subscription>) {
    if sub
        .push_worker
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return; // Its worker is already running.
    }
    tokio::spawn(async move {
        let mut stopping = broker.inner.stopping.subscribe();
        let mut removed = sub.removed.subscribe();
        // Dropping `run` at any await point is safe: the position only moves after a 2xx, so an
        // interrupted batch is delivered again by the next worker (at-least-once).
        tokio::select! {
            () = run(&broker, &sub) => {}
            _ = stopping.wait_for(|stop| *stop) => {}
            _ = removed.wait_for(|removed| *removed) => {}
        }
        tracing::debug!(subscription = %sub.key(), "push worker stopped");
        sub.push_worker
            .store(false, std::sync::atomic::Ordering::Release);
    });
}

async fn run(broker: &Broker, sub: &Subscription) {
    let Some(url) = sub.push_url() else {
        return;
    };
    // Redirects are not followed: reqwest would turn a 301-303 into a bodiless GET, whose 2xx
    // would count as a delivery. A 3xx is a failure, shown in `last_error`.
    let client = reqwest::Client::builder()
        .timeout(PUSH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build();
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(subscription = %sub.key(), error = %e, "push worker has no HTTP client");
            fail(sub, format!("no HTTP client: {e}"));
            return;
        }
    };
    // Read failures are the broker's own trouble, not the subscriber's: counted apart.
    let mut read_failures = 0u32;
    loop {
        let page = match broker
            .subscription_page(sub, None, PUSH_BATCH, PUSH_WAIT, Layout::Lines)
            .await
        {
            Ok(page) => {
                read_failures = 0;
                page
            }
            Err(e) => {
                read_failures = read_failures.saturating_add(1);
                tracing::error!(subscription = %sub.key(), error = %e, "push worker cannot read the log");
                tokio::time::sleep(backoff(u64::from(read_failures), jitter())).await;
                continue;
            }
        };
        if page.count > 0 {
            let result = match encode(sub, &page.body) {
                Ok(batch) => deliver(&client, url, sub, &batch).await,
                Err(e) => Err(format!("encoding a batch: {e}")),
            };
            if let Err(error) = result {
                let failures = fail(sub, error);
                tokio::time::sleep(backoff(failures, jitter())).await;
                continue;
            }
            let failures = sub.push.failures.swap(0, Relaxed);
            if let Ok(mut last) = sub.push.last_error.lock() {
                *last = None;
            }
            if failures > 0 {
                tracing::info!(subscription = %sub.key(), url, failures, "push delivery recovered");
            }
        }
        // Everything up to `next_after` is delivered or filtered out. The page never reads past
        // the head, so this ack is always valid; it goes to this very subscription, not whatever
        // now holds its name.
        broker.inner.registry.ack(sub, page.next_after);
        if page.complete {
            tracing::info!(subscription = %sub.key(), "push subscription delivered its whole range");
            return;
        }
    }
}

/// Records a failed delivery; returns the number of consecutive failures.
fn fail(sub: &Subscription, mut error: String) -> u64 {
    if error.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    let failures = sub.push.failures.fetch_add(1, Relaxed) + 1;
    sub.push.total_failures.fetch_add(1, Relaxed);
    // A subscriber down for hours fails thousands of times: log the 1st, 2nd, 4th, 8th...
    if failures.is_power_of_two() {
        tracing::warn!(subscription = %sub.key(), failures, error = %error, "push delivery failed");
    }
    if let Ok(mut last) = sub.push.last_error.lock() {
        *last = Some(error);
    }
    failures
}

/// The delay after the `failures`-th consecutive failure: [`BACKOFF_BASE`] doubled per failure,
/// scaled by `jitter` (0.5 to 1.5, so retries of many subscriptions spread out), at most
/// [`BACKOFF_CAP`].
fn backoff(failures: u64, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20) as u32;
    let delay = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_CAP);
    delay.mul_f64(jitter.clamp(0.5, 1.5)).min(BACKOFF_CAP)
}

/// A factor in 0.5..1.5, from the random bits of a UUIDv7 (no PRNG dependency needed).
fn jitter() -> f64 {
    let bits = uuid::Uuid::now_v7().as_u128() as u64 & ((1 << 53) - 1);
    0.5 + bits as f64 / (1u64 << 53) as f64
}

/// One encoded batch.
struct Batch {
    body: bytes::Bytes,
    content_type: &'static str,
    first: u64,
    last: u64,
}

/// A CloudEvent 1.0 as pushed: the mapping of [`crate::cloudevents`] read backwards, with the
/// log's `position` and `hash` as extension attributes.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    time: String,
    datacontenttype: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<&'a str>,
    position: u64,
    hash: &'a str,
}

impl<'a> CloudEvent<'a> {
    fn from_event(event: &'a Event) -> Self {
        Self {
            specversion: "1.0",
            id: &event.id,
            source: if event.source.is_empty() {
                "/lockstep"
            } else {
                &event.source
            },
            event_type: &event.event_type,
            subject: event.key.as_deref(),
            time: event
                .occurred_at
                .unwrap_or(event.time)
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            datacontenttype: event.content_type.as_deref().unwrap_or(JSON_CONTENT_TYPE),
            data: event.data.as_deref(),
            data_base64: event.data_base64.as_deref(),
            position: event.position,
            hash: &event.hash,
        }
    }
}

/// Encodes a page of [`Layout::Lines`] as the subscription's push body.
///
/// The page is split with a JSON stream reader, not on newlines: JSON data is stored as it was
/// published and may hold newlines of its own.
fn encode(sub: &Subscription, lines: &[u8]) -> Result<Batch, serde_json::Error> {
    let format = sub.push_format();
    let mut body = Vec::with_capacity(lines.len() + 64);
    let content_type = match format {
        PushFormat::Json => {
            body.extend_from_slice(b"{\"subscription\":");
            serde_json::to_writer(
                &mut body,
                &serde_json::json!({"service": sub.service(), "replica": sub.replica()}),
            )?;
            body.extend_from_slice(b",\"events\":[");
            JSON_CONTENT_TYPE
        }
        PushFormat::Cloudevents => {
            body.push(b'[');
            CLOUDEVENTS_BATCH
        }
    };
    let (mut first, mut last) = (None, 0);
    for (i, raw) in serde_json::Deserializer::from_slice(lines)
        .into_iter::<&RawValue>()
        .enumerate()
    {
        let raw = raw?;
        let event: Event = serde_json::from_str(raw.get())?;
        if i > 0 {
            body.push(b',');
        }
        match format {
            PushFormat::Json => body.extend_from_slice(raw.get().as_bytes()),
            PushFormat::Cloudevents => {
                serde_json::to_writer(&mut body, &CloudEvent::from_event(&event))?;
            }
        }
        first.get_or_insert(event.position);
        last = event.position;
    }
    body.extend_from_slice(match format {
        PushFormat::Json => b"]}",
        PushFormat::Cloudevents => b"]",
    });
    Ok(Batch {
        body: body.into(),
        content_type,
        first: first.unwrap_or(0),
        last,
    })
}

/// POSTs one batch; `Err` is the failure's one-line description.
async fn deliver(
    client: &reqwest::Client,
    url: &str,
    sub: &Subscription,
    batch: &Batch,
) -> Result<(), String> {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, batch.content_type)
        .header(SUBSCRIPTION_HEADER, sub.key())
        .header(POSITIONS_HEADER, format!("{}-{}", batch.first, batch.last))
        .body(batch.body.clone())
        .send()
        .await
        .map_err(|e| format!("POST {url}: {}", chain(&e.without_url())))?;
    let status = response.status();
    // Read (a bounded part of) the answer, so the connection can serve the next batch.
    let mut response = response;
    let mut read = 0;
    while read < MAX_ANSWER_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) => break,
            // The status is what counts; a broken answer body only costs the connection.
            Err(_) => break,
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status} from {url}"))
    }
}

/// An error and its sources on one line: reqwest's own message rarely says what went wrong.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_to_the_cap_with_bounded_jitter() {
        assert_eq!(backoff(1, 1.0), BACKOFF_BASE);
        assert_eq!(backoff(2, 1.0), BACKOFF_BASE * 2);
        assert_eq!(backoff(4, 1.0), BACKOFF_BASE * 8);
        assert_eq!(backoff(1, 0.5), BACKOFF_BASE / 2);
        assert_eq!(backoff(1_000, 1.5), BACKOFF_CAP);
        assert_eq!(backoff(u64::MAX, 1.0), BACKOFF_CAP);
        for _ in 0..1_000 {
            let j = jitter();
            assert!((0.5..1.5).contains(&j), "{j}");
        }
    }

    fn subscription(format: PushFormat) -> Arc<Subscription> {
        let dir = tempfile::tempdir().unwrap();
        let registry = crate::registry::Registry::open(dir.path()).unwrap();
        let spec = lockstep_proto::subscription::SubscriptionSpec {
            service: "bank".into(),
            replica: "b-1".into(),
            types: vec!["*".into()],
            start: lockstep_proto::subscription::Start::Named(
                lockstep_proto::subscription::StartName::Beginning,
            ),
            end: None,
            push_url: Some("http://127.0.0.1:9/hook".into()),
            push_format: Some(format),
        };
        registry.create(&spec, false, 0, |_| Ok(1)).unwrap().0
    }

    /// Two events as `Layout::Lines` writes them; the first one's data holds a newline.
    const LINES: &[u8] =
        b"{\"position\":3,\"id\":\"e3\",\"type\":\"account.opened\",\"source\":\"\",\
\"key\":\"acc-1\",\"time\":\"2026-01-02T03:04:05.123Z\",\"data\":{\"a\": 1,\n \"b\": [1, 2]},\
\"hash\":\"aa\"}\n\
{\"position\":7,\"id\":\"e7\",\"type\":\"file.stored\",\"source\":\"files\",\
\"time\":\"2026-01-02T03:04:06Z\",\"occurred_at\":\"2025-12-31T00:00:00Z\",\
\"content_type\":\"application/octet-stream\",\"data_base64\":\"AAE=\",\"hash\":\"bb\"}\n";

    #[test]
    fn json_batches_carry_the_events_byte_for_byte() {
        let batch = encode(&subscription(PushFormat::Json), LINES).unwrap();
        assert_eq!(batch.content_type, "application/json");
        assert_eq!((batch.first, batch.last), (3, 7));
        let text = std::str::from_utf8(&batch.body).unwrap();
        assert!(
            text.contains("\"data\":{\"a\": 1,\n \"b\": [1, 2]}"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(
            v["subscription"],
            serde_json::json!({"service": "bank", "replica": "b-1"})
        );
        let positions: Vec<_> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect();
        assert_eq!(positions, [3, 7]);
    }

    #[test]
    fn cloudevents_batches_map_every_attribute() {
        let batch = encode(&subscription(PushFormat::Cloudevents), LINES).unwrap();
        assert_eq!(batch.content_type, "application/cloudevents-batch+json");
        let text = std::str::from_utf8(&batch.body).unwrap();
        assert!(
            text.contains("\"data\":{\"a\": 1,\n \"b\": [1, 2]}"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&batch.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {
                    "specversion": "1.0", "id": "e3", "source": "/lockstep",
                    "type": "account.opened", "subject": "acc-1",
                    "time": "2026-01-02T03:04:05.123Z", "datacontenttype": "application/json",
                    "data": {"a": 1, "b": [1, 2]}, "position": 3, "hash": "aa"
                },
                {
                    "specversion": "1.0", "id": "e7", "source": "files", "type": "file.stored",
                    "time": "2025-12-31T00:00:00Z",
                    "datacontenttype": "application/octet-stream", "data_base64": "AAE=",
                    "position": 7, "hash": "bb"
                }
            ])
        );
    }

    #[test]
    fn failures_are_counted_and_described_on_one_bounded_line() {
        let sub = subscription(PushFormat::Json);
        assert_eq!(fail(&sub, "first".into()), 1);
        assert_eq!(fail(&sub, "é".repeat(MAX_ERROR_LEN)), 2);
        assert_eq!(sub.push.total_failures.load(Relaxed), 2);
        let last = sub.push.last_error.lock().unwrap().clone().unwrap();
        assert!(last.len() <= MAX_ERROR_LEN && last.starts_with('é'));
    }
}
