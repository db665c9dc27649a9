//! Local snapshots of a replica's state, in redb: `STATE_DIR/replica.redb`.
//!
//! A snapshot is the state's canonical bytes at a position, with their blake3 hash and the chain
//! hash at that position. Writing one is also the replica's checkpoint: position and state land in
//! the same transaction, so a restart never sees one without the other. A snapshot whose bytes no
//! longer match their hash is skipped with a warning and never loaded.
//!
//! Row layout (`snapshots`: position → bytes):
//!
//! ```text
//! u8       format version (1)
//! [u8;32]  blake3 of the state bytes
//! [u8;32]  chain hash at the position
//! i64      created, ns since the epoch (big-endian)
//! ...      the state bytes (bincode)
//! ```

use std::path::Path;

use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const SNAPSHOTS: TableDefinition<u64, &[u8]> = TableDefinition::new("snapshots");
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 32 + 32 + 8;

/// The local store failed.
#[derive(Debug, thiserror::Error)]
#[error("replica store: {0}")]
pub struct StoreError(String);

fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// One stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The position the state includes everything up to.
    pub position: u64,
    /// blake3 of `bytes`.
    pub state_hash: [u8; 32],
    /// Chain hash at `position`.
    pub chain_hash: [u8; 32],
    /// When it was taken.
    pub created: DateTime<Utc>,
    /// The state, bincode.
    pub bytes: Vec<u8>,
}

impl Snapshot {
    /// The state hash, hex.
    pub fn state_hash_hex(&self) -> String {
        blake3::Hash::from_bytes(self.state_hash)
            .to_hex()
            .to_string()
    }
}

/// A replica's snapshots.
pub struct SnapshotStore {
    db: Database,
}

impl SnapshotStore {
    /// Opens (or creates) `dir/replica.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("replica.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(store_error)?;
        txn.open_table(SNAPSHOTS).map_err(store_error)?;
        txn.commit().map_err(store_error)?;
        Ok(Self { db })
    }

    /// Stores a snapshot durably and keeps only the newest `keep` (at least one).
    pub fn save(
        &self,
        position: u64,
        chain_hash: [u8; 32],
        bytes: &[u8],
        keep: usize,
    ) -> Result<Snapshot, StoreError> {
        self.save_keeping(position, chain_hash, bytes, keep, &[])
    }

    /// Stores a snapshot durably and keeps the newest `keep` (at least one) and those at the
    /// `pinned` positions (marks a rollback may return to).
    pub fn save_keeping(
        &self,
        position: u64,
        chain_hash: [u8; 32],
        bytes: &[u8],
        keep: usize,
        pinned: &[u64],
    ) -> Result<Snapshot, StoreError> {
        let snapshot = Snapshot {
            position,
            state_hash: *blake3::hash(bytes).as_bytes(),
            chain_hash,
            created: Utc::now(),
            bytes: bytes.to_vec(),
        };
        let mut row = Vec::with_capacity(HEADER_LEN + bytes.len());
        row.push(FORMAT_VERSION);
        row.extend_from_slice(&snapshot.state_hash);
        row.extend_from_slice(&chain_hash);
        let created_ns = snapshot.created.timestamp_nanos_opt().unwrap_or(0);
        row.extend_from_slice(&created_ns.to_be_bytes());
        row.extend_from_slice(bytes);
        let txn = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(store_error)?;
            table
                .insert(position, row.as_slice())
                .map_err(store_error)?;
            let positions: Vec<u64> = table
                .iter()
                .map_err(store_error)?
                .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                .collect();
            let excess = positions.len().saturating_sub(keep.max(1));
            for old in positions[..excess].iter().filter(|p| !pinned.contains(p)) {
                table.remove(*old).map_err(store_error)?;
            }
        }
        txn.commit().map_err(store_error)?;
        Ok(snapshot)
    }

    /// The newest snapshot whose bytes match their hash. Damaged ones are skipped with a warning.
    pub fn newest_valid(&self) -> Result<Option<Snapshot>, StoreError> {
        self.newest_valid_at_or_before(u64::MAX)
    }

    /// The newest valid snapshot at or before `position`.
    pub fn newest_valid_at_or_before(&self, position: u64) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_error)?;
        for entry in table.range(..=position).map_err(store_error)?.rev() {
            let (position, row) = entry.map_err(store_error)?;
            match parse(position.value(), row.value()) {
                Ok(snapshot) => return Ok(Some(snapshot)),
                Err(why) => tracing::warn!(
                    position = position.value(),
                    %why,
                    "skipping a damaged snapshot; it will not be loaded"
                ),
            }
        }
        Ok(None)
    }

    /// The snapshot at exactly `position`, if it is kept and valid.
    pub fn at(&self, position: u64) -> Result<Option<Snapshot>, StoreError> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_error)?;
        let Some(row) = table.get(position).map_err(store_error)? else {
            return Ok(None);
        };
        Ok(parse(position, row.value()).ok())
    }

    /// Removes every snapshot after `position` (they hold states a rollback superseded); returns
    /// how many.
    pub fn remove_after(&self, position: u64) -> Result<usize, StoreError> {
        let txn = self.db.begin_write().map_err(store_error)?;
        let removed = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(store_error)?;
            let later: Vec<u64> = table
                .range(position.saturating_add(1)..)
                .map_err(store_error)?
                .map(|e| e.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(store_error)?;
            for p in &later {
                table.remove(*p).map_err(store_error)?;
            }
            later.len()
        };
        txn.commit().map_err(store_error)?;
        Ok(removed)
    }

    /// Positions of the stored snapshots, oldest first.
    pub fn positions(&self) -> Result<Vec<u64>, StoreError> {
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(store_error)?;
        let positions = table
            .iter()
            .map_err(store_error)?
            .filter_map(|e| e.ok().map(|(k, _)| k.value()))
            .collect();
        Ok(positions)
    }

    #[cfg(test)]
    fn overwrite_raw(&self, position: u64, row: &[u8]) {
        let txn = self.db.begin_write().unwrap();
        txn.open_table(SNAPSHOTS)
            .unwrap()
            .insert(position, row)
            .unwrap();
        txn.commit().unwrap();
    }
}

fn parse(position: u64, row: &[u8]) -> Result<Snapshot, String> {
    if row.len() < HEADER_LEN || row[0] != FORMAT_VERSION {
        return Err("unknown format or truncated".into());
    }
    let mut state_hash = [0; 32];
    state_hash.copy_from_slice(&row[1..33]);
    let mut chain_hash = [0; 32];
    chain_hash.copy_from_slice(&row[33..65]);
    let mut created = [0; 8];
    created.copy_from_slice(&row[65..73]);
    let bytes = &row[HEADER_LEN..];
    if *blake3::hash(bytes).as_bytes() != state_hash {
        return Err("its bytes do not match their blake3 hash".into());
    }
    Ok(Snapshot {
        position,
        state_hash,
        chain_hash,
        created: DateTime::from_timestamp_nanos(i64::from_be_bytes(created)),
        bytes: bytes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_skips_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        for p in 1..=5u64 {
            store
                .save(p * 10, [p as u8; 32], &p.to_be_bytes(), 3)
                .unwrap();
        }
        assert_eq!(store.positions().unwrap(), [30, 40, 50]);
        let newest = store.newest_valid().unwrap().unwrap();
        assert_eq!(
            (newest.position, newest.bytes.clone()),
            (50, 5u64.to_be_bytes().to_vec())
        );

        // Flip one byte of the newest snapshot's state: it must be skipped, never loaded.
        let mut damaged = vec![FORMAT_VERSION];
        damaged.extend_from_slice(&newest.state_hash);
        damaged.extend_from_slice(&newest.chain_hash);
        damaged.extend_from_slice(&0i64.to_be_bytes());
        damaged.extend_from_slice(&6u64.to_be_bytes());
        store.overwrite_raw(50, &damaged);
        let fallback = store.newest_valid().unwrap().unwrap();
        assert_eq!(fallback.position, 40);
        store.overwrite_raw(40, b"\x01short");
        assert_eq!(store.newest_valid().unwrap().unwrap().position, 30);
    }

    #[test]
    fn pinned_snapshots_stay_and_a_rollback_removes_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        for p in 1..=6u64 {
            store
                .save_keeping(p * 10, [0; 32], &p.to_be_bytes(), 2, &[20])
                .unwrap();
        }
        assert_eq!(store.positions().unwrap(), [20, 50, 60]);
        assert_eq!(
            store
                .newest_valid_at_or_before(49)
                .unwrap()
                .unwrap()
                .position,
            20
        );
        assert_eq!(store.remove_after(20).unwrap(), 2);
        assert_eq!(store.positions().unwrap(), [20]);
    }
}
