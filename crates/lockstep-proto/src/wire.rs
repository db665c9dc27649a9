//! The JSON shapes of the HTTP API, shared by the broker and the SDK.

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::record::{ChainHash, DecodeError, JSON_CONTENT_TYPE, RecordRef};

/// Longest event id, source or key accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// One event to publish (`POST /v1/events`, a single object or an array of them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Event type name, e.g. `account.opened`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Dedup key; the broker generates one (a UUIDv7) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The publishing service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The entity this event is about; the unit of `expected_position`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The client's own time for the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<DateTime<Utc>>,
    /// Content type of the data; `application/json` unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// JSON payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Binary payload, base64 (standard alphabet); exclusive with `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Write only if the log's head is at this position when this event is appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_head: Option<u64>,
    /// Write only if the last event with this event's `key` is at this position (0: no such event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_position: Option<u64>,
}

impl NewEvent {
    /// An event of `event_type` whose data is `data` as JSON.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_type: event_type.into(),
            data: Some(serde_json::value::to_raw_value(data)?),
            ..Self::default()
        })
    }
}

/// The broker's answer for one published event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    /// Position in the log.
    pub position: u64,
    /// The event's id (generated when the client gave none).
    pub id: String,
    /// Chain hash at `position`, hex.
    pub hash: String,
    /// Broker receive time.
    #[serde(deserialize_with = "time_format::deserialize")]
    pub time: DateTime<Utc>,
    /// True when the id was already stored: this is the original position, nothing was written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// True when that original was superseded by a rollback: it is not live. Redrive it (or
    /// publish with a new id) to make it live again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

/// Answer to `POST /v1/events`: one ack per input event, in input order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishResponse {
    /// The acks.
    pub events: Vec<PublishAck>,
}

/// Answer to `GET /v1/head`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Position of the last event; 0 for an empty log.
    pub position: u64,
    /// Chain hash at `position`, hex (all zeros for an empty log).
    pub hash: String,
    /// Broker time of the last event; absent for an empty log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
}

/// An event as read from the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log, from 1.
    pub position: u64,
    /// Dedup key.
    pub id: String,
    /// Event type name.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Publishing service ("" when not given).
    #[serde(default)]
    pub source: String,
    /// Entity key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Broker receive time.
    #[serde(deserialize_with = "time_format::deserialize")]
    pub time: DateTime<Utc>,
    /// The client's own time.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "time_format::deserialize_option"
    )]
    pub occurred_at: Option<DateTime<Utc>>,
    /// Content type of the data; absent means `application/json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// JSON payload (when the content type is JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Binary payload, base64 (when the content type is not JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Chain hash at `position`, hex.
    pub hash: String,
    /// The event lies between a rollback's target and the rollback record: it is kept for the
    /// audit trail but no longer part of the live log (read with `include_superseded=true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

impl Event {
    /// Recomputes this event's chain hash from the hash before it and checks it against `hash`.
    /// Returns the verified hash.
    pub fn verify(&self, previous: &ChainHash) -> Result<ChainHash, DecodeError> {
        let time_ns = nanos(self.time)?;
        let occurred_at_ns = self.occurred_at.map(nanos).transpose()?;
        let binary;
        let data: &[u8] = match (&self.data, &self.data_base64) {
            (Some(raw), _) => raw.get().as_bytes(),
            (None, Some(b64)) => {
                binary = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| DecodeError::new(format!("data_base64: {e}")))?;
                &binary
            }
            (None, None) => b"",
        };
        let record = RecordRef {
            position: self.position,
            time_ns,
            id: &self.id,
            event_type: &self.event_type,
            source: &self.source,
            key: self.key.as_deref(),
            occurred_at_ns,
            content_type: self.content_type.as_deref().unwrap_or(JSON_CONTENT_TYPE),
            data,
        };
        let mut canonical = Vec::with_capacity(record.encoded_len());
        record.encode(&mut canonical);
        let computed = previous.next(&canonical);
        let claimed = ChainHash::from_hex(&self.hash)?;
        if computed != claimed {
            return Err(DecodeError::new(format!(
                "hash mismatch at position {}: computed {computed}, event says {claimed}",
                self.position
            )));
        }
        Ok(computed)
    }

    /// The data decoded from JSON.
    pub fn data_as<T: for<'de> Deserialize<'de>>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.as_deref().map_or("null", RawValue::get))
    }
}

fn nanos(t: DateTime<Utc>) -> Result<i64, DecodeError> {
    t.timestamp_nanos_opt()
        .ok_or_else(|| DecodeError::new(format!("time {t} is out of range")))
}

/// Reading times fast: a catch-up read parses one per event, and chrono's general RFC 3339 parser
/// dominated the client's profile. The broker always writes `YYYY-MM-DDTHH:MM:SS[.fraction]Z`;
/// anything else falls back to chrono.
mod time_format {
    use chrono::{DateTime, NaiveDate, Utc};
    use serde::Deserializer;
    use serde::de::{Error, Visitor};

    struct TimeVisitor;

    impl Visitor<'_> for TimeVisitor {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 time")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Self::Value, E> {
            parse_utc(text)
                .or_else(|| {
                    DateTime::parse_from_rfc3339(text)
                        .ok()
                        .map(|t| t.with_timezone(&Utc))
                })
                .ok_or_else(|| E::custom(format!("{text:?} is not an RFC 3339 time")))
        }
    }

    fn number(bytes: &[u8]) -> Option<u32> {
        bytes.iter().try_fold(0u32, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
        })
    }

    /// `YYYY-MM-DDTHH:MM:SS[.d{1,9}]Z`, or `None`.
    pub(super) fn parse_utc(text: &str) -> Option<DateTime<Utc>> {
        let b = text.as_bytes();
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[13] != b':'
            || b[16] != b':'
            || *b.last()? != b'Z'
        {
            return None;
        }
        let fraction = &b[19..b.len() - 1];
        let nanos = match fraction {
            [] => 0,
            [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
                number(digits)? * 10u32.pow(9 - digits.len() as u32)
            }
            _ => return None,
        };
        let date = NaiveDate::from_ymd_opt(
            i32::try_from(number(&b[0..4])?).ok()?,
            number(&b[5..7])?,
            number(&b[8..10])?,
        )?;
        let time = date.and_hms_nano_opt(
            number(&b[11..13])?,
            number(&b[14..16])?,
            number(&b[17..19])?,
            nanos,
        )?;
        Some(time.and_utc())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        d.deserialize_str(TimeVisitor)
    }

    pub(super) fn deserialize_option<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        struct OptionVisitor;
        impl<'de> Visitor<'de> for OptionVisitor {
            type Value = Option<DateTime<Utc>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an RFC 3339 time or null")
            }
            fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_str(TimeVisitor).map(Some)
            }
        }
        d.deserialize_option(OptionVisitor)
    }
}

/// Answer to `GET /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadResponse {
    /// Matching events in log order.
    pub events: Vec<Event>,
    /// The log's head when the read was made.
    pub head: u64,
    /// Where to continue: pass this as `after` in the next read. It can be past the last returned
    /// event when a type filter skipped events.
    pub next_after: u64,
    /// True when the read had an `until` bound and no later event can match it any more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub complete: bool,
}

/// The JSON body of every 4xx/5xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_event`, `conflict`.
    pub code: String,
    /// A sentence for people.
    pub message: String,
    /// For a `conflict`: the current value (head, or the key's last position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    /// For errors about one event of a batch: its index in the input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

/// Appends the JSON form of a stored event (the shape of [`Event`]) to `out`.
///
/// This is the read path's hot loop, so it writes bytes directly instead of building an [`Event`]:
/// JSON data is copied through untouched, which also keeps it byte-identical to what was hashed.
/// To write many events, keep one [`EventJsonWriter`] instead.
pub fn write_event_json(out: &mut Vec<u8>, record: &RecordRef<'_>, hash: &ChainHash) {
    EventJsonWriter::default().write(out, record, hash);
}

/// Writes events as JSON like [`write_event_json`], remembering the last broker time it formatted:
/// the events of one publish share their time, so most events of a page reuse it.
#[derive(Debug, Default)]
pub struct EventJsonWriter {
    last_time_ns: Option<i64>,
    last_time: Vec<u8>,
}

impl EventJsonWriter {
    /// Appends the JSON form of `record` to `out`.
    pub fn write(&mut self, out: &mut Vec<u8>, record: &RecordRef<'_>, hash: &ChainHash) {
        out.extend_from_slice(b"{\"position\":");
        out.extend_from_slice(itoa(record.position, &mut [0; 20]));
        out.extend_from_slice(b",\"id\":");
        write_json_str(out, record.id);
        out.extend_from_slice(b",\"type\":");
        write_json_str(out, record.event_type);
        out.extend_from_slice(b",\"source\":");
        write_json_str(out, record.source);
        if let Some(key) = record.key {
            out.extend_from_slice(b",\"key\":");
            write_json_str(out, key);
        }
        out.extend_from_slice(b",\"time\":\"");
        if self.last_time_ns != Some(record.time_ns) {
            self.last_time.clear();
            write_time(&mut self.last_time, record.time());
            self.last_time_ns = Some(record.time_ns);
        }
        out.extend_from_slice(&self.last_time);
        if let Some(t) = record.occurred_at() {
            out.extend_from_slice(b"\",\"occurred_at\":\"");
            write_time(out, t);
        }
        out.push(b'"');
        if record.content_type != JSON_CONTENT_TYPE {
            out.extend_from_slice(b",\"content_type\":");
            write_json_str(out, record.content_type);
        }
        if record.is_json() {
            if !record.data.is_empty() {
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(record.data);
            }
        } else {
            out.extend_from_slice(b",\"data_base64\":\"");
            let b64 = base64::engine::general_purpose::STANDARD.encode(record.data);
            out.extend_from_slice(b64.as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"hash\":\"");
        out.extend_from_slice(&hex32(&hash.0));
        out.extend_from_slice(b"\"}");
    }
}

/// Lowercase hex of a 32-byte hash.
fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0; 64];
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    out
}

/// The JSON body of a publish answer, `{"events": [ack, ...]}` (the shape of [`PublishResponse`]).
///
/// Written by hand for the same reason as [`write_event_json`]: a batch of 1,000 events answers
/// with 1,000 acks, and serde's generic path costs more than the rest of the request.
pub fn write_publish_response(acks: &[PublishAck]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + acks.len() * 200);
    out.extend_from_slice(b"{\"events\":[");
    for (i, ack) in acks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"position\":");
        out.extend_from_slice(itoa(ack.position, &mut [0; 20]));
        out.extend_from_slice(b",\"id\":");
        write_json_str(&mut out, &ack.id);
        out.extend_from_slice(b",\"hash\":");
        write_json_str(&mut out, &ack.hash);
        out.extend_from_slice(b",\"time\":\"");
        write_time(&mut out, ack.time);
        out.push(b'"');
        if ack.duplicate {
            out.extend_from_slice(b",\"duplicate\":true");
        }
        if ack.superseded {
            out.extend_from_slice(b",\"superseded\":true");
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json escapes exactly as JSON requires; writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Writes `t` as RFC 3339 in UTC with `Z`, the fraction in 0, 3, 6 or 9 digits as needed (what
/// chrono's `SecondsFormat::AutoSi` gives), without allocating: this runs once per event read.
fn write_time(out: &mut Vec<u8>, t: DateTime<Utc>) {
    use chrono::{Datelike as _, Timelike as _};
    let year = t.year();
    if !(0..=9999).contains(&year) {
        out.extend_from_slice(t.to_rfc3339_opts(SecondsFormat::AutoSi, true).as_bytes());
        return;
    }
    let digits = |n: u32, width: usize, out: &mut Vec<u8>| {
        let mut buf = [b'0'; 9];
        let mut n = n;
        for slot in buf[..width].iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&buf[..width]);
    };
    digits(year as u32, 4, out);
    out.push(b'-');
    digits(t.month(), 2, out);
    out.push(b'-');
    digits(t.day(), 2, out);
    out.push(b'T');
    digits(t.hour(), 2, out);
    out.push(b':');
    digits(t.minute(), 2, out);
    out.push(b':');
    digits(t.second(), 2, out);
    let nanos = t.nanosecond();
    if nanos != 0 {
        out.push(b'.');
        if nanos % 1_000_000 == 0 {
            digits(nanos / 1_000_000, 3, out);
        } else if nanos % 1_000 == 0 {
            digits(nanos / 1_000, 6, out);
        } else {
            digits(nanos, 9, out);
        }
    }
    out.push(b'Z');
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::GENESIS_HASH;

    fn written(record: &RecordRef<'_>) -> (Event, ChainHash) {
        let mut canonical = Vec::new();
        record.encode(&mut canonical);
        let hash = GENESIS_HASH.next(&canonical);
        let mut out = Vec::new();
        write_event_json(&mut out, record, &hash);
        (serde_json::from_slice(&out).expect("valid JSON"), hash)
    }

    #[test]
    fn json_event_verifies_against_its_record() {
        let record = RecordRef {
            position: 1,
            time_ns: 1_780_000_000_000_000_123,
            id: "quote\"and\\slash\u{1}",
            event_type: "account.opened",
            source: "bank",
            key: Some("acct-ü"),
            occurred_at_ns: Some(5),
            content_type: JSON_CONTENT_TYPE,
            data: br#"{ "owner" : "ann", "n": [1, 2] }"#,
        };
        let (event, hash) = written(&record);
        assert_eq!(event.id, record.id);
        assert_eq!(event.key.as_deref(), record.key);
        assert_eq!(event.data.as_ref().unwrap().get().as_bytes(), record.data);
        assert_eq!(event.verify(&GENESIS_HASH).unwrap(), hash);
    }

    #[test]
    fn binary_event_verifies() {
        let record = RecordRef {
            position: 9,
            time_ns: 1,
            id: "b",
            event_type: "blob.stored",
            source: "",
            key: None,
            occurred_at_ns: None,
            content_type: "application/octet-stream",
            data: &[0, 159, 146, 150, 255],
        };
        let (event, hash) = written(&record);
        assert!(event.data.is_none());
        assert_eq!(
            event.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(event.verify(&GENESIS_HASH).unwrap(), hash);
    }

    #[test]
    fn tampered_event_fails_verification() {
        let record = RecordRef {
            position: 1,
            time_ns: 1,
            id: "a",
            event_type: "x.y",
            source: "s",
            key: None,
            occurred_at_ns: None,
            content_type: JSON_CONTENT_TYPE,
            data: b"1",
        };
        let (mut event, _) = written(&record);
        event.source = "t".into();
        assert!(event.verify(&GENESIS_HASH).is_err());
    }

    #[test]
    fn time_matches_chrono() {
        for ns in [
            0i64,
            1,
            1_000,
            1_000_000,
            1_780_000_000_123_456_789,
            1_780_000_000_120_000_000,
            1_780_000_000_123_456_000,
            -1_000_000_001,
            i64::MAX,
        ] {
            let t = DateTime::from_timestamp_nanos(ns);
            let mut out = Vec::new();
            write_time(&mut out, t);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text, t.to_rfc3339_opts(SecondsFormat::AutoSi, true), "{ns}");
            assert_eq!(DateTime::parse_from_rfc3339(&text).unwrap(), t);
        }
    }

    #[test]
    fn publish_response_matches_serde() {
        let acks = vec![
            PublishAck {
                position: 3,
                id: "a\"b".into(),
                hash: GENESIS_HASH.to_hex(),
                time: DateTime::from_timestamp_nanos(1_780_000_000_123_456_789),
                duplicate: false,
                superseded: false,
            },
            PublishAck {
                position: 1,
                id: "x".into(),
                hash: GENESIS_HASH.next(b"1").to_hex(),
                time: DateTime::from_timestamp_nanos(5_000_000_000),
                duplicate: true,
                superseded: true,
            },
        ];
        let ours: serde_json::Value =
            serde_json::from_slice(&write_publish_response(&acks)).unwrap();
        let serde = serde_json::to_value(PublishResponse { events: acks }).unwrap();
        assert_eq!(ours, serde);
    }

    #[test]
    fn fast_time_parse_agrees_with_chrono() {
        for ns in [
            0i64,
            1,
            1_000_000,
            1_780_000_000_123_456_789,
            1_780_000_000_120_000_000,
        ] {
            let t = DateTime::from_timestamp_nanos(ns);
            let text = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
            assert_eq!(time_format::parse_utc(&text), Some(t), "{text}");
        }
        for odd in [
            "2026-11-01T00:00:00+01:00",
            "2026-13-01T00:00:00Z",
            "2026-11-01T00:00:00.Z",
            "x",
        ] {
            assert_eq!(time_format::parse_utc(odd), None, "{odd}");
        }
        let offset: Event = serde_json::from_str(
            r#"{"position":1,"id":"a","type":"x.y","time":"2026-11-01T01:00:00+01:00","hash":"00"}"#,
        )
        .unwrap();
        assert_eq!(offset.time.to_rfc3339(), "2026-11-01T00:00:00+00:00");
    }

    #[test]
    fn hex_matches_blake3() {
        let h = GENESIS_HASH.next(b"abc");
        assert_eq!(hex32(&h.0).as_slice(), h.to_hex().as_bytes());
    }

    #[test]
    fn the_time_cache_never_serves_a_stale_time() {
        let mut writer = EventJsonWriter::default();
        for time_ns in [5, 5, 6_000_000_000, 5] {
            let record = RecordRef {
                position: 1,
                time_ns,
                id: "a",
                event_type: "x.y",
                source: "",
                key: None,
                occurred_at_ns: None,
                content_type: JSON_CONTENT_TYPE,
                data: b"1",
            };
            let mut out = Vec::new();
            writer.write(&mut out, &record, &GENESIS_HASH);
            let event: Event = serde_json::from_slice(&out).unwrap();
            assert_eq!(event.time, DateTime::from_timestamp_nanos(time_ns));
        }
    }

    #[test]
    fn itoa_matches_display() {
        for n in [0, 1, 9, 10, 12345, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }
}
