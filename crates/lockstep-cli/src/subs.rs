//! `lockstep subs`: the registrar's subscriptions from a terminal: list, add, remove, show.

use std::io::Write as _;

use anyhow::{Context as _, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use lockstep::{
    Client, End, PushFormat, Start, StartName, SubscriptionInfo, SubscriptionSpec,
    SubscriptionState,
};

/// Flags of `lockstep subs`; without a subcommand it lists.
#[derive(clap::Args)]
pub struct SubsArgs {
    #[command(subcommand)]
    command: Option<SubsCommand>,
}

#[derive(clap::Subcommand)]
enum SubsCommand {
    /// List subscriptions with position, lag and state (the default).
    Ls,
    /// Create a subscription (does nothing if the same one exists).
    Add(AddArgs),
    /// Delete a subscription and its position.
    Rm {
        /// Service the replica belongs to.
        service: String,
        /// The replica's id.
        replica: String,
    },
    /// Show one subscription in full.
    Show {
        /// Service the replica belongs to.
        service: String,
        /// The replica's id.
        replica: String,
    },
}

/// Flags of `lockstep subs add`.
#[derive(clap::Args)]
struct AddArgs {
    /// Service the replica belongs to.
    service: String,
    /// The replica's id.
    replica: String,
    /// Comma-separated type patterns, e.g. account.*,billing.invoiced (`*` for all).
    #[arg(long, required = true, value_delimiter = ',')]
    types: Vec<String>,
    /// Where delivery starts: beginning, now, a position, or an RFC 3339 time.
    #[arg(long, default_value = "beginning", value_parser = parse_start)]
    start: Start,
    /// Where a bounded replay ends: a position, or an RFC 3339 time (absent: live).
    #[arg(long, value_parser = parse_end)]
    end: Option<End>,
    /// Push delivery: the URL the broker POSTs batches to (absent: pull).
    #[arg(long)]
    push_url: Option<String>,
    /// Push delivery: the body format.
    #[arg(long, value_enum, requires = "push_url")]
    push_format: Option<PushFormatArg>,
    /// Replace a different subscription with the same service and replica (its position
    /// starts over).
    #[arg(long)]
    replace: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PushFormatArg {
    Json,
    Cloudevents,
}

impl From<PushFormatArg> for PushFormat {
    fn from(format: PushFormatArg) -> Self {
        match format {
            PushFormatArg::Json => PushFormat::Json,
            PushFormatArg::Cloudevents => PushFormat::Cloudevents,
        }
    }
}

fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "beginning" => Ok(Start::Named(StartName::Beginning)),
        "now" => Ok(Start::Named(StartName::Now)),
        _ => match parse_point(text)? {
            Point::Position(position) => Ok(Start::Position { position }),
            Point::Time(time) => Ok(Start::Time { time }),
        },
    }
}

fn parse_end(text: &str) -> Result<End, String> {
    match parse_point(text)? {
        Point::Position(position) => Ok(End::Position { position }),
        Point::Time(time) => Ok(End::Time { time }),
    }
}

enum Point {
    Position(u64),
    Time(DateTime<Utc>),
}

fn parse_point(text: &str) -> Result<Point, String> {
    if let Ok(position) = text.parse::<u64>() {
        return Ok(Point::Position(position));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| Point::Time(t.with_timezone(&Utc)))
        .map_err(|_| {
            format!("{text:?} is neither a position nor an RFC 3339 time (2026-11-01T00:00:00Z)")
        })
}

/// `lockstep subs ...`.
pub async fn run(url: &str, json: bool, args: SubsArgs) -> anyhow::Result<()> {
    let client = Client::new(url)?;
    match args.command.unwrap_or(SubsCommand::Ls) {
        SubsCommand::Ls => list(&client, json).await,
        SubsCommand::Add(args) => add(&client, json, args).await,
        SubsCommand::Rm { service, replica } => {
            client
                .unsubscribe(&service, &replica)
                .await
                .with_context(|| format!("removing {service}/{replica}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"removed": {"service": service, "replica": replica}})
                );
            } else {
                println!("removed {service}/{replica}");
            }
            Ok(())
        }
        SubsCommand::Show { service, replica } => {
            let info = client
                .subscription(&service, &replica)
                .await
                .with_context(|| format!("showing {service}/{replica}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                show(&info)?;
            }
            Ok(())
        }
    }
}

async fn list(client: &Client, json: bool) -> anyhow::Result<()> {
    let list = client
        .subscriptions()
        .await
        .context("listing subscriptions")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let header = [
        "SERVICE",
        "REPLICA",
        "TYPES",
        "MODE",
        "POSITION",
        "LAG(events)",
        "LAG(s)",
        "STATE",
    ];
    let rows: Vec<[String; 8]> = list
        .subscriptions
        .iter()
        .map(|s| {
            [
                s.spec.service.clone(),
                s.spec.replica.clone(),
                s.spec.types.join(","),
                mode(s).to_owned(),
                s.position.to_string(),
                s.lag_events.to_string(),
                format!("{:.1}", s.lag_seconds),
                state(s.state).to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let numeric = [false, false, false, false, true, true, true, false];
    let mut out = std::io::stdout().lock();
    let mut line = |cells: &[&str]| -> std::io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths[i];
            if i > 0 {
                text.push_str("  ");
            }
            if numeric[i] {
                text.push_str(&format!("{cell:>w$}"));
            } else {
                text.push_str(&format!("{cell:<w$}"));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(&header)?;
    for row in &rows {
        line(&row.each_ref().map(String::as_str))?;
    }
    if rows.is_empty() {
        writeln!(out, "(no subscriptions; head {})", list.head)?;
    }
    Ok(())
}

async fn add(client: &Client, json: bool, args: AddArgs) -> anyhow::Result<()> {
    if args.types.iter().any(|t| t.trim().is_empty()) {
        bail!("--types has an empty pattern; give e.g. --types 'account.*,billing.invoiced'");
    }
    let spec = SubscriptionSpec {
        service: args.service,
        replica: args.replica,
        types: args.types.iter().map(|t| t.trim().to_owned()).collect(),
        start: args.start,
        end: args.end,
        push_url: args.push_url,
        push_format: args.push_format.map(PushFormat::from),
    };
    let name = format!("{}/{}", spec.service, spec.replica);
    let (info, created) = match client.subscribe(&spec, args.replace).await {
        Ok(answer) => answer,
        Err(e) if e.is_conflict() => {
            return Err(anyhow::Error::new(e).context(format!(
                "{name} exists with a different spec; pass --replace to replace it"
            )));
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("adding {name}"))),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "created": created,
                "subscription": info,
            }))?
        );
    } else if created {
        println!(
            "created {name}: {} {}, position {}",
            mode(&info),
            info.spec.types.join(","),
            info.position
        );
    } else {
        println!(
            "{name} already existed with this spec: position {}, {}",
            info.position,
            state(info.state)
        );
    }
    Ok(())
}

fn show(info: &SubscriptionInfo) -> anyhow::Result<()> {
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    let spec = &info.spec;
    let start = match &spec.start {
        Start::Named(StartName::Beginning) => "beginning".to_owned(),
        Start::Named(StartName::Now) => "now".to_owned(),
        Start::Position { position } => format!("position {position}"),
        Start::Time { time: t } => time(t),
    };
    let end = match &spec.end {
        None => "- (live)".to_owned(),
        Some(End::Position { position }) => format!("position {position}"),
        Some(End::Time { time: t }) => time(t),
    };
    let mut out = std::io::stdout().lock();
    let mut field = |name: &str, value: &str| writeln!(out, "{name:<14} {value}");
    field("service", &spec.service)?;
    field("replica", &spec.replica)?;
    field("types", &spec.types.join(","))?;
    field("mode", mode(info))?;
    if let Some(url) = &spec.push_url {
        let format = match spec.push_format.unwrap_or_default() {
            PushFormat::Json => "json",
            PushFormat::Cloudevents => "cloudevents",
        };
        field("push url", url)?;
        field("push format", format)?;
    }
    field("start", &start)?;
    field("end", &end)?;
    field("created", &time(&info.created_at))?;
    field("position", &info.position.to_string())?;
    field(
        "acked at",
        &info.acked_at.as_ref().map_or("-".to_owned(), time),
    )?;
    field(
        "lag",
        &format!("{} events, {:.1} s", info.lag_events, info.lag_seconds),
    )?;
    field("state", state(info.state))?;
    if let Some(failures) = info.push_failures {
        field("push failures", &failures.to_string())?;
    }
    if let Some(error) = &info.last_error {
        field("last error", error)?;
    }
    if let Some(stuck) = &info.stuck {
        field("stuck at", &format!("{}: {}", stuck.position, stuck.error))?;
    }
    Ok(())
}

fn mode(info: &SubscriptionInfo) -> &'static str {
    if info.spec.push_url.is_some() {
        "push"
    } else {
        "pull"
    }
}

fn state(state: SubscriptionState) -> &'static str {
    match state {
        SubscriptionState::Live => "live",
        SubscriptionState::CatchingUp => "catching_up",
        SubscriptionState::Failing => "failing",
        SubscriptionState::Complete => "complete",
        SubscriptionState::Stuck => "stuck",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_and_ends_parse_from_the_command_line() {
        assert_eq!(
            parse_start("beginning"),
            Ok(Start::Named(StartName::Beginning))
        );
        assert_eq!(parse_start("now"), Ok(Start::Named(StartName::Now)));
        assert_eq!(parse_start("42"), Ok(Start::Position { position: 42 }));
        assert!(matches!(
            parse_start("2026-11-01T00:00:00+01:00"),
            Ok(Start::Time { time }) if time.to_rfc3339() == "2026-10-31T23:00:00+00:00"
        ));
        assert!(parse_start("yesterday").is_err());
        assert_eq!(parse_end("9"), Ok(End::Position { position: 9 }));
        assert!(parse_end("now").is_err());
    }
}
