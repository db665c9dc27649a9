//! `lockstep bench replay`: how fast a replica catches up, snapshots and restores.
//!
//! 1. A replica with a trivial apply (count events per key) catches up on a long log through the
//!    SDK runtime: stream, decode, apply, snapshots every 100,000 events.
//! 2. A state of `--entries` map entries: encoding plus blake3 (what a snapshot and a state-hash
//!    report cost), the durable write, and restoring (read, verify, decode).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lockstep::snapshot::SnapshotStore;
use lockstep::{ApplyError, Client, EventMeta, Replica, Runtime, decode_state, encode_state};
use serde::{Deserialize, Serialize};

/// Options of `lockstep bench replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// Events in the log the replica catches up on (published first if the log is shorter).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Entries in the state for the snapshot and restore figures.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
}

#[derive(Deserialize)]
#[serde(tag = "type", content = "data")]
enum BenchEvent {
    #[serde(rename = "bench.happened")]
    Happened {},
}

/// Counts events per key: as trivial as an apply gets.
struct Counting;

impl Replica for Counting {
    type State = BTreeMap<String, u64>;
    type Event = BenchEvent;

    fn apply(state: &mut Self::State, _: BenchEvent, meta: &EventMeta) -> Result<(), ApplyError> {
        *state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default() += 1;
        Ok(())
    }
}

#[derive(Serialize)]
struct ReplayFigures {
    events: u64,
    catch_up_seconds: f64,
    events_per_sec: f64,
    state_entries: u64,
    state_bytes: usize,
    encode_and_hash_ms: f64,
    snapshot_write_ms: f64,
    restore_ms: f64,
}

/// Runs the replay bench against the broker `client` talks to.
pub async fn run(client: &Client, options: &ReplayOptions, json: bool) -> anyhow::Result<()> {
    let head = client.head().await?.position;
    if head < options.events {
        let fill = Instant::now();
        super::fill_log(client, options.events - head, 200).await?;
        if !json {
            eprintln!(
                "filled the log to {} events in {:.1} s",
                options.events,
                fill.elapsed().as_secs_f64()
            );
        }
    }
    let head = client.head().await?.position;
    let dir = tempfile::tempdir().context("temporary state directory")?;
    let replica = format!("replay-{}", std::process::id());
    let runtime = Runtime::builder(client.url())
        .service("bench-replay")
        .replica(&replica)
        .types(["bench.*"])
        .state_dir(dir.path().join("replica"))
        .snapshot_every(100_000)
        .snapshot_interval(Duration::from_secs(3600))
        .check_determinism(false)
        .build::<Counting>()?;
    let state = runtime.state();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(runtime.run(async {
        let _ = stopped.await;
    }));
    while state.position() < head {
        if task.is_finished() {
            anyhow::bail!("the replica stopped before catching up");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let catch_up = started.elapsed();
    let _ = stop.send(());
    task.await.context("replica task")??;
    let _ = client.unsubscribe("bench-replay", &replica).await;

    // A state of `entries` entries, snapshotted and restored the way the runtime does.
    let big: BTreeMap<u64, u64> = (0..options.entries).map(|i| (i, i * 7)).collect();
    let t = Instant::now();
    let bytes = encode_state(&big)?;
    let hash = blake3::hash(&bytes);
    let encode_and_hash = t.elapsed();
    let store = SnapshotStore::open(&dir.path().join("big"))?;
    let t = Instant::now();
    store.save(options.entries, *hash.as_bytes(), &bytes, 1)?;
    let write = t.elapsed();
    let t = Instant::now();
    let snapshot = store
        .newest_valid()?
        .context("the snapshot just written is missing")?;
    let restored: BTreeMap<u64, u64> = decode_state(&snapshot.bytes)?;
    let restore = t.elapsed();
    anyhow::ensure!(
        restored.len() as u64 == options.entries,
        "restored the wrong state"
    );

    let figures = ReplayFigures {
        events: head,
        catch_up_seconds: catch_up.as_secs_f64(),
        events_per_sec: head as f64 / catch_up.as_secs_f64(),
        state_entries: options.entries,
        state_bytes: bytes.len(),
        encode_and_hash_ms: encode_and_hash.as_secs_f64() * 1e3,
        snapshot_write_ms: write.as_secs_f64() * 1e3,
        restore_ms: restore.as_secs_f64() * 1e3,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "catch-up: one replica applied {} events in {:.2} s = {:.0} events/s (floor 300000)",
            figures.events, figures.catch_up_seconds, figures.events_per_sec
        );
        println!(
            "state of {} entries ({} bytes): encode + blake3 {:.0} ms, durable snapshot write {:.0} ms, \
             restore (read + verify + decode) {:.0} ms (floor: each under 1000 ms)",
            figures.state_entries,
            figures.state_bytes,
            figures.encode_and_hash_ms,
            figures.snapshot_write_ms,
            figures.restore_ms
        );
    }
    Ok(())
}
