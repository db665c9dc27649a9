//! The replica runtime: registers the subscription, streams events in order, applies them to the
//! state through [`Replica::apply`], and keeps snapshots so that a restart resumes in milliseconds.
//!
//! On start it restores the newest valid local snapshot and streams from its position; with no
//! snapshot it starts from the subscription's `start` (registering it again if the broker
//! remembered a position this replica's state no longer has). Snapshots are taken every
//! `snapshot_every` events or `snapshot_interval`, and once more at shutdown; the last
//! `keep_snapshots` are kept. The applied position is acknowledged to the broker (for lag) every
//! second, but the local snapshot is what a restart trusts.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lockstep_proto::consistency::{BARRIER_TYPE, StateReport};
use lockstep_proto::names::is_reserved;
use lockstep_proto::record::ChainHash;
use lockstep_proto::subscription::{Start, StartName, Stuck, SubscriptionSpec};

use crate::client::{Client, ClientError};
use serde::de::DeserializeOwned;

use crate::replica::{
    ApplyError, EventMeta, Replica, decode, decode_event, decode_state, encode_state,
};
use crate::snapshot::{SnapshotStore, StoreError};
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
}

impl RuntimeBuilder {
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
                let hash = blake3::Hash::from_bytes(snapshot.chain_hash)
                    .to_hex()
                    .to_string();
                (snapshot.position, hash, state)
            }
            None => (0, String::new(), R::State::default()),
        };
        Ok(Runtime {
            client,
            service,
            replica,
            settings: self,
            store: Arc::new(store),
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
        let guard = match self.inner.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
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
        let driver = Driver {
            client: self.client.clone(),
            service: self.service.clone(),
            replica: self.replica.clone(),
            settings: self.settings.clone(),
        };
        driver.run(&self, shutdown).await
    }
}

impl<R: Replica> Target for Runtime<R> {
    fn position(&self) -> u64 {
        self.state.position()
    }

    fn state_hash(&self) -> Option<Result<(blake3::Hash, String), ApplyError>> {
        Some(self.state.inner_read(|applied| {
            encode_state(&applied.state).map(|b| (blake3::hash(&b), applied.chain_hash.clone()))
        }))
    }

    fn apply(&self, event: &crate::Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let decoded = decode::<R>(&event.event_type, event.data.as_deref())?;
        let mut guard = match self.state.inner.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        R::apply(&mut guard.state, decoded, meta)?;
        guard.position = event.position;
        guard.chain_hash.clone_from(&event.hash);
        Ok(())
    }

    fn skip(&self, event: &crate::Event) -> Result<(), ApplyError> {
        let mut guard = match self.state.inner.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.position = event.position;
        guard.chain_hash.clone_from(&event.hash);
        Ok(())
    }

    /// Writes a snapshot of the current state (and checks it round-trips canonically).
    async fn checkpoint(&self) -> Result<(), RuntimeError> {
        let (position, chain_hash, bytes) = self.state.inner_read(|applied| {
            encode_state(&applied.state)
                .map(|b| (applied.position, chain_bytes(&applied.chain_hash), b))
        })?;
        if position == 0 {
            return Ok(());
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
        tokio::task::spawn_blocking(move || store.save(position, chain_hash, &bytes, keep))
            .await
            .map_err(|e| RuntimeError::Config(format!("snapshot task failed: {e}")))??;
        tracing::debug!(position, "snapshot written");
        Ok(())
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
    /// Makes progress durable: a snapshot, or nothing when the target stores its own position.
    fn checkpoint(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// blake3 of the state's canonical bytes and the chain hash (hex) at its position, where the
    /// runtime holds the state; `None` where it does not (external state).
    fn state_hash(&self) -> Option<Result<(blake3::Hash, String), ApplyError>>;
}

/// The loop shared by both runtimes: register, stream, apply in order, checkpoint, ack.
struct Driver {
    client: Client,
    service: String,
    replica: String,
    settings: RuntimeBuilder,
}

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
                        tokio::select! {
                            () = self.apply_until_done(target, &event) => {}
                            _ = &mut shutdown => break 'connect,
                        }
                        after = event.position;
                        since_checkpoint += 1;
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

    /// At a barrier, with everything up to it applied: snapshot, then report the state's hash so
    /// the broker can verify that every replica holds the same state here.
    async fn at_barrier(&self, target: &impl Target, position: u64) -> Result<(), RuntimeError> {
        let Some(hashed) = target.state_hash() else {
            return Ok(());
        };
        let (state_hash, chain_hash) = hashed?;
        target.checkpoint().await?;
        let report = StateReport {
            service: self.service.clone(),
            replica: self.replica.clone(),
            position,
            state_hash: state_hash.to_hex().to_string(),
            chain_hash,
        };
        if let Err(e) = self.client.report_state(&report).await {
            tracing::warn!(error = %e, position, "could not report the state hash at a barrier");
        }
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

    /// Applies one event, retrying with backoff until it succeeds; never skips it.
    async fn apply_until_done(&self, target: &impl Target, event: &crate::Event) {
        let meta = EventMeta {
            position: event.position,
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            key: event.key.clone(),
            time: event.time,
            hash: event.hash.clone(),
        };
        let mut delay = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            let result = if is_reserved(&event.event_type) {
                target.skip(event)
            } else {
                target.apply(event, &meta)
            };
            match result {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(position = event.position, failures, "apply recovered");
                        self.report_stuck(None).await;
                    }
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(
                        service = %self.service,
                        replica = %self.replica,
                        position = event.position,
                        error = %e,
                        failures,
                        "stuck: applying this event fails; retrying, never skipping"
                    );
                    if failures == 1 {
                        let stuck = Stuck {
                            position: event.position,
                            error: e.to_string(),
                        };
                        self.report_stuck(Some(stuck)).await;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
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

    fn state_hash(&self) -> Option<Result<(blake3::Hash, String), ApplyError>> {
        None
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

    async fn checkpoint(&self) -> Result<(), RuntimeError> {
        Ok(())
    }
}

impl<S> StateHandle<S> {
    fn inner_read<T>(&self, f: impl FnOnce(&Applied<S>) -> T) -> T {
        let guard = match self.inner.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&guard)
    }
}

fn chain_bytes(hex: &str) -> [u8; 32] {
    ChainHash::from_hex(hex).map_or([0; 32], |h| h.0)
}
