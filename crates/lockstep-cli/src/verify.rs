//! `lockstep verify` and `lockstep barrier`: are the replicas in step?

use lockstep::{Client, MarkAt, MarkAtName, Verdict};

/// `lockstep mark …`.
#[derive(clap::Subcommand)]
pub enum MarkCommand {
    /// Name a position: `--at verified` (the latest barrier every service agreed at), `head`,
    /// or a position.
    Create {
        /// The mark's name, e.g. release-42.
        name: String,
        /// verified, head, or a position.
        #[arg(long, default_value = "verified")]
        at: String,
    },
    /// List the marks.
    Ls,
    /// Remove a mark (nothing else changes).
    Rm {
        /// The mark's name.
        name: String,
    },
}

/// The finding `lockstep verify` exits 1 with: replicas hold different states.
#[derive(Debug, thiserror::Error)]
#[error("DIVERGED: {0}")]
pub struct Diverged(String);

/// Runs a mark command.
pub async fn mark(url: &str, json: bool, command: MarkCommand) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    match command {
        MarkCommand::Create { name, at } => {
            let at = match at.as_str() {
                "verified" => MarkAt::Named(MarkAtName::Verified),
                "head" => MarkAt::Named(MarkAtName::Head),
                position => MarkAt::Position {
                    position: position.parse().map_err(|_| {
                        anyhow::anyhow!("--at takes verified, head or a position, not {position:?}")
                    })?,
                },
            };
            let mark = client.create_mark(&name, at).await?;
            if json {
                println!("{}", serde_json::to_string(&mark)?);
            } else {
                println!("mark {} at position {}", mark.name, mark.position);
            }
        }
        MarkCommand::Rm { name } => {
            client.remove_mark(&name).await?;
            if !json {
                println!("mark {name} removed");
            }
        }
        MarkCommand::Ls => {
            let marks = client.marks().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&marks)?);
            } else {
                println!("{:<24} {:>10}  CREATED", "MARK", "POSITION");
                for m in marks.marks {
                    println!(
                        "{:<24} {:>10}  {}",
                        m.name,
                        m.position,
                        m.created_at.to_rfc3339()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Prints each service's verdict and its replicas, and with `explain` the keys that differ;
/// fails (exit 1) when any service diverged.
pub async fn verify(
    url: &str,
    json: bool,
    service: Option<&str>,
    explain: bool,
) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    let verification = client.verify(service).await?;
    let mut explanations = Vec::new();
    if explain {
        for s in &verification.services {
            if s.verdict == Verdict::Diverged {
                explanations.push(client.explain(&s.service).await?);
            }
        }
    }
    if json && explain {
        let all = serde_json::json!({
            "services": verification.services,
            "at": verification.at,
            "explanations": explanations,
        });
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if json {
        println!("{}", serde_json::to_string_pretty(&verification)?);
    } else if verification.services.is_empty() {
        println!("no state reports yet: replicas report at barriers (lockstep barrier)");
    } else {
        println!(
            "{:<16} {:<9} {:>9}  {:<16} {:>9}  {:<12}  {:<6} SPLIT AT",
            "SERVICE", "VERDICT", "BARRIER", "REPLICA", "POSITION", "STATE", "AGREES"
        );
        for s in &verification.services {
            let verdict = match s.verdict {
                Verdict::Verified => "verified",
                Verdict::Diverged => "DIVERGED",
                Verdict::Unknown => "unknown",
            };
            let barrier = s.barrier.map_or("-".to_owned(), |b| b.to_string());
            for r in &s.replicas {
                println!(
                    "{:<16} {:<9} {:>9}  {:<16} {:>9}  {:<12}  {:<6} {}",
                    s.service,
                    verdict,
                    barrier,
                    r.replica,
                    r.position,
                    &r.state_hash[..12.min(r.state_hash.len())],
                    if r.agrees { "yes" } else { "NO" },
                    r.diverged_at.map_or("-".to_owned(), |p| p.to_string()),
                );
            }
        }
    }
    if !json {
        for s in &verification.services {
            print_recent(s);
        }
        for e in &explanations {
            print_explanation(e);
        }
    }
    let diverged: Vec<String> = verification
        .services
        .iter()
        .filter(|s| s.verdict == Verdict::Diverged)
        .map(|s| {
            let odd: Vec<&str> = s
                .replicas
                .iter()
                .filter(|r| !r.agrees)
                .map(|r| r.replica.as_str())
                .collect();
            format!("{} ({})", s.service, odd.join(", "))
        })
        .collect();
    if !diverged.is_empty() {
        return Err(Diverged(format!("replicas diverged: {}", diverged.join("; "))).into());
    }
    Ok(())
}

/// The latest barriers of a service, each with its replicas grouped by state hash.
fn print_recent(s: &lockstep::ServiceVerification) {
    if s.recent.is_empty() {
        return;
    }
    println!();
    println!(
        "{}: latest barriers, replicas grouped by state hash",
        s.service
    );
    for barrier in &s.recent {
        let groups: Vec<String> = barrier
            .groups
            .iter()
            .map(|g| {
                format!(
                    "{} {}",
                    &g.state_hash[..12.min(g.state_hash.len())],
                    g.replicas.join(",")
                )
            })
            .collect();
        println!("  {:>10}  {}", barrier.position, groups.join("  |  "));
    }
}

fn print_explanation(e: &lockstep::Explanation) {
    let short = |h: &Option<String>| {
        h.as_deref()
            .map_or("(none)".to_owned(), |h| h[..12.min(h.len())].to_owned())
    };
    println!();
    let Some(barrier) = e.barrier else {
        println!(
            "{}: {}",
            e.service,
            e.note.as_deref().unwrap_or("nothing to explain")
        );
        return;
    };
    if let Some(note) = &e.note {
        println!("{}: note: {note}", e.service);
    }
    println!(
        "{} at barrier {barrier}: majority {}",
        e.service,
        e.majority.join(", ")
    );
    for odd in &e.odd {
        println!("  {} differs in {} key(s):", odd.replica, odd.keys.len());
        for k in &odd.keys {
            let touched: Vec<String> = k.touched_by.iter().map(u64::to_string).collect();
            println!(
                "    {:<24} majority {}  {} {}  touched by events at {}",
                k.key,
                short(&k.majority),
                odd.replica,
                short(&k.replica),
                if touched.is_empty() {
                    "-".to_owned()
                } else {
                    touched.join(", ")
                }
            );
        }
    }
    if !e.waiting_for.is_empty() {
        println!(
            "  waiting for entries from {} (sent at their next barrier; the replica must \
             implement Replica::entries)",
            e.waiting_for.join(", ")
        );
    }
}

/// Appends a barrier and prints its position.
pub async fn barrier(url: &str, json: bool) -> anyhow::Result<()> {
    let position = Client::new(url)?.barrier().await?;
    if json {
        println!("{}", serde_json::json!({ "position": position }));
    } else {
        println!("barrier at position {position}");
    }
    Ok(())
}

/// `lockstep status`: one screen for an operator: the log, subscriptions, verification, marks,
/// rollbacks, and whether publishing is paused.
pub async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    let head = client.head().await?;
    let subs = client.subscriptions().await?;
    let verification = client.verify(None).await?;
    let marks = client.marks().await?;
    let rollbacks = client.rollbacks().await?;
    let pause = client.pause_state().await?;
    if json {
        let all = serde_json::json!({
            "head": head,
            "paused": pause,
            "subscriptions": subs.subscriptions,
            "verification": verification.services,
            "marks": marks.marks,
            "rollbacks": rollbacks,
        });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let time = head.time.map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
    println!("log        head {} at {time}", head.position);
    println!("           hash {}", head.hash);
    if pause.paused {
        println!(
            "           PUBLISHING PAUSED since {}{}",
            pause
                .since
                .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339()),
            pause
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
    } else {
        println!("           publishing open");
    }
    println!();
    println!("subscriptions ({})", subs.subscriptions.len());
    for s in &subs.subscriptions {
        let mode = if s.spec.push_url.is_some() {
            "push"
        } else {
            "pull"
        };
        let state = serde_json::to_value(s.state)?;
        let state = state.as_str().unwrap_or("?");
        println!(
            "  {}/{} [{mode}] position {} lag {} events {:.1} s  {state}{}",
            s.spec.service,
            s.spec.replica,
            s.position,
            s.lag_events,
            s.lag_seconds,
            s.stuck.as_ref().map_or(String::new(), |st| format!(
                " at {}: {}",
                st.position, st.error
            ))
        );
    }
    println!();
    println!("replicas");
    if verification.services.is_empty() {
        println!("  no state reports yet");
    }
    for s in &verification.services {
        let verdict = match s.verdict {
            Verdict::Verified => "verified",
            Verdict::Diverged => "DIVERGED",
            Verdict::Unknown => "unknown",
        };
        let last = s
            .last_verified_barrier
            .map_or("-".to_owned(), |b| b.to_string());
        println!(
            "  {}: {verdict}, {} replicas, last verified barrier {last}",
            s.service,
            s.replicas.len()
        );
        for r in s.replicas.iter().filter(|r| !r.agrees) {
            println!(
                "    {} disagrees (split at {})",
                r.replica,
                r.diverged_at.map_or("-".to_owned(), |p| p.to_string())
            );
        }
    }
    println!();
    println!("marks ({})", marks.marks.len());
    for m in &marks.marks {
        println!("  {} at {}", m.name, m.position);
    }
    println!();
    println!(
        "rollbacks ({}, {} events superseded)",
        rollbacks.rollbacks.len(),
        rollbacks.superseded_events
    );
    for r in &rollbacks.rollbacks {
        println!(
            "  at {} to {}{}{}",
            r.position,
            r.target,
            r.mark
                .as_deref()
                .map(|m| format!(" (mark {m})"))
                .unwrap_or_default(),
            r.reason
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
