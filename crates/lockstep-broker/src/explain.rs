//! Forensics: which keys of a map-shaped state differ between the majority and an odd replica.
//!
//! Replicas whose state is a map report, with each state hash, the hashes of
//! [`EXPLAIN_BUCKETS`](lockstep_proto::consistency::EXPLAIN_BUCKETS) buckets of its entries
//! (Merkle-style: a report stays a few kilobytes whatever the state's size). When the state
//! hashes at a barrier differ, the broker compares the odd replicas' buckets with the majority's
//! and asks every replica, in its answer to a report, for the entries of just the differing
//! buckets at that barrier. A replica sends them at once if it still holds that state, or from
//! its local snapshot of that barrier at its next report. `GET /v1/explain` then compares the
//! entries key by key and names, for each differing key, the events with that key since the
//! replica last agreed: where to look for the bug.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::PoisonError;

use lockstep_proto::consistency::{
    EXPLAIN_BUCKETS, EntriesReport, ExplainRequest, Explanation, KeyDifference,
    MAX_EXPLAIN_ENTRIES, OddReplica, ReportAnswer, StateReport, bucket_of,
};
use lockstep_proto::record::ChainHash;

use crate::Broker;
use crate::consistency::{ReportError, Reports, StoredReport, majority};
use crate::error::StoreError;

/// Barriers per service the broker keeps asking entries for.
const WANTED_BARRIERS: usize = 3;
/// Buckets asked for at one barrier: a sixteenth of a state at most, so that the entries of even
/// a large state fit a request. A few bad events touch a few keys, so a few buckets.
const MAX_WANTED_BUCKETS: usize = 4;

/// What the broker wants to explain one diverged barrier.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wanted {
    /// The buckets in which replicas differ there (the first [`MAX_WANTED_BUCKETS`]).
    buckets: Vec<u32>,
    /// Buckets each replica has sent its entries of.
    sent: BTreeMap<String, BTreeSet<u32>>,
    /// How many buckets differ in all (more than `buckets` when capped).
    differing: usize,
}
/// Positions named per differing key.
const TOUCHED_PER_KEY: usize = 10;

/// What the broker asks of the replica that just sent `report` (already stored).
pub(crate) fn answer(reports: &Reports, report: &StateReport) -> Result<ReportAnswer, StoreError> {
    if report.buckets.is_none() {
        return Ok(ReportAnswer::default());
    }
    let at = reports.at_barrier(&report.service, report.position)?;
    let wanted = {
        let mut wanted = reports
            .wanted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let service = wanted.entry(report.service.clone()).or_default();
        if let Some(buckets) = differing_buckets(&at) {
            let entry = service.entry(report.position).or_default();
            entry.differing = entry.differing.max(buckets.len());
            for b in buckets {
                if entry.buckets.len() < MAX_WANTED_BUCKETS && !entry.buckets.contains(&b) {
                    entry.buckets.push(b);
                }
            }
            entry.buckets.sort_unstable();
            while service.len() > WANTED_BARRIERS {
                service.pop_first();
            }
        }
        service.clone()
    };
    let explain = wanted
        .range(..=report.position)
        .filter(|(_, w)| {
            let sent = w.sent.get(&report.replica);
            !w.buckets
                .iter()
                .all(|b| sent.is_some_and(|s| s.contains(b)))
        })
        .map(|(&position, w)| ExplainRequest {
            position,
            buckets: w.buckets.clone(),
        })
        .collect();
    Ok(ReportAnswer { explain })
}

/// Notes that a replica sent the entries of some buckets at a barrier.
fn record_sent(reports: &Reports, report: &EntriesReport) {
    let mut wanted = reports
        .wanted
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(w) = wanted
        .get_mut(&report.service)
        .and_then(|s| s.get_mut(&report.position))
    {
        w.sent
            .entry(report.replica.clone())
            .or_default()
            .extend(report.buckets.iter().copied());
    }
}

/// The buckets in which the odd replicas at a barrier differ from the majority, if any.
fn differing_buckets(at: &BTreeMap<String, StoredReport>) -> Option<Vec<u32>> {
    let majority = majority(at.values().map(|r| &r.state))?;
    let reference = at
        .values()
        .find(|r| r.state == majority)
        .and_then(|r| r.buckets.as_ref())?;
    let mut out = BTreeSet::new();
    for report in at.values().filter(|r| r.state != majority) {
        if let Some(buckets) = &report.buckets {
            for (i, (a, b)) in buckets.iter().zip(reference).enumerate() {
                if a != b {
                    out.insert(i as u32);
                }
            }
        }
    }
    (!out.is_empty()).then(|| out.into_iter().collect())
}

impl Broker {
    /// Stores a replica's entries of some buckets at a barrier.
    pub async fn report_entries(&self, report: EntriesReport) -> Result<(), ReportError> {
        self.check_reporter(&report.service, &report.replica, report.position)?;
        if report.entries.len() > MAX_EXPLAIN_ENTRIES {
            return Err(ReportError::Invalid(format!(
                "{} entries: at most {MAX_EXPLAIN_ENTRIES} per report",
                report.entries.len()
            )));
        }
        if let Some(b) = report
            .buckets
            .iter()
            .find(|&&b| b as usize >= EXPLAIN_BUCKETS)
        {
            return Err(ReportError::Invalid(format!(
                "bucket {b} does not exist (0..{EXPLAIN_BUCKETS})"
            )));
        }
        for entry in &report.entries {
            if ChainHash::from_hex(&entry.hash).is_err() {
                return Err(ReportError::Invalid(format!(
                    "the hash of entry {:?} is not 64 hex characters",
                    entry.key
                )));
            }
            if !report.buckets.contains(&bucket_of(&entry.key)) {
                return Err(ReportError::Invalid(format!(
                    "entry {:?} is not in the buckets sent",
                    entry.key
                )));
            }
        }
        let reports = std::sync::Arc::clone(&self.inner.reports);
        tokio::task::spawn_blocking(move || {
            reports.store_entries(&report)?;
            record_sent(&reports, &report);
            Ok::<_, StoreError>(())
        })
        .await
        .map_err(|e| StoreError::new(format!("entries task failed: {e}")))??;
        Ok(())
    }

    /// Which keys differ between the majority and the odd replicas of `service`: at the latest
    /// barrier where they disagreed and every replica's entries are in, else at the latest
    /// where they disagreed (naming the replicas still to send theirs).
    pub async fn explain(&self, service: &str) -> Result<Explanation, StoreError> {
        let all = self.verify_reports(Some(service.to_owned())).await?;
        let barriers = all.get(service).cloned().unwrap_or_default();
        let diverged: Vec<u64> = barriers
            .iter()
            .rev()
            .filter(|(_, by_replica)| by_replica.values().collect::<HashSet<_>>().len() > 1)
            .map(|(p, _)| *p)
            .take(WANTED_BARRIERS)
            .collect();
        let mut latest = None;
        for barrier in diverged {
            let explanation = self.explain_at(service, &barriers, barrier).await?;
            if explanation.waiting_for.is_empty() {
                return Ok(explanation);
            }
            latest.get_or_insert(explanation);
        }
        Ok(latest.unwrap_or_else(|| Explanation {
            note: Some("no barrier where this service's replicas disagree".into()),
            ..Explanation::empty(service)
        }))
    }

    async fn explain_at(
        &self,
        service: &str,
        barriers: &BTreeMap<u64, BTreeMap<String, [u8; 32]>>,
        barrier: u64,
    ) -> Result<Explanation, StoreError> {
        let mut explanation = Explanation::empty(service);
        let Some(by_replica) = barriers.get(&barrier) else {
            return Ok(explanation);
        };
        explanation.barrier = Some(barrier);
        let capped = {
            let wanted = self
                .inner
                .reports
                .wanted
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            wanted
                .get(service)
                .and_then(|s| s.get(&barrier))
                .is_some_and(|w| w.differing > w.buckets.len())
        };
        if capped {
            explanation.note = Some(format!(
                "more than {MAX_WANTED_BUCKETS} of {EXPLAIN_BUCKETS} buckets differ: only keys \
                 of the first {MAX_WANTED_BUCKETS} were compared, others may differ too"
            ));
        }
        let Some(majority_hash) = majority(by_replica.values()) else {
            return Ok(explanation);
        };
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let owned = service.to_owned();
        let entries = tokio::task::spawn_blocking(move || reports.entries_at(&owned, barrier))
            .await
            .map_err(|e| StoreError::new(format!("explain task failed: {e}")))??;
        let (majority_ids, odd_ids): (Vec<&String>, Vec<&String>) = by_replica
            .keys()
            .partition(|r| by_replica[*r] == majority_hash);
        explanation.majority = majority_ids.iter().map(|r| (*r).clone()).collect();
        let reference = majority_ids.iter().find_map(|r| entries.get(*r));
        // Per odd replica: its differing keys, and where the window of suspects starts.
        let mut found: Vec<(String, u64, Vec<KeyDifference>)> = Vec::new();
        for replica in odd_ids {
            let (Some(reference), Some(theirs)) = (reference, entries.get(replica)) else {
                explanation.waiting_for.push(replica.clone());
                continue;
            };
            let common: HashSet<u32> = theirs
                .buckets
                .iter()
                .filter(|b| reference.buckets.contains(b))
                .copied()
                .collect();
            let side = |report: &EntriesReport| -> BTreeMap<String, String> {
                report
                    .entries
                    .iter()
                    .filter(|e| common.contains(&bucket_of(&e.key)))
                    .map(|e| (e.key.clone(), e.hash.clone()))
                    .collect()
            };
            // A truncated side holds its first keys in order: compare only up to the last key
            // both sides hold, so that a key cut from one side is not called different.
            let last_key = |r: &EntriesReport| r.entries.last().map(|e| e.key.clone());
            let up_to = [reference, theirs]
                .into_iter()
                .filter(|r| r.truncated)
                .filter_map(last_key)
                .min();
            let (mut ours, mut odd) = (side(reference), side(theirs));
            if let Some(last) = &up_to {
                ours.retain(|k, _| k <= last);
                odd.retain(|k, _| k <= last);
                explanation.note = Some(format!(
                    "the differing buckets hold more than {MAX_EXPLAIN_ENTRIES} entries; keys \
                     up to {last:?} were compared, later ones may differ too"
                ));
            }
            let keys: BTreeSet<&String> = ours.keys().chain(odd.keys()).collect();
            let differences: Vec<KeyDifference> = keys
                .into_iter()
                .filter(|k| ours.get(*k) != odd.get(*k))
                .map(|k| KeyDifference {
                    key: k.clone(),
                    majority: ours.get(k).cloned(),
                    replica: odd.get(k).cloned(),
                    touched_by: Vec::new(),
                })
                .collect();
            // The last barrier before this one where the replica agreed with the majority.
            let since = barriers
                .range(..barrier)
                .rev()
                .find(|(_, at)| {
                    let m = majority(at.values());
                    at.get(replica).is_some_and(|h| Some(*h) == m)
                })
                .map_or(0, |(p, _)| *p);
            found.push((replica.clone(), since, differences));
        }
        if reference.is_none() {
            explanation
                .waiting_for
                .extend(explanation.majority.iter().cloned());
        }
        self.touched_by(&mut found, barrier).await?;
        explanation.odd = found
            .into_iter()
            .map(|(replica, _, keys)| OddReplica { replica, keys })
            .collect();
        Ok(explanation)
    }

    /// Fills in, per differing key, the live events with that key after each replica's window
    /// start and up to `barrier`.
    async fn touched_by(
        &self,
        found: &mut [(String, u64, Vec<KeyDifference>)],
        barrier: u64,
    ) -> Result<(), StoreError> {
        let Some(from) = found.iter().map(|(_, since, _)| *since).min() else {
            return Ok(());
        };
        let keys: HashSet<String> = found
            .iter()
            .flat_map(|(_, _, diffs)| diffs.iter().map(|d| d.key.clone()))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let log = self.inner.log.clone();
        let superseded = log.superseded();
        let positions = tokio::task::spawn_blocking(move || {
            let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
            log.scan(from, |record, _| {
                if record.position > barrier {
                    return ControlFlow::Break(());
                }
                if let Some(key) = record.key
                    && keys.contains(key)
                    && !superseded.contains(record.position)
                {
                    by_key
                        .entry(key.to_owned())
                        .or_default()
                        .push(record.position);
                }
                ControlFlow::Continue(())
            })?;
            Ok::<_, StoreError>(by_key)
        })
        .await
        .map_err(|e| StoreError::new(format!("explain task failed: {e}")))??;
        for (_, since, diffs) in found.iter_mut() {
            for diff in diffs.iter_mut() {
                let all = positions.get(&diff.key).map(Vec::as_slice).unwrap_or(&[]);
                let window: Vec<u64> = all.iter().copied().filter(|p| p > since).collect();
                let skip = window.len().saturating_sub(TOUCHED_PER_KEY);
                diff.touched_by = window[skip..].to_vec();
            }
        }
        Ok(())
    }
}
