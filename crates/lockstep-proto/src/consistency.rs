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
    /// For forensics, where the state is a map: [`EXPLAIN_BUCKETS`] hashes (hex) of the state's
    /// entries grouped by [`bucket_of`] their key, so the broker can tell which buckets differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<String>>,
}

/// Buckets a keyed state's entries are hashed in for `verify --explain`.
pub const EXPLAIN_BUCKETS: usize = 64;

/// The bucket of a state entry's key.
pub fn bucket_of(key: &str) -> u32 {
    u32::from(blake3::hash(key.as_bytes()).as_bytes()[0]) % EXPLAIN_BUCKETS as u32
}

/// The bucket hashes of keyed entries `(key, blake3 of the value)`: per bucket, blake3 over its
/// entries in key order (key length, key, value hash).
pub fn bucket_hashes(entries: &[(String, [u8; 32])]) -> Vec<[u8; 32]> {
    let mut sorted: Vec<&(String, [u8; 32])> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut hashers: Vec<blake3::Hasher> = (0..EXPLAIN_BUCKETS)
        .map(|_| blake3::Hasher::new())
        .collect();
    for (key, value) in sorted {
        let hasher = &mut hashers[bucket_of(key) as usize];
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key.as_bytes());
        hasher.update(value);
    }
    hashers.iter().map(|h| *h.finalize().as_bytes()).collect()
}

/// The broker's answer to a report: entries it asks this replica for, to explain a divergence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAnswer {
    /// Send the entries of these buckets at these barriers (`POST /v1/reports/entries`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub explain: Vec<ExplainRequest>,
}

/// Entries the broker asks a replica for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// The barrier.
    pub position: u64,
    /// The buckets whose entries differ between replicas there.
    pub buckets: Vec<u32>,
}

/// `POST /v1/reports/entries`: a replica's entries of some buckets at a barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntriesReport {
    /// The service.
    pub service: String,
    /// The replica.
    pub replica: String,
    /// The barrier.
    pub position: u64,
    /// The buckets sent.
    pub buckets: Vec<u32>,
    /// The entries of those buckets, by key: key and blake3 of the value (hex); at most
    /// [`MAX_EXPLAIN_ENTRIES`].
    pub entries: Vec<EntryHash>,
    /// True when the buckets held more entries than were sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Most entries one [`EntriesReport`] carries (a few MiB of JSON).
pub const MAX_EXPLAIN_ENTRIES: usize = 10_000;

/// One state entry, hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHash {
    /// The entry's key.
    pub key: String,
    /// blake3 of its value's canonical bytes, hex.
    pub hash: String,
}

/// `GET /v1/explain?service=S`: which keys differ between the majority and the odd replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    /// The service.
    pub service: String,
    /// The barrier compared: the latest at which replicas reporting bucket hashes disagreed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier: Option<u64>,
    /// The replicas that agree with the majority there.
    pub majority: Vec<String>,
    /// Per odd replica, the keys whose values differ.
    pub odd: Vec<OddReplica>,
    /// Replicas whose entries have not arrived yet (they send them at their next barrier).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
    /// Why there is nothing to explain, when there is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Explanation {
    /// An explanation of `service` with nothing in it yet.
    pub fn empty(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            barrier: None,
            majority: Vec::new(),
            odd: Vec::new(),
            waiting_for: Vec::new(),
            note: None,
        }
    }
}

/// One odd replica's differences from the majority.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OddReplica {
    /// The replica.
    pub replica: String,
    /// The keys whose values differ (or exist on one side only), by key.
    pub keys: Vec<KeyDifference>,
}

/// One key whose value differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyDifference {
    /// The key.
    pub key: String,
    /// The majority's value hash (absent: the majority has no such entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub majority: Option<String>,
    /// The odd replica's value hash (absent: it has no such entry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// Positions of the events with this key between the last barrier where this replica agreed
    /// and the compared barrier: where to look for the bug.
    pub touched_by: Vec<u64>,
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
    /// The latest barriers (up to [`RECENT_BARRIERS`], newest first) with the replicas that
    /// reported there grouped by state hash, largest group first.
    #[serde(default)]
    pub recent: Vec<BarrierGroups>,
}

/// Barriers [`ServiceVerification::recent`] shows.
pub const RECENT_BARRIERS: usize = 5;

/// One barrier's reports, grouped by state hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierGroups {
    /// The barrier.
    pub position: u64,
    /// One group per distinct state hash, largest first (ties by hash).
    pub groups: Vec<HashGroup>,
}

/// The replicas that reported one state hash at a barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashGroup {
    /// The state hash, hex.
    pub state_hash: String,
    /// The replicas, by name.
    pub replicas: Vec<String>,
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

/// Type of the rollback control record.
pub const ROLLBACK_TYPE: &str = "lockstep.rollback";

/// Where a rollback returns to: a mark's name or a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackTo {
    /// The position a mark names.
    Mark(String),
    /// A position.
    Position(u64),
}

/// `POST /v1/rollbacks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The target: `{"mark": "release-42"}` or `{"position": 1200}`.
    pub to: RollbackTo,
    /// Why, for the audit trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The data of a `lockstep.rollback` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackData {
    /// The position every replica returns to.
    pub target: u64,
    /// The mark the target was named by, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A rollback in the log: the record at `position` supersedes every event after `target` and
/// before `position` that was not superseded already.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// Position of the `lockstep.rollback` record.
    pub position: u64,
    /// The position replicas returned to.
    pub target: u64,
    /// The mark the target was named by, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the record was appended.
    pub time: DateTime<Utc>,
}

/// `GET /v1/rollbacks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackList {
    /// Every rollback, oldest first.
    pub rollbacks: Vec<Rollback>,
    /// Events superseded by them all.
    pub superseded_events: u64,
}

/// Whether publishing is paused (`GET /v1/pause`, `POST /v1/pause`, `POST /v1/resume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseState {
    /// Publishes are answered 503 + Retry-After while true.
    pub paused: bool,
    /// Since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /v1/pause`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Why, shown to publishers in the 503 answer.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/redrive`: publish superseded events again, as new events at the head.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    /// First position to consider.
    pub from: u64,
    /// Last position to consider.
    pub to: u64,
    /// Ids of superseded events to leave out (the bad ones).
    #[serde(default)]
    pub except: Vec<String>,
}

/// One event published again by a redrive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Redriven {
    /// Where the superseded original is.
    pub original: u64,
    /// Where the new event is.
    pub position: u64,
    /// The new event's id: `lockstep-redrive-{original}`, so a repeated redrive of the same
    /// event is a duplicate, not a second copy.
    pub id: String,
    /// True when an earlier redrive already published it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// The answer to `POST /v1/redrive`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedriveResult {
    /// The events published again, in order.
    pub redriven: Vec<Redriven>,
    /// Superseded events left out because their id was in `except`.
    pub excepted: usize,
}

/// `GET /v1/snapshots/verified?service=S[&at_or_before=P]`: the newest barrier at which every
/// reporting replica of the service agreed and whose snapshot the broker holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifiedSnapshot {
    /// The service.
    pub service: String,
    /// The barrier's position.
    pub position: u64,
    /// The agreed state hash (blake3 of the snapshot's bytes), hex: also the blob's address,
    /// `GET /v1/snapshots/{state_hash}`.
    pub state_hash: String,
    /// Chain hash at `position`, hex.
    pub chain_hash: String,
    /// How many replicas agreed.
    pub replicas: usize,
    /// Size of the blob in bytes.
    pub bytes: u64,
}

/// `POST /v1/snapshots/gc`: removes snapshot blobs no one needs any more.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotGcRequest {
    /// Blobs written within this many seconds are kept whatever (default 600): reports at their
    /// barriers may still be arriving.
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

/// What a snapshot collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotGc {
    /// Blobs kept.
    pub kept: usize,
    /// Blobs removed.
    pub removed: usize,
    /// Bytes removed.
    pub bytes_removed: u64,
}
