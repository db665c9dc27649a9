//! `bank REPLICA_ID PORT [BROKER_URL]`: one replica of the account service. Its snapshots go to
//! `./bank-state/REPLICA_ID`, every `BANK_SNAPSHOT_EVERY` events (default 10,000).

use anyhow::Context as _;
use lockstep::{Client, Runtime};
use lockstep_example_bank::{Bank, Service, router};

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
        .build::<Bank>()?;
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
