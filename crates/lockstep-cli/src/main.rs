//! `lockstep`: runs the broker (`serve`) and drives it from a terminal.
//!
//! A thin binary: it parses flags, sets up tracing and calls the libraries. Every client command
//! finds the broker by `--url` (env `LOCKSTEP_URL`, default `http://127.0.0.1:7700`) and prints
//! JSON with `--json`. Errors print one line and exit non-zero.

mod bench;
mod client_cmds;
mod rollback;
mod serve;
mod subs;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Where client commands look for the broker when neither `--url` nor `LOCKSTEP_URL` is set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7700";

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Lockstep: a durable, ordered event log that keeps replicas in step"
)]
struct Cli {
    /// Broker URL for client commands [default: http://127.0.0.1:7700]
    #[arg(long, global = true, env = "LOCKSTEP_URL")]
    url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Publish one event, or a JSON file of events.
    Publish(client_cmds::PublishArgs),
    /// Print events from the log, optionally following new ones.
    Tail(client_cmds::TailArgs),
    /// Print the log's head: last position, its hash and time.
    Head,
    /// Subscriptions: list (default), add, rm, show.
    Subs(subs::SubsArgs),
    /// Whether every service's replicas hold the same state; exits 1 on divergence, 2 on an
    /// error such as an unreachable broker.
    Verify {
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Also name the keys whose values differ, and the events that touched them.
        #[arg(long)]
        explain: bool,
    },
    /// Append a barrier now: every replica reports its state hash there.
    Barrier,
    /// One screen for an operator: head, subscriptions and lag, verification, marks.
    Status,
    /// Named, immutable positions ("known good"): create, ls, rm.
    #[command(subcommand)]
    Mark(verify::MarkCommand),
    /// Return every replica to a mark or position; the events after it are superseded.
    Rollback(rollback::RollbackArgs),
    /// List the rollbacks and how many events they superseded.
    Rollbacks,
    /// Make publishes wait (503 + Retry-After), e.g. around a rollback.
    Pause {
        /// Why, shown to publishers.
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a pause.
    Resume,
    /// Publish superseded events again, as new events at the head.
    Redrive(rollback::RedriveArgs),
    /// Measure the broker: publish throughput and latency, catch-up reads, subscription fan-out.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let url = cli.url.clone();
    let client_url = || url.clone().unwrap_or_else(|| DEFAULT_URL.to_owned());
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Publish(args) => client_cmds::publish(&client_url(), cli.json, args).await,
            Command::Tail(args) => client_cmds::tail(&client_url(), cli.json, args).await,
            Command::Head => client_cmds::head(&client_url(), cli.json).await,
            Command::Subs(args) => subs::run(&client_url(), cli.json, args).await,
            Command::Verify { service, explain } => {
                verify::verify(&client_url(), cli.json, service.as_deref(), explain).await
            }
            Command::Barrier => verify::barrier(&client_url(), cli.json).await,
            Command::Status => verify::status(&client_url(), cli.json).await,
            Command::Mark(command) => verify::mark(&client_url(), cli.json, command).await,
            Command::Rollback(args) => rollback::rollback(&client_url(), cli.json, args).await,
            Command::Rollbacks => rollback::list(&client_url(), cli.json).await,
            Command::Pause { reason } => {
                rollback::pause(&client_url(), cli.json, Some(reason)).await
            }
            Command::Resume => rollback::pause(&client_url(), cli.json, None).await,
            Command::Redrive(args) => rollback::redrive(&client_url(), cli.json, args).await,
            Command::Bench(command) => bench::run(cli.url.as_deref(), cli.json, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // 1 means "the replicas diverged", a finding; 2 means the command failed.
        Err(e) if e.downcast_ref::<verify::Diverged>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
