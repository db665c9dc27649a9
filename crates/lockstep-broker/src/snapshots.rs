//! Snapshot blobs: replicas' state snapshots, uploaded at barriers and stored content-addressed
//! by blake3 in `DATA/snapshots/{hash}`. The address is the state hash the replicas report, so
//! a blob is checked on upload (the body must hash to its address) and again on every download
//! (a blob damaged on disk is refused, never served). Three replicas uploading the same state
//! store it once.
//!
//! A new replica bootstraps from the newest barrier at which every reporting replica of its
//! service agreed and whose blob is here ([`Broker::verified_snapshot`]), instead of replaying
//! the whole log.
//!
//! Retention ([`Broker::collect_snapshots`], every [`GC_INTERVAL`] and on request): per service,
//! the blobs of the newest [`KEEP_VERIFIED`] verified barriers and, for every mark, of the newest
//! verified barrier at or before it (what a rollback to the mark falls back on) are kept, and so
//! is every blob written in the last [`GC_GRACE`]; the others are removed.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lockstep_proto::consistency::{SnapshotGc, VerifiedSnapshot};
use lockstep_proto::record::ChainHash;

use crate::Broker;
use crate::error::StoreError;

/// Why a snapshot operation was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotError {
    /// A malformed request, or a body that does not hash to its address.
    #[error("{0}")]
    Invalid(String),
    /// No such blob, or no verified snapshot.
    #[error("{0}")]
    NotFound(String),
    /// The stored blob no longer hashes to its address.
    #[error("snapshot {0} is damaged: its bytes no longer hash to its address; it was refused")]
    Damaged(String),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

/// The blob directory.
pub struct SnapshotBlobs {
    dir: PathBuf,
}

impl SnapshotBlobs {
    /// Opens (or creates) `DATA/snapshots`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::new(format!("creating {}: {e}", dir.display())))?;
        // Uploads cut short by a crash leave temp files; they were never acknowledged.
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| StoreError::new(format!("listing {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir })
    }

    fn path(&self, hash: &ChainHash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    /// Size of the blob stored under `hash`, if any.
    pub fn size(&self, hash: &ChainHash) -> Option<u64> {
        std::fs::metadata(self.path(hash)).ok().map(|m| m.len())
    }

    /// Stores `bytes` under `hash` durably (temp file, fsync, rename, fsync the directory),
    /// after checking that they hash to it. Storing a blob that is already here is a no-op.
    pub fn put(&self, hash: &ChainHash, bytes: &[u8]) -> Result<bool, SnapshotError> {
        let actual = blake3::hash(bytes);
        if actual.as_bytes() != &hash.0 {
            return Err(SnapshotError::Invalid(format!(
                "the body hashes to {} (blake3), not to its address {}; nothing was stored",
                actual.to_hex(),
                hash.to_hex()
            )));
        }
        let path = self.path(hash);
        if path.exists() {
            return Ok(false);
        }
        let io = |what: &str, e: std::io::Error| StoreError::new(format!("{what}: {e}"));
        let temp = self
            .dir
            .join(format!("{}.{}.tmp", hash.to_hex(), uuid::Uuid::now_v7()));
        let mut file = std::fs::File::create(&temp).map_err(|e| io("creating a blob", e))?;
        file.write_all(bytes).map_err(|e| io("writing a blob", e))?;
        file.sync_all().map_err(|e| io("syncing a blob", e))?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(|e| io("renaming a blob", e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the blob directory", e))?;
        Ok(true)
    }

    /// The blob stored under `hash`, checked against it.
    pub fn get(&self, hash: &ChainHash) -> Result<Vec<u8>, SnapshotError> {
        let bytes = match std::fs::read(self.path(hash)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::NotFound(format!(
                    "no snapshot {} is stored",
                    hash.to_hex()
                )));
            }
            Err(e) => return Err(StoreError::new(format!("reading a blob: {e}")).into()),
        };
        if blake3::hash(&bytes).as_bytes() != &hash.0 {
            tracing::error!(hash = %hash.to_hex(), "a stored snapshot blob is damaged");
            return Err(SnapshotError::Damaged(hash.to_hex()));
        }
        Ok(bytes)
    }
}

/// Verified barriers per service whose blobs retention keeps.
pub const KEEP_VERIFIED: usize = 3;
/// Blobs written within this long are kept whatever.
pub const GC_GRACE: Duration = Duration::from_secs(600);
/// How often a serving broker collects blobs.
pub const GC_INTERVAL: Duration = Duration::from_secs(600);

impl SnapshotBlobs {
    /// Removes every blob not in `keep` and written before `grace` ago.
    fn collect(&self, keep: &HashSet<[u8; 32]>, grace: Duration) -> Result<SnapshotGc, StoreError> {
        let io = |what: &str, e: std::io::Error| StoreError::new(format!("{what}: {e}"));
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let mut gc = SnapshotGc::default();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io("listing blobs", e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io("listing blobs", e))?;
            let name = entry.file_name();
            let Ok(hash) = ChainHash::from_hex(&name.to_string_lossy()) else {
                continue; // a temp file of an upload in progress
            };
            let meta = entry
                .metadata()
                .map_err(|e| io("reading a blob's metadata", e))?;
            let recent = meta.modified().map_or(true, |t| t > cutoff);
            if keep.contains(&hash.0) || recent {
                gc.kept += 1;
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    gc.removed += 1;
                    gc.bytes_removed += meta.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("removing a blob", e)),
            }
        }
        Ok(gc)
    }
}

fn parse_hash(text: &str) -> Result<ChainHash, SnapshotError> {
    ChainHash::from_hex(text).map_err(|_| {
        SnapshotError::Invalid(format!(
            "{text:?} is not a snapshot address (64 hex characters)"
        ))
    })
}

impl Broker {
    /// Stores an uploaded snapshot under its state hash; true when it was new.
    pub async fn put_snapshot(&self, hash: &str, bytes: Vec<u8>) -> Result<bool, SnapshotError> {
        let hash = parse_hash(hash)?;
        let blobs = std::sync::Arc::clone(&self.inner.snapshots);
        tokio::task::spawn_blocking(move || blobs.put(&hash, &bytes))
            .await
            .map_err(|e| StoreError::new(format!("snapshot task failed: {e}")))?
    }

    /// A stored snapshot's bytes, checked against its address.
    pub async fn snapshot(&self, hash: &str) -> Result<Vec<u8>, SnapshotError> {
        let hash = parse_hash(hash)?;
        let blobs = std::sync::Arc::clone(&self.inner.snapshots);
        tokio::task::spawn_blocking(move || blobs.get(&hash))
            .await
            .map_err(|e| StoreError::new(format!("snapshot task failed: {e}")))?
    }

    /// Size of a stored snapshot, if the broker has it.
    pub fn snapshot_size(&self, hash: &str) -> Result<Option<u64>, SnapshotError> {
        Ok(self.inner.snapshots.size(&parse_hash(hash)?))
    }

    /// Removes the snapshot blobs retention does not keep (see the module documentation);
    /// `grace`: blobs written within it are kept whatever.
    pub async fn collect_snapshots(&self, grace: Duration) -> Result<SnapshotGc, SnapshotError> {
        let all = self.verify_reports(None).await?;
        let marks = self.marks().await?.marks;
        let mut keep: HashSet<[u8; 32]> = HashSet::new();
        for barriers in all.values() {
            // Verified barriers, oldest first, with the hash their replicas agreed on.
            let verified: Vec<(u64, [u8; 32])> = barriers
                .iter()
                .filter_map(|(&position, by_replica)| {
                    let mut hashes = by_replica.values();
                    let first = *hashes.next()?;
                    (by_replica.len() >= 2 && hashes.all(|h| *h == first))
                        .then_some((position, first))
                })
                .collect();
            keep.extend(verified.iter().rev().take(KEEP_VERIFIED).map(|(_, h)| *h));
            for mark in &marks {
                if let Some((_, hash)) = verified.iter().rev().find(|(p, _)| *p <= mark.position) {
                    keep.insert(*hash);
                }
            }
        }
        let blobs = std::sync::Arc::clone(&self.inner.snapshots);
        let gc = tokio::task::spawn_blocking(move || blobs.collect(&keep, grace))
            .await
            .map_err(|e| StoreError::new(format!("snapshot task failed: {e}")))??;
        if gc.removed > 0 {
            tracing::info!(
                removed = gc.removed,
                bytes = gc.bytes_removed,
                kept = gc.kept,
                "snapshot blobs collected"
            );
        }
        Ok(gc)
    }

    /// Collects snapshot blobs every [`GC_INTERVAL`] until the broker stops.
    pub(crate) fn spawn_snapshot_gc(&self) {
        let broker = self.clone();
        tokio::spawn(async move {
            let mut stopping = broker.inner.stopping.subscribe();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(GC_INTERVAL) => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
                if let Err(e) = broker.collect_snapshots(GC_GRACE).await {
                    tracing::warn!(error = %e, "collecting snapshot blobs failed");
                }
            }
        });
    }

    /// The newest barrier at or before `at_or_before` (default: any) at which two or more
    /// replicas of `service` reported, all with the same state hash, and whose snapshot is here.
    pub async fn verified_snapshot(
        &self,
        service: &str,
        at_or_before: Option<u64>,
    ) -> Result<VerifiedSnapshot, SnapshotError> {
        let verification = self.verify_reports(Some(service.to_owned())).await?;
        let barriers = verification.get(service).cloned().unwrap_or_default();
        let limit = at_or_before.unwrap_or(u64::MAX);
        for (&position, by_replica) in barriers.range(..=limit).rev() {
            let mut hashes = by_replica.values();
            let Some(first) = hashes.next() else { continue };
            if by_replica.len() < 2 || hashes.any(|h| h != first) {
                continue;
            }
            let state = ChainHash(*first);
            let Some(bytes) = self.inner.snapshots.size(&state) else {
                continue;
            };
            let log = self.inner.log.clone();
            let chain = tokio::task::spawn_blocking(move || log.get(position, |_, hash| *hash))
                .await
                .map_err(|e| StoreError::new(format!("snapshot task failed: {e}")))??
                .ok_or_else(|| StoreError::new(format!("barrier {position} is not in the log")))?;
            return Ok(VerifiedSnapshot {
                service: service.to_owned(),
                position,
                state_hash: state.to_hex(),
                chain_hash: chain.to_hex(),
                replicas: by_replica.len(),
                bytes,
            });
        }
        Err(SnapshotError::NotFound(format!(
            "no verified snapshot of service {service:?}{}: no barrier where two or more \
             replicas agreed has an uploaded snapshot",
            at_or_before
                .map(|p| format!(" at or before {p}"))
                .unwrap_or_default()
        )))
    }
}
