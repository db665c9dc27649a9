//! Rollback: returning every replica to a known-good position without deleting anything.
//!
//! `POST /v1/rollbacks` appends a `lockstep.rollback` record at `R` naming a target `P` (a mark's
//! position or a position). The writer checks the target and stores the rollback in the same
//! transaction as the record, so the events in `(P, R)` are *superseded* from the moment the
//! record is visible: reads skip them unless asked, subscriptions never deliver them again, and
//! the record reaches every subscription, telling replicas that applied any of them to restore
//! their state at `P` (see the SDK runtime). Replicas that replay the log later never see the
//! superseded events, so for them the record changes nothing: both end in the same state.
//!
//! Around a rollback an operator can pause publishing (`503` + `Retry-After`), and afterwards
//! publish chosen superseded events again as new ones (redrive).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::sync::PoisonError;

use chrono::Utc;
use lockstep_proto::RecordRef;
use lockstep_proto::consistency::{
    PauseState, ROLLBACK_TYPE, RedriveRequest, RedriveResult, Redriven, Rollback, RollbackData,
    RollbackList, RollbackRequest, RollbackTo,
};
use lockstep_proto::names::is_reserved;

use crate::Broker;
use crate::consistency::ReportError;
use crate::error::{AppendError, ConflictKind, PublishError, StoreError};
use crate::log::Draft;

/// Most events one redrive publishes; narrow the range for more.
pub const MAX_REDRIVE: usize = 10_000;

/// Seconds a paused broker asks publishers to wait before retrying.
pub const PAUSED_RETRY_AFTER_SECS: u64 = 2;

/// Why a rollback or redrive was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RollbackError {
    /// The request names something that is not there (a mark, a position).
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The log refused the record (a target it cannot return to) or failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A malformed request.
    #[error("{0}")]
    Invalid(String),
    /// Publishes kept the head moving; pause them and try again.
    #[error("{0}")]
    Busy(String),
}

/// Longest reason a rollback or a pause may give, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Checks an operator's reason (of a rollback or a pause) against [`MAX_REASON_BYTES`].
pub(crate) fn check_reason(reason: Option<&str>) -> Result<(), String> {
    match reason {
        Some(r) if r.len() > MAX_REASON_BYTES => {
            Err(format!("reason is longer than {MAX_REASON_BYTES} bytes"))
        }
        _ => Ok(()),
    }
}

/// Times a rollback is computed again because publishes moved the head meanwhile.
const ROLLBACK_ATTEMPTS: usize = 20;

/// Holds client publishes (503) while it lives.
struct HeldPublishes<'a>(&'a Broker);

impl<'a> HeldPublishes<'a> {
    fn hold(broker: &'a Broker) -> Self {
        broker
            .inner
            .holding_publishes
            .store(true, std::sync::atomic::Ordering::Release);
        Self(broker)
    }
}

impl Drop for HeldPublishes<'_> {
    fn drop(&mut self) {
        self.0
            .inner
            .holding_publishes
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl From<StoreError> for RollbackError {
    fn from(e: StoreError) -> Self {
        Self::Report(ReportError::Store(e))
    }
}

impl Broker {
    /// Rolls every replica back to a mark or position: appends the rollback record.
    pub async fn rollback(&self, request: RollbackRequest) -> Result<Rollback, RollbackError> {
        let (target, mark) = match request.to {
            RollbackTo::Mark(name) => (self.mark(&name).await?.position, Some(name)),
            RollbackTo::Position(position) => (position, None),
        };
        check_reason(request.reason.as_deref()).map_err(RollbackError::Invalid)?;
        let data = RollbackData {
            target,
            mark: mark.clone(),
            reason: request.reason.clone(),
        };
        let data = serde_json::to_value(&data)
            .map_err(|e| RollbackError::Invalid(format!("rollback data: {e}")))?;
        // The keys whose last event is superseded get back their last live one, so that
        // `expected_position` agrees with the replicas' restored state. Computed against a head
        // the record then insists on: publishes are held meanwhile (those already queued may
        // still land, and then it is computed again).
        let _one_at_a_time = self.inner.rolling_back.lock().await;
        let _held = HeldPublishes::hold(self);
        let mut attempts = 0;
        let ack = loop {
            let head = self.inner.log.tip().position;
            let resets = self.key_resets(target, head).await?;
            let draft = self
                .control_draft(ROLLBACK_TYPE, &data)?
                .rollback_to(target)
                .with_key_resets(head, resets);
            match self.append(vec![draft]).await {
                Ok(mut acks) => {
                    break acks
                        .pop()
                        .ok_or_else(|| PublishError::invalid("no ack for the rollback record"))?;
                }
                Err(PublishError::Append(AppendError::Conflict {
                    kind: ConflictKind::Head,
                    ..
                })) if attempts < ROLLBACK_ATTEMPTS => {
                    attempts += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(PublishError::Append(AppendError::Conflict {
                    kind: ConflictKind::Head,
                    ..
                })) => {
                    return Err(RollbackError::Busy(format!(
                        "publishes kept moving the head during {ROLLBACK_ATTEMPTS} attempts; \
                         pause publishing (lockstep pause) and roll back again"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::warn!(
            position = ack.position,
            target,
            mark = mark.as_deref().unwrap_or(""),
            reason = request.reason.as_deref().unwrap_or(""),
            "rollback: events after the target are superseded"
        );
        Ok(Rollback {
            position: ack.position,
            target,
            mark,
            reason: request.reason,
            time: ack.time,
        })
    }

    /// For every key with an event in `(target, head]`: the position of its last live event at
    /// or before `target` (0: none).
    async fn key_resets(&self, target: u64, head: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let log = self.inner.log.clone();
        let superseded = log.superseded();
        let task = move || -> Result<Vec<(String, u64)>, StoreError> {
            let mut keys = HashSet::new();
            if target < head {
                log.scan(target, |record, _| {
                    if record.position > head {
                        return ControlFlow::Break(());
                    }
                    if let Some(key) = record.key {
                        keys.insert(key.to_owned());
                    }
                    ControlFlow::Continue(())
                })?;
            }
            let all: Vec<String> = keys.iter().cloned().collect();
            let found = log.last_live_positions(keys, target, &superseded)?;
            Ok(all
                .into_iter()
                .map(|key| {
                    let last = found.get(&key).copied().unwrap_or(0);
                    (key, last)
                })
                .collect())
        };
        tokio::task::spawn_blocking(task)
            .await
            .map_err(|e| StoreError::new(format!("rollback task failed: {e}")))?
    }

    /// Every rollback in the log, oldest first, and how many events they supersede.
    pub async fn rollbacks(&self) -> Result<RollbackList, StoreError> {
        let log = self.inner.log.clone();
        let superseded = log.superseded();
        let task = move || -> Result<RollbackList, StoreError> {
            let mut rollbacks = Vec::with_capacity(superseded.rollbacks().len());
            for entry in superseded.rollbacks() {
                let found = log.get(entry.at, |record, _| {
                    let data: Option<RollbackData> = serde_json::from_slice(record.data).ok();
                    (data, record.time_ns)
                })?;
                let (data, time_ns) = found.ok_or_else(|| {
                    StoreError::new(format!("rollback record {} is missing", entry.at))
                })?;
                let data = data.unwrap_or(RollbackData {
                    target: entry.target,
                    mark: None,
                    reason: None,
                });
                rollbacks.push(Rollback {
                    position: entry.at,
                    target: entry.target,
                    mark: data.mark,
                    reason: data.reason,
                    time: chrono::DateTime::from_timestamp_nanos(time_ns),
                });
            }
            Ok(RollbackList {
                rollbacks,
                superseded_events: superseded.count(),
            })
        };
        tokio::task::spawn_blocking(task)
            .await
            .map_err(|e| StoreError::new(format!("rollback list task failed: {e}")))?
    }

    /// Whether publishing is paused.
    pub fn pause_state(&self) -> PauseState {
        self.inner
            .paused
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Pauses (`Some(reason)`) or resumes (`None`) publishing; survives restarts.
    pub async fn set_paused(
        &self,
        pause: Option<Option<String>>,
    ) -> Result<PauseState, StoreError> {
        let state = match pause {
            Some(reason) => PauseState {
                paused: true,
                since: Some(Utc::now()),
                reason,
            },
            None => PauseState {
                paused: false,
                since: None,
                reason: None,
            },
        };
        let reports = std::sync::Arc::clone(&self.inner.reports);
        let stored = state.clone();
        tokio::task::spawn_blocking(move || reports.store_pause(&stored))
            .await
            .map_err(|e| StoreError::new(format!("pause task failed: {e}")))??;
        *self
            .inner
            .paused
            .write()
            .unwrap_or_else(PoisonError::into_inner) = state.clone();
        tracing::warn!(paused = state.paused, reason = ?state.reason, "publishing paused state changed");
        Ok(state)
    }

    /// Publishes superseded events of `[from, to]` again, as new events at the head, except
    /// those whose id is listed. Atomic; repeating it publishes nothing twice.
    pub async fn redrive(&self, request: RedriveRequest) -> Result<RedriveResult, RollbackError> {
        let head = self.inner.log.tip().position;
        if request.from == 0 || request.from > request.to || request.to > head {
            return Err(RollbackError::Invalid(format!(
                "redrive needs 1 <= from <= to <= head ({head}), not from={} to={}",
                request.from, request.to
            )));
        }
        let log = self.inner.log.clone();
        let superseded = log.superseded();
        let except: HashSet<String> = request.except.into_iter().collect();
        let (from, to) = (request.from, request.to);
        let task = move || -> Result<Result<Selection, String>, StoreError> {
            let mut drafts = Vec::new();
            let mut originals = Vec::new();
            let mut excepted = 0;
            let mut too_many = false;
            log.scan(from - 1, |record, _| {
                if record.position > to {
                    return ControlFlow::Break(());
                }
                if !superseded.contains(record.position) || is_reserved(record.event_type) {
                    return ControlFlow::Continue(());
                }
                if except.contains(record.id) {
                    excepted += 1;
                    return ControlFlow::Continue(());
                }
                if drafts.len() == MAX_REDRIVE {
                    too_many = true;
                    return ControlFlow::Break(());
                }
                let id = redrive_id(record.position);
                let again = RecordRef { id: &id, ..*record };
                drafts.push(Draft::new(&again, false, None, None));
                originals.push(record.position);
                ControlFlow::Continue(())
            })?;
            if too_many {
                return Ok(Err(format!(
                    "more than {MAX_REDRIVE} superseded events in {from}..={to}; redrive a narrower range"
                )));
            }
            Ok(Ok((drafts, originals, excepted)))
        };
        let (drafts, originals, excepted) = tokio::task::spawn_blocking(task)
            .await
            .map_err(|e| StoreError::new(format!("redrive task failed: {e}")))??
            .map_err(RollbackError::Invalid)?;
        if drafts.is_empty() {
            return Ok(RedriveResult {
                redriven: Vec::new(),
                excepted,
            });
        }
        let acks = self.append(drafts).await?;
        let redriven = acks
            .into_iter()
            .zip(originals)
            .map(|(ack, original)| Redriven {
                original,
                position: ack.position,
                id: ack.id,
                duplicate: ack.duplicate,
            })
            .collect();
        Ok(RedriveResult { redriven, excepted })
    }
}

/// What a redrive publishes: the drafts, their originals' positions, and how many were left out.
type Selection = (Vec<Draft>, Vec<u64>, usize);

/// The id of a redriven event: derived from the original's position, so a second redrive of the
/// same event is recognised as a duplicate.
fn redrive_id(original: u64) -> String {
    format!("lockstep-redrive-{original}")
}
