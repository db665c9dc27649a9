//! The receiver: turns publish bodies (Lockstep's own JSON and CloudEvents) into checked drafts.
//!
//! Everything here is validation; nothing touches the log. A request that fails any check is
//! refused whole, before the writer sees it.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use lockstep_proto::names::validate_client_type;
use lockstep_proto::record::{JSON_CONTENT_TYPE, RecordRef, is_json_content_type};
use lockstep_proto::wire::MAX_ID_LEN;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

use crate::error::PublishError;
use crate::log::Draft;

/// Most events one publish request may carry.
pub const MAX_BATCH_EVENTS: usize = 10_000;

/// Longest content type accepted, in bytes.
const MAX_CONTENT_TYPE_LEN: usize = 128;

/// Content type of binary data when the client names none.
pub(crate) const OCTET_STREAM: &str = "application/octet-stream";

/// Parses a body of Lockstep's own format: one event object or an array of them.
pub fn parse_native(body: &[u8]) -> Result<Vec<Draft>, PublishError> {
    let events: Vec<NewEventIn<'_>> = match first_json_byte(body) {
        Some(b'[') => serde_json::from_slice(body).map_err(invalid_json)?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(invalid_json)?],
        Some(_) => {
            return Err(invalid_json_msg(
                "the body must be one event object or a JSON array of them",
            ));
        }
        None => return Err(invalid_json_msg("the body is empty")),
    };
    check_batch_size(events.len())?;
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| draft(event).map_err(|e| e.at(i)))
        .collect()
}

pub(crate) fn first_json_byte(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

pub(crate) fn check_batch_size(n: usize) -> Result<(), PublishError> {
    if n == 0 {
        return Err(PublishError::invalid("the batch is empty"));
    }
    if n > MAX_BATCH_EVENTS {
        return Err(PublishError::invalid(format!(
            "the batch has {n} events; the limit is {MAX_BATCH_EVENTS} per request"
        )));
    }
    Ok(())
}

pub(crate) fn invalid_json(e: serde_json::Error) -> PublishError {
    invalid_json_msg(format!("malformed event JSON: {e}"))
}

fn invalid_json_msg(message: impl Into<String>) -> PublishError {
    PublishError::Invalid {
        code: "invalid_json",
        message: message.into(),
        index: None,
    }
}

/// One event of Lockstep's own format ([`lockstep_proto::wire::NewEvent`]), borrowing from the
/// request body wherever the JSON allows: a batch of a thousand events then costs a thousand
/// encodings, not many thousands of small allocations.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEventIn<'a> {
    #[serde(rename = "type", borrow)]
    event_type: Text<'a>,
    #[serde(default, borrow)]
    id: Option<Text<'a>>,
    #[serde(default, borrow)]
    source: Option<Text<'a>>,
    #[serde(default, borrow)]
    key: Option<Text<'a>>,
    #[serde(default)]
    occurred_at: Option<DateTime<Utc>>,
    #[serde(default, borrow)]
    content_type: Option<Text<'a>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data_base64: Option<Text<'a>>,
    #[serde(default)]
    expected_head: Option<u64>,
    #[serde(default)]
    expected_position: Option<u64>,
}

/// A JSON string that borrows from the body unless it holds escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for TextVisitor<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor(std::marker::PhantomData))
    }
}

/// Checks one event of Lockstep's own format and fills in its defaults.
fn draft(event: NewEventIn<'_>) -> Result<Draft, PublishError> {
    let content_type = event.content_type.map(|t| t.0);
    let (content_type, data) = match (event.data, event.data_base64) {
        (Some(_), Some(_)) => {
            return Err(PublishError::invalid(
                "give either data or data_base64, not both",
            ));
        }
        (Some(json), None) => {
            let content_type = content_type.unwrap_or(Cow::Borrowed(JSON_CONTENT_TYPE));
            if !is_json_content_type(&content_type) {
                return Err(PublishError::invalid(format!(
                    "content_type {content_type:?} is not JSON, so the data must come as data_base64"
                )));
            }
            (content_type, Cow::Borrowed(json.get().as_bytes()))
        }
        (None, Some(b64)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.0.as_bytes())
                .map_err(|e| PublishError::invalid(format!("data_base64 is not base64: {e}")))?;
            let content_type = content_type.unwrap_or(Cow::Borrowed(OCTET_STREAM));
            if is_json_content_type(&content_type) {
                return Err(PublishError::invalid(format!(
                    "content_type {content_type:?} is JSON, so the data must come as data"
                )));
            }
            (content_type, Cow::Owned(bytes))
        }
        (None, None) => (
            content_type.unwrap_or(Cow::Borrowed(JSON_CONTENT_TYPE)),
            Cow::Borrowed(&[][..]),
        ),
    };
    Fields {
        event_type: event.event_type.0,
        id: event.id.map(|t| t.0),
        source: event.source.map(|t| t.0),
        key: event.key.map(|t| t.0),
        occurred_at: event.occurred_at,
        content_type,
        data,
        expected_head: event.expected_head,
        expected_position: event.expected_position,
    }
    .check()
}

/// An event's attributes whatever format they came in, before the common checks.
pub(crate) struct Fields<'a> {
    pub event_type: Cow<'a, str>,
    pub id: Option<Cow<'a, str>>,
    pub source: Option<Cow<'a, str>>,
    pub key: Option<Cow<'a, str>>,
    pub occurred_at: Option<DateTime<Utc>>,
    pub content_type: Cow<'a, str>,
    pub data: Cow<'a, [u8]>,
    pub expected_head: Option<u64>,
    pub expected_position: Option<u64>,
}

impl Fields<'_> {
    /// The checks every event passes, whatever format it came in.
    pub(crate) fn check(self) -> Result<Draft, PublishError> {
        validate_client_type(&self.event_type).map_err(|e| PublishError::invalid(e.to_string()))?;
        let id_generated = self.id.is_none();
        let mut uuid_text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id: &str = match &self.id {
            Some(id) => {
                check_text("id", id)?;
                id
            }
            None => uuid::Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut uuid_text),
        };
        let source = self.source.unwrap_or_default();
        if source.len() > MAX_ID_LEN {
            return Err(PublishError::invalid(format!(
                "source is {} bytes long; the limit is {MAX_ID_LEN}",
                source.len()
            )));
        }
        if let Some(key) = &self.key {
            check_text("key", key)?;
        }
        if self.expected_position.is_some() && self.key.is_none() {
            return Err(PublishError::invalid(
                "expected_position needs a key: it is the position of the last event with that key",
            ));
        }
        if self.content_type.len() > MAX_CONTENT_TYPE_LEN
            || !self.content_type.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            return Err(PublishError::invalid(
                "content_type must be printable ASCII of at most 128 bytes",
            ));
        }
        let occurred_at_ns = self
            .occurred_at
            .map(|t| {
                t.timestamp_nanos_opt().ok_or_else(|| {
                    PublishError::invalid(format!(
                        "occurred_at {t} is outside the years 1678..2262"
                    ))
                })
            })
            .transpose()?;
        let data = if is_json_content_type(&self.content_type) {
            one_line(self.data)
        } else {
            self.data
        };
        let record = RecordRef {
            position: 0,
            time_ns: 0,
            id,
            event_type: &self.event_type,
            source: &source,
            key: self.key.as_deref(),
            occurred_at_ns,
            content_type: &self.content_type,
            data: &data,
        };
        Ok(Draft::new(
            &record,
            id_generated,
            self.expected_head,
            self.expected_position,
        ))
    }
}

/// JSON data as stored: exactly as published, except that line breaks become spaces. In valid JSON
/// a line break can only be whitespace between tokens, so the value is unchanged, and every event
/// then fits on one line of an NDJSON stream.
fn one_line(json: Cow<'_, [u8]>) -> Cow<'_, [u8]> {
    if !json.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return json;
    }
    let mut owned = json.into_owned();
    for b in owned.iter_mut().filter(|b| matches!(**b, b'\n' | b'\r')) {
        *b = b' ';
    }
    Cow::Owned(owned)
}

fn check_text(what: &str, value: &str) -> Result<(), PublishError> {
    if value.is_empty() {
        return Err(PublishError::invalid(format!("{what} is empty")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(PublishError::invalid(format!(
            "{what} is {} bytes long; the limit is {MAX_ID_LEN}",
            value.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> String {
        parse_native(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn single_and_batch() {
        let one = parse_native(br#"{"type":"a.b","data":{"x":1}}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].record().unwrap().data, br#"{"x":1}"#);
        assert_eq!(one[0].record().unwrap().content_type, JSON_CONTENT_TYPE);
        let two = parse_native(br#" [{"type":"a.b","id":"1"},{"type":"a.c","id":"2"}]"#).unwrap();
        assert_eq!((two[0].id(), two[1].id()), ("1", "2"));
    }

    #[test]
    fn line_breaks_in_json_data_become_spaces() {
        let d = parse_native(b"{\"type\":\"a.b\",\"data\":{\r\n \"x\": \"a\\nb\"\n}}").unwrap();
        assert_eq!(d[0].record().unwrap().data, br#"{   "x": "a\nb" }"#);
        let bin = parse_native(br#"{"type":"a.b","data_base64":"Cg=="}"#).unwrap();
        assert_eq!(
            bin[0].record().unwrap().data,
            b"\n",
            "binary data is left alone"
        );
    }

    #[test]
    fn generated_ids_are_unique() {
        let two = parse_native(br#"[{"type":"a.b"},{"type":"a.b"}]"#).unwrap();
        assert_ne!(two[0].id(), two[1].id());
    }

    #[test]
    fn binary_data() {
        let d = parse_native(br#"{"type":"a.b","data_base64":"AAEC"}"#).unwrap();
        assert_eq!(d[0].record().unwrap().data, [0, 1, 2]);
        assert_eq!(d[0].record().unwrap().content_type, OCTET_STREAM);
    }

    #[test]
    fn refusals_name_the_problem() {
        assert!(message("").contains("empty"));
        assert!(message("[]").contains("empty"));
        assert!(message("42").contains("object or a JSON array"));
        assert!(message(r#"{"data":1}"#).contains("missing field `type`"));
        assert!(message(r#"{"type":"a.b","colour":1}"#).contains("unknown field `colour`"));
        assert!(message(r#"{"type":"A.b"}"#).contains("invalid segment"));
        assert!(message(r#"{"type":"lockstep.barrier"}"#).contains("reserved"));
        assert!(message(r#"{"type":"a.b","id":""}"#).contains("id is empty"));
        assert!(message(r#"{"type":"a.b","expected_position":1}"#).contains("needs a key"));
        assert!(message(r#"{"type":"a.b","data":1,"data_base64":"AA=="}"#).contains("not both"));
        assert!(message(r#"{"type":"a.b","data_base64":"!!"}"#).contains("not base64"));
        assert!(
            message(r#"[{"type":"a.b"},{"type":"a..b"}]"#).starts_with("event 1:"),
            "batch errors name the index"
        );
        let huge = format!(
            "[{}]",
            vec![r#"{"type":"a.b"}"#; MAX_BATCH_EVENTS + 1].join(",")
        );
        assert!(message(&huge).contains("limit is 10000"));
    }
}
