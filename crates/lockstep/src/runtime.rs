//! The replica runtime: registers the subscription, streams events in order, applies them to the
//! state through [`Replica::apply`], and keeps snapshots so that a restart resumes in milliseconds.
//!
//! On start it restores the newest valid local snapshot and streams from its position; with no
//! snapshot it starts from the subscription's `start` (registering it again if the broker
//! remembered a position this replica's state no longer has). Snapshots are taken every
//! `snapshot_every` events or `snapshot_interval`, and once more at shutdown; the last
//! `keep_snapshots` are kept (and those at marks). The applied position is acknowledged to the
//! broker (for lag) every second, but the local snapshot is what a restart trusts.
//!
//! At every barrier the runtime snapshots, reports the state's hash (and optionally uploads the
//! snapshot) so the broker can verify that replicas agree. A new replica may bootstrap from the
//! newest verified snapshot instead of replaying the log ([`Bootstrap::Verified`]).
//!
//! A `lockstep.rollback` record naming target `P` reaches every replica. One that applied
//! anything after `P` removes its snapshots after `P`, restores the newest one at or before it
//! (local, else the broker's verified one, else the empty state), replays the live events up to
//! `P` and goes on after the record. One that never applied anything after `P` (it was behind, or
//! is replaying history, where the superseded events are skipped) has nothing to undo.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use lockstep_proto::consistency::{
    BARRIER_TYPE, EntriesReport, EntryHash, ExplainRequest, MAX_EXPLAIN_ENTRIES, ROLLBACK_TYPE,
    RollbackData, StateReport, bucket_hashes, bucket_of,
};
use lockstep_proto::names::is_reserved;
use lockstep_proto::record::ChainHash;
use lockstep_proto::subscription::{Start, StartName, Stuck, SubscriptionSpec};

use crate::client::{Client, ClientError, ReadRequest};
use serde::de::DeserializeOwned;

use crate::replica::{
    ApplyError, Entries, EventMeta, Replica, decode, decode_event, decode_state, encode_state,
};
use crate::snapshot::{Snapshot, SnapshotStore, StoreError};
use crate::subscription::StreamItem;

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A required setting is missing or wrong.
    #[error("runtime configuration: {0}")]
    Config(String),
    /// The broker refused the subscription.
    #[error(transparent)]
    Broker(#[from] ClientError),
    /// The local snapshot store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state could not be encoded or a snapshot decoded.
    #[error(transparent)]
    State(#[from] ApplyError),
    /// A rollback this replica cannot carry out; it stopped rather than diverge.
    #[error("rollback: {0}")]
    Rollback(String),
}

/// How a replica with no local state starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Bootstrap {
    /// Replay the log from the subscription's start (the default).
    #[default]
    Replay,
    /// Download the newest verified snapshot of the service (checked against the hash the
    /// replicas agreed on), restore it and replay only the tail; replay everything when there is
    /// none or it fails its check.
    Verified,
}

/// Settings of a [`Runtime`], with defaults: see each method.
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    url: String,
    service: Option<String>,
    replica: Option<String>,
    types: Vec<String>,
    state_dir: Option<PathBuf>,
    start: Start,
    snapshot_every: u64,
    snapshot_interval: Duration,
    keep_snapshots: usize,
    check_determinism: bool,
    upload_snapshots: bool,
    bootstrap: Bootstrap,
}

impl RuntimeBuilder {
    /// Upload the snapshot taken at each barrier to the broker (when it has no copy yet), so
    /// new replicas can bootstrap from it and rollbacks find it (default: off).
    pub fn upload_snapshots(mut self, on: bool) -> Self {
        self.upload_snapshots = on;
        self
    }

    /// How a replica with no local state starts (default: [`Bootstrap::Replay`]).
    pub fn bootstrap(mut self, bootstrap: Bootstrap) -> Self {
        self.bootstrap = bootstrap;
        self
    }

    /// The service this replica belongs to (required).
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// This replica's id, unique within the service (required).
    pub fn replica(mut self, replica: impl Into<String>) -> Self {
        self.replica = Some(replica.into());
        self
    }

    /// The type patterns to receive (default: every type).
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(mut self, types: I) -> Self {
        self.types = types.into_iter().map(Into::into).collect();
        self
    }

    /// Where the local snapshots live (required).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Where a new replica starts (default: the beginning of the log).
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Snapshot after this many applied events (default 10,000).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events.max(1);
        self
    }

    /// Snapshot at least this often while events arrive (default 30 s).
    pub fn snapshot_interval(mut self, interval: Duration) -> Self {
        self.snapshot_interval = interval;
        self
    }

    /// Snapshots to keep (default 3).
    pub fn keep_snapshots(mut self, keep: usize) -> Self {
        self.keep_snapshots = keep.max(1);
        self
    }

    /// Check every snapshot for a canonical state: decode it, encode it again and compare the
    /// hashes, complaining loudly when they differ (default: on in debug builds).
    pub fn check_determinism(mut self, on: bool) -> Self {
        self.check_determinism = on;
        self
    }

    /// The runtime of a replica whose state lives in its own database; `state_dir` is not used.
    pub fn build_external<E: ExternalReplica>(
        self,
        replica: E,
    ) -> Result<ExternalRuntime<E>, RuntimeError> {
        let missing = |what: &str| RuntimeError::Config(format!("{what} is required"));
        let service = self.service.clone().ok_or_else(|| missing("service"))?;
        let replica_id = self.replica.clone().ok_or_else(|| missing("replica"))?;
        let client = Client::new(&self.url)?;
        let position = replica.resume_after()?;
        Ok(ExternalRuntime {
            driver: Driver {
                client,
                service,
                replica: replica_id,
                settings: self,
                uploading: Arc::default(),
                marks_listed: std::sync::Mutex::default(),
            },
            replica,
            position: std::sync::atomic::AtomicU64::new(position),
        })
    }

    /// The runtime for replica type `R`.
    pub fn build<R: Replica>(self) -> Result<Runtime<R>, RuntimeError> {
        let missing = |what: &str| RuntimeError::Config(format!("{what} is required"));
        let service = self.service.clone().ok_or_else(|| missing("service"))?;
        let replica = self.replica.clone().ok_or_else(|| missing("replica"))?;
        let state_dir = self.state_dir.clone().ok_or_else(|| missing("state_dir"))?;
        let client = Client::new(&self.url)?;
        let store = SnapshotStore::open(&state_dir)?;
        let (position, chain_hash, state) = match store.newest_valid()? {
            Some(snapshot) => {
                let state: R::State = decode_state(&snapshot.bytes)?;
                tracing::info!(position = snapshot.position, "restored the newest snapshot");
                (snapshot.position, hex(&snapshot.chain_hash), state)
            }
            None => (0, String::new(), R::State::default()),
        };
        Ok(Runtime {
            client,
            service,
            replica,
            settings: self,
            store: Arc::new(store),
            pinned: std::sync::Mutex::new(Vec::new()),
            state: StateHandle {
                inner: Arc::new(RwLock::new(Applied {
                    position,
                    chain_hash,
                    state,
                })),
            },
        })
    }
}

struct Applied<S> {
    position: u64,
    /// Chain hash at `position`, hex as the broker sent it: decoded only when a snapshot needs it.
    chain_hash: String,
    state: S,
}

/// Read access to a runtime's state, shareable with request handlers. Clone freely.
pub struct StateHandle<S> {
    inner: Arc<RwLock<Applied<S>>>,
}

impl<S> Clone for StateHandle<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S> StateHandle<S> {
    /// Calls `f` with the state and the position it includes everything up to.
    pub fn read<T>(&self, f: impl FnOnce(&S, u64) -> T) -> T {
        let guard = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard.state, guard.position)
    }

    /// The position the state includes everything up to.
    pub fn position(&self) -> u64 {
        self.read(|_, position| position)
    }
}

/// A running replica: see the module documentation. Build with [`Runtime::builder`].
pub struct Runtime<R: Replica> {
    client: Client,
    service: String,
    replica: String,
    settings: RuntimeBuilder,
    store: Arc<SnapshotStore>,
    /// Positions of the broker's marks: their snapshots are kept for rollbacks.
    pinned: std::sync::Mutex<Vec<u64>>,
    state: StateHandle<R::State>,
}

/// Longest wait between retries of a failing apply or a lost connection.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the applied position is acknowledged to the broker.
const ACK_INTERVAL: Duration = Duration::from_secs(1);

impl Runtime<NoReplica> {
    /// Settings for a replica talking to the broker at `url`.
    pub fn builder(url: &str) -> RuntimeBuilder {
        RuntimeBuilder {
            url: url.to_owned(),
            service: None,
            replica: None,
            types: vec!["*".to_owned()],
            state_dir: None,
            start: Start::Named(StartName::Beginning),
            snapshot_every: 10_000,
            snapshot_interval: Duration::from_secs(30),
            keep_snapshots: 3,
            check_determinism: cfg!(debug_assertions),
            upload_snapshots: false,
            bootstrap: Bootstrap::Replay,
        }
    }
}

/// Stands in for a replica type in [`Runtime::builder`], which needs none yet.
#[doc(hidden)]
pub struct NoReplica;

impl Replica for NoReplica {
    type State = ();
    type Event = ();
    fn apply(_: &mut (), _: (), _: &EventMeta) -> Result<(), ApplyError> {
        Ok(())
    }
}

impl<R: Replica> Runtime<R> {
    /// Read access to the state, for serving queries while the runtime runs.
    pub fn state(&self) -> StateHandle<R::State> {
        self.state.clone()
    }

    /// Runs until `shutdown` resolves (then takes a final snapshot) or a bounded subscription
    /// completes. Connection losses are retried forever; a failing apply is retried forever too,
    /// with the replica reported stuck at that position.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RuntimeError> {
        if self.settings.bootstrap == Bootstrap::Verified && self.state.position() == 0 {
            match self.bootstrap_now().await {
                Ok(Some(position)) => {
                    tracing::info!(position, "bootstrapped from the verified snapshot");
                }
                Ok(None) => tracing::info!("no verified snapshot yet: replaying the log"),
                Err(e) => tracing::warn!(error = %e, "bootstrap refused: replaying the log"),
            }
        }
        let driver = Driver {
            client: self.client.clone(),
            service: self.service.clone(),
            replica: self.replica.clone(),
            settings: self.settings.clone(),
            uploading: Arc::default(),
            marks_listed: std::sync::Mutex::default(),
        };
        driver.run(&self, shutdown).await
    }

    /// Restores the newest verified snapshot of the service from the broker now, whatever the
    /// local state, and stores it as a local snapshot; returns its position, or `None` when the
    /// broker has none. The blob is checked against the hash the replicas agreed on: a damaged
    /// or substituted one is refused (an error) and nothing changes. [`Runtime::run`] calls this
    /// for a replica without local state when built with [`Bootstrap::Verified`].
    pub async fn bootstrap_now(&self) -> Result<Option<u64>, RuntimeError> {
        let Some((position, chain_hash, bytes)) = self.fetch_verified(None).await? else {
            return Ok(None);
        };
        self.install(position, chain_hash, bytes).await?;
        Ok(Some(position))
    }

    /// Downloads and checks the newest verified snapshot at or before `at_or_before`.
    async fn fetch_verified(
        &self,
        at_or_before: Option<u64>,
    ) -> Result<Option<(u64, String, Vec<u8>)>, RuntimeError> {
        let Some(verified) = self
            .client
            .verified_snapshot(&self.service, at_or_before)
            .await?
        else {
            return Ok(None);
        };
        let bytes = self.client.download_snapshot(&verified.state_hash).await?;
        Ok(Some((verified.position, verified.chain_hash, bytes)))
    }

    /// Makes `bytes` (a snapshot at `position`) the state and stores it locally.
    async fn install(
        &self,
        position: u64,
        chain_hash: String,
        bytes: Vec<u8>,
    ) -> Result<(), RuntimeError> {
        let state: R::State = decode_state(&bytes)?;
        let chain = chain_bytes(&chain_hash);
        let store = Arc::clone(&self.store);
        let keep = self.settings.keep_snapshots;
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio::task::spawn_blocking(move || {
            store.save_keeping(position, chain, &bytes, keep, &pinned)
        })
        .await
        .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        self.set_state(position, chain_hash, state);
        Ok(())
    }

    fn set_state(&self, position: u64, chain_hash: String, state: R::State) {
        let mut guard = self
            .state
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *guard = Applied {
            position,
            chain_hash,
            state,
        };
    }
}

impl<R: Replica> Target for Runtime<R> {
    fn position(&self) -> u64 {
        self.state.position()
    }

    fn apply(&self, event: &crate::Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let decoded = decode::<R>(&event.event_type, event.data.as_deref())?;
        let mut guard = self
            .state
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        R::apply(&mut guard.state, decoded, meta)?;
        guard.position = event.position;
        guard.chain_hash.clone_from(&event.hash);
        Ok(())
    }

    fn skip(&self, event: &crate::Event) -> Result<(), ApplyError> {
        let mut guard = self
            .state
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        guard.position = event.position;
        guard.chain_hash.clone_from(&event.hash);
        Ok(())
    }

    /// Writes a snapshot of the current state (and checks it round-trips canonically).
    async fn checkpoint(&self) -> Result<Option<Snapshot>, RuntimeError> {
        let (position, chain_hash, bytes) = self.state.inner_read(|applied| {
            encode_state(&applied.state)
                .map(|b| (applied.position, chain_bytes(&applied.chain_hash), b))
        })?;
        if position == 0 {
            return Ok(None);
        }
        if self.settings.check_determinism {
            let again = decode_state::<R::State>(&bytes).and_then(|s| encode_state(&s))?;
            if again != bytes {
                tracing::error!(
                    position,
                    "NON-CANONICAL STATE: decoding and re-encoding the state changes its bytes \
                     (a HashMap?); replicas will disagree on their state hash"
                );
            }
        }
        let store = Arc::clone(&self.store);
        let keep = self.settings.keep_snapshots;
        let pinned = self
            .pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let snapshot = tokio::task::spawn_blocking(move || {
            store.save_keeping(position, chain_hash, &bytes, keep, &pinned)
        })
        .await
        .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        tracing::debug!(position, "snapshot written");
        Ok(Some(snapshot))
    }

    async fn entries(&self, at: Option<u64>) -> Result<Option<Entries>, RuntimeError> {
        let Some(position) = at else {
            return Ok(self.state.inner_read(|applied| R::entries(&applied.state)));
        };
        let store = Arc::clone(&self.store);
        let snapshot = tokio::task::spawn_blocking(move || store.at(position))
            .await
            .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        match snapshot {
            Some(snapshot) => Ok(R::entries(&decode_state::<R::State>(&snapshot.bytes)?)),
            None => Ok(None),
        }
    }

    fn pin(&self, positions: Vec<u64>) {
        *self.pinned.lock().unwrap_or_else(PoisonError::into_inner) = positions;
    }

    /// Removes the snapshots after `target` and restores the newest state at or before it:
    /// local, else the broker's verified snapshot, else the empty state.
    async fn restore(&self, target: u64, empty_ok: bool) -> Result<u64, RuntimeError> {
        // Nothing is removed until a state to return to is found: a replica that cannot roll
        // back stops with its snapshots as they were.
        let store = Arc::clone(&self.store);
        let local = tokio::task::spawn_blocking(move || store.newest_valid_at_or_before(target))
            .await
            .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        let (position, chain_hash, state) = match local {
            Some(snapshot) => (
                snapshot.position,
                hex(&snapshot.chain_hash),
                decode_state(&snapshot.bytes)?,
            ),
            None => match self.fetch_verified(Some(target)).await {
                Ok(Some((position, chain_hash, bytes))) => {
                    (position, chain_hash, decode_state(&bytes)?)
                }
                found => {
                    if let Err(e) = found {
                        tracing::warn!(error = %e, "verified snapshot refused; replaying instead");
                    }
                    if !empty_ok {
                        return Err(RuntimeError::Rollback(format!(
                            "no snapshot at or before position {target}, locally or verified at \
                             the broker, and this replica's history starts at 'now': its state \
                             there cannot be rebuilt"
                        )));
                    }
                    (0, String::new(), R::State::default())
                }
            },
        };
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.remove_after(target))
            .await
            .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        self.set_state(position, chain_hash, state);
        Ok(position)
    }
}

/// What the shared loop drives: the in-memory [`Runtime`] or an [`ExternalRuntime`].
trait Target: Sync {
    /// The position the target includes everything up to.
    fn position(&self) -> u64;
    /// Applies one event (not a control record).
    fn apply(&self, event: &crate::Event, meta: &EventMeta) -> Result<(), ApplyError>;
    /// Records a control record's position as applied (it changes no state).
    fn skip(&self, event: &crate::Event) -> Result<(), ApplyError>;
    /// Makes progress durable: a snapshot (returned), or nothing when the target stores its own
    /// position (external state, whose hash the runtime cannot know).
    fn checkpoint(&self) -> impl Future<Output = Result<Option<Snapshot>, RuntimeError>> + Send;
    /// Keeps the snapshots at these positions (the broker's marks) from now on.
    fn pin(&self, positions: Vec<u64>);
    /// The state's keyed entries (see [`Replica::entries`]): now (`None`), or as the local
    /// snapshot at a position holds them; `None` where the replica reports none or the snapshot
    /// is gone.
    fn entries(
        &self,
        at: Option<u64>,
    ) -> impl Future<Output = Result<Option<Entries>, RuntimeError>> + Send;
    /// Returns the state to the newest point at or before `target` it can restore; returns that
    /// point's position (0: the empty state). The runtime then replays the rest up to `target`.
    /// `empty_ok`: whether the empty state is a valid start (the replica's history starts at a
    /// known point, not at 'now').
    fn restore(
        &self,
        target: u64,
        empty_ok: bool,
    ) -> impl Future<Output = Result<u64, RuntimeError>> + Send;
}

/// Applies one event, or records a control record as applied.
fn apply_once(
    target: &impl Target,
    event: &crate::Event,
    meta: &EventMeta,
) -> Result<(), ApplyError> {
    if is_reserved(&event.event_type) {
        target.skip(event)
    } else {
        target.apply(event, meta)
    }
}

/// How applying an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    /// It kept failing until a rollback superseded it.
    Superseded,
}

/// The loop shared by both runtimes: register, stream, apply in order, checkpoint, ack.
struct Driver {
    client: Client,
    service: String,
    replica: String,
    settings: RuntimeBuilder,
    /// True while a snapshot upload runs: barriers during it upload nothing (a replica catching
    /// up passes many barriers; only the state it settles at matters).
    uploading: Arc<std::sync::atomic::AtomicBool>,
    /// When the marks were last listed: at most every [`MARKS_INTERVAL`], not at every barrier
    /// (a replica catching up passes many).
    marks_listed: std::sync::Mutex<Option<Instant>>,
}

/// How often the runtime lists the broker's marks, to keep their snapshots.
const MARKS_INTERVAL: Duration = Duration::from_secs(1);

impl Driver {
    async fn run(
        &self,
        target: &impl Target,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RuntimeError> {
        tokio::pin!(shutdown);
        let mut after = self.register(target.position()).await?;
        let mut since_checkpoint = 0u64;
        let mut last_checkpoint = Instant::now();
        let mut last_ack = Instant::now();
        let mut backoff = Duration::from_millis(100);
        'connect: loop {
            let mut stream = tokio::select! {
                stream = self.client.stream(&self.service, &self.replica, Some(after)) => match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the broker; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = &mut shutdown => break 'connect,
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue 'connect;
                    }
                },
                _ = &mut shutdown => break 'connect,
            };
            backoff = Duration::from_millis(100);
            let mut acked = 0;
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    _ = &mut shutdown => break 'connect,
                    // A quiet stream: let the broker know where this replica stands.
                    _ = tokio::time::sleep(ACK_INTERVAL), if acked != after => {
                        self.ack(after).await;
                        acked = after;
                        last_ack = Instant::now();
                        continue;
                    }
                };
                match item {
                    Some(Ok(StreamItem::Event(event))) => {
                        if event.event_type == ROLLBACK_TYPE {
                            self.roll_back(target, &event).await?;
                        }
                        let outcome = tokio::select! {
                            outcome = self.apply_until_done(target, &event) => outcome,
                            _ = &mut shutdown => break 'connect,
                        };
                        if outcome == Outcome::Superseded {
                            // A rollback took the failing event out of the live log: stream
                            // again from before it, which now skips to the rollback record.
                            continue 'connect;
                        }
                        after = event.position;
                        since_checkpoint += 1;
                        if event.event_type == ROLLBACK_TYPE {
                            // Where a rollback left the state is worth keeping at once.
                            target.checkpoint().await?;
                            since_checkpoint = 0;
                            last_checkpoint = Instant::now();
                        }
                        if event.event_type == BARRIER_TYPE {
                            self.at_barrier(target, event.position).await?;
                            since_checkpoint = 0;
                            last_checkpoint = Instant::now();
                        }
                    }
                    Some(Ok(StreamItem::Heartbeat { .. })) => {}
                    Some(Ok(StreamItem::Complete)) => {
                        target.checkpoint().await?;
                        self.ack(after).await;
                        return Ok(());
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "stream broke; reconnecting");
                        continue 'connect;
                    }
                    None => continue 'connect,
                }
                if since_checkpoint >= self.settings.snapshot_every
                    || (since_checkpoint > 0
                        && last_checkpoint.elapsed() >= self.settings.snapshot_interval)
                {
                    target.checkpoint().await?;
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                }
                if last_ack.elapsed() >= ACK_INTERVAL {
                    self.ack(after).await;
                    acked = after;
                    last_ack = Instant::now();
                }
            }
        }
        target.checkpoint().await?;
        self.ack(target.position()).await;
        Ok(())
    }

    /// At a barrier, with everything up to it applied: snapshot (keeping those at marks), then
    /// report the state's hash so the broker can verify that every replica holds the same state
    /// here, and upload the snapshot if asked to.
    async fn at_barrier(&self, target: &impl Target, position: u64) -> Result<(), RuntimeError> {
        self.refresh_pins(target).await;
        let Some(snapshot) = target.checkpoint().await? else {
            return Ok(());
        };
        let entries = target.entries(None).await?;
        let report = StateReport {
            service: self.service.clone(),
            replica: self.replica.clone(),
            position,
            state_hash: snapshot.state_hash_hex(),
            chain_hash: hex(&snapshot.chain_hash),
            buckets: entries
                .as_deref()
                .map(|e| bucket_hashes(e).iter().map(hex).collect()),
        };
        match self.client.report_state(&report).await {
            Ok(answer) => {
                for request in answer.explain {
                    self.send_entries(target, position, entries.as_ref(), request)
                        .await?;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, position, "could not report the state hash at a barrier");
            }
        }
        if self.settings.upload_snapshots
            && !self
                .uploading
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let (client, uploading) = (self.client.clone(), Arc::clone(&self.uploading));
            tokio::spawn(async move {
                let hash = snapshot.state_hash_hex();
                if !matches!(client.has_snapshot(&hash).await, Ok(true))
                    && let Err(e) = client.upload_snapshot(snapshot.bytes).await
                {
                    tracing::warn!(error = %e, position, "could not upload the snapshot");
                }
                uploading.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        Ok(())
    }

    /// Lists the broker's marks (at most every [`MARKS_INTERVAL`]) so their snapshots are kept.
    async fn refresh_pins(&self, target: &impl Target) {
        {
            let mut listed = self
                .marks_listed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if listed.is_some_and(|at| at.elapsed() < MARKS_INTERVAL) {
                return;
            }
            *listed = Some(Instant::now());
        }
        match self.client.marks().await {
            Ok(marks) => target.pin(marks.marks.iter().map(|m| m.position).collect()),
            Err(e) => tracing::debug!(error = %e, "could not list marks"),
        }
    }

    /// Sends the entries the broker asked for to explain a divergence: from the state at this
    /// barrier (`current`, its entries) or from the local snapshot at an earlier one.
    async fn send_entries(
        &self,
        target: &impl Target,
        barrier: u64,
        current: Option<&Entries>,
        request: ExplainRequest,
    ) -> Result<(), RuntimeError> {
        let at = request.position;
        let earlier;
        let found = if at == barrier {
            current
        } else {
            earlier = target.entries(Some(at)).await?;
            earlier.as_ref()
        };
        let Some(found) = found else {
            tracing::debug!(at, "entries asked for, but that snapshot is gone");
            return Ok(());
        };
        let mut wanted: Vec<&(String, [u8; 32])> = found
            .iter()
            .filter(|(key, _)| request.buckets.contains(&bucket_of(key)))
            .collect();
        wanted.sort_by(|a, b| a.0.cmp(&b.0));
        let truncated = wanted.len() > MAX_EXPLAIN_ENTRIES;
        wanted.truncate(MAX_EXPLAIN_ENTRIES);
        let report = EntriesReport {
            service: self.service.clone(),
            replica: self.replica.clone(),
            position: at,
            entries: wanted
                .into_iter()
                .map(|(key, hash)| EntryHash {
                    key: key.clone(),
                    hash: hex(hash),
                })
                .collect(),
            buckets: request.buckets,
            truncated,
        };
        if let Err(e) = self.client.report_entries(&report).await {
            tracing::warn!(error = %e, at, "could not send entries to explain");
        }
        Ok(())
    }

    /// At a rollback record: if this replica applied anything after the target, return its
    /// state to the target (see the module documentation). The caller then records the rollback
    /// record itself as applied.
    async fn roll_back(
        &self,
        target: &impl Target,
        record: &crate::Event,
    ) -> Result<(), RuntimeError> {
        let data: RollbackData = record
            .data
            .as_deref()
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
            .ok_or_else(|| {
                RuntimeError::Rollback(format!(
                    "the rollback record at {} has no readable target",
                    record.position
                ))
            })?;
        let to = data.target;
        let at = target.position();
        if at <= to {
            tracing::info!(
                rollback = record.position,
                target = to,
                "rollback: nothing after the target was applied here"
            );
            return Ok(());
        }
        tracing::warn!(
            service = %self.service,
            replica = %self.replica,
            rollback = record.position,
            target = to,
            from = at,
            "rolling back"
        );
        let empty_ok = self.settings.start != Start::Named(StartName::Now);
        let restored = target.restore(to, empty_ok).await?;
        if restored > to {
            return Err(RuntimeError::Rollback(format!(
                "the replica restored position {restored}, after the target {to}"
            )));
        }
        // Replay the live events up to the target; reads skip superseded ones. From the empty
        // state, that starts where the replica's history starts.
        let mut request = ReadRequest::after(restored)
            .types(self.settings.types.join(","))
            .limit(10_000);
        if restored == 0 {
            match &self.settings.start {
                Start::Named(StartName::Beginning) => {}
                Start::Position { position } => request.after = position.saturating_sub(1),
                Start::Time { time } => request.since = Some(*time),
                Start::Named(StartName::Now) => {}
            }
        }
        let mut pages = self.client.pages(request);
        'pages: while let Some(page) = pages.next().await {
            let page = page?;
            for event in &page.events {
                if event.position > to {
                    break 'pages;
                }
                if !is_reserved(&event.event_type) {
                    // Live events up to the target: a rollback cannot supersede them unless a
                    // later one does, which this replica handles when it reaches it.
                    let _ = self.apply_until_done(target, event).await;
                }
            }
            if page.next_after >= to {
                break;
            }
        }
        tracing::info!(target = to, restored, "rollback replayed up to the target");
        Ok(())
    }

    /// Registers the subscription; returns the position to stream after. `local` is where the
    /// replica's own state stands (0: nothing applied).
    async fn register(&self, local: u64) -> Result<u64, RuntimeError> {
        let spec = SubscriptionSpec {
            service: self.service.clone(),
            replica: self.replica.clone(),
            types: self.settings.types.clone(),
            start: self.settings.start.clone(),
            end: None,
            push_url: None,
            push_format: None,
        };
        let (info, created) = self.client.subscribe(&spec, false).await?;
        if local > 0 {
            return Ok(local);
        }
        if !created && info.position > 0 {
            // The broker remembers progress this replica's state no longer has: start over.
            tracing::warn!(
                position = info.position,
                "no local state but the subscription has moved on; replaying from its start"
            );
            let (info, _) = self.client.subscribe(&spec, true).await?;
            return Ok(info.position);
        }
        Ok(info.position)
    }

    /// Applies one event, retrying with backoff until it succeeds; never skips it, unless a
    /// rollback supersedes it meanwhile (the remedy for a poison event).
    async fn apply_until_done(&self, target: &impl Target, event: &crate::Event) -> Outcome {
        let meta = EventMeta {
            position: event.position,
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            key: event.key.clone(),
            time: event.time,
            hash: event.hash.clone(),
        };
        match apply_once(target, event, &meta) {
            Ok(()) => Outcome::Applied,
            // The retry loop's future (HTTP calls included) is boxed: the one built for every
            // event stays small.
            Err(e) => Box::pin(self.retry_apply(target, event, &meta, e)).await,
        }
    }

    /// Retries a failing apply with backoff, reporting the replica stuck, until it succeeds or a
    /// rollback supersedes the event.
    async fn retry_apply(
        &self,
        target: &impl Target,
        event: &crate::Event,
        meta: &EventMeta,
        first: ApplyError,
    ) -> Outcome {
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u32;
        let mut error = first;
        loop {
            failures += 1;
            tracing::error!(
                service = %self.service,
                replica = %self.replica,
                position = event.position,
                error = %error,
                failures,
                "stuck: applying this event fails; retrying, never skipping"
            );
            if failures == 1 {
                let stuck = Stuck {
                    position: event.position,
                    error: error.to_string(),
                };
                self.report_stuck(Some(stuck)).await;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_BACKOFF);
            if self.superseded(event.position).await {
                tracing::warn!(
                    position = event.position,
                    "the failing event was superseded by a rollback; moving on"
                );
                self.report_stuck(None).await;
                return Outcome::Superseded;
            }
            match apply_once(target, event, meta) {
                Ok(()) => {
                    tracing::info!(position = event.position, failures, "apply recovered");
                    self.report_stuck(None).await;
                    return Outcome::Applied;
                }
                Err(e) => error = e,
            }
        }
    }

    /// Whether a rollback has superseded `position` (false when the broker cannot say).
    async fn superseded(&self, position: u64) -> bool {
        self.client.rollbacks().await.is_ok_and(|list| {
            list.rollbacks
                .iter()
                .any(|r| r.target < position && position < r.position)
        })
    }

    async fn report_stuck(&self, stuck: Option<Stuck>) {
        if let Err(e) = self
            .client
            .report_stuck(&self.service, &self.replica, stuck)
            .await
        {
            tracing::warn!(error = %e, "could not report the replica's status to the broker");
        }
    }

    async fn ack(&self, position: u64) {
        if position == 0 {
            return;
        }
        if let Err(e) = self
            .client
            .ack(&self.service, &self.replica, position)
            .await
        {
            tracing::debug!(error = %e, "ack failed; the next one will carry the position");
        }
    }
}

/// A replica whose state lives in its own database (the escape hatch). Instead of snapshots,
/// it stores the position (and chain hash) of each event in the same transaction as the event's
/// effects, and tells the runtime on start where it stands.
///
/// The same correctness requirements as [`Replica`] hold: deterministic effects, and an `Err`
/// leaves the database as it was (roll the transaction back); the runtime retries and never skips.
pub trait ExternalReplica: Send + Sync + 'static {
    /// The events, decoded like [`Replica::Event`].
    type Event: DeserializeOwned + Send;

    /// The last position whose effects are stored (what [`apply`](Self::apply) stored last),
    /// or 0 when nothing is. Called once, at start: delivery resumes after it.
    fn resume_after(&self) -> Result<u64, ApplyError>;

    /// Applies one event and, in the same transaction, stores `meta.position` and `meta.hash`.
    fn apply(&self, event: Self::Event, meta: &EventMeta) -> Result<(), ApplyError>;

    /// Records that everything up to `position` (a control record, no effects) is applied;
    /// store the position so a restart resumes after it. The default does nothing: the control
    /// record is then delivered again after a restart, which is harmless.
    fn skip(&self, _position: u64, _hash: &str) -> Result<(), ApplyError> {
        Ok(())
    }

    /// A rollback to `target`: return the database to its state at some position at or before
    /// `target` (from a backup, or by undoing) and return that position; the runtime then
    /// replays the live events from there up to `target`. `None` (the default) means this replica
    /// cannot roll back: the runtime stops with an error rather than let it diverge.
    fn roll_back(&self, _target: u64) -> Option<Result<u64, ApplyError>> {
        None
    }
}

/// The runtime of an [`ExternalReplica`]. Build with [`RuntimeBuilder::build_external`].
pub struct ExternalRuntime<E: ExternalReplica> {
    driver: Driver,
    replica: E,
    position: std::sync::atomic::AtomicU64,
}

impl<E: ExternalReplica> ExternalRuntime<E> {
    /// Runs until `shutdown` resolves or a bounded subscription completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RuntimeError> {
        self.driver.run(&self, shutdown).await
    }
}

impl<E: ExternalReplica> Target for ExternalRuntime<E> {
    fn position(&self) -> u64 {
        self.position.load(std::sync::atomic::Ordering::Acquire)
    }

    fn apply(&self, event: &crate::Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let decoded: E::Event = decode_event(&event.event_type, event.data.as_deref())?;
        self.replica.apply(decoded, meta)?;
        self.position
            .store(event.position, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn skip(&self, event: &crate::Event) -> Result<(), ApplyError> {
        self.replica.skip(event.position, &event.hash)?;
        self.position
            .store(event.position, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn checkpoint(&self) -> Result<Option<Snapshot>, RuntimeError> {
        Ok(None)
    }

    fn pin(&self, _positions: Vec<u64>) {}

    async fn entries(&self, _at: Option<u64>) -> Result<Option<Entries>, RuntimeError> {
        Ok(None)
    }

    async fn restore(&self, target: u64, _empty_ok: bool) -> Result<u64, RuntimeError> {
        match self.replica.roll_back(target) {
            None => Err(RuntimeError::Rollback(format!(
                "a rollback to position {target} reached this replica, whose state lives in its \
                 own database and which does not implement ExternalReplica::roll_back; it stopped \
                 rather than diverge"
            ))),
            Some(Err(e)) => Err(RuntimeError::Rollback(format!(
                "rolling back to {target} failed: {e}"
            ))),
            Some(Ok(position)) => {
                self.position
                    .store(position, std::sync::atomic::Ordering::Release);
                Ok(position)
            }
        }
    }
}

impl<S> StateHandle<S> {
    fn inner_read<T>(&self, f: impl FnOnce(&Applied<S>) -> T) -> T {
        let guard = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }
}

/// A 32-byte hash as 64 hex characters.
fn hex(hash: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*hash).to_hex().to_string()
}

fn chain_bytes(hex: &str) -> [u8; 32] {
    ChainHash::from_hex(hex).map_or([0; 32], |h| h.0)
}
