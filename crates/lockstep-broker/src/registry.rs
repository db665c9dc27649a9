//! The registrar: durable subscriptions and their acknowledged positions.
//!
//! Subscriptions live in their own redb file, `DATA/registry.redb`, so registering and acking never
//! wait on the log's writer. All of them are also held in memory (there are few, and listing them
//! with their lag must be cheap).
//!
//! Tables:
//! - `subscriptions`: `"service/replica"` → format byte ‖ bincode of [`Stored`];
//! - `cursors`: `"service/replica"` → (acknowledged position, when, ns).
//!
//! Acks move the in-memory position at once and reach disk in one durable transaction every
//! [`CURSOR_FLUSH_INTERVAL`] (and at shutdown). A crash can so lose the last fraction of a second of
//! acks: those events are delivered again, which at-least-once delivery allows. A position never
//! moves backwards.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use lockstep_proto::TypeFilter;
use lockstep_proto::subscription::{
    End, PushFormat, Start, StartName, SubscriptionSpec, validate_name,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("subscriptions");
const CURSORS: TableDefinition<&str, (u64, i64)> = TableDefinition::new("cursors");

/// First byte of every stored subscription; bincode's encoding can change with a new value.
const FORMAT_VERSION: u8 = 1;

/// How often acknowledged positions are written to disk.
pub const CURSOR_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Most subscriptions one broker keeps.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;

/// Why a registration request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A different subscription exists under the same service and replica.
    #[error("{0}")]
    Conflict(String),
    /// No such subscription.
    #[error("no subscription for service {0:?}, replica {1:?}")]
    NotFound(String, String),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}

/// A subscription as stored: its spec in bincode-friendly form, plus what was resolved at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    service: String,
    replica: String,
    types: Vec<String>,
    start: StoredStart,
    end: Option<StoredEnd>,
    push_url: Option<String>,
    push_cloudevents: bool,
    created_ns: i64,
    /// The position delivery starts after, resolved from `start` at creation.
    start_after: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum StoredStart {
    Beginning,
    Now,
    Position(u64),
    Time(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum StoredEnd {
    Position(u64),
    Time(i64),
}

/// One subscription, as the rest of the broker sees it.
#[derive(Debug)]
pub struct Subscription {
    stored: Stored,
    filter: TypeFilter,
    position: AtomicU64,
    acked_ns: AtomicI64,
    dirty: AtomicBool,
    /// Push delivery health, kept by the push worker.
    pub push: PushHealth,
    /// Whether a push worker runs for it; there is never more than one.
    pub push_worker: AtomicBool,
    /// The replica's report that it cannot apply an event (kept in memory: a replica repeats it).
    pub stuck: Mutex<Option<lockstep_proto::subscription::Stuck>>,
    /// Turns true when the subscription is deleted or replaced, to stop its push worker.
    pub removed: tokio::sync::watch::Sender<bool>,
}

/// How a push subscription's deliveries are going.
#[derive(Debug, Default)]
pub struct PushHealth {
    /// Consecutive failed deliveries.
    pub failures: AtomicU64,
    /// Failed deliveries since the broker started.
    pub total_failures: AtomicU64,
    /// The last failure's description.
    pub last_error: Mutex<Option<String>>,
}

impl Subscription {
    /// `service/replica`.
    pub fn key(&self) -> String {
        key(&self.stored.service, &self.stored.replica)
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.stored.service
    }

    /// The replica.
    pub fn replica(&self) -> &str {
        &self.stored.replica
    }

    /// Which types it receives (control records come whatever this says).
    pub fn filter(&self) -> &TypeFilter {
        &self.filter
    }

    /// The last acknowledged position.
    pub fn position(&self) -> u64 {
        self.position.load(Relaxed)
    }

    /// When the position last moved, if ever.
    pub fn acked_at(&self) -> Option<DateTime<Utc>> {
        let ns = self.acked_ns.load(Relaxed);
        (ns != 0).then(|| DateTime::from_timestamp_nanos(ns))
    }

    /// When it was created.
    pub fn created_at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_nanos(self.stored.created_ns)
    }

    /// The last position to deliver, for a range ending at a position.
    pub fn end_position(&self) -> Option<u64> {
        match self.stored.end {
            Some(StoredEnd::Position(p)) => Some(p),
            _ => None,
        }
    }

    /// The last time to deliver, for a range ending at a time.
    pub fn end_time_ns(&self) -> Option<i64> {
        match self.stored.end {
            Some(StoredEnd::Time(t)) => Some(t),
            _ => None,
        }
    }

    /// Where to push, for a push subscription.
    pub fn push_url(&self) -> Option<&str> {
        self.stored.push_url.as_deref()
    }

    /// How to encode pushed batches.
    pub fn push_format(&self) -> PushFormat {
        if self.stored.push_cloudevents {
            PushFormat::Cloudevents
        } else {
            PushFormat::Json
        }
    }

    /// The spec as the API shows it.
    pub fn spec(&self) -> SubscriptionSpec {
        let s = &self.stored;
        let time = DateTime::from_timestamp_nanos;
        SubscriptionSpec {
            service: s.service.clone(),
            replica: s.replica.clone(),
            types: s.types.clone(),
            start: match s.start {
                StoredStart::Beginning => Start::Named(StartName::Beginning),
                StoredStart::Now => Start::Named(StartName::Now),
                StoredStart::Position(position) => Start::Position { position },
                StoredStart::Time(ns) => Start::Time { time: time(ns) },
            },
            end: s.end.map(|end| match end {
                StoredEnd::Position(position) => End::Position { position },
                StoredEnd::Time(ns) => End::Time { time: time(ns) },
            }),
            push_url: s.push_url.clone(),
            push_format: s.push_url.as_ref().map(|_| self.push_format()),
        }
    }

    /// Moves the acknowledged position forward to `position` (never back). True if it moved.
    fn advance(&self, position: u64) -> bool {
        let previous = self.position.fetch_max(position, Relaxed);
        if position > previous {
            self.acked_ns.store(now_ns(), Relaxed);
            self.dirty.store(true, Relaxed);
            true
        } else {
            false
        }
    }
}

/// The subscriptions of one broker.
pub struct Registry {
    db: Database,
    subscriptions: RwLock<BTreeMap<String, Arc<Subscription>>>,
}

fn key(service: &str, replica: &str) -> String {
    format!("{service}/{replica}")
}

fn now_ns() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn encode(stored: &Stored) -> Result<Vec<u8>, StoreError> {
    let mut bytes = vec![FORMAT_VERSION];
    bytes.extend(
        bincode::serde::encode_to_vec(stored, bincode::config::standard())
            .map_err(|e| StoreError::new(format!("encoding a subscription: {e}")))?,
    );
    Ok(bytes)
}

fn decode(bytes: &[u8]) -> Result<Stored, StoreError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            bincode::serde::decode_from_slice(rest, bincode::config::standard())
                .map(|(stored, _)| stored)
                .map_err(|e| StoreError::new(format!("undecodable subscription: {e}")))
        }
        Some((v, _)) => Err(StoreError::new(format!(
            "subscription in unknown format version {v}"
        ))),
        None => Err(StoreError::new("empty subscription record")),
    }
}

impl Registry {
    /// Opens (or creates) `DATA/registry.redb` and loads every subscription.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("registry.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::new(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        txn.open_table(SUBSCRIPTIONS)?;
        txn.open_table(CURSORS)?;
        txn.commit()?;
        let mut subscriptions = BTreeMap::new();
        {
            let txn = db.begin_read()?;
            let subs = txn.open_table(SUBSCRIPTIONS)?;
            let cursors = txn.open_table(CURSORS)?;
            for entry in subs.iter()? {
                let (k, v) = entry?;
                let stored = decode(v.value())?;
                let (position, acked_ns) = cursors
                    .get(k.value())?
                    .map_or((stored.start_after, 0), |c| c.value());
                let sub = build(stored, position, acked_ns)?;
                subscriptions.insert(k.value().to_owned(), Arc::new(sub));
            }
        }
        Ok(Self {
            db,
            subscriptions: RwLock::new(subscriptions),
        })
    }

    /// Every subscription, ordered by service then replica.
    pub fn all(&self) -> Vec<Arc<Subscription>> {
        self.subscriptions
            .read()
            .map(|subs| subs.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One subscription.
    pub fn get(&self, service: &str, replica: &str) -> Result<Arc<Subscription>, RegistryError> {
        self.subscriptions
            .read()
            .ok()
            .and_then(|subs| subs.get(&key(service, replica)).cloned())
            .ok_or_else(|| RegistryError::NotFound(service.to_owned(), replica.to_owned()))
    }

    /// Creates a subscription; blocking. `resolve` turns a start time into the position delivery
    /// starts after, `head` is the log's head. The same spec again is not an error: the existing
    /// subscription is returned with `false`. A different spec is a conflict unless `replace`.
    pub fn create(
        &self,
        spec: &SubscriptionSpec,
        replace: bool,
        head: u64,
        resolve: impl FnOnce(i64) -> Result<u64, StoreError>,
    ) -> Result<(Arc<Subscription>, bool), RegistryError> {
        let stored = check(spec, head, resolve)?;
        let k = key(&stored.service, &stored.replica);
        let mut subs = self
            .subscriptions
            .write()
            .map_err(|_| StoreError::new("registry lock poisoned"))?;
        if let Some(existing) = subs.get(&k) {
            if same_spec(&existing.stored, &stored) {
                return Ok((Arc::clone(existing), false));
            }
            if !replace {
                return Err(RegistryError::Conflict(format!(
                    "a different subscription for service {:?}, replica {:?} exists; delete it \
                     or create with replace=true (its position starts over)",
                    stored.service, stored.replica
                )));
            }
        } else if subs.len() >= MAX_SUBSCRIPTIONS {
            return Err(RegistryError::Invalid(format!(
                "the broker already keeps {MAX_SUBSCRIPTIONS} subscriptions"
            )));
        }
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut table = txn.open_table(SUBSCRIPTIONS).map_err(StoreError::from)?;
            table
                .insert(k.as_str(), encode(&stored)?.as_slice())
                .map_err(StoreError::from)?;
            let mut cursors = txn.open_table(CURSORS).map_err(StoreError::from)?;
            cursors
                .insert(k.as_str(), (stored.start_after, 0))
                .map_err(StoreError::from)?;
        }
        txn.commit().map_err(StoreError::from)?;
        let position = stored.start_after;
        let sub = Arc::new(build(stored, position, 0)?);
        if let Some(old) = subs.insert(k, Arc::clone(&sub)) {
            old.removed.send_replace(true);
        }
        Ok((sub, true))
    }

    /// Deletes a subscription; blocking.
    pub fn delete(&self, service: &str, replica: &str) -> Result<(), RegistryError> {
        let k = key(service, replica);
        let mut subs = self
            .subscriptions
            .write()
            .map_err(|_| StoreError::new("registry lock poisoned"))?;
        let Some(sub) = subs.get(&k).cloned() else {
            return Err(RegistryError::NotFound(
                service.to_owned(),
                replica.to_owned(),
            ));
        };
        let txn = self.db.begin_write().map_err(StoreError::from)?;
        {
            let mut table = txn.open_table(SUBSCRIPTIONS).map_err(StoreError::from)?;
            table.remove(k.as_str()).map_err(StoreError::from)?;
            let mut cursors = txn.open_table(CURSORS).map_err(StoreError::from)?;
            cursors.remove(k.as_str()).map_err(StoreError::from)?;
        }
        txn.commit().map_err(StoreError::from)?;
        subs.remove(&k);
        sub.removed.send_replace(true);
        Ok(())
    }

    /// Moves a subscription's acknowledged position forward; it reaches disk with the next flush.
    pub fn ack(&self, sub: &Subscription, position: u64) -> bool {
        sub.advance(position)
    }

    /// Writes every moved position in one durable transaction; blocking.
    pub fn flush(&self) -> Result<(), StoreError> {
        let dirty: Vec<Arc<Subscription>> = self
            .all()
            .into_iter()
            .filter(|s| s.dirty.swap(false, Relaxed))
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let result = (|| {
            let txn = self.db.begin_write()?;
            {
                let mut cursors = txn.open_table(CURSORS)?;
                for sub in &dirty {
                    cursors.insert(
                        sub.key().as_str(),
                        (sub.position(), sub.acked_ns.load(Relaxed)),
                    )?;
                }
            }
            txn.commit()?;
            Ok::<_, StoreError>(())
        })();
        if result.is_err() {
            for sub in &dirty {
                sub.dirty.store(true, Relaxed);
            }
        }
        result
    }
}

fn build(stored: Stored, position: u64, acked_ns: i64) -> Result<Subscription, StoreError> {
    let filter = TypeFilter::from_patterns(stored.types.iter().map(String::as_str))
        .map_err(|e| StoreError::new(format!("stored subscription has a bad pattern: {e}")))?;
    Ok(Subscription {
        stored,
        filter,
        position: AtomicU64::new(position),
        acked_ns: AtomicI64::new(acked_ns),
        dirty: AtomicBool::new(false),
        push: PushHealth::default(),
        push_worker: AtomicBool::new(false),
        stuck: Mutex::new(None),
        removed: tokio::sync::watch::Sender::new(false),
    })
}

/// Whether two subscriptions are the same registration (creation time and resolved start aside).
fn same_spec(a: &Stored, b: &Stored) -> bool {
    Stored {
        created_ns: 0,
        start_after: 0,
        ..a.clone()
    } == Stored {
        created_ns: 0,
        start_after: 0,
        ..b.clone()
    }
}

/// Validates a spec and resolves its start.
fn check(
    spec: &SubscriptionSpec,
    head: u64,
    resolve: impl FnOnce(i64) -> Result<u64, StoreError>,
) -> Result<Stored, RegistryError> {
    validate_name("service", &spec.service).map_err(RegistryError::Invalid)?;
    validate_name("replica", &spec.replica).map_err(RegistryError::Invalid)?;
    if spec.types.is_empty() {
        return Err(RegistryError::Invalid(
            "types is empty: name at least one pattern, or \"*\" for every type".into(),
        ));
    }
    TypeFilter::from_patterns(spec.types.iter().map(String::as_str))
        .map_err(|e| RegistryError::Invalid(e.to_string()))?;
    let ns = |t: DateTime<Utc>| {
        t.timestamp_nanos_opt()
            .ok_or_else(|| RegistryError::Invalid(format!("time {t} is outside 1678..2262")))
    };
    let (start, start_after) = match &spec.start {
        Start::Named(StartName::Beginning) => (StoredStart::Beginning, 0),
        Start::Named(StartName::Now) => (StoredStart::Now, head),
        Start::Position { position: 0 } => {
            return Err(RegistryError::Invalid(
                "start position is 1 or more (positions start at 1)".into(),
            ));
        }
        Start::Position { position } if *position > head + 1 => {
            return Err(RegistryError::Invalid(format!(
                "start position {position} is past the head of the log ({head}) + 1"
            )));
        }
        Start::Position { position } => (StoredStart::Position(*position), position - 1),
        Start::Time { time } => {
            let t = ns(*time)?;
            (StoredStart::Time(t), resolve(t)?.saturating_sub(1))
        }
    };
    let end = match &spec.end {
        None => None,
        Some(End::Position { position }) if *position <= start_after => {
            return Err(RegistryError::Invalid(format!(
                "end position {position} is before the start"
            )));
        }
        Some(End::Position { position }) => Some(StoredEnd::Position(*position)),
        Some(End::Time { time }) => Some(StoredEnd::Time(ns(*time)?)),
    };
    if let Some(url) = &spec.push_url {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() <= 2048
            && reqwest::Url::parse(url).is_ok();
        if !ok {
            return Err(RegistryError::Invalid(format!(
                "push_url {url:?} is not an http:// or https:// URL"
            )));
        }
    } else if spec.push_format.is_some() {
        return Err(RegistryError::Invalid(
            "push_format needs a push_url".into(),
        ));
    }
    Ok(Stored {
        service: spec.service.clone(),
        replica: spec.replica.clone(),
        types: spec.types.clone(),
        start,
        end,
        push_url: spec.push_url.clone(),
        push_cloudevents: spec.push_format == Some(PushFormat::Cloudevents),
        created_ns: now_ns(),
        start_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replica: &str) -> SubscriptionSpec {
        SubscriptionSpec {
            service: "bank".into(),
            replica: replica.into(),
            types: vec!["account.*".into()],
            start: Start::Named(StartName::Beginning),
            end: None,
            push_url: None,
            push_format: None,
        }
    }

    #[test]
    fn create_is_idempotent_conflicts_unless_replaced_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        let (sub, created) = registry.create(&spec("r1"), false, 10, |_| Ok(1)).unwrap();
        assert!(created);
        assert_eq!(sub.position(), 0);
        let (_, again) = registry.create(&spec("r1"), false, 20, |_| Ok(1)).unwrap();
        assert!(!again, "same spec: not created again");
        let mut other = spec("r1");
        other.types = vec!["*".into()];
        assert!(matches!(
            registry.create(&other, false, 20, |_| Ok(1)),
            Err(RegistryError::Conflict(_))
        ));
        assert!(registry.ack(&sub, 7));
        assert!(!registry.ack(&sub, 3), "never backwards");
        registry.flush().unwrap();
        let mut now = spec("r2");
        now.start = Start::Named(StartName::Now);
        registry.create(&now, false, 42, |_| Ok(1)).unwrap();
        drop(registry);

        let registry = Registry::open(dir.path()).unwrap();
        assert_eq!(registry.get("bank", "r1").unwrap().position(), 7);
        assert_eq!(registry.get("bank", "r2").unwrap().position(), 42);
        let (replaced, created) = registry.create(&other, true, 50, |_| Ok(1)).unwrap();
        assert!(created);
        assert_eq!(replaced.position(), 0);
        registry.delete("bank", "r2").unwrap();
        assert!(matches!(
            registry.delete("bank", "r2"),
            Err(RegistryError::NotFound(..))
        ));
        assert_eq!(registry.all().len(), 1);
    }

    #[test]
    fn bad_specs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::open(dir.path()).unwrap();
        type Change = Box<dyn Fn(&mut SubscriptionSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("service", Box::new(|s| s.service = "a/b".into())),
            ("types is empty", Box::new(|s| s.types.clear())),
            (
                "invalid segment",
                Box::new(|s| s.types = vec!["A.b".into()]),
            ),
            (
                "1 or more",
                Box::new(|s| s.start = Start::Position { position: 0 }),
            ),
            (
                "past the head",
                Box::new(|s| s.start = Start::Position { position: 99 }),
            ),
            (
                "push_url",
                Box::new(|s| s.push_url = Some("ftp://x".into())),
            ),
            (
                "needs a push_url",
                Box::new(|s| s.push_format = Some(PushFormat::Json)),
            ),
            (
                "before the start",
                Box::new(|s| {
                    s.start = Start::Position { position: 5 };
                    s.end = Some(End::Position { position: 3 });
                }),
            ),
        ];
        for (needle, change) in cases {
            let mut s = spec("r");
            change(&mut s);
            let err = registry.create(&s, false, 10, |_| Ok(1)).unwrap_err();
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        assert!(registry.all().is_empty());
    }
}
