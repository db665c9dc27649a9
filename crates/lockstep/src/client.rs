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
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle to one broker. Clones share a connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Arc<str>,
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
}

impl ClientError {
    /// Whether the same request may succeed later unchanged (broker down, overloaded or stopping).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Unreachable(_) => true,
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
        let timeout = REQUEST_TIMEOUT + request.wait.unwrap_or_default();
        let response = self
            .http
            .get(format!("{}/v1/events", self.base))
            .query(&request.query())
            .timeout(timeout)
            .send()
            .await
            .map_err(ClientError::Unreachable)?;
        decode(response).await
    }

    /// The event at `position`.
    pub async fn event(&self, position: u64) -> Result<Event, ClientError> {
        self.get(&format!("/v1/events/{position}")).await
    }

    /// The log's head.
    pub async fn head(&self) -> Result<Head, ClientError> {
        self.get("/v1/head").await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
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

async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, ClientError> {
    let status = response.status();
    let body = response.bytes().await.map_err(ClientError::Unreachable)?;
    if status == StatusCode::OK {
        return serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("undecodable {status} answer: {e}")));
    }
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(ErrorBody { error }) => Err(ClientError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            current: error.current,
            index: error.index,
        }),
        Err(_) => Err(ClientError::Api {
            status: status.as_u16(),
            code: "http".into(),
            message: String::from_utf8_lossy(&body).chars().take(200).collect(),
            current: None,
            index: None,
        }),
    }
}
