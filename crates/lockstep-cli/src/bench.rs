//! `lockstep bench`: benchmark programs that print figures.
//!
//! Without `--url` each bench starts its own broker on a temporary directory, in this process but
//! on its own runtime threads, so client and broker share the machine as they would on one host.
//! Every publish is durable (fsynced before it is acknowledged), exactly as in production.

mod consistency;
mod fanout;
mod replay;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use fanout::FanoutOptions;
use lockstep::{Client, NewEvent, ReadRequest};
use serde::Serialize;
use serde_json::value::RawValue;

/// The benchmarks.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Publish throughput and latency: single events at 1/16/64 clients, batches of 100 and 1000.
    Publish {
        /// Seconds per scenario.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Bytes of JSON data per event.
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Run one scenario with this many concurrent clients instead of the standard set.
        #[arg(long, requires = "batch")]
        clients: Option<usize>,
        /// Events per request of that one scenario.
        #[arg(long, requires = "clients")]
        batch: Option<usize>,
    },
    /// SDK publisher throughput: many tasks each publishing single events through one
    /// `lockstep::Publisher`, which batches them; every event acknowledged durably.
    SdkPublish {
        /// Seconds to run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Bytes of JSON data per event.
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Concurrent publishing tasks.
        #[arg(long, default_value_t = 256)]
        tasks: usize,
        /// Requests the publisher keeps in flight.
        #[arg(long, default_value_t = lockstep::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
    },
    /// Catch-up reads: events/s reading a long log from the beginning, with memory samples.
    Read {
        /// Events in the log (published first if the log is shorter).
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Bytes of JSON data per event.
        #[arg(long, default_value_t = 200)]
        payload: usize,
        /// Events per read request.
        #[arg(long, default_value_t = 10_000)]
        page: usize,
    },
    /// Subscription fan-out: delivery latency to streaming subscribers at a steady publish
    /// rate, then catch-up throughput of fresh subscribers reading a long log.
    Fanout {
        /// Seconds of steady publishing for the latency part.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Events per second published in the latency part (single-event publishes).
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Events published before the throughput part.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Subscribers in each part.
        #[arg(long, default_value_t = 3)]
        subscribers: usize,
        /// Bytes of JSON data per event.
        #[arg(long, default_value_t = 200)]
        payload: usize,
    },
    /// Replica catch-up through the SDK runtime, and snapshot/restore of a large state.
    Replay(replay::ReplayOptions),
    /// Three replicas rolling back to a mark over many superseded events.
    Rollback(consistency::RollbackOptions),
    /// A new replica bootstrapping from the verified snapshot vs replaying the whole history.
    Bootstrap(consistency::BootstrapOptions),
}

/// Runs a benchmark against `url`, or against an embedded broker when `url` is `None`.
pub async fn run(url: Option<&str>, json: bool, command: BenchCommand) -> anyhow::Result<()> {
    let (embedded, url) = match url {
        Some(url) => (None, url.to_owned()),
        None => {
            let embedded = Embedded::start()?;
            let url = embedded.url.clone();
            (Some(embedded), url)
        }
    };
    if !json {
        match &embedded {
            Some(e) => eprintln!(
                "embedded broker at {url}, data in {}",
                e.dir.path().display()
            ),
            None => eprintln!("broker at {url}"),
        }
    }
    let client = Client::new(&url)?;
    client
        .head()
        .await
        .with_context(|| format!("no broker answers at {url}"))?;
    match command {
        BenchCommand::Publish {
            seconds,
            payload,
            clients,
            batch,
        } => {
            let scenarios = match (clients, batch) {
                (Some(clients), Some(batch)) => vec![(clients.max(1), batch.max(1))],
                _ => STANDARD_SCENARIOS.to_vec(),
            };
            publish_bench(
                &client,
                &scenarios,
                Duration::from_secs(seconds),
                payload,
                json,
            )
            .await
        }
        BenchCommand::SdkPublish {
            seconds,
            payload,
            tasks,
            max_in_flight,
        } => {
            let publisher = lockstep::Publisher::builder(client.clone())
                .max_in_flight(max_in_flight)
                .build();
            let figures = sdk_publish_scenario(
                &publisher,
                tasks.max(1),
                Duration::from_secs(seconds),
                payload,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&figures)?);
            } else {
                println!(
                    "{:<28} {:>8} {:>12} {:>10} {:>10}",
                    "scenario", "events", "events/s", "p50 ms", "p99 ms"
                );
                println!(
                    "{:<28} {:>8} {:>12.0} {:>10.2} {:>10.2}",
                    figures.scenario,
                    figures.events,
                    figures.events_per_sec,
                    figures.p50_ms,
                    figures.p99_ms
                );
            }
            Ok(())
        }
        BenchCommand::Read {
            events,
            payload,
            page,
        } => read_bench(&client, events, payload, page, json).await,
        BenchCommand::Fanout {
            seconds,
            rate,
            events,
            subscribers,
            payload,
        } => {
            let options = FanoutOptions {
                duration: Duration::from_secs(seconds),
                rate: rate.max(1),
                events,
                subscribers: subscribers.max(1),
                payload,
            };
            fanout::run(&client, &options, json).await
        }
        BenchCommand::Replay(options) => replay::run(&client, &options, json).await,
        BenchCommand::Rollback(options) => consistency::rollback(&client, &options, json).await,
        BenchCommand::Bootstrap(options) => consistency::bootstrap(&client, &options, json).await,
    }
}

/// A broker on a temporary directory, served by its own runtime threads.
struct Embedded {
    url: String,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Embedded {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a temporary data directory")?;
        let broker =
            lockstep_broker::Broker::open(lockstep_broker::Config::with_data_dir(dir.path()))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("broker")
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let _ = lockstep_broker::serve(listener, broker, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Ok(Self {
            url,
            dir,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sample_event(payload: usize) -> anyhow::Result<NewEvent> {
    // {"pad":"xxxx"} is 10 bytes of framing around the padding.
    let pad = "x".repeat(payload.saturating_sub(10));
    let data = RawValue::from_string(format!("{{\"pad\":\"{pad}\"}}"))?;
    Ok(NewEvent {
        event_type: "bench.happened".into(),
        source: Some("bench".into()),
        data: Some(data),
        ..NewEvent::default()
    })
}

#[derive(Serialize)]
struct PublishFigures {
    scenario: String,
    clients: usize,
    batch: usize,
    events: u64,
    events_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// (clients, events per request) of `lockstep bench publish`.
const STANDARD_SCENARIOS: [(usize, usize); 5] = [(1, 1), (16, 1), (64, 1), (16, 100), (8, 1000)];

async fn publish_bench(
    client: &Client,
    scenarios: &[(usize, usize)],
    duration: Duration,
    payload: usize,
    json: bool,
) -> anyhow::Result<()> {
    if !json {
        println!(
            "{:<28} {:>8} {:>12} {:>10} {:>10}",
            "scenario", "events", "events/s", "p50 ms", "p99 ms"
        );
    }
    let mut all = Vec::new();
    for &(clients, batch) in scenarios {
        let figures = publish_scenario(client, clients, batch, duration, payload).await?;
        if !json {
            println!(
                "{:<28} {:>8} {:>12.0} {:>10.2} {:>10.2}",
                figures.scenario,
                figures.events,
                figures.events_per_sec,
                figures.p50_ms,
                figures.p99_ms
            );
        }
        all.push(figures);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

async fn publish_scenario(
    client: &Client,
    clients: usize,
    batch: usize,
    duration: Duration,
    payload: usize,
) -> anyhow::Result<PublishFigures> {
    let events: Vec<NewEvent> = vec![sample_event(payload)?; batch];
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, events) = (client.clone(), events.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                client.publish(&events).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let latencies = gather_latencies(tasks).await?;
    let elapsed = started.elapsed();
    let events = (latencies.len() * batch) as u64;
    let scenario = if batch == 1 {
        format!("single, {clients} clients")
    } else {
        format!("batch {batch}, {clients} clients")
    };
    Ok(PublishFigures {
        scenario,
        clients,
        batch,
        events,
        events_per_sec: events as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}

/// Single events from `tasks` tasks through one batching publisher; latency is per event.
async fn sdk_publish_scenario(
    publisher: &lockstep::Publisher,
    tasks: usize,
    duration: Duration,
    payload: usize,
) -> anyhow::Result<PublishFigures> {
    let event = sample_event(payload)?;
    let started = Instant::now();
    let deadline = started + duration;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (publisher, event) = (publisher.clone(), event.clone());
        set.spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                publisher.publish(event.clone()).await?;
                latencies.push(sent.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let latencies = gather_latencies(set).await?;
    let elapsed = started.elapsed();
    let events = latencies.len() as u64;
    Ok(PublishFigures {
        scenario: format!("sdk publisher, {tasks} tasks"),
        clients: tasks,
        batch: 1,
        events,
        events_per_sec: events as f64 / elapsed.as_secs_f64(),
        p50_ms: percentile_ms(&latencies, 0.50),
        p99_ms: percentile_ms(&latencies, 0.99),
    })
}

/// Every task's request latencies, sorted.
async fn gather_latencies(
    mut tasks: tokio::task::JoinSet<anyhow::Result<Vec<Duration>>>,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    latencies.sort_unstable();
    Ok(latencies)
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

#[derive(Serialize)]
struct ReadFigures {
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    mib_per_sec: f64,
    rss_mib_samples: Vec<f64>,
}

async fn read_bench(
    client: &Client,
    events: u64,
    payload: usize,
    page: usize,
    json: bool,
) -> anyhow::Result<()> {
    let head = client.head().await?.position;
    if head < events {
        let fill = Instant::now();
        fill_log(client, events - head, payload).await?;
        if !json {
            eprintln!(
                "filled the log to {events} events in {:.1} s",
                fill.elapsed().as_secs_f64()
            );
        }
    }
    let started = Instant::now();
    let mut pages = client.pages(ReadRequest::after(0).limit(page));
    let mut read = 0u64;
    let mut bytes = 0usize;
    let mut rss = vec![rss_mib()];
    let sample_every = (events / 10).max(1);
    while let Some(response) = pages.next().await {
        let response = response?;
        for event in &response.events {
            bytes += event.data.as_ref().map_or(0, |d| d.get().len()) + 200;
        }
        let before = read;
        read += response.events.len() as u64;
        if read / sample_every != before / sample_every {
            rss.push(rss_mib());
        }
        if read >= events {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let figures = ReadFigures {
        events: read,
        seconds,
        events_per_sec: read as f64 / seconds,
        mib_per_sec: bytes as f64 / seconds / (1 << 20) as f64,
        rss_mib_samples: rss,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        println!(
            "catch-up read: {} events in {:.2} s = {:.0} events/s (~{:.0} MiB/s of JSON), pages of {page}",
            figures.events, figures.seconds, figures.events_per_sec, figures.mib_per_sec
        );
        let samples: Vec<String> = figures
            .rss_mib_samples
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect();
        println!(
            "RSS of this process (the broker too when embedded) while reading, MiB, every 10%: {}",
            samples.join(" ")
        );
    }
    Ok(())
}

pub(crate) async fn fill_log(client: &Client, count: u64, payload: usize) -> anyhow::Result<()> {
    const BATCH: u64 = 1000;
    const WRITERS: u64 = 4;
    let event = sample_event(payload)?;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (client, event) = (client.clone(), event.clone());
        let share = count / WRITERS + u64::from(w < count % WRITERS);
        tasks.spawn(async move {
            let mut left = share;
            while left > 0 {
                let n = left.min(BATCH);
                client.publish(&vec![event.clone(); n as usize]).await?;
                left -= n;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Resident memory of this process in MiB (Linux), 0 where unknown.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
