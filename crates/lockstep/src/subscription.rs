//! The registrar from the client side: subscribing, pulling pages or a stream from a
//! subscription's position, and acknowledging what has been applied.
//!
//! A subscription is the broker's memory of how far one replica of a service has got. Delivery
//! starts after its acknowledged position, so a replica that restarts carries on where it
//! acknowledged last; events after that position may be delivered again (at-least-once), which
//! is why a replica applies them idempotently or by position.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lockstep_proto::consistency::{
    CreateMark, EntriesReport, Explanation, Mark, MarkAt, MarkList, ReportAnswer, StateReport,
    Verification,
};
use lockstep_proto::subscription::{
    Ack, ReplicaStatus, Stuck, SubscriptionInfo, SubscriptionList, SubscriptionSpec,
};
use lockstep_proto::wire::{Event, ReadResponse};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::client::{Client, ClientError, REQUEST_TIMEOUT, api_error, decode};

/// Longest NDJSON line a [`SubscriptionStream`] accepts: 16 MiB, room for the largest event the
/// broker stores (4 MiB bodies by default, a third more when base64-encoded) with margin. A
/// longer line ends the stream with [`ClientError::Protocol`] instead of growing the buffer.
pub const MAX_STREAM_LINE_BYTES: usize = 16 << 20;

/// How long a stream may stay silent before it counts as dead ([`ClientError::Stalled`]): three
/// of the broker's 15-second heartbeats.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Parameters of a pull from a subscription (`GET /v1/subscriptions/{service}/{replica}/events`).
///
/// The default pulls from the subscription's acknowledged position, the broker's default page
/// size (1000), without waiting.
#[derive(Debug, Clone, Default)]
pub struct PullRequest {
    /// Start after this position instead of the acknowledged one (to read ahead of acks).
    pub after: Option<u64>,
    /// Most events to return (broker default 1000, max 10000).
    pub limit: Option<usize>,
    /// Long-poll up to this long for a new event when there is none.
    pub wait: Option<Duration>,
}

impl PullRequest {
    /// From the acknowledged position, with the broker's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start after `position` instead of the acknowledged position.
    pub fn after(mut self, position: u64) -> Self {
        self.after = Some(position);
        self
    }

    /// At most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Wait up to `wait` for a new event if there is none.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        if let Some(after) = self.after {
            q.push(("after", after.to_string()));
        }
        if let Some(limit) = self.limit {
            q.push(("limit", limit.to_string()));
        }
        if let Some(wait) = self.wait {
            q.push(("wait_ms", wait.as_millis().to_string()));
        }
        q
    }
}

impl Client {
    /// Registers a subscription. Answers it with `true` when it was created, `false` when the
    /// same subscription already existed (subscribing is idempotent, so a replica can subscribe
    /// at every start). A different spec under the same service and replica fails with a 409
    /// `subscription_conflict` ([`ClientError::is_conflict`]) unless `replace` is set, which
    /// replaces it (and its position).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), lockstep::ClientError> {
    /// use lockstep::{Client, Start, StartName, SubscriptionSpec};
    ///
    /// let client = Client::new("http://127.0.0.1:7700")?;
    /// let spec = SubscriptionSpec {
    ///     service: "bank".into(),
    ///     replica: "b-1".into(),
    ///     types: vec!["account.*".into()],
    ///     start: Start::Named(StartName::Beginning),
    ///     end: None,
    ///     push_url: None,
    ///     push_format: None,
    /// };
    /// let (info, created) = client.subscribe(&spec, false).await?;
    /// println!("created: {created}, position {}", info.position);
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
        replace: bool,
    ) -> Result<(SubscriptionInfo, bool), ClientError> {
        let mut request = self
            .http
            .post(format!("{}/v1/subscriptions", self.base))
            .timeout(REQUEST_TIMEOUT)
            .json(spec);
        if replace {
            request = request.query(&[("replace", "true")]);
        }
        let response = request.send().await.map_err(ClientError::Unreachable)?;
        let created = response.status() == StatusCode::CREATED;
        Ok((decode(response).await?, created))
    }

    /// Every subscription with its position, lag and state, and the log's head.
    pub async fn subscriptions(&self) -> Result<SubscriptionList, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/subscriptions", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// One subscription with its position, lag and state; a 404 when there is none.
    pub async fn subscription(
        &self,
        service: &str,
        replica: &str,
    ) -> Result<SubscriptionInfo, ClientError> {
        let response = self
            .http
            .get(self.subscription_url(service, replica, None)?)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Deletes a subscription and its position; open streams of it end. A 404 when there is
    /// none.
    pub async fn unsubscribe(&self, service: &str, replica: &str) -> Result<(), ClientError> {
        let response = self
            .http
            .delete(self.subscription_url(service, replica, None)?)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        no_content(response).await
    }

    /// Pulls one page of a subscription's events: its types (control records always included),
    /// within its range, after its acknowledged position unless `request.after` says otherwise.
    /// Pulling does not move the position: [`ack`](Client::ack) does.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), lockstep::ClientError> {
    /// use std::time::Duration;
    /// use lockstep::{Client, PullRequest};
    ///
    /// let client = Client::new("http://127.0.0.1:7700")?;
    /// let request = PullRequest::new().limit(500).wait(Duration::from_secs(20));
    /// let page = client.pull("bank", "b-1", &request).await?;
    /// for event in &page.events {
    ///     println!("{} {}", event.position, event.event_type);
    /// }
    /// client.ack("bank", "b-1", page.next_after).await?;
    /// # Ok(()) }
    /// ```
    pub async fn pull(
        &self,
        service: &str,
        replica: &str,
        request: &PullRequest,
    ) -> Result<ReadResponse, ClientError> {
        let response = self
            .http
            .get(self.subscription_url(service, replica, Some("events"))?)
            .query(&request.query())
            .timeout(REQUEST_TIMEOUT + request.wait.unwrap_or_default())
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Acknowledges everything up to and including `position` as applied. The position only
    /// moves forward: acknowledging an older position changes nothing. Returns the
    /// subscription's position after the ack.
    pub async fn ack(
        &self,
        service: &str,
        replica: &str,
        position: u64,
    ) -> Result<u64, ClientError> {
        let response = self
            .http
            .post(self.subscription_url(service, replica, Some("ack"))?)
            .timeout(REQUEST_TIMEOUT)
            .json(&Ack { position })
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let ack: Ack = decode(response).await?;
        Ok(ack.position)
    }

    /// Reports that this replica is stuck at an event (`Some`), or no longer (`None`), so that
    /// `GET /v1/subscriptions` and `lockstep subs` show it.
    pub async fn report_stuck(
        &self,
        service: &str,
        replica: &str,
        stuck: Option<Stuck>,
    ) -> Result<(), ClientError> {
        let response = self
            .http
            .post(self.subscription_url(service, replica, Some("status"))?)
            .timeout(REQUEST_TIMEOUT)
            .json(&ReplicaStatus { stuck })
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        no_content(response).await
    }

    /// Opens a stream of a subscription's events, after its acknowledged position unless
    /// `after` is given. Events arrive as they are committed; a quiet stream carries heartbeats.
    /// The stream does not acknowledge: call [`ack`](Client::ack) as events are applied (every
    /// so often is enough, since delivery resumes after the acknowledged position).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), lockstep::ClientError> {
    /// use lockstep::{Client, StreamItem};
    ///
    /// let client = Client::new("http://127.0.0.1:7700")?;
    /// let mut stream = client.stream("bank", "b-1", None).await?;
    /// while let Some(item) = stream.next().await {
    ///     match item? {
    ///         StreamItem::Event(event) => {
    ///             println!("{} {}", event.position, event.event_type);
    ///             client.ack("bank", "b-1", event.position).await?;
    ///         }
    ///         StreamItem::Heartbeat { .. } => {}
    ///         StreamItem::Complete => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stream(
        &self,
        service: &str,
        replica: &str,
        after: Option<u64>,
    ) -> Result<SubscriptionStream, ClientError> {
        let mut request = self
            .http
            .get(self.subscription_url(service, replica, Some("stream"))?);
        if let Some(after) = after {
            request = request.query(&[("after", after)]);
        }
        // No overall timeout: a stream lives as long as the subscriber wants. Silence is caught
        // per chunk instead (STREAM_IDLE_TIMEOUT).
        let response = tokio::time::timeout(REQUEST_TIMEOUT, request.send())
            .await
            .map_err(|_| ClientError::Stalled(REQUEST_TIMEOUT))?
            .map_err(ClientError::Unreachable)?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.bytes().await.map_err(ClientError::Unreachable)?;
            return Err(api_error(status, &body));
        }
        Ok(SubscriptionStream {
            response: Some(response),
            lines: LineSplitter::new(MAX_STREAM_LINE_BYTES),
            idle_timeout: STREAM_IDLE_TIMEOUT,
            last_position: after,
        })
    }

    /// `{base}/v1/subscriptions/{service}/{replica}[/{tail}]`, names percent-encoded.
    fn subscription_url(
        &self,
        service: &str,
        replica: &str,
        tail: Option<&str>,
    ) -> Result<Url, ClientError> {
        let mut url = Url::parse(&format!("{}/v1/subscriptions", self.base))
            .map_err(|e| ClientError::Protocol(format!("bad broker URL {:?}: {e}", self.base)))?;
        {
            let mut segments = url.path_segments_mut().map_err(|()| {
                ClientError::Protocol(format!(
                    "bad broker URL {:?}: cannot have a path",
                    self.base
                ))
            })?;
            segments.push(service).push(replica);
            if let Some(tail) = tail {
                segments.push(tail);
            }
        }
        Ok(url)
    }
}

/// One line of a subscription stream.
#[derive(Debug)]
// Nearly every item is an event, so boxing it would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
pub enum StreamItem {
    /// The next event of the subscription.
    Event(Event),
    /// Nothing new for a while; the log's head is at `head`. Proves the connection alive.
    Heartbeat {
        /// The log's head when the heartbeat was sent.
        head: u64,
    },
    /// A bounded subscription has delivered its whole range; the stream ends after this.
    Complete,
}

/// The events of a subscription as the broker commits them, from [`Client::stream`].
///
/// Reads the NDJSON response body incrementally, holding at most one line beyond the chunk
/// being read ([`MAX_STREAM_LINE_BYTES`]). After an error or [`StreamItem::Complete`], and when
/// the broker ends the stream (the subscription was deleted or the broker is stopping),
/// [`next`](SubscriptionStream::next) answers `None`.
pub struct SubscriptionStream {
    /// `None` once the body has ended or failed.
    response: Option<reqwest::Response>,
    lines: LineSplitter,
    idle_timeout: Duration,
    last_position: Option<u64>,
}

impl SubscriptionStream {
    /// The next event, heartbeat or completion; `None` when the stream has ended.
    pub async fn next(&mut self) -> Option<Result<StreamItem, ClientError>> {
        loop {
            match self.lines.next_line() {
                Ok(Some(line)) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let item = parse_line(&line);
                    match &item {
                        Ok(StreamItem::Event(event)) => self.last_position = Some(event.position),
                        Ok(StreamItem::Complete) | Err(_) => self.end(),
                        Ok(StreamItem::Heartbeat { .. }) => {}
                    }
                    return Some(item);
                }
                Ok(None) => {}
                Err(e) => {
                    self.end();
                    return Some(Err(e));
                }
            }
            let response = self.response.as_mut()?;
            match tokio::time::timeout(self.idle_timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) => self.lines.push(&chunk),
                Ok(Ok(None)) => {
                    self.response = None;
                    if !self.lines.is_empty() {
                        self.end();
                        return Some(Err(ClientError::Protocol(
                            "stream ended in the middle of a line".into(),
                        )));
                    }
                    return None;
                }
                Ok(Err(e)) => {
                    self.end();
                    return Some(Err(ClientError::Unreachable(e)));
                }
                Err(_) => {
                    self.end();
                    return Some(Err(ClientError::Stalled(self.idle_timeout)));
                }
            }
        }
    }

    /// Position of the last event delivered by this stream, or the `after` it was opened with.
    /// Reopening with this as `after` resumes without repeats.
    pub fn last_position(&self) -> Option<u64> {
        self.last_position
    }

    fn end(&mut self) {
        self.response = None;
        self.lines.clear();
    }
}

impl std::fmt::Debug for SubscriptionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionStream")
            .field("open", &self.response.is_some())
            .field("buffered", &self.lines.pending.len())
            .field("last_position", &self.last_position)
            .finish()
    }
}

/// The non-event lines of a stream.
#[derive(Deserialize)]
struct ControlLine {
    #[serde(default)]
    heartbeat: bool,
    #[serde(default)]
    head: Option<u64>,
    #[serde(default)]
    complete: bool,
}

fn parse_line(line: &[u8]) -> Result<StreamItem, ClientError> {
    // Events are nearly every line, and a control line is never a valid event: try events first.
    let event_error = match serde_json::from_slice::<Event>(line) {
        Ok(event) => return Ok(StreamItem::Event(event)),
        Err(e) => e,
    };
    match serde_json::from_slice::<ControlLine>(line) {
        Ok(ControlLine { complete: true, .. }) => Ok(StreamItem::Complete),
        Ok(ControlLine {
            heartbeat: true,
            head: Some(head),
            ..
        }) => Ok(StreamItem::Heartbeat { head }),
        _ => {
            let shown: String = String::from_utf8_lossy(line).chars().take(120).collect();
            Err(ClientError::Protocol(format!(
                "undecodable stream line ({event_error}): {shown}"
            )))
        }
    }
}

/// Splits a byte stream into `\n`-terminated lines, keeping a partial line across chunks.
///
/// Invariant: `pending[..searched]` holds no `\n`, so each byte is searched once however many
/// chunks a long line spans. The partial line is bounded by `max_line`.
struct LineSplitter {
    pending: BytesMut,
    searched: usize,
    max_line: usize,
}

impl LineSplitter {
    fn new(max_line: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            searched: 0,
            max_line,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
    }

    /// The next complete line without its `\n` (nor a `\r` before it), `None` until one is
    /// complete, or an error once the partial line is longer than the bound.
    fn next_line(&mut self) -> Result<Option<Bytes>, ClientError> {
        let found = self.pending[self.searched..]
            .iter()
            .position(|&b| b == b'\n');
        let Some(offset) = found else {
            self.searched = self.pending.len();
            if self.pending.len() > self.max_line {
                return Err(self.too_long());
            }
            return Ok(None);
        };
        let end = self.searched + offset;
        self.searched = 0;
        if end > self.max_line {
            return Err(self.too_long());
        }
        let mut line = self.pending.split_to(end + 1);
        line.truncate(end);
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        // The consumed front is reclaimed by BytesMut when the next chunk is pushed, once the
        // caller has dropped the lines that share it.
        Ok(Some(line.freeze()))
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn clear(&mut self) {
        self.pending = BytesMut::new();
        self.searched = 0;
    }

    fn too_long(&self) -> ClientError {
        ClientError::Protocol(format!(
            "stream line longer than {} bytes; is this a Lockstep stream?",
            self.max_line
        ))
    }
}

impl Client {
    /// Reports this replica's state hash at a barrier (`POST /v1/reports`); the answer may ask
    /// for entries to explain a divergence.
    pub async fn report_state(&self, report: &StateReport) -> Result<ReportAnswer, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/reports", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(report)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(ReportAnswer::default());
        }
        decode(response).await
    }

    /// Sends entries the broker asked for (`POST /v1/reports/entries`).
    pub async fn report_entries(&self, report: &EntriesReport) -> Result<(), ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/reports/entries", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(report)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        no_content(response).await
    }

    /// Which keys differ between a service's majority and its odd replicas (`GET /v1/explain`).
    pub async fn explain(&self, service: &str) -> Result<Explanation, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/explain", self.url()))
            .query(&[("service", service)])
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Whether every service's replicas hold the same state (`GET /v1/verify`).
    pub async fn verify(&self, service: Option<&str>) -> Result<Verification, ClientError> {
        let mut request = self.http.get(format!("{}/v1/verify", self.url()));
        if let Some(service) = service {
            request = request.query(&[("service", service)]);
        }
        let response = request
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Creates a named, immutable mark (`POST /v1/marks`): at a position, the head, or the
    /// latest barrier every service's replicas agreed at.
    pub async fn create_mark(&self, name: &str, at: MarkAt) -> Result<Mark, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/marks", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .json(&CreateMark {
                name: name.to_owned(),
                at,
            })
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Every mark, by position (`GET /v1/marks`).
    pub async fn marks(&self) -> Result<MarkList, ClientError> {
        let response = self
            .http
            .get(format!("{}/v1/marks", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// Appends a barrier now (`POST /v1/barriers`); returns its position.
    pub async fn barrier(&self) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Position {
            position: u64,
        }
        let response = self
            .http
            .post(format!("{}/v1/barriers", self.url()))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let answer: Position = decode(response).await?;
        Ok(answer.position)
    }
}

/// An answer without a body: success, or the broker's error.
pub(crate) async fn no_content(response: reqwest::Response) -> Result<(), ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.bytes().await.map_err(ClientError::Unreachable)?;
    Err(api_error(status, &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(splitter: &mut LineSplitter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = splitter.next_line().unwrap() {
            out.push(String::from_utf8(line.to_vec()).unwrap());
        }
        out
    }

    #[test]
    fn splits_lines_and_keeps_partial_ones_across_chunks() {
        let mut s = LineSplitter::new(1024);
        s.push(b"{\"a\":1}\n{\"b\":");
        assert_eq!(lines(&mut s), ["{\"a\":1}"]);
        assert!(!s.is_empty());
        s.push(b"2");
        assert_eq!(lines(&mut s), Vec::<String>::new());
        s.push(b"}\n\n{\"c\":3}\r\n");
        assert_eq!(lines(&mut s), ["{\"b\":2}", "", "{\"c\":3}"]);
        assert!(s.is_empty());
    }

    #[test]
    fn every_split_point_gives_the_same_lines() {
        let body = b"{\"position\":1}\n{\"heartbeat\":true,\"head\":7}\n{\"complete\":true}\n";
        for cut in 0..=body.len() {
            for cut2 in cut..=body.len() {
                let mut s = LineSplitter::new(1024);
                let mut got = Vec::new();
                for part in [&body[..cut], &body[cut..cut2], &body[cut2..]] {
                    s.push(part);
                    got.extend(lines(&mut s));
                }
                assert_eq!(
                    got,
                    [
                        "{\"position\":1}",
                        "{\"heartbeat\":true,\"head\":7}",
                        "{\"complete\":true}"
                    ],
                    "cuts at {cut} and {cut2}"
                );
                assert!(s.is_empty());
            }
        }
    }

    #[test]
    fn a_line_longer_than_the_bound_is_an_error_not_growth() {
        let mut s = LineSplitter::new(8);
        s.push(b"0123");
        assert!(s.next_line().unwrap().is_none());
        s.push(b"456789");
        assert!(matches!(s.next_line(), Err(ClientError::Protocol(_))));

        let mut s = LineSplitter::new(8);
        s.push(b"0123456789\n");
        assert!(s.next_line().is_err());

        let mut s = LineSplitter::new(8);
        s.push(b"01234567\nab");
        assert_eq!(lines(&mut s), ["01234567"]);
    }

    #[test]
    fn parses_events_heartbeats_and_completion() {
        let event = br#"{"position":3,"id":"e3","type":"account.opened","source":"","time":"2026-11-01T00:00:00.000000000Z","data":{"owner":"ann"},"hash":"ab"}"#;
        match parse_line(event).unwrap() {
            StreamItem::Event(e) => {
                assert_eq!(e.position, 3);
                assert_eq!(e.data.unwrap().get(), r#"{"owner":"ann"}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_line(br#"{"heartbeat":true,"head":42}"#).unwrap(),
            StreamItem::Heartbeat { head: 42 }
        ));
        assert!(matches!(
            parse_line(br#"{"complete":true}"#).unwrap(),
            StreamItem::Complete
        ));
        assert!(matches!(
            parse_line(br#"{"colour":1}"#),
            Err(ClientError::Protocol(_))
        ));
        assert!(parse_line(b"not json").is_err());
    }
}
