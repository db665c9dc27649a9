//! The JSON shapes of consistency checking: barriers, state-hash reports and verification.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Type of the barrier control record.
pub const BARRIER_TYPE: &str = "lockstep.barrier";

/// `POST /v1/reports`: a replica's state hash at a barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateReport {
    /// The service.
    pub service: String,
    /// The replica.
    pub replica: String,
    /// The barrier's position: the state includes every event up to it.
    pub position: u64,
    /// blake3 of the state's canonical bytes, hex.
    pub state_hash: String,
    /// Chain hash at `position`, hex.
    pub chain_hash: String,
}

/// How one service's replicas compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every replica that reported at the latest barrier holds the same state.
    Verified,
    /// Replicas hold different states at the same position.
    Diverged,
    /// No barrier has reports from two or more replicas yet.
    Unknown,
}

/// One replica's standing in a verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaStanding {
    /// The replica.
    pub replica: String,
    /// Its latest reported barrier.
    pub position: u64,
    /// Its state hash there.
    pub state_hash: String,
    /// Whether it agrees with the majority at that barrier.
    pub agrees: bool,
    /// The first barrier at which it disagreed with the majority, if it ever did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged_at: Option<u64>,
}

/// One service's verification (`GET /v1/verify`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceVerification {
    /// The service.
    pub service: String,
    /// The verdict at the latest barrier with reports from two or more replicas.
    pub verdict: Verdict,
    /// That barrier's position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier: Option<u64>,
    /// The majority's state hash there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_hash: Option<String>,
    /// Every replica that ever reported, with its latest report.
    pub replicas: Vec<ReplicaStanding>,
    /// The latest barrier at which every reporting replica agreed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_barrier: Option<u64>,
}

/// `GET /v1/verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    /// Per service, by name.
    pub services: Vec<ServiceVerification>,
    /// When it was computed.
    pub at: DateTime<Utc>,
}

/// Where a mark points, as asked for (`POST /v1/marks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MarkAt {
    /// `"verified"`: the latest barrier at which every service's replicas agreed; `"head"`.
    Named(MarkAtName),
    /// `{"position": N}`.
    Position {
        /// The position.
        position: u64,
    },
}

/// The named mark targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkAtName {
    /// The latest position verified for every service that reports.
    Verified,
    /// The log's head.
    Head,
}

/// `POST /v1/marks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMark {
    /// The mark's name, e.g. `release-42`.
    pub name: String,
    /// Where it points.
    pub at: MarkAt,
}

/// A named, immutable position ("known good").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Its name.
    pub name: String,
    /// The position it names.
    pub position: u64,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/marks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkList {
    /// Every mark, by position.
    pub marks: Vec<Mark>,
}
