//! Consistency: barriers in the log, replicas' state-hash reports at them, and verification.
//!
//! The broker appends a `lockstep.barrier` control record every `barrier_every` events or
//! `barrier_interval` (when there was traffic since the last), and on demand. Every subscription
//! receives it whatever its filter; a replica that has applied everything up to it hashes its
//! state and reports `(service, replica, position, state hash, chain hash)`. Reports live in
//! `DATA/consistency.redb`; verification groups them by service and barrier: all equal is
//! *verified*, different is *diverged*, naming the odd replicas and the first barrier at which each
//! split from the majority.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use lockstep_proto::consistency::{
    BARRIER_TYPE, BarrierGroups, CreateMark, EXPLAIN_BUCKETS, EntriesReport, HashGroup, Mark,
    MarkAt, MarkAtName, MarkList, PauseState, RECENT_BARRIERS, ReplicaStanding, ReportAnswer,
    ServiceVerification, StateReport, Verdict, Verification,
};
use lockstep_proto::record::ChainHash;
use lockstep_proto::subscription::validate_name;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::Broker;
use crate::error::StoreError;

/// Reports as verification reads them: service → barrier position → replica → state hash.
pub(crate) type ReportMap = BTreeMap<String, BTreeMap<u64, BTreeMap<String, [u8; 32]>>>;

/// (service, barrier position, replica) → state hash ‖ chain hash ‖ reported at (ns, BE)
/// [‖ the [`EXPLAIN_BUCKETS`] bucket hashes, when the replica sent them].
const REPORTS: TableDefinition<(&str, u64, &str), &[u8]> = TableDefinition::new("reports");

/// (service, barrier position, replica) → the replica's entries of some buckets there, as the
/// JSON of an [`EntriesReport`] (for `verify --explain`).
const ENTRIES: TableDefinition<(&str, u64, &str), &[u8]> = TableDefinition::new("entries");

/// One replica's report at a barrier, as explaining reads it.
pub(crate) struct StoredReport {
    pub(crate) state: [u8; 32],
    pub(crate) buckets: Option<Vec<[u8; 32]>>,
}

/// name → (position, created at ns).
const MARKS: TableDefinition<&str, (u64, i64)> = TableDefinition::new("marks");

/// Broker settings changed at run time: `"pause"` → the [`PauseState`] as JSON.
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");

/// Stored state-hash reports and marks.
pub struct Reports {
    db: Database,
    /// Per service, barriers whose divergence the broker wants entries for (the latest few;
    /// in memory: after a restart, replicas are simply asked again).
    pub(crate) wanted: std::sync::Mutex<BTreeMap<String, BTreeMap<u64, crate::explain::Wanted>>>,
}

impl Reports {
    /// Opens (or creates) `DATA/consistency.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("consistency.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::new(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        txn.open_table(REPORTS)?;
        txn.open_table(MARKS)?;
        txn.open_table(SETTINGS)?;
        txn.open_table(ENTRIES)?;
        txn.commit()?;
        Ok(Self {
            db,
            wanted: std::sync::Mutex::default(),
        })
    }

    /// Every replica's row of `table` at one barrier of a service, decoded by `decode`.
    fn rows_at<T>(
        &self,
        table: TableDefinition<(&str, u64, &str), &[u8]>,
        service: &str,
        position: u64,
        decode: impl Fn(&[u8]) -> Result<T, StoreError>,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = BTreeMap::new();
        for entry in table.range((service, position, "")..)? {
            let (key, value) = entry?;
            let (s, p, replica) = key.value();
            if s != service || p != position {
                break;
            }
            out.insert(replica.to_owned(), decode(value.value())?);
        }
        Ok(out)
    }

    /// Every replica's report at one barrier of a service.
    pub(crate) fn at_barrier(
        &self,
        service: &str,
        position: u64,
    ) -> Result<BTreeMap<String, StoredReport>, StoreError> {
        self.rows_at(REPORTS, service, position, |value| {
            let mut state = [0; 32];
            state.copy_from_slice(
                value
                    .get(..32)
                    .ok_or_else(|| StoreError::new("short report"))?,
            );
            let buckets = value.get(72..).filter(|b| !b.is_empty()).map(|b| {
                b.chunks_exact(32)
                    .map(|c| {
                        let mut h = [0; 32];
                        h.copy_from_slice(c);
                        h
                    })
                    .collect()
            });
            Ok(StoredReport { state, buckets })
        })
    }

    /// Stores a replica's entries of some buckets at a barrier.
    pub(crate) fn store_entries(&self, report: &EntriesReport) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(report)
            .map_err(|e| StoreError::new(format!("encoding entries: {e}")))?;
        let txn = self.db.begin_write()?;
        txn.open_table(ENTRIES)?.insert(
            (
                report.service.as_str(),
                report.position,
                report.replica.as_str(),
            ),
            bytes.as_slice(),
        )?;
        txn.commit()?;
        Ok(())
    }

    /// Every replica's entries at one barrier of a service.
    pub(crate) fn entries_at(
        &self,
        service: &str,
        position: u64,
    ) -> Result<BTreeMap<String, EntriesReport>, StoreError> {
        self.rows_at(ENTRIES, service, position, |value| {
            serde_json::from_slice(value)
                .map_err(|e| StoreError::new(format!("stored entries: {e}")))
        })
    }

    /// The stored pause state (not paused when none is stored).
    pub(crate) fn load_pause(&self) -> Result<PauseState, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SETTINGS)?;
        let Some(value) = table.get("pause")? else {
            return Ok(PauseState {
                paused: false,
                since: None,
                reason: None,
            });
        };
        serde_json::from_slice(value.value())
            .map_err(|e| StoreError::new(format!("stored pause state: {e}")))
    }

    /// Stores the pause state durably.
    pub(crate) fn store_pause(&self, state: &PauseState) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state)
            .map_err(|e| StoreError::new(format!("encoding the pause state: {e}")))?;
        let txn = self.db.begin_write()?;
        txn.open_table(SETTINGS)?
            .insert("pause", bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Stores a checked report (a replica reporting the same barrier again overwrites it).
    fn store(
        &self,
        report: &StateReport,
        state: [u8; 32],
        chain: [u8; 32],
        buckets: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(72 + 32 * buckets.len());
        value.extend_from_slice(&state);
        value.extend_from_slice(&chain);
        value.extend_from_slice(&Utc::now().timestamp_nanos_opt().unwrap_or(0).to_be_bytes());
        for bucket in buckets {
            value.extend_from_slice(bucket);
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(REPORTS)?;
            table.insert(
                (
                    report.service.as_str(),
                    report.position,
                    report.replica.as_str(),
                ),
                value.as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every report: service → barrier → replica → state hash.
    fn all(&self) -> Result<ReportMap, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REPORTS)?;
        let mut out: ReportMap = BTreeMap::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (service, position, replica) = key.value();
            let mut state = [0; 32];
            state.copy_from_slice(
                value
                    .value()
                    .get(..32)
                    .ok_or_else(|| StoreError::new("short report"))?,
            );
            out.entry(service.to_owned())
                .or_default()
                .entry(position)
                .or_default()
                .insert(replica.to_owned(), state);
        }
        Ok(out)
    }
}

impl Reports {
    /// Creates a mark, or returns the existing one of that name if it names the same position.
    fn create_mark(&self, name: &str, position: u64) -> Result<Mark, ReportError> {
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        let mark = {
            let mut table = txn.open_table(MARKS).map_err(StoreError::from)?;
            let existing = table
                .get(name)
                .map_err(StoreError::from)?
                .map(|v| v.value());
            match existing {
                Some((p, created)) if p == position => Mark {
                    name: name.to_owned(),
                    position,
                    created_at: chrono::DateTime::from_timestamp_nanos(created),
                },
                Some((p, _)) => {
                    return Err(ReportError::Conflict(format!(
                        "mark {name:?} already names position {p}; marks never move"
                    )));
                }
                None => {
                    let now = Utc::now();
                    table
                        .insert(name, (position, now.timestamp_nanos_opt().unwrap_or(0)))
                        .map_err(StoreError::from)?;
                    Mark {
                        name: name.to_owned(),
                        position,
                        created_at: now,
                    }
                }
            }
        };
        txn.commit().map_err(StoreError::from)?;
        Ok(mark)
    }

    /// Removes a mark; false when there was none.
    fn remove_mark(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(MARKS)?.remove(name)?.is_some();
        txn.commit()?;
        Ok(removed)
    }

    fn marks(&self) -> Result<Vec<Mark>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MARKS)?;
        let mut marks = Vec::new();
        for entry in table.iter()? {
            let (name, value) = entry?;
            let (position, created) = value.value();
            marks.push(Mark {
                name: name.value().to_owned(),
                position,
                created_at: chrono::DateTime::from_timestamp_nanos(created),
            });
        }
        marks.sort_by_key(|m| (m.position, m.name.clone()));
        Ok(marks)
    }
}

/// Why a report was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReportError {
    /// A malformed report or mark.
    #[error("{0}")]
    Invalid(String),
    /// The mark exists with another position, or nothing is verified yet.
    #[error("{0}")]
    Conflict(String),
    /// No such mark.
    #[error("no mark named {0:?}")]
    NotFound(String),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

/// The majority among state hashes; ties go to the smallest hash, so every reader agrees.
pub(crate) fn majority<'a>(hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> Option<[u8; 32]> {
    let mut counts: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for hash in hashes {
        *counts.entry(*hash).or_default() += 1;
    }
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(hash, _)| *hash)
}

/// The verdicts over `reports` (see the module documentation).
fn verify(reports: &ReportMap) -> Vec<ServiceVerification> {
    let hex = |h: &[u8; 32]| blake3::Hash::from_bytes(*h).to_hex().to_string();
    reports
        .iter()
        .map(|(service, barriers)| {
            let mut diverged_at: BTreeMap<&str, u64> = BTreeMap::new();
            let mut latest: BTreeMap<&str, (u64, [u8; 32])> = BTreeMap::new();
            let mut majority_at: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
            let mut last_compared = None;
            let mut last_verified = None;
            for (&position, by_replica) in barriers {
                for (replica, hash) in by_replica {
                    latest.insert(replica, (position, *hash));
                }
                if by_replica.len() < 2 {
                    continue;
                }
                let distinct: std::collections::BTreeSet<&[u8; 32]> = by_replica.values().collect();
                let majority = majority(by_replica.values()).unwrap_or_default();
                majority_at.insert(position, majority);
                for (replica, hash) in by_replica {
                    if *hash != majority {
                        diverged_at.entry(replica).or_insert(position);
                    }
                }
                last_compared = Some(position);
                if distinct.len() == 1 {
                    last_verified = Some(position);
                }
            }
            let verdict = match last_compared {
                None => Verdict::Unknown,
                Some(p) if last_verified == Some(p) => Verdict::Verified,
                Some(_) => Verdict::Diverged,
            };
            let replicas = latest
                .iter()
                .map(|(replica, (position, hash))| ReplicaStanding {
                    replica: (*replica).to_owned(),
                    position: *position,
                    state_hash: hex(hash),
                    agrees: majority_at.get(position).is_none_or(|m| m == hash),
                    diverged_at: diverged_at.get(replica).copied(),
                })
                .collect();
            let recent = barriers
                .iter()
                .rev()
                .take(RECENT_BARRIERS)
                .map(|(&position, by_replica)| {
                    let mut groups: BTreeMap<&[u8; 32], Vec<String>> = BTreeMap::new();
                    for (replica, hash) in by_replica {
                        groups.entry(hash).or_default().push(replica.clone());
                    }
                    let mut groups: Vec<HashGroup> = groups
                        .into_iter()
                        .map(|(hash, replicas)| HashGroup {
                            state_hash: hex(hash),
                            replicas,
                        })
                        .collect();
                    // Stable: equal sizes keep hash order, as the majority's tie-break does.
                    groups.sort_by_key(|g| std::cmp::Reverse(g.replicas.len()));
                    BarrierGroups { position, groups }
                })
                .collect();
            ServiceVerification {
                service: service.clone(),
                verdict,
                barrier: last_compared,
                state_hash: last_compared.and_then(|p| majority_at.get(&p)).map(hex),
                replicas,
                last_verified_barrier: last_verified,
                recent,
            }
        })
        .collect()
}

impl Broker {
    /// Appends a barrier now; returns its position.
    pub async fn barrier(&self) -> Result<u64, crate::PublishError> {
        let seq = self.inner.log.tip().position;
        let ack = self
            .append_control(BARRIER_TYPE, &serde_json::json!({"after": seq}))
            .await?;
        Ok(ack.position)
    }

    /// Stores a replica's state-hash report; answers with the entries the broker wants from it
    /// to explain a divergence (see [`crate::explain`]).
    pub async fn report(&self, report: StateReport) -> Result<ReportAnswer, ReportError> {
        self.check_reporter(&report.service, &report.replica, report.position)?;
        let parse = |what: &str, hex: &str| {
            ChainHash::from_hex(hex)
                .map(|h| h.0)
                .map_err(|_| ReportError::Invalid(format!("{what} is not 64 hex characters")))
        };
        let state = parse("state_hash", &report.state_hash)?;
        let chain = parse("chain_hash", &report.chain_hash)?;
        let buckets = match &report.buckets {
            None => Vec::new(),
            Some(list) if list.len() == EXPLAIN_BUCKETS => list
                .iter()
                .map(|h| parse("a bucket hash", h))
                .collect::<Result<_, _>>()?,
            Some(list) => {
                return Err(ReportError::Invalid(format!(
                    "buckets holds {} hashes, not {EXPLAIN_BUCKETS}",
                    list.len()
                )));
            }
        };
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let answer = tokio::task::spawn_blocking(move || {
            reports.store(&report, state, chain, &buckets)?;
            crate::explain::answer(&reports, &report)
        })
        .await
        .map_err(|e| StoreError::new(format!("report task failed: {e}")))??;
        Ok(answer)
    }

    /// Checks the names and barrier position a replica reports with.
    pub(crate) fn check_reporter(
        &self,
        service: &str,
        replica: &str,
        position: u64,
    ) -> Result<(), ReportError> {
        validate_name("service", service).map_err(ReportError::Invalid)?;
        validate_name("replica", replica).map_err(ReportError::Invalid)?;
        let head = self.inner.log.tip().position;
        if position == 0 || position > head {
            return Err(ReportError::Invalid(format!(
                "position {position} is not in the log (head {head})"
            )));
        }
        Ok(())
    }

    /// Verification of every service (or one).
    pub async fn verify(&self, service: Option<String>) -> Result<Verification, StoreError> {
        let all = self.verify_reports(service).await?;
        Ok(Verification {
            services: verify(&all),
            at: Utc::now(),
        })
    }

    /// The reports verification looks at: every service's (or one's), at barriers still on the
    /// live log. Barriers a rollback superseded are left out: their states are not what any
    /// replica holds now.
    pub(crate) async fn verify_reports(
        &self,
        service: Option<String>,
    ) -> Result<ReportMap, StoreError> {
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let mut all = tokio::task::spawn_blocking(move || reports.all())
            .await
            .map_err(|e| StoreError::new(format!("verify task failed: {e}")))??;
        if let Some(service) = service {
            all.retain(|s, _| *s == service);
        }
        let superseded = self.inner.log.superseded();
        for barriers in all.values_mut() {
            barriers.retain(|position, _| !superseded.contains(*position));
        }
        Ok(all)
    }

    /// Creates a named, immutable mark at a position, the head, or the latest verified barrier.
    pub async fn create_mark(&self, request: CreateMark) -> Result<Mark, ReportError> {
        validate_name("mark name", &request.name).map_err(ReportError::Invalid)?;
        let head = self.inner.log.tip().position;
        let position = match request.at {
            MarkAt::Named(MarkAtName::Head) => head,
            MarkAt::Position { position } if position <= head => position,
            MarkAt::Position { position } => {
                return Err(ReportError::Invalid(format!(
                    "position {position} is past the head of the log ({head})"
                )));
            }
            MarkAt::Named(MarkAtName::Verified) => {
                let verification = self.verify(None).await?;
                if verification.services.is_empty() {
                    return Err(ReportError::Conflict(
                        "nothing is verified yet: no replica has reported at a barrier".into(),
                    ));
                }
                let mut lowest = u64::MAX;
                for service in &verification.services {
                    match service.last_verified_barrier {
                        Some(p) => lowest = lowest.min(p),
                        None => {
                            return Err(ReportError::Conflict(format!(
                                "service {:?} has no verified barrier yet",
                                service.service
                            )));
                        }
                    }
                }
                lowest
            }
        };
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let name = request.name;
        tokio::task::spawn_blocking(move || reports.create_mark(&name, position))
            .await
            .map_err(|e| StoreError::new(format!("mark task failed: {e}")))?
    }

    /// Every mark, by position.
    pub async fn marks(&self) -> Result<MarkList, StoreError> {
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let marks = tokio::task::spawn_blocking(move || reports.marks())
            .await
            .map_err(|e| StoreError::new(format!("marks task failed: {e}")))??;
        Ok(MarkList { marks })
    }

    /// Removes a mark (the positions it named stay as they are).
    pub async fn remove_mark(&self, name: &str) -> Result<(), ReportError> {
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let owned = name.to_owned();
        let removed = tokio::task::spawn_blocking(move || reports.remove_mark(&owned))
            .await
            .map_err(|e| StoreError::new(format!("mark task failed: {e}")))??;
        if removed {
            Ok(())
        } else {
            Err(ReportError::NotFound(name.to_owned()))
        }
    }

    /// One mark.
    pub async fn mark(&self, name: &str) -> Result<Mark, ReportError> {
        self.marks()
            .await?
            .marks
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ReportError::NotFound(name.to_owned()))
    }

    /// Appends barriers every `barrier_every` events or `barrier_interval` with traffic, until
    /// the broker stops. Started by [`Broker::start_background`].
    pub(crate) fn spawn_barriers(&self) {
        let (every, interval) = (
            self.inner.config.barrier_every,
            self.inner.config.barrier_interval_ms,
        );
        if every == 0 && interval == 0 {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            let mut stopping = broker.inner.stopping.subscribe();
            let mut last = broker.inner.log.tip().position;
            let mut since = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
                let head = broker.inner.log.tip().position;
                let by_count = every > 0 && head >= last + every;
                let by_time = interval > 0
                    && head > last
                    && since.elapsed() >= Duration::from_millis(interval);
                if by_count || by_time {
                    match broker.barrier().await {
                        Ok(position) => last = position,
                        Err(e) => tracing::warn!(error = %e, "could not append a barrier"),
                    }
                    since = Instant::now();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reports(rows: &[(&str, u64, &str, u8)]) -> ReportMap {
        let mut out: ReportMap = BTreeMap::new();
        for (service, position, replica, hash) in rows {
            out.entry((*service).into())
                .or_default()
                .entry(*position)
                .or_default()
                .insert((*replica).into(), [*hash; 32]);
        }
        out
    }

    #[test]
    fn verdicts_name_the_odd_replica_and_where_it_split() {
        let all = reports(&[
            ("bank", 10, "a", 1),
            ("bank", 10, "b", 1),
            ("bank", 10, "c", 1),
            ("bank", 20, "a", 2),
            ("bank", 20, "b", 2),
            ("bank", 20, "c", 9),
            ("bank", 30, "a", 3),
            ("bank", 30, "b", 3),
            ("bank", 30, "c", 8),
            ("shop", 5, "x", 4),
            ("shop", 5, "y", 4),
            ("solo", 5, "only", 4),
        ]);
        let v = verify(&all);
        let bank = &v[0];
        assert_eq!(bank.verdict, Verdict::Diverged);
        assert_eq!(bank.barrier, Some(30));
        assert_eq!(bank.last_verified_barrier, Some(10));
        let c = bank.replicas.iter().find(|r| r.replica == "c").unwrap();
        assert_eq!((c.agrees, c.diverged_at), (false, Some(20)));
        assert!(
            bank.replicas
                .iter()
                .filter(|r| r.replica != "c")
                .all(|r| r.agrees)
        );
        assert_eq!(v[1].verdict, Verdict::Verified);
        assert_eq!(v[2].verdict, Verdict::Unknown);
        // The latest barriers, newest first, each with its replicas grouped by hash.
        let recent: Vec<(u64, Vec<usize>)> = bank
            .recent
            .iter()
            .map(|b| {
                (
                    b.position,
                    b.groups.iter().map(|g| g.replicas.len()).collect(),
                )
            })
            .collect();
        assert_eq!(recent, [(30, vec![2, 1]), (20, vec![2, 1]), (10, vec![3])]);
        assert_eq!(bank.recent[0].groups[1].replicas, ["c"]);
    }
}
