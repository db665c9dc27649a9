//! The HTTP client.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use lockstep_proto::wire::{
    ErrorBody, Event, Head, NewEvent, PublishAck, PublishResponse, ReadResponse,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

/// How long a request may take beyond any long-poll wait it asks for.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle to one broker. Clones share a connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) base: Arc<str>,
}

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker refused the request: a 4xx or 5xx with its JSON error body.
    #[error("{message} ({status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The broker's error code, e.g. `head_conflict`, `invalid_event`.
        code: String,
        /// The broker's explanation.
        message: String,
        /// For conflicts: the current head or key position.
        current: Option<u64>,
        /// For errors about one event of a batch: its index.
        index: Option<usize>,
    },
    /// The broker could not be reached or the connection broke; the request may or may not have
    /// been applied (publishing again with the same event ids is safe).
    #[error("broker unreachable: {0}")]
    Unreachable(#[source] reqwest::Error),
    /// The broker answered something this SDK does not understand.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// An event could not be encoded.
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
    /// A subscription stream went silent for this long although the broker sends heartbeats
    /// more often: the connection is presumed dead. Open a new stream to carry on.
    #[error("the broker sent nothing for {0:?} on a stream; connection presumed dead")]
    Stalled(Duration),
}

impl ClientError {
    /// Whether the same request may succeed later unchanged (broker down, overloaded or stopping).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) | ClientError::Stalled(_) => true,
            ClientError::Api { status, .. } => *status == 503 || *status >= 500,
            ClientError::Protocol(_) | ClientError::Encode(_) => false,
        }
    }

    /// Whether this is an optimistic-concurrency conflict (409); `current` says the current value.
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Api { status: 409, .. })
    }
}

/// Parameters of a read (`GET /v1/events`). Build with [`ReadRequest::after`].
#[derive(Debug, Clone, Default)]
pub struct ReadRequest {
    /// Start after this position.
    pub after: u64,
    /// Most events to return (broker default 1000, max 10000).
    pub limit: Option<usize>,
    /// Comma-separated type patterns.
    pub types: Option<String>,
    /// Start at the first event at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Stop before the first event after this time.
    pub until: Option<DateTime<Utc>>,
    /// Long-poll up to this long for a new event.
    pub wait: Option<Duration>,
    /// Return events superseded by rollbacks too (each marked `superseded`).
    pub include_superseded: bool,
}

impl ReadRequest {
    /// Events after `position`.
    pub fn after(position: u64) -> Self {
        Self {
            after: position,
            ..Self::default()
        }
    }

    /// At most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Only types matching these comma-separated patterns.
    pub fn types(mut self, patterns: impl Into<String>) -> Self {
        self.types = Some(patterns.into());
        self
    }

    /// From the first event at or after `time`.
    pub fn since(mut self, time: DateTime<Utc>) -> Self {
        self.since = Some(time);
        self
    }

    /// Up to the last event at or before `time`.
    pub fn until(mut self, time: DateTime<Utc>) -> Self {
        self.until = Some(time);
        self
    }

    /// Wait up to `wait` for a new event if there is none.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Superseded events too (the audit view).
    pub fn include_superseded(mut self) -> Self {
        self.include_superseded = true;
        self
    }

    fn query(&self) -> Vec<(&'static str, String)> {
        let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let mut q = vec![("after", self.after.to_string())];
        if let Some(limit) = self.limit {
            q.push(("limit", limit.to_string()));
        }
        if let Some(types) = &self.types {
            q.push(("types", types.clone()));
        }
        if let Some(since) = &self.since {
            q.push(("since", time(since)));
        }
        if let Some(until) = &self.until {
            q.push(("until", time(until)));
        }
        if let Some(wait) = self.wait {
            q.push(("wait_ms", wait.as_millis().to_string()));
        }
        if self.include_superseded {
            q.push(("include_superseded", "true".to_owned()));
        }
        q
    }
}

impl Client {
    /// A client for the broker at `url`, e.g. `http://127.0.0.1:7700`.
    pub fn new(url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ClientError::Protocol(format!("building HTTP client: {e}")))?;
        Ok(Self::with_http(url, http))
    }

    /// A client that uses the given `reqwest` client (for TLS, proxies, custom timeouts).
    pub fn with_http(url: &str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: Arc::from(url.trim_end_matches('/')),
        }
    }

    /// The broker's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Publishes `events` atomically; answers once they are durable, one ack per event in order.
    pub async fn publish(&self, events: &[NewEvent]) -> Result<Vec<PublishAck>, ClientError> {
        let response = self
            .http
            .post(format!("{}/v1/events", self.base))
            .timeout(REQUEST_TIMEOUT)
            .json(events)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let answer: PublishResponse = decode(response).await?;
        if answer.events.len() != events.len() {
            return Err(ClientError::Protocol(format!(
                "published {} events, got {} acks",
                events.len(),
                answer.events.len()
            )));
        }
        Ok(answer.events)
    }

    /// Publishes one event.
    pub async fn publish_one(&self, event: &NewEvent) -> Result<PublishAck, ClientError> {
        let mut acks = self.publish(std::slice::from_ref(event)).await?;
        acks.pop()
            .ok_or_else(|| ClientError::Protocol("no ack for the event".into()))
    }

    /// Reads one page of events.
    pub async fn read(&self, request: &ReadRequest) -> Result<ReadResponse, ClientError> {
        let body = self.read_bytes(request).await?;
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("undecodable page: {e}")))
    }

    /// Reads page after page from `request.after` up to the head, keeping the next read in
    /// flight while the caller works on the current page (read-ahead), so a catch-up overlaps
    /// the broker's work with the client's. See [`Pages`].
    pub fn pages(&self, request: ReadRequest) -> Pages {
        Pages {
            client: self.clone(),
            request,
            in_flight: None,
            done: false,
        }
    }

    async fn read_bytes(&self, request: &ReadRequest) -> Result<bytes::Bytes, ClientError> {
        let timeout = REQUEST_TIMEOUT + request.wait.unwrap_or_default();
        let response = self
            .http
            .get(format!("{}/v1/events", self.base))
            .query(&request.query())
            .timeout(timeout)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(ClientError::Unreachable)?;
        if status == StatusCode::OK {
            Ok(body)
        } else {
            Err(api_error(status, &body))
        }
    }

    /// The event at `position`.
    pub async fn event(&self, position: u64) -> Result<Event, ClientError> {
        self.get(&format!("/v1/events/{position}")).await
    }

    /// The log's head.
    pub async fn head(&self) -> Result<Head, ClientError> {
        self.get("/v1/head").await
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }
}

/// Pages of a catch-up read, from [`Client::pages`]. Ends after the page that reaches the head
/// the broker reported (events published meanwhile are for the next catch-up or a long-poll).
pub struct Pages {
    client: Client,
    request: ReadRequest,
    in_flight: Option<tokio::task::JoinHandle<Result<bytes::Bytes, ClientError>>>,
    done: bool,
}

impl Pages {
    /// The next page, or `None` once the head is reached.
    pub async fn next(&mut self) -> Option<Result<ReadResponse, ClientError>> {
        if self.done {
            return None;
        }
        let body = match self.in_flight.take() {
            Some(task) => match task.await {
                Ok(body) => body,
                Err(e) => Err(ClientError::Protocol(format!("read task failed: {e}"))),
            },
            None => self.client.read_bytes(&self.request).await,
        };
        let body = match body {
            Ok(body) => body,
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        // The broker writes head and next_after before the events: start the next read now.
        let peeked = peek_positions(&body);
        if let Some((head, next_after)) = peeked {
            if next_after < head {
                let (client, mut request) = (self.client.clone(), self.request.clone());
                request.after = next_after;
                request.since = None;
                self.in_flight = Some(tokio::spawn(
                    async move { client.read_bytes(&request).await },
                ));
            }
        }
        let page: ReadResponse = match serde_json::from_slice(&body) {
            Ok(page) => page,
            Err(e) => {
                self.done = true;
                return Some(Err(ClientError::Protocol(format!("undecodable page: {e}"))));
            }
        };
        self.request.after = page.next_after;
        self.request.since = None;
        if page.complete || page.next_after >= page.head {
            self.done = true;
        }
        Some(Ok(page))
    }
}

/// `head` and `next_after` from the opening of a page, where the broker puts them.
fn peek_positions(body: &[u8]) -> Option<(u64, u64)> {
    let opening = body.get(..body.len().min(128))?;
    let value = |key: &[u8]| -> Option<u64> {
        let at = opening.windows(key.len()).position(|w| w == key)? + key.len();
        let digits: Vec<u8> = opening[at..]
            .iter()
            .copied()
            .skip_while(u8::is_ascii_whitespace)
            .take_while(u8::is_ascii_digit)
            .collect();
        std::str::from_utf8(&digits).ok()?.parse().ok()
    };
    Some((value(b"\"head\":")?, value(b"\"next_after\":")?))
}

pub(crate) async fn decode<T: DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let status = response.status();
    let body = response.bytes().await.map_err(ClientError::Unreachable)?;
    if status.is_success() {
        return serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("undecodable {status} answer: {e}")));
    }
    Err(api_error(status, &body))
}

pub(crate) fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ClientError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            current: error.current,
            index: error.index,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
            current: None,
            index: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks_positions_from_the_opening() {
        let body = br#"{"head":1200                ,"next_after":1000               ,"events":[]}"#;
        assert_eq!(peek_positions(body), Some((1200, 1000)));
        assert_eq!(peek_positions(br#"{"events":[],"head":5}"#), None);
        assert_eq!(peek_positions(b""), None);
    }
}
