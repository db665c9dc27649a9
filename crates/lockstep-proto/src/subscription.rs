//! The JSON shapes of the registrar: subscriptions, their positions and state.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest service or replica name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a service or replica name: 1..=128 bytes of ASCII letters, digits, `_`, `-` and `.`,
/// so it can stand in a URL path as it is.
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("{what} must be 1 to {MAX_NAME_LEN} bytes long"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{what} {name:?} contains {bad:?}: use letters, digits, '_', '-' and '.'"
        ));
    }
    Ok(())
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Start {
    /// `"beginning"` or `"now"`.
    Named(StartName),
    /// `{"position": N}`: deliver from position N on.
    Position {
        /// First position delivered.
        position: u64,
    },
    /// `{"time": "RFC3339"}`: deliver from the first event at or after this time.
    Time {
        /// The time.
        time: DateTime<Utc>,
    },
}

/// The named starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartName {
    /// From position 1.
    Beginning,
    /// After the head at the time of subscribing.
    Now,
}

/// Where a bounded subscription (a replay of a range) ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum End {
    /// `{"position": N}`: the last position delivered.
    Position {
        /// Last position delivered.
        position: u64,
    },
    /// `{"time": "RFC3339"}`: the last event delivered is the last at or before this time.
    Time {
        /// The time.
        time: DateTime<Utc>,
    },
}

/// How push deliveries are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushFormat {
    /// `{"subscription": {...}, "events": [event, ...]}` with events as read from the log.
    #[default]
    Json,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    Cloudevents,
}

/// A subscription as created (`POST /v1/subscriptions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// The service the replica belongs to.
    pub service: String,
    /// The replica's own id; each replica of a service subscribes on its own.
    pub replica: String,
    /// Type patterns; control records (`lockstep.*`) are delivered whatever they say.
    pub types: Vec<String>,
    /// Where delivery starts.
    pub start: Start,
    /// Where delivery ends, for a bounded replay; absent for a live subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
    /// For push delivery: the URL the broker POSTs batches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_url: Option<String>,
    /// For push delivery: the body format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_format: Option<PushFormat>,
}

/// What a subscription is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Up to date, or close behind.
    Live,
    /// Behind and being delivered to.
    CatchingUp,
    /// Push deliveries are failing.
    Failing,
    /// A bounded subscription that has delivered its whole range.
    Complete,
    /// The replica reported that applying an event keeps failing; see `stuck`.
    Stuck,
}

/// A replica's report that it cannot apply the event at `position` (it retries, never skips).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stuck {
    /// The event that fails to apply.
    pub position: u64,
    /// Why, in the replica's words.
    pub error: String,
}

/// `POST /v1/subscriptions/{service}/{replica}/status`: a replica's own report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaStatus {
    /// Set while an event fails to apply; `null` once it applied.
    pub stuck: Option<Stuck>,
}

/// A subscription with its position and health (`GET /v1/subscriptions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    /// The spec as created.
    #[serde(flatten)]
    pub spec: SubscriptionSpec,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The last position acknowledged (delivered and confirmed); 0 before the first.
    pub position: u64,
    /// When the position last moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<DateTime<Utc>>,
    /// Log positions between the acknowledged position and the head (or the end).
    pub lag_events: u64,
    /// Age of the oldest event not yet acknowledged, in seconds; 0 when caught up.
    pub lag_seconds: f64,
    /// What it is doing.
    pub state: SubscriptionState,
    /// For push: consecutive failed deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_failures: Option<u64>,
    /// For push: the last delivery error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The replica's report that it is stuck at an event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stuck: Option<Stuck>,
}

/// `GET /v1/subscriptions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionList {
    /// Every subscription, ordered by service then replica.
    pub subscriptions: Vec<SubscriptionInfo>,
    /// The log's head.
    pub head: u64,
}

/// `POST /v1/subscriptions/{service}/{replica}/ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// Everything up to and including this position is applied.
    pub position: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_and_ends_parse_from_their_json_forms() {
        let spec: SubscriptionSpec = serde_json::from_str(
            r#"{"service":"bank","replica":"b-1","types":["account.*"],
                "start":{"time":"2026-11-01T00:00:00Z"},"end":{"position":9}}"#,
        )
        .unwrap();
        assert!(matches!(spec.start, Start::Time { .. }));
        assert_eq!(spec.end, Some(End::Position { position: 9 }));
        let unknown = r#"{"service":"a","replica":"b","types":[],"start":"now","colour":1}"#;
        assert!(serde_json::from_str::<SubscriptionSpec>(unknown).is_err());
        for (json, start) in [
            (r#""beginning""#, Start::Named(StartName::Beginning)),
            (r#""now""#, Start::Named(StartName::Now)),
            (r#"{"position":5}"#, Start::Position { position: 5 }),
        ] {
            assert_eq!(serde_json::from_str::<Start>(json).unwrap(), start);
        }
        assert!(serde_json::from_str::<Start>(r#""yesterday""#).is_err());
    }

    #[test]
    fn names() {
        assert!(validate_name("service", "bank-eu.1_a").is_ok());
        for bad in ["", "a/b", "a b", "ü", &"x".repeat(129)] {
            assert!(validate_name("service", bad).is_err(), "{bad:?}");
        }
    }
}
