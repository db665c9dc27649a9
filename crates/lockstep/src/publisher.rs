//! The batching publisher: many tasks publish single events, the broker sees few large requests.
//!
//! Callers enqueue into a bounded channel; one background task drains it into batches. A batch
//! leaves as soon as a request slot is free (at most `max_in_flight` requests are outstanding), so
//! events "linger" only while the broker is busy with earlier requests: no added latency at low
//! load, large batches at high load. Each caller awaits the acknowledgement of its own event.
//!
//! A batch is atomic on the broker: one invalid event fails the whole request. When the broker
//! names the failing event (`index`), that caller alone gets the error and the rest is sent again;
//! other refusals of a multi-event batch are resolved by sending its events one by one.

use std::time::Duration;

use lockstep_proto::wire::{NewEvent, PublishAck};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::client::{Client, ClientError};

/// Default capacity of the publisher's queue, in events; beyond it `publish` waits (back-pressure).
pub const DEFAULT_QUEUE_CAPACITY: usize = 65_536;
/// Default largest batch sent in one request.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// Default number of requests outstanding at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;
/// Attempts at a request that fails for a retryable reason (unreachable broker, 5xx) before its
/// callers get the error. Waits between attempts double from 50 ms.
const ATTEMPTS: u32 = 5;
const FIRST_RETRY_WAIT: Duration = Duration::from_millis(50);

/// Publishes events from many tasks through few batched requests. Cheap to clone; the background
/// task stops once every clone is dropped and the queued events are sent.
///
/// Every event gets an id before it is queued (a UUIDv7 unless it has one), so a retried request
/// is deduplicated by the broker rather than written twice.
///
/// Events with `expected_head` or `expected_position` are sent alone: their conflict would
/// otherwise fail every event of the batch they happened to share.
///
/// Order: events from one task are stored in the order it published them when it awaits each
/// acknowledgement before the next publish. Events queued concurrently may be stored in any order
/// when `max_in_flight` is above one or a request is retried or split.
///
/// ```no_run
/// # async fn run() -> Result<(), lockstep::ClientError> {
/// use lockstep::{Client, NewEvent, Publisher};
///
/// let publisher = Publisher::new(Client::new("http://127.0.0.1:7700")?);
/// let mut tasks = Vec::new();
/// for n in 0..256 {
///     let publisher = publisher.clone();
///     tasks.push(tokio::spawn(async move {
///         let event = NewEvent::json("order.placed", &serde_json::json!({ "n": n }))?;
///         let ack = publisher.publish(event).await?;
///         println!("order {n} stored at {} ({})", ack.position, ack.hash);
///         Ok::<_, lockstep::ClientError>(())
///     }));
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Publisher {
    queue: mpsc::Sender<Pending>,
}

/// Settings of a [`Publisher`]; from [`Publisher::builder`].
#[derive(Debug, Clone)]
pub struct PublisherBuilder {
    client: Client,
    max_batch: usize,
    max_in_flight: usize,
    linger: Duration,
    queue_capacity: usize,
}

/// One caller's event and where its answer goes.
#[derive(Debug)]
struct Pending {
    event: NewEvent,
    reply: oneshot::Sender<Result<PublishAck, ClientError>>,
}

impl Publisher {
    /// A publisher with the default settings (see [`PublisherBuilder`]). Must be called within a
    /// Tokio runtime: it spawns the batching task.
    pub fn new(client: Client) -> Self {
        Self::builder(client).build()
    }

    /// Settings for a publisher.
    pub fn builder(client: Client) -> PublisherBuilder {
        PublisherBuilder {
            client,
            max_batch: DEFAULT_MAX_BATCH,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            linger: Duration::ZERO,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }

    /// Publishes `event` with others waiting at the same time; answers once it is durable.
    ///
    /// Errors: a refusal of this event (4xx: invalid, conflict) as the broker gave it. When the
    /// broker stayed unreachable through the retries, every caller of the request gets a retryable
    /// error (`is_retryable()`); for all but one of them it is a `503 unreachable`
    /// [`ClientError::Api`], since transport errors cannot be copied. Publishing the same event
    /// again (same id) is safe.
    pub async fn publish(&self, mut event: NewEvent) -> Result<PublishAck, ClientError> {
        if event.id.is_none() {
            event.id = Some(uuid::Uuid::now_v7().to_string());
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { event, reply })
            .await
            .map_err(|_| ClientError::Protocol("the publisher has stopped".into()))?;
        answer
            .await
            .map_err(|_| ClientError::Protocol("the publisher dropped the event".into()))?
    }
}

impl PublisherBuilder {
    /// Largest number of events per request (default [`DEFAULT_MAX_BATCH`]; the broker takes at
    /// most 10,000).
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.clamp(1, 10_000);
        self
    }

    /// Requests outstanding at once (default [`DEFAULT_MAX_IN_FLIGHT`]).
    pub fn max_in_flight(mut self, max_in_flight: usize) -> Self {
        self.max_in_flight = max_in_flight.max(1);
        self
    }

    /// Extra time a batch smaller than `max_batch` waits for more events once a request slot is
    /// free (default zero: batches form only while earlier requests are in flight).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Events queued before `publish` waits (default [`DEFAULT_QUEUE_CAPACITY`]).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity.max(1);
        self
    }

    /// Starts the batching task. Must be called within a Tokio runtime.
    pub fn build(self) -> Publisher {
        let (queue, rx) = mpsc::channel(self.queue_capacity);
        tokio::spawn(batch_loop(self, rx));
        Publisher { queue }
    }
}

/// Whether an event must have a request of its own.
fn sent_alone(event: &NewEvent) -> bool {
    event.expected_head.is_some() || event.expected_position.is_some()
}

async fn batch_loop(settings: PublisherBuilder, mut rx: mpsc::Receiver<Pending>) {
    let slots = std::sync::Arc::new(Semaphore::new(settings.max_in_flight));
    // An event taken from the queue that could not join the batch being formed.
    let mut held: Option<Pending> = None;
    loop {
        let first = match held.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        // Waiting for a slot is the lingering: the queue fills while requests are in flight.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        if !sent_alone(&batch[0].event) {
            // The callers answered by the request that freed this slot are runnable now; one
            // turn of the scheduler lets them queue their next events into this batch rather
            // than a string of tiny ones. At low load this costs microseconds, not a linger.
            tokio::task::yield_now().await;
            let deadline = tokio::time::Instant::now() + settings.linger;
            while batch.len() < settings.max_batch {
                let next = match rx.try_recv() {
                    Ok(next) => next,
                    Err(_) if settings.linger.is_zero() => break,
                    Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(next)) => next,
                        _ => break,
                    },
                };
                if sent_alone(&next.event) {
                    held = Some(next);
                    break;
                }
                batch.push(next);
            }
        }
        let client = settings.client.clone();
        tokio::spawn(async move {
            send(&client, batch).await;
            drop(slot);
        });
    }
    // Wait for the requests in flight before the task (and its client) goes.
    let _ = slots.acquire_many(settings.max_in_flight as u32).await;
}

/// What to do after a batch of `len` events failed with `error` (after the retries).
#[derive(Debug, PartialEq, Eq)]
enum Recovery {
    /// Fail the caller at this index with the error and send the others again.
    FailOne(usize),
    /// Send every event in a request of its own.
    SendEachAlone,
    /// Fail every caller of the batch.
    FailAll,
}

fn recovery(len: usize, error: &ClientError) -> Recovery {
    match error {
        ClientError::Api {
            status: 400..=499,
            index: Some(index),
            ..
        } if *index < len => Recovery::FailOne(*index),
        e if e.is_retryable() => Recovery::FailAll,
        _ if len > 1 => Recovery::SendEachAlone,
        _ => Recovery::FailAll,
    }
}

/// Sends `batch`, retrying retryable failures, and answers every caller.
async fn send(client: &Client, mut batch: Vec<Pending>) {
    let mut events: Vec<NewEvent> = batch.iter_mut().map(take_event).collect();
    while !batch.is_empty() {
        let error = match publish_with_retries(client, &events).await {
            Ok(acks) => {
                for (pending, ack) in batch.into_iter().zip(acks) {
                    let _ = pending.reply.send(Ok(ack));
                }
                return;
            }
            Err(error) => error,
        };
        match recovery(batch.len(), &error) {
            Recovery::FailOne(index) => {
                events.remove(index);
                let _ = batch.remove(index).reply.send(Err(error));
            }
            Recovery::SendEachAlone => {
                for (pending, event) in batch.into_iter().zip(events) {
                    let answer = publish_with_retries(client, std::slice::from_ref(&event))
                        .await
                        .and_then(|mut acks| {
                            acks.pop()
                                .ok_or_else(|| ClientError::Protocol("no ack for the event".into()))
                        });
                    let _ = pending.reply.send(answer);
                }
                return;
            }
            Recovery::FailAll => {
                let mut callers = batch.into_iter();
                if let Some(first) = callers.next() {
                    for other in callers {
                        let _ = other.reply.send(Err(copy_error(&error)));
                    }
                    let _ = first.reply.send(Err(error));
                }
                return;
            }
        }
    }
}

fn take_event(pending: &mut Pending) -> NewEvent {
    std::mem::take(&mut pending.event)
}

async fn publish_with_retries(
    client: &Client,
    events: &[NewEvent],
) -> Result<Vec<PublishAck>, ClientError> {
    let mut wait = FIRST_RETRY_WAIT;
    let mut attempt = 1;
    loop {
        match client.publish(events).await {
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, events = events.len(), "publish failed, retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            answer => return answer,
        }
    }
}

/// The same error for another caller of the batch; transport errors cannot be cloned, so they
/// become a retryable `503 unreachable`.
fn copy_error(error: &ClientError) -> ClientError {
    match error {
        ClientError::Api {
            status,
            code,
            message,
            current,
            index,
        } => ClientError::Api {
            status: *status,
            code: code.clone(),
            message: message.clone(),
            current: *current,
            index: *index,
        },
        ClientError::Protocol(message) => ClientError::Protocol(message.clone()),
        other => ClientError::Api {
            status: 503,
            code: "unreachable".into(),
            message: other.to_string(),
            current: None,
            index: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, index: Option<usize>) -> ClientError {
        ClientError::Api {
            status,
            code: "invalid_event".into(),
            message: "bad".into(),
            current: None,
            index,
        }
    }

    #[test]
    fn an_indexed_refusal_fails_only_that_event() {
        assert_eq!(recovery(10, &api(400, Some(3))), Recovery::FailOne(3));
        assert_eq!(recovery(1, &api(400, Some(0))), Recovery::FailOne(0));
    }

    #[test]
    fn an_unindexed_refusal_splits_a_batch_and_fails_a_single_event() {
        assert_eq!(recovery(10, &api(413, None)), Recovery::SendEachAlone);
        assert_eq!(recovery(1, &api(409, None)), Recovery::FailAll);
        // An index the batch does not have is not trusted.
        assert_eq!(recovery(2, &api(400, Some(7))), Recovery::SendEachAlone);
    }

    #[test]
    fn retryable_errors_fail_the_batch_after_the_retries() {
        assert_eq!(recovery(10, &api(503, None)), Recovery::FailAll);
        let copied = copy_error(&ClientError::Stalled(Duration::from_secs(1)));
        assert!(copied.is_retryable());
    }

    #[test]
    fn conditional_events_are_sent_alone() {
        assert!(sent_alone(&NewEvent {
            expected_position: Some(0),
            ..NewEvent::default()
        }));
        assert!(!sent_alone(&NewEvent::default()));
    }
}
