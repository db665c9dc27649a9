//! `lockstep serve`: settings from flags, environment and a TOML file, then the broker library.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use lockstep_broker::{Broker, Config};
use tracing_subscriber::EnvFilter;

/// Flags of `lockstep serve`. Precedence: flag, then environment variable, then config file,
/// then the built-in default.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Data directory [default: ./lockstep-data]
    #[arg(long, env = "LOCKSTEP_DATA")]
    data: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7700]
    #[arg(long, env = "LOCKSTEP_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML config file (keys: data_dir, listen, max_body_bytes, cache_bytes, barrier_every,
    /// barrier_interval_ms, max_snapshot_bytes).
    #[arg(long, env = "LOCKSTEP_CONFIG")]
    config: Option<PathBuf>,
    /// Largest request body accepted, in bytes [default: 4194304]
    #[arg(long, env = "LOCKSTEP_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Append a barrier after this many events; 0 for never [default: 10000]
    #[arg(long, env = "LOCKSTEP_BARRIER_EVERY")]
    barrier_every: Option<u64>,
    /// Append a barrier this often (ms) while events arrive; 0 for never [default: 10000]
    #[arg(long, env = "LOCKSTEP_BARRIER_INTERVAL_MS")]
    barrier_interval_ms: Option<u64>,
}

impl ServeArgs {
    fn config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                Config::from_toml(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(data) = self.data {
            config.data_dir = data;
        }
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(max) = self.max_body_bytes {
            config.max_body_bytes = max;
        }
        if let Some(every) = self.barrier_every {
            config.barrier_every = every;
        }
        if let Some(interval) = self.barrier_interval_ms {
            config.barrier_interval_ms = interval;
        }
        Ok(config)
    }
}

/// Runs the broker until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let config = args.config()?;
    let listen = config.listen;
    let data_dir = config.data_dir.clone();
    let broker = Broker::open(config)
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "lockstep broker listening");
    lockstep_broker::serve(listener, broker, shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
