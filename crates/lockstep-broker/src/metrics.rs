//! Counters the broker keeps for `/metrics` (Prometheus text format).

use std::fmt::Write as _;

use lockstep_proto::subscription::{SubscriptionList, SubscriptionState};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the commit-latency histogram buckets, in seconds.
const COMMIT_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// The log's counters; one per broker.
#[derive(Debug, Default)]
pub struct LogMetrics {
    events_appended: AtomicU64,
    commits: AtomicU64,
    commit_micros: AtomicU64,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
}

impl LogMetrics {
    /// Records one durable group commit of `events` new events.
    pub(crate) fn record_commit(&self, took: Duration, events: u64) {
        self.events_appended.fetch_add(events, Relaxed);
        self.commits.fetch_add(1, Relaxed);
        self.commit_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        let secs = took.as_secs_f64();
        for (bound, count) in COMMIT_BUCKETS.iter().zip(&self.commit_buckets) {
            if secs <= *bound {
                count.fetch_add(1, Relaxed);
            }
        }
    }

    /// Renders every metric, with the current head, in Prometheus text format.
    pub(crate) fn render(&self, head: u64) -> String {
        let mut out = String::with_capacity(2048);
        let commits = self.commits.load(Relaxed);
        let _ = writeln!(
            out,
            "# HELP lockstep_head_position Position of the last event in the log.\n\
             # TYPE lockstep_head_position gauge\nlockstep_head_position {head}"
        );
        let _ = writeln!(
            out,
            "# HELP lockstep_events_appended_total Events appended since the broker started.\n\
             # TYPE lockstep_events_appended_total counter\nlockstep_events_appended_total {}",
            self.events_appended.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP lockstep_commit_seconds Duration of durable group commits.\n\
             # TYPE lockstep_commit_seconds histogram"
        );
        for (bound, count) in COMMIT_BUCKETS.iter().zip(&self.commit_buckets) {
            let _ = writeln!(
                out,
                "lockstep_commit_seconds_bucket{{le=\"{bound}\"}} {}",
                count.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "lockstep_commit_seconds_bucket{{le=\"+Inf\"}} {commits}\n\
             lockstep_commit_seconds_sum {}\nlockstep_commit_seconds_count {commits}",
            self.commit_micros.load(Relaxed) as f64 / 1e6
        );
        out
    }
}

/// Renders the registrar's metrics: per-subscription position, lag and push failures.
pub(crate) fn render_subscriptions(list: &SubscriptionList, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP lockstep_subscriptions Subscriptions the broker keeps.\n\
         # TYPE lockstep_subscriptions gauge\nlockstep_subscriptions {}",
        list.subscriptions.len()
    );
    let metrics: [(&str, &str, &str); 5] = [
        (
            "lockstep_subscription_position",
            "gauge",
            "Last acknowledged position.",
        ),
        (
            "lockstep_subscription_lag_events",
            "gauge",
            "Log positions not yet acknowledged.",
        ),
        (
            "lockstep_subscription_lag_seconds",
            "gauge",
            "Age of the oldest unacknowledged event.",
        ),
        (
            "lockstep_subscription_failing",
            "gauge",
            "1 when push deliveries are failing.",
        ),
        (
            "lockstep_push_failures",
            "gauge",
            "Consecutive failed push deliveries.",
        ),
    ];
    for (name, kind, help) in metrics {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for sub in &list.subscriptions {
            let value = match name {
                "lockstep_subscription_position" => sub.position as f64,
                "lockstep_subscription_lag_events" => sub.lag_events as f64,
                "lockstep_subscription_lag_seconds" => sub.lag_seconds,
                "lockstep_subscription_failing" => {
                    f64::from(u8::from(sub.state == SubscriptionState::Failing))
                }
                _ => match sub.push_failures {
                    Some(failures) => failures as f64,
                    None => continue,
                },
            };
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\",replica=\"{}\"}} {value}",
                sub.spec.service, sub.spec.replica
            );
        }
    }
}

/// Appends the consistency gauges: replicas that disagree with their service's majority at its
/// latest compared barrier, the paused flag, and superseded events.
pub(crate) fn render_consistency(
    verification: &lockstep_proto::consistency::Verification,
    paused: bool,
    superseded: u64,
    out: &mut String,
) {
    let _ = writeln!(
        out,
        "# HELP lockstep_replicas_diverged Replicas whose state hash differs from their \
         service's majority at the latest barrier.\n# TYPE lockstep_replicas_diverged gauge"
    );
    for service in &verification.services {
        let diverged = service.replicas.iter().filter(|r| !r.agrees).count();
        let _ = writeln!(
            out,
            "lockstep_replicas_diverged{{service=\"{}\"}} {diverged}",
            service.service
        );
    }
    let _ = writeln!(
        out,
        "# HELP lockstep_publishing_paused 1 while an operator has paused publishing.\n\
         # TYPE lockstep_publishing_paused gauge\nlockstep_publishing_paused {}\n\
         # HELP lockstep_superseded_events Events superseded by rollbacks (kept, not live).\n\
         # TYPE lockstep_superseded_events gauge\nlockstep_superseded_events {superseded}",
        u8::from(paused)
    );
}
