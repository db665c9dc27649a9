//! `bank REPLICA_ID PORT [BROKER_URL]`: one replica of the account service. Its snapshots go to
//! `./bank-state/REPLICA_ID`, every `BANK_SNAPSHOT_EVERY` events (default 10,000) and at every
//! barrier, where they are also uploaded to the broker.
//!
//! `BANK_BOOTSTRAP=verified`: a replica without local state starts from the newest verified
//! snapshot instead of replaying the log. `BANK_MISAPPLY=TYPE`: fault injection, this replica
//! applies events of TYPE wrongly (to see `lockstep verify` catch it).

use anyhow::Context as _;
use lockstep::{Client, Runtime};
use lockstep_example_bank::{Bank, Service, misapply, router};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let replica = args.next().unwrap_or_else(|| "bank-1".into());
    let port: u16 = args
        .next()
        .map_or(Ok(8081), |p| p.parse())
        .context("PORT")?;
    let broker = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:7700".into());
    let runtime = Runtime::builder(&broker)
        .service("bank")
        .replica(&replica)
        .types(["account.*", "funds.*"])
        .state_dir(format!("./bank-state/{replica}"))
        .snapshot_every(
            std::env::var("BANK_SNAPSHOT_EVERY")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(10_000),
        )
        .upload_snapshots(true)
        .build::<Bank>()?;
    if let Ok(event_type) = std::env::var("BANK_MISAPPLY") {
        eprintln!("fault injection: applying {event_type} wrongly");
        misapply(&event_type);
    }
    if std::env::var("BANK_BOOTSTRAP").as_deref() == Ok("verified")
        && runtime.state().position() == 0
    {
        match runtime.bootstrap_now().await {
            Ok(Some(_)) => {}
            Ok(None) => eprintln!("no verified snapshot yet: replaying the log"),
            Err(e) => eprintln!("verified snapshot refused ({e}): replaying the log"),
        }
    }
    let service = Service {
        client: Client::new(&broker)?,
        state: runtime.state(),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "bank replica {replica} on http://127.0.0.1:{port}, broker {broker}, restored at position {}",
        runtime.state().position()
    );
    let app = tokio::spawn(async move { axum::serve(listener, router(service)).await });
    runtime
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    app.abort();
    Ok(())
}
