//! The trait a service implements: how one event changes its state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where an event sits in the log, handed to [`Replica::apply`] beside the event itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// Position in the log.
    pub position: u64,
    /// The event's id.
    pub id: String,
    /// The event's type name.
    pub event_type: String,
    /// The entity key, if the publisher gave one.
    pub key: Option<String>,
    /// The broker's receive time.
    pub time: DateTime<Utc>,
    /// Chain hash at `position`, hex.
    pub hash: String,
}

/// Why an event could not be applied. The runtime retries it with backoff and never skips it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ApplyError(pub String);

impl ApplyError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A service's state machine. Implement it once; the [`Runtime`](crate::Runtime) feeds it every
/// subscribed event in log order, snapshots its state and restores it on restart.
///
/// # Correctness requirements
///
/// - **Deterministic.** `apply` must depend only on `state`, `event` and `meta`: no clock, no
///   randomness, no I/O, no iteration over `HashMap`s. Replicas stay identical only if the same
///   events make the same state everywhere.
/// - **Canonical state.** The state is encoded with bincode for snapshots and its blake3 hash is
///   what replicas compare: use `BTreeMap`/`BTreeSet`, never `HashMap`/`HashSet`, whose order
///   differs between processes. [`conformance::check`](crate::conformance::check) catches this.
/// - **Errors.** An `Err` leaves the event unapplied: `apply` must not have changed `state` (or
///   must change it only in ways a retry repeats exactly). The runtime retries with backoff,
///   never skips the event (that would fork this replica from the others) and reports itself
///   stuck at that position until an apply succeeds.
/// - **Applied** means: the state includes the event. A snapshot taken after it records its
///   position; on restart the runtime restores the newest snapshot and replays from there, so
///   events after it are applied again to the restored state (exactly once per state).
///
/// # Example
///
/// ```
/// use std::collections::BTreeMap;
/// use lockstep::{ApplyError, EventMeta, Replica};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// #[serde(tag = "type", content = "data")]
/// enum CounterEvent {
///     #[serde(rename = "counter.incremented")]
///     Incremented { by: i64 },
/// }
///
/// struct Counters;
///
/// impl Replica for Counters {
///     type State = BTreeMap<String, i64>;
///     type Event = CounterEvent;
///
///     fn apply(state: &mut Self::State, event: CounterEvent, meta: &EventMeta) -> Result<(), ApplyError> {
///         let CounterEvent::Incremented { by } = event;
///         *state.entry(meta.key.clone().unwrap_or_default()).or_default() += by;
///         Ok(())
///     }
/// }
/// ```
pub trait Replica: Send + Sync + 'static {
    /// The state: every replica of the service holds an identical one at the same position.
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;
    /// The events, decoded from the log's `type` and `data` as the JSON object
    /// `{"type": …, "data": …}`: typically an enum with `#[serde(tag = "type", content = "data")]`
    /// whose variants are renamed to the event types.
    type Event: DeserializeOwned + Send;

    /// Applies one event to the state. See the trait's correctness requirements.
    fn apply(
        state: &mut Self::State,
        event: Self::Event,
        meta: &EventMeta,
    ) -> Result<(), ApplyError>;

    /// Forensics, optional: the state as keyed entries, `(key, blake3 of the value's bytes)`, so
    /// that `lockstep verify --explain` can name the keys whose values differ between replicas.
    /// For a map-shaped state, return `Some(hash_entries(state))`. Costs one pass over the
    /// state at every barrier. Use the events' `key` as the entry key where you can: the broker
    /// then also names the events that touched the differing entries.
    fn entries(_state: &Self::State) -> Option<Entries> {
        None
    }
}

/// A state's keyed entries: `(key, blake3 of the value's canonical bytes)`.
pub type Entries = Vec<(String, [u8; 32])>;

/// A map's entries, keyed by the keys' text and hashed by their values' canonical bytes: what
/// [`Replica::entries`] returns for a map-shaped state.
pub fn hash_entries<K: std::fmt::Display, V: Serialize>(
    map: &std::collections::BTreeMap<K, V>,
) -> Entries {
    map.iter()
        .map(|(k, v)| {
            let bytes = encode_state(v).unwrap_or_default();
            (k.to_string(), *blake3::hash(&bytes).as_bytes())
        })
        .collect()
}

/// Decodes an event for `R` from the log's type and data (`{"type": …, "data": …}`).
pub(crate) fn decode<R: Replica>(
    event_type: &str,
    data: Option<&serde_json::value::RawValue>,
) -> Result<R::Event, ApplyError> {
    decode_event(event_type, data)
}

/// Decodes an event of type `T` from the log's type and data (`{"type": …, "data": …}`).
pub(crate) fn decode_event<T: DeserializeOwned>(
    event_type: &str,
    data: Option<&serde_json::value::RawValue>,
) -> Result<T, ApplyError> {
    let data = data.map_or("null", |d| d.get());
    let tagged = format!(
        "{{\"type\":{},\"data\":{data}}}",
        serde_json::to_string(event_type).unwrap_or_default()
    );
    serde_json::from_str(&tagged)
        .map_err(|e| ApplyError::new(format!("cannot decode a {event_type} event: {e}")))
}

/// Encodes a state as snapshots hold it: bincode, standard configuration.
pub fn encode_state<S: Serialize>(state: &S) -> Result<Vec<u8>, ApplyError> {
    bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| ApplyError::new(format!("cannot encode the state: {e}")))
}

/// Decodes a state encoded by [`encode_state`].
pub fn decode_state<S: DeserializeOwned>(bytes: &[u8]) -> Result<S, ApplyError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(state, _)| state)
        .map_err(|e| ApplyError::new(format!("cannot decode the state: {e}")))
}

/// blake3 of a state's canonical bytes: what replicas compare.
pub fn state_hash<S: Serialize>(state: &S) -> Result<blake3::Hash, ApplyError> {
    Ok(blake3::hash(&encode_state(state)?))
}
