//! `lockstep bench rollback` and `lockstep bench bootstrap`: what consistency operations cost.
//!
//! - rollback: three replicas (SDK runtimes) hold a state over `--keys` keys; a mark is taken at
//!   a verified barrier, `--superseded` more events are applied, then a rollback to the mark.
//!   Timed from the rollback request until all three have passed the rollback record, and checked:
//!   at the next barrier all three report the mark's state hash.
//! - bootstrap: a log of `--events` keyed events; two replicas replay it and upload their snapshot
//!   at a barrier; then a new replica is timed replaying everything, and another bootstrapping from
//!   the verified snapshot and replaying the tail; both must reach the same state hash.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lockstep::{
    ApplyError, Bootstrap, Client, EventMeta, MarkAt, NewEvent, Replica, RollbackTo, Runtime,
    StateHandle,
};
use serde::{Deserialize, Serialize};

/// Options of `lockstep bench rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackOptions {
    /// Events applied before the mark.
    #[arg(long, default_value_t = 100_000)]
    pub before: u64,
    /// Events between the mark and the rollback (superseded by it).
    #[arg(long, default_value_t = 100_000)]
    pub superseded: u64,
    /// Distinct keys, i.e. entries in each replica's state.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Roll back to this many events after the mark instead of the mark itself: replicas then
    /// restore the mark's snapshot and replay these events (checked: all three agree).
    #[arg(long, default_value_t = 0)]
    pub replay: u64,
}

/// Options of `lockstep bench bootstrap`.
#[derive(Debug, Clone, clap::Args)]
pub struct BootstrapOptions {
    /// Events in the history.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Distinct keys, i.e. entries in the state.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Events published after the snapshot's barrier (the tail a bootstrapped replica replays).
    #[arg(long, default_value_t = 10_000)]
    pub tail: u64,
}

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum BenchEvent {
    #[serde(rename = "bench.counted")]
    Counted { n: u64 },
}

/// Per key: how many events and the sum of their numbers.
struct Tally;

impl Replica for Tally {
    type State = BTreeMap<String, (u64, u64)>;
    type Event = BenchEvent;

    fn apply(
        state: &mut Self::State,
        event: BenchEvent,
        meta: &EventMeta,
    ) -> Result<(), ApplyError> {
        let BenchEvent::Counted { n } = event;
        let entry = state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default();
        entry.0 += 1;
        entry.1 += n;
        Ok(())
    }
}

const SERVICE: &str = "bench-consistency";

/// Publishes `count` keyed events, numbered from `from`, with 4 concurrent writers.
async fn publish_keyed(client: &Client, from: u64, count: u64, keys: u64) -> anyhow::Result<()> {
    const BATCH: u64 = 1000;
    const WRITERS: u64 = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let client = client.clone();
        tasks.spawn(async move {
            let mut n = from + w * BATCH;
            while n < from + count {
                let end = (n + BATCH).min(from + count);
                let batch = (n..end)
                    .map(|i| {
                        Ok(NewEvent {
                            key: Some(format!("k{}", i % keys.max(1))),
                            ..NewEvent::json("bench.counted", &serde_json::json!({"n": i}))?
                        })
                    })
                    .collect::<Result<Vec<_>, serde_json::Error>>()?;
                client.publish(&batch).await?;
                n += WRITERS * BATCH;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// A running replica: its state, the switch that stops it, and its task.
struct Running {
    state: StateHandle<<Tally as Replica>::State>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), lockstep::RuntimeError>>,
}

impl Running {
    fn start(runtime: Runtime<Tally>) -> Self {
        let state = runtime.state();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run(async {
            let _ = stopped.await;
        }));
        Self { state, stop, task }
    }

    async fn reach(&self, position: u64, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        while self.state.position() < position {
            anyhow::ensure!(!self.task.is_finished(), "{what}: the replica stopped");
            anyhow::ensure!(Instant::now() < deadline, "{what}: timed out");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("replica task")??;
        Ok(())
    }
}

fn builder(client: &Client, replica: &str, dir: &std::path::Path) -> lockstep::RuntimeBuilder {
    Runtime::builder(client.url())
        .service(SERVICE)
        .replica(replica)
        .types(["bench.*"])
        .state_dir(dir.join(replica))
        .snapshot_every(1_000_000)
        .snapshot_interval(Duration::from_secs(3600))
        .check_determinism(false)
}

/// The state hashes `replicas` reported at `barrier`, once they all have.
async fn reports_at(
    client: &Client,
    barrier: u64,
    replicas: &[String],
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let v = client.verify(Some(SERVICE)).await?;
        let hashes: Vec<String> = replicas
            .iter()
            .filter_map(|id| {
                v.services
                    .iter()
                    .flat_map(|s| &s.replicas)
                    .find(|r| r.replica == *id && r.position == barrier)
                    .map(|r| r.state_hash.clone())
            })
            .collect();
        if hashes.len() == replicas.len() {
            return Ok(hashes);
        }
        anyhow::ensure!(Instant::now() < deadline, "no reports at barrier {barrier}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn unsubscribe(client: &Client, replicas: &[String]) {
    for id in replicas {
        let _ = client.unsubscribe(SERVICE, id).await;
    }
}

#[derive(Serialize)]
struct RollbackFigures {
    replicas: usize,
    state_entries: u64,
    superseded_events: u64,
    rollback_ms: f64,
    hash_after_equals_mark: bool,
}

/// Runs the rollback bench.
pub async fn rollback(
    client: &Client,
    options: &RollbackOptions,
    json: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary state directory")?;
    let run = std::process::id();
    let ids: Vec<String> = (0..3).map(|i| format!("rb-{run}-{i}")).collect();
    let base = client.head().await?.position;
    let replicas: Vec<Running> = ids
        .iter()
        .map(|id| {
            let runtime = builder(client, id, dir.path())
                .start(lockstep::Start::Position { position: base + 1 })
                .build::<Tally>()?;
            Ok(Running::start(runtime))
        })
        .collect::<anyhow::Result<_>>()?;
    publish_keyed(client, 0, options.before, options.keys).await?;
    let mark_at = client.barrier().await?;
    let at_mark = reports_at(client, mark_at, &ids).await?;
    let mark = client
        .create_mark(
            &format!("bench-{run}"),
            MarkAt::Position { position: mark_at },
        )
        .await?;
    publish_keyed(client, options.before, options.superseded, options.keys).await?;
    let head = client.head().await?.position;
    for r in &replicas {
        r.reach(head, "applying the events to be superseded")
            .await?;
    }

    let started = Instant::now();
    let to = if options.replay == 0 {
        RollbackTo::Mark(mark.name.clone())
    } else {
        RollbackTo::Position(mark_at + options.replay)
    };
    let rollback = client.rollback(to, Some("bench")).await?;
    for r in &replicas {
        r.reach(rollback.position, "completing the rollback")
            .await?;
    }
    let took = started.elapsed();
    let after = client.barrier().await?;
    let at_after = reports_at(client, after, &ids).await?;
    for r in replicas {
        r.stop().await?;
    }
    unsubscribe(client, &ids).await;
    let _ = client.remove_mark(&mark.name).await;
    let figures = RollbackFigures {
        replicas: ids.len(),
        state_entries: options.keys.min(options.before),
        superseded_events: rollback.position - rollback.target - 1,
        rollback_ms: took.as_secs_f64() * 1e3,
        hash_after_equals_mark: at_after == at_mark,
    };
    anyhow::ensure!(
        at_after.iter().all(|h| *h == at_after[0]),
        "after the rollback the replicas disagree: {at_after:?}"
    );
    anyhow::ensure!(
        options.replay > 0 || figures.hash_after_equals_mark,
        "after the rollback the replicas report {at_after:?}, not the mark's {at_mark:?}"
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        let check = if options.replay == 0 {
            "all report the mark's state hash at the next barrier".to_owned()
        } else {
            format!(
                "each restored the mark's snapshot and replayed {} events; all agree at the next barrier",
                options.replay
            )
        };
        println!(
            "rollback: {} replicas ({} state entries each) rolled back over {} superseded events \
             in {:.0} ms; {check}",
            figures.replicas, figures.state_entries, figures.superseded_events, figures.rollback_ms
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct BootstrapFigures {
    events: u64,
    state_entries: u64,
    snapshot_bytes: u64,
    full_replay_seconds: f64,
    bootstrap_seconds: f64,
    speedup: f64,
}

/// Runs the bootstrap bench.
pub async fn bootstrap(
    client: &Client,
    options: &BootstrapOptions,
    json: bool,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary state directory")?;
    let run = std::process::id();
    let id = |name: &str| format!("bs-{run}-{name}");
    let base = client.head().await?.position;
    let start = lockstep::Start::Position { position: base + 1 };
    let history = options.events.saturating_sub(options.tail);
    let fill = Instant::now();
    publish_keyed(client, 0, history, options.keys).await?;
    if !json {
        eprintln!(
            "published {history} events in {:.1} s",
            fill.elapsed().as_secs_f64()
        );
    }
    // Two replicas agree on the state at a barrier and upload it.
    let seeds = [id("a"), id("b")];
    let mut running = Vec::new();
    for seed in &seeds {
        let runtime = builder(client, seed, dir.path())
            .start(start.clone())
            .upload_snapshots(true)
            .build::<Tally>()?;
        running.push(Running::start(runtime));
    }
    let head = client.head().await?.position;
    for r in &running {
        r.reach(head, "seed replicas catching up").await?;
    }
    let barrier = client.barrier().await?;
    reports_at(client, barrier, &seeds).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let verified = loop {
        if let Some(v) = client.verified_snapshot(SERVICE, None).await?
            && v.position == barrier
        {
            break v;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no verified snapshot was uploaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for r in running {
        r.stop().await?;
    }
    publish_keyed(client, history, options.tail, options.keys).await?;
    let head = client.head().await?.position;

    // Full replay.
    let started = Instant::now();
    let replayer = Running::start(
        builder(client, &id("replay"), dir.path())
            .start(start.clone())
            .build()?,
    );
    replayer.reach(head, "full replay").await?;
    let full = started.elapsed();
    let replayed = replayer.state.read(|s, _| lockstep::state_hash(s))?;
    replayer.stop().await?;

    // Bootstrap from the verified snapshot, then the tail.
    let started = Instant::now();
    let runtime = builder(client, &id("boot"), dir.path())
        .start(start)
        .bootstrap(Bootstrap::Verified)
        .build::<Tally>()?;
    let from = runtime.bootstrap_now().await?;
    anyhow::ensure!(
        from == Some(barrier),
        "bootstrapped at {from:?}, not {barrier}"
    );
    let booted = Running::start(runtime);
    booted.reach(head, "bootstrap").await?;
    let boot = started.elapsed();
    let bootstrapped = booted.state.read(|s, _| lockstep::state_hash(s))?;
    booted.stop().await?;
    let mut all: Vec<String> = seeds.to_vec();
    all.extend([id("replay"), id("boot")]);
    unsubscribe(client, &all).await;
    anyhow::ensure!(
        replayed == bootstrapped,
        "the bootstrapped replica's state differs from the replayed one"
    );
    let figures = BootstrapFigures {
        events: head - base,
        state_entries: options.keys.min(history),
        snapshot_bytes: verified.bytes,
        full_replay_seconds: full.as_secs_f64(),
        bootstrap_seconds: boot.as_secs_f64(),
        speedup: full.as_secs_f64() / boot.as_secs_f64(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "history of {} events, state of {} entries: full replay {:.2} s; bootstrap from the \
             verified snapshot ({} bytes) + tail of {} events {:.2} s ({:.1}x faster); same state hash",
            figures.events,
            figures.state_entries,
            figures.full_replay_seconds,
            figures.snapshot_bytes,
            options.tail,
            figures.bootstrap_seconds,
            figures.speedup
        );
    }
    Ok(())
}
