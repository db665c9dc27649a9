//! The smallest replica: counters per key, identical on every replica. With a broker running:
//! `cargo run --example counter -- c-1`, then `lockstep publish counter.incremented '{"by":5}' --key a`.
use std::collections::BTreeMap;

use lockstep::{ApplyError, EventMeta, Replica, Runtime};

#[derive(serde::Deserialize)]
#[serde(tag = "type", content = "data")]
enum Event {
    #[serde(rename = "counter.incremented")]
    Incremented { by: i64 },
}

struct Counters;

impl Replica for Counters {
    type State = BTreeMap<String, i64>; // BTreeMap: canonical bytes, so replicas hash alike
    type Event = Event;

    fn apply(state: &mut Self::State, event: Event, meta: &EventMeta) -> Result<(), ApplyError> {
        let Event::Incremented { by } = event;
        *state
            .entry(meta.key.clone().unwrap_or_default())
            .or_default() += by;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let id = std::env::args().nth(1).unwrap_or_else(|| "c-1".into());
    let runtime = Runtime::builder("http://127.0.0.1:7700")
        .service("counter")
        .replica(&id)
        .types(["counter.*"])
        .state_dir(format!("./counter-state/{id}"))
        .build::<Counters>()?;
    let state = runtime.state();
    let printer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            state.read(|counts, at| println!("at {at}: {counts:?}"));
        }
    });
    runtime
        .run(async { tokio::signal::ctrl_c().await.unwrap_or(()) })
        .await?;
    printer.abort();
    Ok(())
}
