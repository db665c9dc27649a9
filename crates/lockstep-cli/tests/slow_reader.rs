//! A pull subscriber that reads its stream at about one event per second, while 100,000 events are
//! published: the broker holds at most a page for it, so its memory stays bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::BrokerProcess;
use lockstep::{Client, NewEvent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_reader_does_not_grow_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let pid = broker.child.id();
    let client = Client::new(&broker.url).unwrap();
    let spec = serde_json::from_value(serde_json::json!({
        "service": "slow", "replica": "r1", "types": ["*"], "start": "beginning"
    }))
    .unwrap();
    client.subscribe(&spec, false).await.unwrap();

    // A raw connection lets the test read as slowly as it likes: about one event's worth of
    // bytes per second, so TCP back-pressure reaches the broker.
    let addr = broker.url.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(
            format!("GET /v1/subscriptions/slow/r1/stream HTTP/1.1\r\nHost: {addr}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 400];
        let mut total = 0;
        let stop = Instant::now() + Duration::from_secs(12);
        while Instant::now() < stop {
            total += socket.read(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        total
    });

    let before = rss_mib(pid);
    let event = NewEvent::json(
        "load.generated",
        &serde_json::json!({"pad": "x".repeat(180)}),
    )
    .unwrap();
    for _ in 0..100 {
        client.publish(&vec![event.clone(); 1000]).await.unwrap();
    }
    assert_eq!(client.head().await.unwrap().position, 100_000);
    let mut peak = rss_mib(pid);
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read = reader.await.unwrap();
    println!(
        "broker RSS: {before:.0} MiB before, {peak:.0} MiB at most after publishing 100k events \
         with a reader that took {read} bytes of its stream"
    );
    // The log is ~35 MB; the broker's page cache is capped at 64 MiB and a stream holds one
    // page of at most 1,000 events, so anything near the log's size would mean it buffered.
    assert!(read < 100_000, "the reader really was slow ({read} bytes)");
    assert!(
        peak < before + 120.0,
        "broker grew from {before:.0} to {peak:.0} MiB"
    );
    let info = client.subscription("slow", "r1").await.unwrap();
    assert_eq!(info.position, 0, "nothing was acknowledged");
    broker.terminate();
}
