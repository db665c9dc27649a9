#![allow(clippy::unwrap_used, missing_docs)]
use chrono::{SecondsFormat, Utc};
use lockstep_e2e::TestBroker;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_future_longpoll() {
    let broker = TestBroker::start().await;
    broker.publish(&json!({"type": "x.y"})).await;
    let since = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Nanos, true);
    let b2 = broker.at("/v1/events");
    let s2 = since.clone();
    let reader = tokio::spawn(async move {
        reqwest::Client::new().get(b2).query(&[("since", s2.as_str()), ("wait_ms", "1500")]).send().await.unwrap().text().await.unwrap()
    });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    broker.publish(&json!({"type": "x.y"})).await;
    println!("since={since}\nlongpoll answer: {}", reader.await.unwrap());
    let r = reqwest::Client::new().get(broker.at("/v1/events")).query(&[("since", since.as_str())]).send().await.unwrap().text().await.unwrap();
    println!("plain answer: {r}");
    let raw = format!("{}/v1/events?since=2000-01-01T02:00:00+02:00", broker.url);
    let r = reqwest::get(raw).await.unwrap();
    println!("raw plus: {} {}", r.status(), r.text().await.unwrap());
    for q in ["limit=abc", "limit=-1", "after=-1", "since=", "types=", "types=a..b", "wait_ms=60001", "after=1&after=2"] {
        let r = reqwest::get(format!("{}/v1/events?{q}", broker.url)).await.unwrap();
        println!("{q}: {} {}", r.status(), r.text().await.unwrap());
    }
    for p in ["0", "-1", "abc", "99", "18446744073709551616"] {
        let r = reqwest::get(format!("{}/v1/events/{p}", broker.url)).await.unwrap();
        println!("/v1/events/{p}: {} {}", r.status(), r.text().await.unwrap());
    }
    let r = reqwest::Client::new().put(broker.at("/v1/events")).send().await.unwrap();
    println!("PUT: {} {}", r.status(), r.text().await.unwrap());
    let r = reqwest::Client::new().post(broker.at("/v1/events")).header("content-type","application/json").body(vec![b'x'; 5<<20]).send().await.unwrap();
    println!("5MiB: {} {}", r.status(), r.text().await.unwrap());
}
