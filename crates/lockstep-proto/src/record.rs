//! The canonical bytes of an event and the hash chain over them.
//!
//! The canonical encoding is what the chain hashes and what the broker stores, so it is specified
//! here byte for byte and never changes meaning for a given format version. All integers are
//! big-endian; `str` and `bytes` are a `u32` length followed by that many bytes.
//!
//! ```text
//! u8     format version (1)
//! u64    position
//! i64    time: broker receive time, nanoseconds since the Unix epoch (UTC)
//! u8     flags: bit 0 = key present, bit 1 = occurred_at present
//! str    id
//! str    type
//! str    source
//! str    key                 (only if flag bit 0)
//! i64    occurred_at, ns     (only if flag bit 1)
//! str    content type
//! bytes  data
//! ```
//!
//! The chain hashes the first 17 bytes (version, position, time: what the broker assigns) as they
//! are, and the rest (the event's content) through its own blake3 digest:
//!
//! ```text
//! hash(n) = blake3(hash(n-1) ‖ canonical(n)[..17] ‖ blake3(canonical(n)[17..]))
//! ```
//!
//! with `hash(0)` all zeros. Two parties that hold the same hash at position `n` hold the same
//! first `n` events. Digesting the content separately lets the broker hash it on the publishing
//! request's own task, in parallel; the one writer thread then hashes 81 bytes per event however
//! large the event is.

use chrono::{DateTime, Utc};

/// Format version written as the first byte of every canonical record.
pub const FORMAT_VERSION: u8 = 1;

/// Content type of JSON event data, the default.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The hash before the first event.
pub const GENESIS_HASH: ChainHash = ChainHash([0; 32]);

const FLAG_KEY: u8 = 1;
const FLAG_OCCURRED: u8 = 2;

/// A blake3 hash of the chain at some position.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

/// Length of the canonical bytes' header: version, position and time, which the broker assigns.
pub const HEADER_LEN: usize = 17;

/// The blake3 digest of an event's content: its canonical bytes after the header.
pub fn content_digest(content: &[u8]) -> [u8; 32] {
    *blake3::hash(content).as_bytes()
}

impl ChainHash {
    /// The hash at the position after `canonical`'s event, given the hash before it.
    pub fn next(&self, canonical: &[u8]) -> ChainHash {
        let (header, content) = canonical.split_at(canonical.len().min(HEADER_LEN));
        self.next_parts(header, &content_digest(content))
    }

    /// [`ChainHash::next`] from the header and the content's digest, computed separately.
    pub fn next_parts(&self, header: &[u8], content_digest: &[u8; 32]) -> ChainHash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.0);
        hasher.update(header);
        hasher.update(content_digest);
        ChainHash(*hasher.finalize().as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Result<Self, DecodeError> {
        blake3::Hash::from_hex(hex)
            .map(|h| ChainHash(*h.as_bytes()))
            .map_err(|_| DecodeError(format!("{hex:?} is not a 64-character hex hash")))
    }
}

impl std::fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainHash({})", self.to_hex())
    }
}

impl std::fmt::Display for ChainHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A record that could not be decoded: corrupt storage or a newer format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable event record: {0}")]
pub struct DecodeError(String);

impl DecodeError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// One event as the chain sees it, borrowing its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// Position in the log, from 1.
    pub position: u64,
    /// Broker receive time, ns since the epoch.
    pub time_ns: i64,
    /// Dedup key.
    pub id: &'a str,
    /// Event type name.
    pub event_type: &'a str,
    /// Publishing service.
    pub source: &'a str,
    /// Entity key, if any.
    pub key: Option<&'a str>,
    /// The client's own time, ns since the epoch, if given.
    pub occurred_at_ns: Option<i64>,
    /// Content type of `data`.
    pub content_type: &'a str,
    /// The payload; JSON text when `content_type` is JSON.
    pub data: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// Appends the canonical bytes of this record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.position.to_be_bytes());
        out.extend_from_slice(&self.time_ns.to_be_bytes());
        let flags = if self.key.is_some() { FLAG_KEY } else { 0 }
            | if self.occurred_at_ns.is_some() {
                FLAG_OCCURRED
            } else {
                0
            };
        out.push(flags);
        put_bytes(out, self.id.as_bytes());
        put_bytes(out, self.event_type.as_bytes());
        put_bytes(out, self.source.as_bytes());
        if let Some(key) = self.key {
            put_bytes(out, key.as_bytes());
        }
        if let Some(t) = self.occurred_at_ns {
            out.extend_from_slice(&t.to_be_bytes());
        }
        put_bytes(out, self.content_type.as_bytes());
        put_bytes(out, self.data);
    }

    /// Writes `position` and `time_ns` into canonical bytes encoded earlier (typically with both
    /// zero), so the costly part of encoding can happen before the order is known.
    pub fn stamp(canonical: &mut [u8], position: u64, time_ns: i64) -> Result<(), DecodeError> {
        match canonical.get_mut(..17) {
            Some(head) if head[0] == FORMAT_VERSION => {
                head[1..9].copy_from_slice(&position.to_be_bytes());
                head[9..17].copy_from_slice(&time_ns.to_be_bytes());
                Ok(())
            }
            _ => Err(DecodeError::new("not a version-1 record")),
        }
    }

    /// Length of the canonical bytes.
    pub fn encoded_len(&self) -> usize {
        1 + 8
            + 8
            + 1
            + 4 * 5
            + self.id.len()
            + self.event_type.len()
            + self.source.len()
            + self.key.map_or(0, |k| 4 + k.len())
            + self.occurred_at_ns.map_or(0, |_| 8)
            + self.content_type.len()
            + self.data.len()
    }

    /// Decodes canonical bytes; the whole slice must be one record.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError(format!("unknown format version {version}")));
        }
        let position = u64::from_be_bytes(r.array()?);
        let time_ns = i64::from_be_bytes(r.array()?);
        let flags = r.u8()?;
        if flags & !(FLAG_KEY | FLAG_OCCURRED) != 0 {
            return Err(DecodeError(format!("unknown flags {flags:#x}")));
        }
        let id = r.str()?;
        let event_type = r.str()?;
        let source = r.str()?;
        let key = if flags & FLAG_KEY != 0 {
            Some(r.str()?)
        } else {
            None
        };
        let occurred_at_ns = if flags & FLAG_OCCURRED != 0 {
            Some(i64::from_be_bytes(r.array()?))
        } else {
            None
        };
        let content_type = r.str()?;
        let data = r.bytes()?;
        if r.at != bytes.len() {
            return Err(DecodeError(format!(
                "{} trailing bytes",
                bytes.len() - r.at
            )));
        }
        Ok(Self {
            position,
            time_ns,
            id,
            event_type,
            source,
            key,
            occurred_at_ns,
            content_type,
            data,
        })
    }

    /// Broker receive time.
    pub fn time(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.time_ns)
    }

    /// The client's time, if given.
    pub fn occurred_at(&self) -> Option<DateTime<Utc>> {
        self.occurred_at_ns.map(DateTime::from_timestamp_nanos)
    }

    /// Whether `data` is JSON text (`application/json` or a `+json` type).
    pub fn is_json(&self) -> bool {
        is_json_content_type(self.content_type)
    }
}

/// Whether a content type denotes JSON (`application/json`, `…+json`, with or without parameters).
pub fn is_json_content_type(content_type: &str) -> bool {
    if content_type == JSON_CONTENT_TYPE {
        return true;
    }
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == JSON_CONTENT_TYPE || essence.ends_with("+json") || essence == "text/json"
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Lengths are bounded by the broker's body limit, far below u32::MAX.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| DecodeError(format!("truncated at byte {}", self.at)))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_be_bytes(self.array()?) as usize;
        self.take(len)
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.at;
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| DecodeError(format!("invalid UTF-8 in string at byte {at}")))
    }
}

/// A stored record: canonical bytes followed by the 32-byte chain hash at its position.
pub struct StoredRecord;

impl StoredRecord {
    /// Encodes `record` with its chain hash, the form the broker keeps on disk.
    pub fn encode(record: &RecordRef<'_>, hash: &ChainHash, out: &mut Vec<u8>) {
        record.encode(out);
        out.extend_from_slice(&hash.0);
    }

    /// Splits stored bytes into the record, its canonical bytes and its chain hash.
    pub fn decode(bytes: &[u8]) -> Result<(RecordRef<'_>, &[u8], ChainHash), DecodeError> {
        let split = bytes
            .len()
            .checked_sub(32)
            .ok_or_else(|| DecodeError("shorter than a hash".into()))?;
        let (canonical, hash) = bytes.split_at(split);
        let mut h = [0; 32];
        h.copy_from_slice(hash);
        Ok((RecordRef::decode(canonical)?, canonical, ChainHash(h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RecordRef<'static> {
        RecordRef {
            position: 7,
            time_ns: 1_700_000_000_123_456_789,
            id: "e-1",
            event_type: "account.opened",
            source: "bank",
            key: Some("acct-1"),
            occurred_at_ns: None,
            content_type: JSON_CONTENT_TYPE,
            data: br#"{"owner":"ann"}"#,
        }
    }

    #[test]
    fn round_trip_and_exact_length() {
        let rec = sample();
        let mut buf = Vec::new();
        rec.encode(&mut buf);
        assert_eq!(buf.len(), rec.encoded_len());
        assert_eq!(RecordRef::decode(&buf).unwrap(), rec);
    }

    #[test]
    fn stamping_equals_encoding_with_position_and_time() {
        let rec = sample();
        let mut early = Vec::new();
        RecordRef {
            position: 0,
            time_ns: 0,
            ..rec
        }
        .encode(&mut early);
        RecordRef::stamp(&mut early, rec.position, rec.time_ns).unwrap();
        let mut direct = Vec::new();
        rec.encode(&mut direct);
        assert_eq!(early, direct);
        assert!(RecordRef::stamp(&mut [1, 2], 1, 1).is_err());
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        for cut in 0..buf.len() {
            assert!(RecordRef::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        buf.push(0);
        assert!(RecordRef::decode(&buf).is_err());
    }

    #[test]
    fn next_parts_equals_next() {
        let mut buf = Vec::new();
        sample().encode(&mut buf);
        let prev = GENESIS_HASH.next(b"p");
        let by_parts = prev.next_parts(&buf[..HEADER_LEN], &content_digest(&buf[HEADER_LEN..]));
        assert_eq!(prev.next(&buf), by_parts);
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = GENESIS_HASH.next(b"x");
        assert_eq!(ChainHash::from_hex(&h.to_hex()).unwrap(), h);
        assert!(ChainHash::from_hex("zz").is_err());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json"));
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.bank+json"));
        assert!(!is_json_content_type("application/octet-stream"));
        assert!(!is_json_content_type("text/plain"));
    }

    prop_compose! {
        fn arb_record()(
            position in 1u64..u64::MAX,
            time_ns in any::<i64>(),
            id in "[a-z0-9-]{1,40}",
            event_type in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
            source in ".{0,20}",
            key in proptest::option::of(".{0,20}"),
            occurred_at_ns in proptest::option::of(any::<i64>()),
            data in proptest::collection::vec(any::<u8>(), 0..200),
        ) -> (u64, i64, String, String, String, Option<String>, Option<i64>, Vec<u8>) {
            (position, time_ns, id, event_type, source, key, occurred_at_ns, data)
        }
    }

    proptest! {
        #[test]
        fn any_record_round_trips(r in arb_record()) {
            let rec = RecordRef {
                position: r.0, time_ns: r.1, id: &r.2, event_type: &r.3, source: &r.4,
                key: r.5.as_deref(), occurred_at_ns: r.6, content_type: "application/octet-stream",
                data: &r.7,
            };
            let mut buf = Vec::new();
            StoredRecord::encode(&rec, &GENESIS_HASH.next(b"p"), &mut buf);
            let (back, canonical, hash) = StoredRecord::decode(&buf).unwrap();
            prop_assert_eq!(back, rec);
            prop_assert_eq!(canonical.len(), rec.encoded_len());
            prop_assert_eq!(hash, GENESIS_HASH.next(b"p"));
        }

        /// Changing any byte of any event changes the hash at every later position.
        #[test]
        fn chain_detects_any_change(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..32), 1..20),
            victim in any::<proptest::sample::Index>(),
            flip in any::<proptest::sample::Index>(),
        ) {
            let chain = |payloads: &[Vec<u8>]| {
                let mut h = GENESIS_HASH;
                payloads.iter().map(|p| { h = h.next(p); h }).collect::<Vec<_>>()
            };
            let original = chain(&payloads);
            let mut tampered = payloads.clone();
            let v = victim.index(tampered.len());
            let f = flip.index(tampered[v].len());
            tampered[v][f] ^= 0x01;
            let after = chain(&tampered);
            prop_assert_eq!(&original[..v], &after[..v]);
            for i in v..payloads.len() {
                prop_assert_ne!(original[i], after[i]);
            }
        }
    }
}
