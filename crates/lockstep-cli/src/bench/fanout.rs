//! `lockstep bench fanout`: subscription delivery through streams.
//!
//! Latency: pull subscriptions from "now", each read by a task holding a stream; a publisher
//! publishes single events at a steady rate. An event's latency is the instant a subscriber
//! received it minus the instant its publish was acknowledged. The broker makes an event
//! readable when it commits, and the acknowledgement travels back to the publisher at the same
//! time as the event travels to the subscribers, so a subscriber can receive an event before its
//! publisher hears the ack: those deliveries count as 0 ms and are reported as raced. The
//! latency from the publish request being sent is reported too, as an upper bound.
//!
//! Throughput: the log is filled first, then fresh subscriptions from "beginning" read it
//! concurrently through streams at full speed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lockstep::{Client, ClientError, Start, StartName, StreamItem, SubscriptionSpec};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use super::{fill_log, percentile_ms, sample_event};

/// The service the bench's subscriptions belong to.
const SERVICE: &str = "bench-fanout";
/// Floor for the latency part: p99 from publish ack to delivery, at 1,000 events/s.
const FLOOR_P99_MS: f64 = 10.0;
/// Floor for the throughput part, per subscriber.
const FLOOR_EVENTS_PER_SEC: f64 = 150_000.0;
/// Subscribers ack this often...
const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// ...or after this many events, whichever comes first.
const ACK_EVERY_EVENTS: u64 = 1000;
/// Most publishes in flight at once in the latency part; ticks beyond it are skipped (and
/// counted), so a stalled broker cannot grow the bench's memory.
const MAX_PUBLISHES_IN_FLIGHT: usize = 1024;
/// How long subscribers may take, after the last publish is acknowledged, to receive it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Parameters of `lockstep bench fanout`.
pub struct FanoutOptions {
    /// Steady publishing time of the latency part.
    pub duration: Duration,
    /// Events per second of the latency part.
    pub rate: u64,
    /// Events published before the throughput part.
    pub events: u64,
    /// Subscribers per part.
    pub subscribers: usize,
    /// Bytes of JSON data per event.
    pub payload: usize,
}

#[derive(Serialize)]
struct LatencyRow {
    subscriber: String,
    delivered: u64,
    missing: u64,
    raced: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Serialize)]
struct LatencyFigures {
    rate: u64,
    seconds: f64,
    published: u64,
    skipped_ticks: u64,
    /// From publish acknowledged to received, per subscriber and `all`.
    from_ack: Vec<LatencyRow>,
    /// From publish request sent to received, all subscribers.
    from_send: LatencyRow,
    floor_p99_ms: f64,
}

#[derive(Serialize)]
struct ThroughputRow {
    subscriber: String,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
}

#[derive(Serialize)]
struct ThroughputFigures {
    log_events: u64,
    subscribers: Vec<ThroughputRow>,
    total_events: u64,
    total_seconds: f64,
    total_events_per_sec: f64,
    floor_events_per_sec_per_subscriber: f64,
}

#[derive(Serialize)]
struct FanoutFigures {
    latency: LatencyFigures,
    throughput: ThroughputFigures,
}

/// Runs both parts and prints their figures.
pub async fn run(client: &Client, options: &FanoutOptions, json: bool) -> anyhow::Result<()> {
    let latency = latency(client, options, json).await?;
    if !json {
        print_latency(&latency);
    }
    let throughput = throughput(client, options, json).await?;
    if json {
        let figures = FanoutFigures {
            latency,
            throughput,
        };
        println!("{}", serde_json::to_string_pretty(&figures)?);
    } else {
        print_throughput(&throughput);
    }
    Ok(())
}

/// A fresh pull subscription to everything from `start`, replacing any left by an earlier run.
async fn fresh_subscription(
    client: &Client,
    replica: &str,
    start: StartName,
) -> anyhow::Result<()> {
    match client.unsubscribe(SERVICE, replica).await {
        Ok(()) => {}
        Err(ClientError::Api { status: 404, .. }) => {}
        Err(e) => return Err(e).context(format!("removing {SERVICE}/{replica}")),
    }
    let spec = SubscriptionSpec {
        service: SERVICE.into(),
        replica: replica.into(),
        types: vec!["*".into()],
        start: Start::Named(start),
        end: None,
        push_url: None,
        push_format: None,
    };
    client
        .subscribe(&spec, true)
        .await
        .with_context(|| format!("subscribing {SERVICE}/{replica}"))?;
    Ok(())
}

async fn remove_subscriptions(client: &Client, replicas: &[String]) -> anyhow::Result<()> {
    for replica in replicas {
        client
            .unsubscribe(SERVICE, replica)
            .await
            .with_context(|| format!("removing {SERVICE}/{replica}"))?;
    }
    Ok(())
}

/// What one subscriber received.
struct Received {
    /// (position, instant received) of every event, when recording.
    arrivals: Vec<(u64, Instant)>,
    events: u64,
    /// From the stream being opened to the target position being received.
    elapsed: Duration,
}

/// Reads `replica`'s stream until `target` (unknown: `u64::MAX`) is received, acking every
/// [`ACK_INTERVAL`] or [`ACK_EVERY_EVENTS`] from a task of its own so that acking never holds up
/// reading.
async fn consume(
    client: Client,
    replica: String,
    mut target: watch::Receiver<u64>,
    record: bool,
) -> anyhow::Result<Received> {
    let name = format!("{SERVICE}/{replica}");
    let opened = Instant::now();
    let mut stream = client
        .stream(SERVICE, &replica, None)
        .await
        .with_context(|| format!("opening the stream of {name}"))?;
    let (latest, latest_rx) = watch::channel(0u64);
    let kick = Arc::new(Notify::new());
    let acker = tokio::spawn(ack_loop(
        client.clone(),
        replica.clone(),
        latest_rx,
        Arc::clone(&kick),
    ));
    let mut arrivals = Vec::new();
    let mut events = 0u64;
    let mut last = 0u64;
    loop {
        if last >= *target.borrow() {
            break;
        }
        tokio::select! {
            item = stream.next() => {
                let item = match item {
                    Some(item) => item.with_context(|| format!("reading the stream of {name}"))?,
                    None => bail!("the stream of {name} ended at position {last}"),
                };
                if let StreamItem::Event(event) = item {
                    if record {
                        arrivals.push((event.position, Instant::now()));
                    }
                    events += 1;
                    last = event.position;
                    latest.send_replace(last);
                    if events % ACK_EVERY_EVENTS == 0 {
                        kick.notify_one();
                    }
                }
            }
            changed = target.changed() => {
                if changed.is_err() {
                    bail!("the bench stopped before {name} received everything");
                }
            }
        }
    }
    let elapsed = opened.elapsed();
    if acker.is_finished() {
        acker.await??;
    } else {
        acker.abort();
    }
    client
        .ack(SERVICE, &replica, last)
        .await
        .with_context(|| format!("acking {name}"))?;
    Ok(Received {
        arrivals,
        events,
        elapsed,
    })
}

/// Acks the latest received position every [`ACK_INTERVAL`] or when kicked. Ends only on error.
async fn ack_loop(
    client: Client,
    replica: String,
    latest: watch::Receiver<u64>,
    kick: Arc<Notify>,
) -> anyhow::Result<()> {
    let mut acked = 0;
    let mut interval = tokio::time::interval(ACK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = kick.notified() => {}
        }
        let position = *latest.borrow();
        if position > acked {
            acked = client
                .ack(SERVICE, &replica, position)
                .await
                .with_context(|| format!("acking {SERVICE}/{replica}"))?;
        }
    }
}

async fn join_consumers(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Received>>>,
) -> anyhow::Result<Vec<Received>> {
    let mut received = Vec::new();
    for task in tasks {
        received.push(task.await.context("subscriber task failed")??);
    }
    Ok(received)
}

async fn latency(
    client: &Client,
    options: &FanoutOptions,
    json: bool,
) -> anyhow::Result<LatencyFigures> {
    let replicas: Vec<String> = (1..=options.subscribers).map(|i| format!("r{i}")).collect();
    for replica in &replicas {
        fresh_subscription(client, replica, StartName::Now).await?;
    }
    let (target_tx, target_rx) = watch::channel(u64::MAX);
    let consumers: Vec<_> = replicas
        .iter()
        .map(|replica| {
            tokio::spawn(consume(
                client.clone(),
                replica.clone(),
                target_rx.clone(),
                true,
            ))
        })
        .collect();
    if !json {
        eprintln!(
            "latency: {} streaming subscribers, publishing {} events/s for {} s",
            options.subscribers,
            options.rate,
            options.duration.as_secs()
        );
    }

    let event = sample_event(options.payload)?;
    // position -> (publish sent, publish acknowledged)
    let mut published: HashMap<u64, (Instant, Instant)> = HashMap::new();
    let mut in_flight = tokio::task::JoinSet::new();
    let mut skipped_ticks = 0u64;
    let period = Duration::from_secs_f64(1.0 / options.rate as f64);
    let total = options.rate * options.duration.as_secs().max(1);
    let started = Instant::now();
    let mut interval = tokio::time::interval(period);
    let mut ticks = 0u64;
    while ticks < total || !in_flight.is_empty() {
        tokio::select! {
            _ = interval.tick(), if ticks < total => {
                ticks += 1;
                if in_flight.len() >= MAX_PUBLISHES_IN_FLIGHT {
                    skipped_ticks += 1;
                    continue;
                }
                let (client, event) = (client.clone(), event.clone());
                in_flight.spawn(async move {
                    let sent = Instant::now();
                    let ack = client.publish_one(&event).await?;
                    anyhow::Ok((ack.position, sent, Instant::now()))
                });
            }
            Some(done) = in_flight.join_next() => {
                let (position, sent, acked) = done.context("publish task failed")??;
                published.insert(position, (sent, acked));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let last = published.keys().copied().max().unwrap_or(0);
    let _ = target_tx.send(last);
    let received = tokio::time::timeout(DRAIN_TIMEOUT, join_consumers(consumers))
        .await
        .with_context(|| {
            format!("subscribers did not receive position {last} within {DRAIN_TIMEOUT:?}")
        })??;
    remove_subscriptions(client, &replicas).await?;

    let mut all_from_ack = Vec::new();
    let mut all_from_send = Vec::new();
    let mut from_ack = Vec::new();
    let (mut all_delivered, mut all_missing, mut all_raced) = (0, 0, 0);
    for (replica, got) in replicas.iter().zip(&received) {
        let mut seen = 0u64;
        let mut raced = 0u64;
        let mut lat = Vec::with_capacity(got.arrivals.len());
        for &(position, at) in &got.arrivals {
            let Some(&(sent, acked)) = published.get(&position) else {
                continue; // someone else's event (a shared broker)
            };
            seen += 1;
            if at < acked {
                raced += 1;
            }
            lat.push(at.saturating_duration_since(acked));
            all_from_send.push(at.saturating_duration_since(sent));
        }
        let missing = (published.len() as u64).saturating_sub(seen);
        all_delivered += seen;
        all_missing += missing;
        all_raced += raced;
        all_from_ack.extend_from_slice(&lat);
        from_ack.push(latency_row(replica, seen, missing, raced, &mut lat));
    }
    from_ack.push(latency_row(
        "all",
        all_delivered,
        all_missing,
        all_raced,
        &mut all_from_ack,
    ));
    let from_send = latency_row("all", all_delivered, all_missing, 0, &mut all_from_send);
    Ok(LatencyFigures {
        rate: options.rate,
        seconds,
        published: published.len() as u64,
        skipped_ticks,
        from_ack,
        from_send,
        floor_p99_ms: FLOOR_P99_MS,
    })
}

fn latency_row(
    subscriber: &str,
    delivered: u64,
    missing: u64,
    raced: u64,
    latencies: &mut [Duration],
) -> LatencyRow {
    latencies.sort_unstable();
    LatencyRow {
        subscriber: subscriber.to_owned(),
        delivered,
        missing,
        raced,
        p50_ms: percentile_ms(latencies, 0.50),
        p99_ms: percentile_ms(latencies, 0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    }
}

fn print_latency(f: &LatencyFigures) {
    println!(
        "fan-out latency: {} events published at {} events/s in {:.1} s (single-event publishes{})",
        f.published,
        f.rate,
        f.seconds,
        if f.skipped_ticks > 0 {
            format!(
                ", {} ticks skipped: too many publishes in flight",
                f.skipped_ticks
            )
        } else {
            String::new()
        }
    );
    println!(
        "{:<34} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "subscriber", "delivered", "missing", "raced", "p50 ms", "p99 ms", "max ms"
    );
    let rows = f
        .from_ack
        .iter()
        .map(|r| (format!("{} (publish ack → received)", r.subscriber), r))
        .chain(std::iter::once((
            "all (publish sent → received)".to_owned(),
            &f.from_send,
        )));
    for (label, r) in rows {
        println!(
            "{label:<34} {:>9} {:>7} {:>7} {:>9.2} {:>9.2} {:>9.2}",
            r.delivered, r.missing, r.raced, r.p50_ms, r.p99_ms, r.max_ms
        );
    }
    let all = f.from_ack.last();
    let p99 = all.map_or(0.0, |r| r.p99_ms);
    println!(
        "floor: p99 < {:.0} ms at 1000 events/s; measured p99 {p99:.2} ms: {}",
        f.floor_p99_ms,
        if p99 < f.floor_p99_ms {
            "met"
        } else {
            "NOT met"
        }
    );
    if let Some(all) = all {
        println!(
            "raced: {} of {} deliveries arrived before their publisher had the ack (counted as 0 ms)",
            all.raced, all.delivered
        );
    }
    println!();
}

async fn throughput(
    client: &Client,
    options: &FanoutOptions,
    json: bool,
) -> anyhow::Result<ThroughputFigures> {
    let fill = Instant::now();
    fill_log(client, options.events, options.payload).await?;
    let head = client.head().await?.position;
    if !json {
        eprintln!(
            "throughput: published {} events in {:.1} s; log head {head}; {} fresh subscribers \
             from the beginning",
            options.events,
            fill.elapsed().as_secs_f64(),
            options.subscribers
        );
    }
    let replicas: Vec<String> = (1..=options.subscribers).map(|i| format!("t{i}")).collect();
    for replica in &replicas {
        fresh_subscription(client, replica, StartName::Beginning).await?;
    }
    let (_target_tx, target_rx) = watch::channel(head);
    let started = Instant::now();
    let consumers: Vec<_> = replicas
        .iter()
        .map(|replica| {
            tokio::spawn(consume(
                client.clone(),
                replica.clone(),
                target_rx.clone(),
                false,
            ))
        })
        .collect();
    let received = join_consumers(consumers).await?;
    let total_seconds = started.elapsed().as_secs_f64();
    remove_subscriptions(client, &replicas).await?;
    let subscribers: Vec<ThroughputRow> = replicas
        .iter()
        .zip(&received)
        .map(|(replica, got)| {
            let seconds = got.elapsed.as_secs_f64();
            ThroughputRow {
                subscriber: replica.clone(),
                events: got.events,
                seconds,
                events_per_sec: got.events as f64 / seconds,
            }
        })
        .collect();
    let total_events = subscribers.iter().map(|r| r.events).sum();
    Ok(ThroughputFigures {
        log_events: head,
        subscribers,
        total_events,
        total_seconds,
        total_events_per_sec: total_events as f64 / total_seconds,
        floor_events_per_sec_per_subscriber: FLOOR_EVENTS_PER_SEC,
    })
}

fn print_throughput(f: &ThroughputFigures) {
    println!(
        "fan-out throughput: {} subscribers streaming a {}-event log from the beginning",
        f.subscribers.len(),
        f.log_events
    );
    println!(
        "{:<12} {:>10} {:>9} {:>12}",
        "subscriber", "events", "seconds", "events/s"
    );
    for r in &f.subscribers {
        println!(
            "{:<12} {:>10} {:>9.2} {:>12.0}",
            r.subscriber, r.events, r.seconds, r.events_per_sec
        );
    }
    println!(
        "{:<12} {:>10} {:>9.2} {:>12.0}",
        "total", f.total_events, f.total_seconds, f.total_events_per_sec
    );
    let slowest = f
        .subscribers
        .iter()
        .map(|r| r.events_per_sec)
        .fold(f64::INFINITY, f64::min);
    println!(
        "floor: ≥ {:.0} events/s per subscriber; slowest {slowest:.0}: {}",
        f.floor_events_per_sec_per_subscriber,
        if slowest >= f.floor_events_per_sec_per_subscriber {
            "met"
        } else {
            "NOT met"
        }
    );
}
