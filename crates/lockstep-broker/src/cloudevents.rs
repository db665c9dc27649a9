//! CloudEvents 1.0 over HTTP: structured, batch and binary content modes, so any language's
//! CloudEvents SDK can publish.
//!
//! Mapping: `id` → id (the dedup key), `source` → source, `type` → type, `subject` → key,
//! `time` → occurred_at, `datacontenttype` → content type, `data`/`data_base64` → data. The
//! extension attributes `expectedhead` and `expectedposition` carry the optimistic-concurrency
//! checks. Other extensions and `dataschema` are refused by name rather than silently dropped:
//! the log stores only what it can give back.

use std::collections::HashMap;

use axum::http::HeaderMap;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use lockstep_proto::record::{JSON_CONTENT_TYPE, is_json_content_type};
use serde_json::value::RawValue;

use crate::error::PublishError;
use crate::log::Draft;
use crate::publish::{Fields, OCTET_STREAM, check_batch_size, first_json_byte, invalid_json};

/// Content type of one structured-mode event.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// Content type of a batch of structured events.
pub const BATCH: &str = "application/cloudevents-batch+json";

type Attributes = HashMap<String, Box<RawValue>>;

/// Parses a structured-mode body: one CloudEvent as a JSON object.
pub fn parse_structured(body: &[u8]) -> Result<Vec<Draft>, PublishError> {
    if first_json_byte(body) != Some(b'{') {
        return Err(PublishError::invalid(
            "a structured CloudEvent is one JSON object; send arrays as application/cloudevents-batch+json",
        ));
    }
    let attributes: Attributes = serde_json::from_slice(body).map_err(invalid_json)?;
    Ok(vec![from_attributes(attributes)?])
}

/// Parses a batch-mode body: a JSON array of CloudEvents.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Draft>, PublishError> {
    if first_json_byte(body) != Some(b'[') {
        return Err(PublishError::invalid(
            "a CloudEvents batch is a JSON array of event objects",
        ));
    }
    let events: Vec<Attributes> = serde_json::from_slice(body).map_err(invalid_json)?;
    check_batch_size(events.len())?;
    events
        .into_iter()
        .enumerate()
        .map(|(i, attributes)| from_attributes(attributes).map_err(|e| e.at(i)))
        .collect()
}

/// Whether the request is a binary-mode CloudEvent (attributes in `ce-` headers).
pub fn is_binary(headers: &HeaderMap) -> bool {
    headers.contains_key("ce-specversion")
}

/// Parses a binary-mode request: attributes from `ce-*` headers, the body is the data.
pub fn parse_binary(
    headers: &HeaderMap,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Vec<Draft>, PublishError> {
    let mut attrs: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let value = value
            .to_str()
            .map_err(|_| PublishError::invalid(format!("header {name} is not visible ASCII")))?;
        attrs.insert(attr.to_owned(), percent_decode(value)?);
    }
    let mut take = |name: &str| attrs.remove(name);
    let spec = take("specversion");
    check_spec(spec.as_deref())?;
    let content_type = content_type.unwrap_or(JSON_CONTENT_TYPE).to_owned();
    if is_json_content_type(&content_type) && !body.is_empty() {
        serde_json::from_slice::<&RawValue>(body).map_err(|e| {
            PublishError::invalid(format!(
                "the body is not the JSON its content type says: {e}"
            ))
        })?;
    }
    let fields = Fields {
        event_type: required(take("type"), "type")?.into(),
        id: Some(required(take("id"), "id")?.into()),
        source: Some(required(take("source"), "source")?.into()),
        key: take("subject").map(Into::into),
        occurred_at: take("time").map(|t| parse_time(&t)).transpose()?,
        content_type: content_type.into(),
        data: body.into(),
        expected_head: take("expectedhead")
            .map(|v| parse_u64("expectedhead", &v))
            .transpose()?,
        expected_position: take("expectedposition")
            .map(|v| parse_u64("expectedposition", &v))
            .transpose()?,
    };
    refuse_leftovers(attrs.keys().map(|k| format!("ce-{k}")))?;
    Ok(vec![fields.check()?])
}

fn from_attributes(mut attrs: Attributes) -> Result<Draft, PublishError> {
    let spec = take_string(&mut attrs, "specversion")?;
    check_spec(spec.as_deref())?;
    let data = attrs.remove("data");
    let data_base64 = take_string(&mut attrs, "data_base64")?;
    let content_type = take_string(&mut attrs, "datacontenttype")?;
    let (content_type, data) = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(PublishError::invalid(
                "a CloudEvent has either data or data_base64, not both",
            ));
        }
        (Some(json), None) => {
            let content_type = content_type.unwrap_or_else(|| JSON_CONTENT_TYPE.to_owned());
            if is_json_content_type(&content_type) {
                (content_type, json.get().as_bytes().to_vec())
            } else {
                // CloudEvents puts non-JSON text data in `data` as a JSON string.
                let text: String = serde_json::from_str(json.get()).map_err(|_| {
                    PublishError::invalid(format!(
                        "datacontenttype {content_type:?} is not JSON, so data must be a string or come as data_base64"
                    ))
                })?;
                (content_type, text.into_bytes())
            }
        }
        (None, Some(b64)) => (
            content_type.unwrap_or_else(|| OCTET_STREAM.to_owned()),
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| PublishError::invalid(format!("data_base64 is not base64: {e}")))?,
        ),
        (None, None) => (
            content_type.unwrap_or_else(|| JSON_CONTENT_TYPE.to_owned()),
            Vec::new(),
        ),
    };
    let fields = Fields {
        event_type: required(take_string(&mut attrs, "type")?, "type")?.into(),
        id: Some(required(take_string(&mut attrs, "id")?, "id")?.into()),
        source: Some(required(take_string(&mut attrs, "source")?, "source")?.into()),
        key: take_string(&mut attrs, "subject")?.map(Into::into),
        occurred_at: take_string(&mut attrs, "time")?
            .map(|t| parse_time(&t))
            .transpose()?,
        content_type: content_type.into(),
        data: data.into(),
        expected_head: take_u64(&mut attrs, "expectedhead")?,
        expected_position: take_u64(&mut attrs, "expectedposition")?,
    };
    refuse_leftovers(attrs.into_keys())?;
    fields.check()
}

fn check_spec(spec: Option<&str>) -> Result<(), PublishError> {
    match spec {
        Some("1.0") => Ok(()),
        Some(other) => Err(PublishError::invalid(format!(
            "specversion {other:?} is not supported; Lockstep speaks CloudEvents 1.0"
        ))),
        None => Err(PublishError::invalid(
            "specversion is missing; Lockstep speaks CloudEvents 1.0",
        )),
    }
}

fn required(value: Option<String>, name: &str) -> Result<String, PublishError> {
    value.ok_or_else(|| {
        PublishError::invalid(format!("the CloudEvents attribute {name} is missing"))
    })
}

fn take_string(attrs: &mut Attributes, name: &str) -> Result<Option<String>, PublishError> {
    attrs
        .remove(name)
        .map(|raw| {
            serde_json::from_str::<String>(raw.get()).map_err(|_| {
                PublishError::invalid(format!("the CloudEvents attribute {name} must be a string"))
            })
        })
        .transpose()
}

fn take_u64(attrs: &mut Attributes, name: &str) -> Result<Option<u64>, PublishError> {
    let Some(raw) = attrs.remove(name) else {
        return Ok(None);
    };
    // Extension values are strings or integers in the CloudEvents JSON format.
    let text: String = serde_json::from_str(raw.get()).unwrap_or_else(|_| raw.get().to_owned());
    parse_u64(name, &text).map(Some)
}

fn parse_u64(name: &str, text: &str) -> Result<u64, PublishError> {
    text.trim().parse().map_err(|_| {
        PublishError::invalid(format!(
            "{name} must be a non-negative integer, not {text:?}"
        ))
    })
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, PublishError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| PublishError::invalid(format!("time {text:?} is not RFC 3339: {e}")))
}

fn refuse_leftovers(names: impl Iterator<Item = String>) -> Result<(), PublishError> {
    let mut names: Vec<String> = names.collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(PublishError::invalid(format!(
        "unsupported CloudEvents attributes: {}; Lockstep stores id, source, type, subject, time, \
         datacontenttype, data and the extensions expectedhead and expectedposition",
        names.join(", ")
    )))
}

/// Decodes `%XX` escapes, which the CloudEvents HTTP binding uses in header values.
fn percent_decode(value: &str) -> Result<String, PublishError> {
    if !value.contains('%') {
        return Ok(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| PublishError::invalid(format!("bad percent-escape in {value:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| PublishError::invalid(format!("{value:?} does not decode to UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn structured_maps_every_attribute() {
        let body = br#"{"specversion":"1.0","id":"e1","source":"/bank","type":"account.opened",
            "subject":"acct-1","time":"2026-11-01T10:00:00Z","data":{"owner":"ann"},
            "expectedposition":"0"}"#;
        let d = &parse_structured(body).unwrap()[0];
        assert_eq!(d.id(), "e1");
        assert_eq!(d.record().unwrap().source, "/bank");
        assert_eq!(d.record().unwrap().key, Some("acct-1"));
        assert_eq!(d.record().unwrap().data, br#"{"owner":"ann"}"#);
        assert_eq!(d.expectations().1, Some(0));
        assert!(d.record().unwrap().occurred_at_ns.is_some());
    }

    #[test]
    fn text_data_with_a_non_json_type() {
        let body = br#"{"specversion":"1.0","id":"e1","source":"s","type":"note.taken",
            "datacontenttype":"text/plain","data":"hello"}"#;
        let d = &parse_structured(body).unwrap()[0];
        assert_eq!(d.record().unwrap().data, b"hello");
        assert_eq!(d.record().unwrap().content_type, "text/plain");
    }

    #[test]
    fn batch_and_refusals() {
        let ok = br#"[{"specversion":"1.0","id":"1","source":"s","type":"a.b"},
                      {"specversion":"1.0","id":"2","source":"s","type":"a.c","data_base64":"AAE="}]"#;
        let d = parse_batch(ok).unwrap();
        assert_eq!(d[1].record().unwrap().data, [0, 1]);
        let err = |body: &[u8]| parse_batch(body).unwrap_err().to_string();
        assert!(
            err(br#"[{"specversion":"0.3","id":"1","source":"s","type":"a.b"}]"#).contains("0.3")
        );
        assert!(
            err(br#"[{"specversion":"1.0","source":"s","type":"a.b"}]"#).contains("id is missing")
        );
        assert!(
            err(br#"[{"specversion":"1.0","id":"1","source":"s","type":"a.b","traceparent":"x"}]"#)
                .contains("unsupported CloudEvents attributes: traceparent")
        );
        assert!(err(br#"{"specversion":"1.0"}"#).contains("JSON array"));
    }

    #[test]
    fn binary_mode() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "b1"),
            ("ce-source", "%2Fbank"),
            ("ce-type", "account.opened"),
            ("ce-subject", "acct-1"),
            ("ce-expectedhead", "0"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        assert!(is_binary(&h));
        let d = &parse_binary(&h, Some("application/json"), br#"{"a":1}"#).unwrap()[0];
        assert_eq!(
            (d.record().unwrap().source, d.expectations().0),
            ("/bank", Some(0))
        );
        assert!(parse_binary(&h, Some("application/json"), b"{nope").is_err());
        let bin = &parse_binary(&h, Some("image/png"), &[137, 80]).unwrap()[0];
        assert_eq!(bin.record().unwrap().data, [137, 80]);
        h.insert("ce-colour", HeaderValue::from_static("red"));
        assert!(
            parse_binary(&h, None, b"")
                .unwrap_err()
                .to_string()
                .contains("ce-colour")
        );
    }
}
