//! `lockstep rollback`, `rollbacks`, `pause`, `resume` and `redrive`: returning every replica to
//! a known-good position, and what goes with it.

use lockstep::{Client, RollbackTo};

/// `lockstep rollback`.
#[derive(clap::Args)]
pub struct RollbackArgs {
    /// A mark's name, or a position.
    #[arg(long)]
    to: String,
    /// Why, kept in the rollback record for the audit trail.
    #[arg(long)]
    reason: Option<String>,
}

/// `lockstep redrive`.
#[derive(clap::Args)]
pub struct RedriveArgs {
    /// First position to consider.
    #[arg(long)]
    from: u64,
    /// Last position to consider.
    #[arg(long)]
    to: u64,
    /// Ids of superseded events to leave out (repeat the flag for several).
    #[arg(long = "except", value_name = "ID")]
    except: Vec<String>,
}

/// Appends the rollback record and says what it superseded.
pub async fn rollback(url: &str, json: bool, args: RollbackArgs) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    let to = match args.to.parse::<u64>() {
        Ok(position) => RollbackTo::Position(position),
        Err(_) => RollbackTo::Mark(args.to.clone()),
    };
    let before = client.rollbacks().await?.superseded_events;
    let rollback = client.rollback(to, args.reason.as_deref()).await?;
    if json {
        println!("{}", serde_json::to_string(&rollback)?);
        return Ok(());
    }
    let after = client.rollbacks().await?.superseded_events;
    let mark = rollback
        .mark
        .as_deref()
        .map(|m| format!(" (mark {m})"))
        .unwrap_or_default();
    println!(
        "rolled back to position {}{mark}: record at {}, {} events superseded",
        rollback.target,
        rollback.position,
        after.saturating_sub(before)
    );
    Ok(())
}

/// Lists the rollbacks.
pub async fn list(url: &str, json: bool) -> anyhow::Result<()> {
    let list = Client::new(url)?.rollbacks().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:>10} {:>10}  {:<16} {:<25} REASON",
        "RECORD", "TARGET", "MARK", "TIME"
    );
    for r in &list.rollbacks {
        println!(
            "{:>10} {:>10}  {:<16} {:<25} {}",
            r.position,
            r.target,
            r.mark.as_deref().unwrap_or("-"),
            r.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            r.reason.as_deref().unwrap_or("")
        );
    }
    println!("{} events superseded in all", list.superseded_events);
    Ok(())
}

/// Pauses (`Some`) or resumes (`None`) publishing.
pub async fn pause(url: &str, json: bool, pause: Option<Option<String>>) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    let state = match pause {
        Some(reason) => client.pause(reason.as_deref()).await?,
        None => client.resume().await?,
    };
    if json {
        println!("{}", serde_json::to_string(&state)?);
    } else if state.paused {
        println!("publishing paused: publishes get 503 + Retry-After until `lockstep resume`");
    } else {
        println!("publishing resumed");
    }
    Ok(())
}

/// Publishes superseded events again.
pub async fn redrive(url: &str, json: bool, args: RedriveArgs) -> anyhow::Result<()> {
    let result = Client::new(url)?
        .redrive(args.from, args.to, args.except)
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    for r in &result.redriven {
        let note = if r.duplicate {
            "  (redriven before)"
        } else {
            ""
        };
        println!("{:>10} -> {:<10} {}{note}", r.original, r.position, r.id);
    }
    println!(
        "{} events redriven, {} left out",
        result.redriven.iter().filter(|r| !r.duplicate).count(),
        result.excepted
    );
    Ok(())
}
