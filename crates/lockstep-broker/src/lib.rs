//! The Lockstep broker: one durable, hash-chained, totally ordered event log on redb, served over
//! HTTP. A library, so the `lockstep` binary and the tests run exactly the same server.
//!
//! Map of the crate, in the order a request flows:
//! - [`http`]: the axum router; maps requests to domain calls and errors to JSON answers.
//! - [`publish`] and [`cloudevents`]: the receiver; turns publish bodies into checked drafts.
//! - [`read`]: pages of events by position or time, long-polling.
//! - [`registry`]: durable subscriptions and their acknowledged positions (the registrar).
//! - [`delivery`]: pull delivery to subscriptions (pages, streams, acks) and their health.
//! - [`push`]: push delivery: POSTing batches to subscribers' URLs, in order, with retries.
//! - [`consistency`]: barriers, replicas' state-hash reports, verification, marks.
//! - [`explain`]: which keys differ between replicas (`verify --explain`).
//! - [`rollback`]: rollback records, superseded events, pause/resume, redrive.
//! - [`snapshots`]: snapshot blobs uploaded by replicas, content-addressed by blake3.
//! - [`log`]: the redb store and its group-committing writer thread.
//! - [`config`], [`error`], [`metrics`]: settings, error types, counters.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = lockstep_broker::Broker::open(lockstep_broker::Config::with_data_dir("./data"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
//! lockstep_broker::serve(listener, broker, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```

pub mod cloudevents;
pub mod config;
pub mod consistency;
pub mod delivery;
pub mod error;
pub mod explain;
pub mod http;
pub mod log;
pub mod metrics;
pub mod publish;
pub mod push;
pub mod read;
pub mod registry;
pub mod rollback;
pub mod snapshots;

use std::future::Future;
use std::sync::Arc;

use lockstep_proto::wire::{Head, PublishAck};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use error::{AppendError, PublishError, ReadError, StoreError};
use log::{Draft, Log};
pub use read::ReadQuery;

/// A running broker: the log and its settings. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    log: Log,
    registry: Arc<registry::Registry>,
    reports: Arc<consistency::Reports>,
    snapshots: Arc<snapshots::SnapshotBlobs>,
    /// Whether client publishes are refused for now (an operator's pause around a rollback).
    paused: std::sync::RwLock<lockstep_proto::consistency::PauseState>,
    /// Held by the rollback being appended: one at a time.
    rolling_back: tokio::sync::Mutex<()>,
    /// True while a rollback is appended: publishes wait (503) for the moment it takes.
    holding_publishes: std::sync::atomic::AtomicBool,
    config: Config,
    /// Turns true when shutdown starts, so long-polls return at once.
    stopping: watch::Sender<bool>,
}

impl Broker {
    /// Opens the log in `config.data_dir` (creating it if needed) and starts its writer.
    pub fn open(config: Config) -> Result<Self, StoreError> {
        let log = Log::open(&config.data_dir, config.cache_bytes)?;
        let registry = Arc::new(registry::Registry::open(&config.data_dir)?);
        let reports = Arc::new(consistency::Reports::open(&config.data_dir)?);
        let snapshots = Arc::new(snapshots::SnapshotBlobs::open(&config.data_dir)?);
        let paused = reports.load_pause()?;
        if paused.paused {
            tracing::warn!(reason = ?paused.reason, "publishing is paused (lockstep resume ends it)");
        }
        tracing::info!(
            data_dir = %config.data_dir.display(),
            head = log.tip().position,
            subscriptions = registry.all().len(),
            "log opened"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                log,
                registry,
                reports,
                snapshots,
                paused: std::sync::RwLock::new(paused),
                rolling_back: tokio::sync::Mutex::new(()),
                holding_publishes: std::sync::atomic::AtomicBool::new(false),
                config,
                stopping: watch::Sender::new(false),
            }),
        })
    }

    /// The broker's settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Appends checked drafts atomically; answers once they are durable. Refused while an
    /// operator has paused publishing.
    pub async fn publish(&self, drafts: Vec<Draft>) -> Result<Vec<PublishAck>, PublishError> {
        let pause = self.pause_state();
        if pause.paused {
            return Err(PublishError::Paused(pause.reason));
        }
        if self
            .inner
            .holding_publishes
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(PublishError::Paused(Some(
                "a rollback is being appended".into(),
            )));
        }
        self.append(drafts).await
    }

    /// Appends whatever the pause says (the broker's own records).
    async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<PublishAck>, PublishError> {
        if *self.inner.stopping.borrow() {
            return Err(AppendError::Closed.into());
        }
        Ok(self.inner.log.append(drafts).await?)
    }

    /// Appends one of the broker's own control records (type `lockstep.…`), which reach every
    /// subscription whatever its filter. Clients cannot publish these; later parts of the broker
    /// (barriers, rollbacks) and tests can.
    pub async fn append_control(
        &self,
        event_type: &str,
        data: &serde_json::Value,
    ) -> Result<PublishAck, PublishError> {
        let draft = self.control_draft(event_type, data)?;
        let mut acks = self.append(vec![draft]).await?;
        acks.pop()
            .ok_or_else(|| PublishError::invalid("no ack for the control record"))
    }

    /// A control record, ready to append.
    fn control_draft(
        &self,
        event_type: &str,
        data: &serde_json::Value,
    ) -> Result<Draft, PublishError> {
        if !lockstep_proto::names::is_reserved(event_type) {
            return Err(PublishError::invalid(format!(
                "{event_type:?} is not a control record type (lockstep.…)"
            )));
        }
        lockstep_proto::names::validate_type(event_type)
            .map_err(|e| PublishError::invalid(e.to_string()))?;
        let id = uuid::Uuid::now_v7().to_string();
        let data = serde_json::to_vec(data)
            .map_err(|e| PublishError::invalid(format!("control record data: {e}")))?;
        let record = lockstep_proto::RecordRef {
            position: 0,
            time_ns: 0,
            id: &id,
            event_type,
            source: "lockstep",
            key: None,
            occurred_at_ns: None,
            content_type: lockstep_proto::record::JSON_CONTENT_TYPE,
            data: &data,
        };
        Ok(Draft::new(&record, true, None, None))
    }

    /// One page of events as its JSON body.
    pub async fn read(&self, query: ReadQuery) -> Result<read::Page, ReadError> {
        read::read_page(&self.inner.log, query, self.inner.stopping.subscribe()).await
    }

    /// The JSON of the event at `position`.
    pub async fn event(&self, position: u64) -> Result<Vec<u8>, ReadError> {
        read::read_one(&self.inner.log, position).await
    }

    /// The last committed event.
    pub fn head(&self) -> Head {
        let tip = self.inner.log.tip();
        Head {
            position: tip.position,
            hash: tip.hash.to_hex(),
            time: (tip.position > 0).then(|| chrono::DateTime::from_timestamp_nanos(tip.time_ns)),
        }
    }

    /// Metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.inner
            .log
            .metrics()
            .render(self.inner.log.tip().position)
    }

    /// The log, for in-process users such as benchmarks.
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// Starts the background work of a serving broker: writing acknowledged positions to disk,
    /// and a push worker for every push subscription. [`serve`] calls it.
    pub fn start_background(&self) {
        let broker = self.clone();
        tokio::spawn(async move {
            let mut stopping = broker.inner.stopping.subscribe();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(registry::CURSOR_FLUSH_INTERVAL) => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
                broker.flush_positions().await;
            }
        });
        for sub in self.inner.registry.all() {
            if sub.push_url().is_some() {
                push::spawn(self.clone(), sub);
            }
        }
        self.spawn_barriers();
        self.spawn_snapshot_gc();
    }

    async fn flush_positions(&self) {
        let registry = Arc::clone(&self.inner.registry);
        match tokio::task::spawn_blocking(move || registry.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "writing subscription positions failed"),
            Err(e) => tracing::error!(error = %e, "position flush task failed"),
        }
    }

    /// Whether anything besides this handle still holds the broker or one of its databases.
    fn storage_shared(&self) -> bool {
        Arc::strong_count(&self.inner) > 1
            || self.inner.log.database_handles() > 1
            || Arc::strong_count(&self.inner.registry) > 1
            || Arc::strong_count(&self.inner.reports) > 1
            || Arc::strong_count(&self.inner.snapshots) > 1
    }

    /// Starts shutdown: refuses new publishes, wakes long-polls and streams, lets queued commits
    /// finish, writes acknowledged positions and stops the writer.
    pub async fn close(&self) {
        self.inner.stopping.send_replace(true);
        self.inner.log.close().await;
        self.flush_positions().await;
    }
}

/// Serves the HTTP API on `listener` until `shutdown` resolves, then stops gracefully: no new
/// connections, in-flight requests (and their commits) finish, long-polls return, the writer stops.
pub async fn serve(
    listener: TcpListener,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    broker.start_background();
    let app = http::router(broker.clone());
    let stopping = broker.clone();
    // Streams write event after event while the reader sends nothing back: without TCP_NODELAY
    // each small write waits for the reader's delayed ACK (~40 ms).
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            stopping.inner.stopping.send_replace(true);
        })
        .await;
    broker.close().await;
    // axum can return while a finished connection's task still holds a clone of the router, and
    // so of the databases. Wait until this handle is the last, then drop it here: the databases
    // close (their files' locks are released) on this thread, before `serve` returns, so the
    // data directory is free for the next broker. (Waiting for a weak count to reach zero is not
    // enough: it does so before the drop that closes the files has finished on another thread.)
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    while broker.storage_shared() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("the database is still in use {CLOSE_TIMEOUT:?} after shutdown");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(broker);
    result
}

/// How long `serve` waits, after shutdown, for the last handle on the database to go.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
