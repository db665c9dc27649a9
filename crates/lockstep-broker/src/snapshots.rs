//! Snapshot blobs: replicas' state snapshots, uploaded at barriers and stored content-addressed
//! by blake3 in `DATA/snapshots/{hash}`. The address is the state hash the replicas report, so
//! a blob is checked on upload (the body must hash to its address) and again on every download
//! (a blob damaged on disk is refused, never served). Three replicas uploading the same state
//! store it once.
//!
//! A new replica bootstraps from the newest barrier at which every reporting replica of its
//! service agreed and whose blob is here ([`Broker::verified_snapshot`]), instead of replaying
//! the whole log.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use lockstep_proto::consistency::VerifiedSnapshot;
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
