//! A check a service runs in its own tests: is its [`Replica`] deterministic and its state
//! canonical?

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use crate::replica::{ApplyError, EventMeta, Replica, decode, decode_state, encode_state};

/// One event for [`check`]: a type and its JSON data.
#[derive(Debug, Clone)]
pub struct TestEvent {
    /// Event type name.
    pub event_type: String,
    /// Entity key.
    pub key: Option<String>,
    /// JSON data.
    pub data: serde_json::Value,
}

impl TestEvent {
    /// An event of `event_type` with `data`.
    pub fn new(event_type: &str, key: Option<&str>, data: serde_json::Value) -> Self {
        Self {
            event_type: event_type.to_owned(),
            key: key.map(str::to_owned),
            data,
        }
    }
}

/// What [`check`] found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    /// An event could not be decoded or applied.
    #[error("event {index} ({event_type}) failed: {error}")]
    Apply {
        /// Its index in the input.
        index: usize,
        /// Its type.
        event_type: String,
        /// The error.
        error: ApplyError,
    },
    /// Two runs over the same events ended in different states.
    #[error(
        "two runs over the same events ended with different states: apply is not deterministic"
    )]
    Nondeterministic,
    /// Decoding and re-encoding the state changed its bytes: it is not canonical.
    #[error(
        "the state after event {index} does not survive snapshot and restore byte for byte (a HashMap?)"
    )]
    NotCanonical {
        /// Index of the event after which it showed.
        index: usize,
    },
    /// Restoring a snapshot and applying the rest did not reach the same state.
    #[error(
        "restoring the snapshot taken after event {index} and replaying the rest ends in another state"
    )]
    RestoreDiverges {
        /// Index of the event after which the snapshot was taken.
        index: usize,
    },
}

/// Applies `events` to a fresh state twice and checks, after every event, that the state's bytes
/// survive a snapshot/restore round trip and that restoring there and replaying the rest reaches
/// the same final state. Returns the final state's blake3 hash.
pub fn check<R: Replica>(events: &[TestEvent]) -> Result<blake3::Hash, ConformanceError> {
    let final_bytes = |start: R::State, from: usize| -> Result<Vec<u8>, ConformanceError> {
        let mut state = start;
        for (index, event) in events.iter().enumerate().skip(from) {
            apply_one::<R>(&mut state, index, event)?;
        }
        encode_state(&state).map_err(|error| ConformanceError::Apply {
            index: events.len(),
            event_type: String::new(),
            error,
        })
    };
    let first = final_bytes(R::State::default(), 0)?;
    if final_bytes(R::State::default(), 0)? != first {
        return Err(ConformanceError::Nondeterministic);
    }
    let mut state = R::State::default();
    for (index, event) in events.iter().enumerate() {
        apply_one::<R>(&mut state, index, event)?;
        let bytes = encode_state(&state).map_err(|error| ConformanceError::Apply {
            index,
            event_type: event.event_type.clone(),
            error,
        })?;
        let restored: R::State = decode_state(&bytes).map_err(|error| ConformanceError::Apply {
            index,
            event_type: event.event_type.clone(),
            error,
        })?;
        if encode_state(&restored).ok().as_deref() != Some(bytes.as_slice()) {
            return Err(ConformanceError::NotCanonical { index });
        }
        if index % 16 == 0 && final_bytes(restored, index + 1)? != first {
            return Err(ConformanceError::RestoreDiverges { index });
        }
    }
    Ok(blake3::hash(&first))
}

fn apply_one<R: Replica>(
    state: &mut R::State,
    index: usize,
    event: &TestEvent,
) -> Result<(), ConformanceError> {
    let fail = |error| ConformanceError::Apply {
        index,
        event_type: event.event_type.clone(),
        error,
    };
    let raw = RawValue::from_string(event.data.to_string())
        .map_err(|e| fail(ApplyError::new(e.to_string())))?;
    let decoded = decode::<R>(&event.event_type, Some(&raw)).map_err(fail)?;
    let meta = EventMeta {
        position: index as u64 + 1,
        id: format!("test-{index}"),
        event_type: event.event_type.clone(),
        key: event.key.clone(),
        time: DateTime::<Utc>::from_timestamp_nanos(index as i64),
        hash: String::new(),
    };
    R::apply(state, decoded, &meta).map_err(fail)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum Ev {
        #[serde(rename = "n.added")]
        Added { n: i64 },
    }

    struct Good;
    impl Replica for Good {
        type State = BTreeMap<String, i64>;
        type Event = Ev;
        fn apply(s: &mut Self::State, e: Ev, m: &EventMeta) -> Result<(), ApplyError> {
            let Ev::Added { n } = e;
            *s.entry(m.key.clone().unwrap_or_default()).or_default() += n;
            Ok(())
        }
    }

    struct Unordered;
    impl Replica for Unordered {
        type State = HashMap<String, i64>;
        type Event = Ev;
        fn apply(s: &mut Self::State, e: Ev, m: &EventMeta) -> Result<(), ApplyError> {
            let Ev::Added { n } = e;
            *s.entry(format!(
                "{}-{}",
                m.key.clone().unwrap_or_default(),
                m.position
            ))
            .or_default() += n;
            Ok(())
        }
    }

    fn events() -> Vec<TestEvent> {
        (0..40)
            .map(|i| TestEvent::new("n.added", Some(&format!("k{}", i % 7)), json!({"n": i})))
            .collect()
    }

    #[test]
    fn a_canonical_replica_passes() {
        assert!(check::<Good>(&events()).is_ok());
    }

    #[test]
    fn a_hashmap_state_is_caught() {
        let err = check::<Unordered>(&events()).unwrap_err();
        assert!(
            matches!(
                err,
                ConformanceError::NotCanonical { .. } | ConformanceError::Nondeterministic
            ),
            "{err}"
        );
    }

    #[test]
    fn undecodable_events_are_named() {
        let err = check::<Good>(&[TestEvent::new("n.removed", None, json!({}))]).unwrap_err();
        assert!(err.to_string().contains("n.removed"), "{err}");
    }
}
