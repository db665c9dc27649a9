//! Chunks: runs of consecutive stored records kept in one redb value.
//!
//! One B-tree entry per event made the writer spend most of its time inside redb; one entry per
//! chunk of up to [`MAX_CHUNK_EVENTS`] events or [`MAX_CHUNK_BYTES`] bytes keeps the per-event cost
//! of a batch close to a memcpy, and lets a catch-up read walk far fewer entries.
//!
//! A chunk is keyed by the position of its first event and holds:
//!
//! ```text
//! u8   chunk format version (1)
//! then, per event in position order:
//! u32  length of the stored record (big-endian)
//! ...  the stored record: canonical bytes ‖ 32-byte chain hash
//! ```
//!
//! Chunks never span two transactions, so a chunk is written once and never changed.

use std::ops::ControlFlow;

use lockstep_proto::record::{ChainHash, RecordRef, StoredRecord};
use redb::ReadableTable;

use crate::error::StoreError;

const CHUNK_VERSION: u8 = 1;
/// A chunk takes no record that would grow it past this many bytes (unless it is the chunk's only
/// record). redb sizes pages in powers of two, so a value just over 64 KiB would occupy 128 KiB:
/// this bound leaves room for the page's own header within 64 KiB.
pub(super) const MAX_CHUNK_BYTES: usize = (64 << 10) - 512;
/// A chunk is closed once it holds this many events.
pub(super) const MAX_CHUNK_EVENTS: usize = 256;

/// Builds the chunks of one transaction.
pub(super) struct ChunkBuilder {
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

impl ChunkBuilder {
    pub(super) fn new() -> Self {
        Self {
            first: 0,
            count: 0,
            bytes: Vec::with_capacity(MAX_CHUNK_BYTES + 4096),
        }
    }

    /// Drops whatever was pushed since the last `take`.
    pub(super) fn clear(&mut self) {
        self.count = 0;
    }

    /// Adds the stored record of the event at `position`, the next one after the last pushed.
    pub(super) fn push(&mut self, position: u64, stored: &[u8]) {
        if self.count == 0 {
            self.first = position;
            self.bytes.clear();
            self.bytes.push(CHUNK_VERSION);
        }
        // A stored record is bounded by the body limit, far below u32::MAX.
        let len = u32::try_from(stored.len()).unwrap_or(u32::MAX);
        self.bytes.extend_from_slice(&len.to_be_bytes());
        self.bytes.extend_from_slice(stored);
        self.count += 1;
    }

    /// Whether the chunk must be taken before a stored record of `len` bytes is pushed.
    pub(super) fn is_full_for(&self, len: usize) -> bool {
        self.count > 0
            && (self.count >= MAX_CHUNK_EVENTS || self.bytes.len() + 4 + len > MAX_CHUNK_BYTES)
    }

    /// The finished chunk (first position, bytes), if it holds any event; the builder is emptied.
    pub(super) fn take(&mut self) -> Option<(u64, &[u8])> {
        if self.count == 0 {
            return None;
        }
        self.count = 0;
        Some((self.first, &self.bytes))
    }
}

/// Visits the records of one chunk in order; true when `visit` stopped early.
pub(super) fn for_each_record(
    chunk: &[u8],
    mut visit: impl FnMut(&RecordRef<'_>, &ChainHash) -> ControlFlow<()>,
) -> Result<bool, StoreError> {
    match chunk.first() {
        Some(&CHUNK_VERSION) => {}
        Some(v) => return Err(StoreError::new(format!("unknown chunk format version {v}"))),
        None => return Err(StoreError::new("empty chunk")),
    }
    let mut at = 1;
    if chunk.len() == 1 {
        return Err(StoreError::new("chunk holds no event"));
    }
    while at < chunk.len() {
        let len_bytes = chunk
            .get(at..at + 4)
            .ok_or_else(|| StoreError::new("chunk truncated in a record length"))?;
        let mut len = [0; 4];
        len.copy_from_slice(len_bytes);
        let start = at + 4;
        let end = start + u32::from_be_bytes(len) as usize;
        let stored = chunk
            .get(start..end)
            .ok_or_else(|| StoreError::new("chunk truncated in a record"))?;
        let (record, _, hash) = StoredRecord::decode(stored)?;
        if visit(&record, &hash).is_break() {
            return Ok(true);
        }
        at = end;
    }
    Ok(false)
}

/// Calls `f` with the event at `position`, if stored.
pub(super) fn get<T>(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    position: u64,
    f: impl FnOnce(&RecordRef<'_>, &ChainHash) -> T,
) -> Result<Option<T>, StoreError> {
    let Some(entry) = chunks.range(..=position)?.next_back() else {
        return Ok(None);
    };
    let (_, chunk) = entry?;
    let mut f = Some(f);
    let mut found = None;
    for_each_record(chunk.value(), |record, hash| {
        if record.position == position {
            found = f.take().map(|f| f(record, hash));
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(found)
}

/// Calls `f` with the last stored event, if any.
pub(super) fn last<T>(
    chunks: &impl ReadableTable<u64, &'static [u8]>,
    f: impl FnOnce(&RecordRef<'_>, &ChainHash) -> T,
) -> Result<Option<T>, StoreError> {
    let Some((_, chunk)) = chunks.last()? else {
        return Ok(None);
    };
    let mut last = None;
    for_each_record(chunk.value(), |record, hash| {
        last = Some((record.position, record.time_ns, *hash));
        ControlFlow::Continue(())
    })?;
    match last {
        Some((position, ..)) => get(chunks, position, f),
        None => Err(StoreError::new("the last chunk holds no event")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_proto::GENESIS_HASH;

    fn stored(position: u64) -> Vec<u8> {
        let record = RecordRef {
            position,
            time_ns: position as i64,
            id: "id",
            event_type: "a.b",
            source: "",
            key: None,
            occurred_at_ns: None,
            content_type: "application/json",
            data: b"{}",
        };
        let mut out = Vec::new();
        StoredRecord::encode(&record, &GENESIS_HASH, &mut out);
        out
    }

    #[test]
    fn builder_round_trip_and_limits() {
        let mut builder = ChunkBuilder::new();
        let len = stored(1).len();
        for p in 5..5 + MAX_CHUNK_EVENTS as u64 {
            assert!(!builder.is_full_for(len));
            builder.push(p, &stored(p));
        }
        assert!(builder.is_full_for(len));
        let (first, bytes) = builder.take().unwrap();
        assert_eq!(first, 5);
        let mut seen = Vec::new();
        for_each_record(bytes, |r, _| {
            seen.push(r.position);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(seen, (5..5 + MAX_CHUNK_EVENTS as u64).collect::<Vec<_>>());
        assert!(builder.take().is_none());
    }

    #[test]
    fn a_chunk_stays_within_its_byte_bound() {
        let mut builder = ChunkBuilder::new();
        let big = vec![7u8; 20_000];
        for p in 1..=3 {
            builder.push(p, &big);
        }
        // 1 + 3 × (4 + 20,000) = 60,013 bytes so far.
        assert!(!builder.is_full_for(4_000));
        assert!(builder.is_full_for(6_000));
        assert!(builder.take().unwrap().1.len() <= MAX_CHUNK_BYTES);
        // A record larger than the bound still gets a chunk of its own.
        assert!(!builder.is_full_for(MAX_CHUNK_BYTES * 2));
    }

    #[test]
    fn corrupt_chunks_are_errors_not_panics() {
        let mut builder = ChunkBuilder::new();
        builder.push(1, &stored(1));
        let (_, bytes) = builder.take().unwrap();
        let bytes = bytes.to_vec();
        for cut in 0..bytes.len() {
            let result = for_each_record(&bytes[..cut], |_, _| ControlFlow::Continue(()));
            assert!(result.is_err(), "cut at {cut}");
        }
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        assert!(for_each_record(&wrong_version, |_, _| ControlFlow::Continue(())).is_err());
    }
}
