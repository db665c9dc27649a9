//! Delivery to subscriptions: registering, pulling pages or a stream from a subscription's
//! position, acknowledging, and the health the registrar reports.
//!
//! Pull delivery reads the log exactly as `GET /v1/events` does, with the subscription's filter
//! (control records always pass) and range. A stream is produced one page at a time and only as
//! fast as the client reads it (the HTTP body is polled when the socket has room), so a slow
//! reader holds at most one page of broker memory.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures_util::Stream;
use lockstep_proto::subscription::{
    SubscriptionInfo, SubscriptionList, SubscriptionSpec, SubscriptionState,
};

use crate::Broker;
use crate::error::{ReadError, StoreError};
use crate::read::{Layout, Page, ReadQuery, read_page};
use crate::registry::{RegistryError, Subscription};

/// Events per stream chunk.
pub const STREAM_CHUNK_EVENTS: usize = 1_000;
/// A quiet stream sends a heartbeat line this often, so both ends notice a dead connection.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Consecutive push failures after which a subscription is shown as failing.
pub const FAILING_AFTER: u64 = 3;
/// A subscription this close behind (age of its oldest unacknowledged event) counts as live.
const LIVE_LAG: Duration = Duration::from_secs(5);

impl Broker {
    /// Registers a subscription. Answers it with `true` when created, `false` when the same
    /// subscription already existed.
    pub async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        replace: bool,
    ) -> Result<(SubscriptionInfo, bool), RegistryError> {
        let (registry, log) = (Arc::clone(&self.inner.registry), self.inner.log.clone());
        let head = log.tip().position;
        let (sub, created) = tokio::task::spawn_blocking(move || {
            registry.create(&spec, replace, head, |t| log.first_at_or_after(t))
        })
        .await
        .map_err(|e| StoreError::new(format!("registration task failed: {e}")))??;
        if created && sub.push_url().is_some() {
            crate::push::spawn(self.clone(), Arc::clone(&sub));
        }
        Ok((self.info(&sub).await?, created))
    }

    /// Every subscription with its position and health.
    pub async fn subscriptions(&self) -> Result<SubscriptionList, RegistryError> {
        let head = self.inner.log.tip().position;
        let mut subscriptions = Vec::new();
        for sub in self.inner.registry.all() {
            subscriptions.push(self.info(&sub).await?);
        }
        Ok(SubscriptionList {
            subscriptions,
            head,
        })
    }

    /// One subscription with its position and health.
    pub async fn subscription(
        &self,
        service: &str,
        replica: &str,
    ) -> Result<SubscriptionInfo, RegistryError> {
        let sub = self.inner.registry.get(service, replica)?;
        self.info(&sub).await
    }

    /// Deletes a subscription; its push worker stops.
    pub async fn unsubscribe(&self, service: &str, replica: &str) -> Result<(), RegistryError> {
        let registry = Arc::clone(&self.inner.registry);
        let (service, replica) = (service.to_owned(), replica.to_owned());
        tokio::task::spawn_blocking(move || registry.delete(&service, &replica))
            .await
            .map_err(|e| StoreError::new(format!("registration task failed: {e}")))?
    }

    /// Acknowledges everything up to `position`: the subscription's position moves there (never
    /// back). Returns the position after the ack.
    pub fn ack(&self, service: &str, replica: &str, position: u64) -> Result<u64, RegistryError> {
        let sub = self.inner.registry.get(service, replica)?;
        let head = self.inner.log.tip().position;
        if position > head {
            return Err(RegistryError::Invalid(format!(
                "ack position {position} is past the head of the log ({head})"
            )));
        }
        self.inner.registry.ack(&sub, position);
        Ok(sub.position())
    }

    /// Records a replica's own report: stuck at an event, or (with `None`) no longer.
    pub fn report_status(
        &self,
        service: &str,
        replica: &str,
        stuck: Option<lockstep_proto::subscription::Stuck>,
    ) -> Result<(), RegistryError> {
        let sub = self.inner.registry.get(service, replica)?;
        if let Some(s) = &stuck {
            tracing::warn!(subscription = %sub.key(), position = s.position, error = %s.error, "replica reports it is stuck");
        }
        if let Ok(mut slot) = sub.stuck.lock() {
            *slot = stuck;
        }
        Ok(())
    }

    /// The subscription, for delivery.
    pub fn subscription_handle(
        &self,
        service: &str,
        replica: &str,
    ) -> Result<Arc<Subscription>, RegistryError> {
        self.inner.registry.get(service, replica)
    }

    /// One page for `sub`, after `after` (default: its acknowledged position).
    pub async fn subscription_page(
        &self,
        sub: &Subscription,
        after: Option<u64>,
        limit: usize,
        wait: Duration,
        layout: Layout,
    ) -> Result<Page, ReadError> {
        let query = ReadQuery {
            after: after.unwrap_or_else(|| sub.position()),
            limit,
            filter: sub.filter().clone(),
            with_control: true,
            until_position: sub.end_position(),
            until_ns: sub.end_time_ns(),
            wait,
            layout,
            since_ns: None,
            include_superseded: false,
        };
        read_page(&self.inner.log, query, self.inner.stopping.subscribe()).await
    }

    /// An NDJSON stream of `sub`'s events after `after` (default: its acknowledged position):
    /// one event per line, a `{"heartbeat":true,"head":H}` line after a quiet
    /// [`HEARTBEAT_INTERVAL`], and `{"complete":true}` as the last line of a bounded range. It
    /// ends when the subscription is deleted or the broker stops.
    pub fn subscription_stream(
        &self,
        sub: Arc<Subscription>,
        after: Option<u64>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        struct State {
            broker: Broker,
            sub: Arc<Subscription>,
            after: u64,
            done: bool,
        }
        let after = after.unwrap_or_else(|| sub.position());
        let state = State {
            broker: self.clone(),
            sub,
            after,
            done: false,
        };
        futures_util::stream::unfold(state, |mut s| async move {
            if s.done || *s.broker.inner.stopping.borrow() || *s.sub.removed.borrow() {
                return None;
            }
            let page = s
                .broker
                .subscription_page(
                    &s.sub,
                    Some(s.after),
                    STREAM_CHUNK_EVENTS,
                    HEARTBEAT_INTERVAL,
                    Layout::Lines,
                )
                .await;
            let chunk = match page {
                Ok(page) => {
                    s.after = page.next_after;
                    s.done = page.complete;
                    let mut body = page.body;
                    if page.complete {
                        body.extend_from_slice(b"{\"complete\":true}\n");
                    } else if page.count == 0 {
                        body.extend_from_slice(
                            format!("{{\"heartbeat\":true,\"head\":{}}}\n", page.head).as_bytes(),
                        );
                    }
                    Ok(Bytes::from(body))
                }
                Err(e) => {
                    s.done = true;
                    tracing::warn!(error = %e, subscription = %s.sub.key(), "stream stopped");
                    Err(std::io::Error::other(e.to_string()))
                }
            };
            Some((chunk, s))
        })
    }

    /// Position, lag and state of a subscription.
    async fn info(&self, sub: &Subscription) -> Result<SubscriptionInfo, RegistryError> {
        let tip = self.inner.log.tip();
        let position = sub.position();
        let last = sub
            .end_position()
            .map_or(tip.position, |end| end.min(tip.position));
        // Superseded events are never delivered: they are no lag.
        let superseded = self.inner.log.superseded();
        let lag_events = last
            .saturating_sub(position)
            .saturating_sub(superseded.count_between(position, last));
        let next = superseded.next_live(position);
        let (oldest_ns, next_time_past_end) = if next <= tip.position {
            let log = self.inner.log.clone();
            let time = tokio::task::spawn_blocking(move || log.get(next, |r, _| r.time_ns))
                .await
                .map_err(|e| StoreError::new(format!("read task failed: {e}")))??;
            let past_end = matches!((time, sub.end_time_ns()), (Some(t), Some(end)) if t > end);
            (time, past_end)
        } else {
            (None, false)
        };
        let now_ns = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let lag_seconds = oldest_ns.map_or(0.0, |t| (now_ns.saturating_sub(t)).max(0) as f64 / 1e9);
        let failures = sub.push.failures.load(std::sync::atomic::Ordering::Relaxed);
        let complete = sub.end_position().is_some_and(|end| position >= end)
            || next_time_past_end
            || sub
                .end_time_ns()
                .is_some_and(|end| position >= tip.position && end < now_ns);
        let stuck = sub.stuck.lock().ok().and_then(|s| s.clone());
        let state = if complete {
            SubscriptionState::Complete
        } else if stuck.is_some() {
            SubscriptionState::Stuck
        } else if sub.push_url().is_some() && failures >= FAILING_AFTER {
            SubscriptionState::Failing
        } else if lag_events == 0 || lag_seconds < LIVE_LAG.as_secs_f64() {
            SubscriptionState::Live
        } else {
            SubscriptionState::CatchingUp
        };
        let last_error = sub.push.last_error.lock().ok().and_then(|e| e.clone());
        Ok(SubscriptionInfo {
            spec: sub.spec(),
            created_at: sub.created_at(),
            position,
            acked_at: sub.acked_at(),
            lag_events: if complete { 0 } else { lag_events },
            lag_seconds: if complete { 0.0 } else { lag_seconds },
            state,
            push_failures: sub.push_url().map(|_| failures),
            last_error,
            stuck,
        })
    }
}
