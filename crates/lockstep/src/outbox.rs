//! The durable outbox: events stored locally first, published when the broker can take them.
//!
//! `DIR/outbox.redb` holds the events not yet acknowledged (`events`: sequence → the event as
//! JSON, its id assigned) and those the broker refused (`dead_letters`: sequence → the event and
//! the error). A background flusher sends pending events in sequence order, in batches of up to
//! [`MAX_FLUSH_BATCH`], one request at a time, and deletes them once the broker acknowledged them.
//! While the broker is unreachable it retries with a backoff from 100 ms doubling to 5 s.
//!
//! Invariants: an event leaves `events` only after the broker acknowledged it (or refused it, into
//! `dead_letters`), so a crash at any point loses nothing. A batch sent again because its answer
//! was lost is harmless: the stable ids make the broker answer `duplicate` instead of writing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lockstep_proto::wire::NewEvent;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::client::{Client, ClientError};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQUENCE: &str = "next_sequence";

/// Most events the flusher sends in one request.
pub const MAX_FLUSH_BATCH: usize = 1000;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What went wrong with the outbox's local store.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The redb file could not be opened, read or written.
    #[error("outbox store {path}: {message}")]
    Store {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The event could not be encoded.
    #[error("cannot encode event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Proof that an event is stored durably and will be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxReceipt {
    /// The event's id: the broker's dedup key, and how to find it in the log later.
    pub id: String,
    /// Its place in the outbox's order.
    pub sequence: u64,
}

/// An event the broker refused, kept in `dead_letters` for a person to look at.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its place in the outbox's order.
    pub sequence: u64,
    /// The event as it was sent.
    pub event: NewEvent,
    /// The broker's refusal.
    pub error: String,
}

/// A durable outbox: [`Outbox::publish`] returns once the event is on local disk, and the event
/// is published to the broker in order, exactly once in the log, whenever the broker is
/// reachable, across restarts of the service and of the broker. Cheap to clone; the flusher stops
/// (and the file closes) shortly after the last clone is dropped.
///
/// Events the broker refuses with a 4xx (invalid, or a conflict of `expected_position`) would
/// block the queue forever: they are moved to the dead letters ([`Outbox::dead_letters`]) with
/// the error, and logged at `error` level. Conditional events are therefore a poor fit for an
/// outbox: when the condition fails, the event is not published.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use lockstep::{Client, NewEvent, Outbox};
///
/// let outbox = Outbox::open("./state".as_ref(), Client::new("http://127.0.0.1:7700")?)?;
/// let receipt = outbox
///     .publish(NewEvent::json("invoice.sent", &serde_json::json!({"invoice": 42}))?)
///     .await?;
/// println!("stored as {}; {} events still to publish", receipt.id, outbox.pending());
/// outbox.flush().await; // e.g. before a graceful shutdown
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Outbox {
    store: Arc<Store>,
    wake: mpsc::Sender<()>,
}

struct Store {
    db: Database,
    path: PathBuf,
    pending: watch::Sender<usize>,
}

impl Outbox {
    /// Opens (or creates) `dir/outbox.redb` and starts flushing what it holds to `client`'s
    /// broker. Must be called within a Tokio runtime.
    pub fn open(dir: &Path, client: Client) -> Result<Self, OutboxError> {
        let path = dir.join("outbox.redb");
        let failed = |e: &dyn std::fmt::Display| OutboxError::Store {
            path: path.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
        let db = Database::create(&path).map_err(|e| failed(&e))?;
        let txn = db.begin_write().map_err(|e| failed(&e))?;
        let pending = {
            let events = txn.open_table(EVENTS).map_err(|e| failed(&e))?;
            txn.open_table(DEAD_LETTERS).map_err(|e| failed(&e))?;
            txn.open_table(META).map_err(|e| failed(&e))?;
            events.len().map_err(|e| failed(&e))?
        };
        txn.commit().map_err(|e| failed(&e))?;
        let store = Arc::new(Store {
            db,
            path: path.clone(),
            pending: watch::Sender::new(pending as usize),
        });
        let (wake, woken) = mpsc::channel(1);
        tokio::spawn(flush_loop(store.clone(), client, woken));
        Ok(Self { store, wake })
    }

    /// Stores `event` durably (with a new UUIDv7 id unless it has one) and returns: the event will
    /// be published, even if the service restarts first.
    pub async fn publish(&self, mut event: NewEvent) -> Result<OutboxReceipt, OutboxError> {
        let id = event
            .id
            .get_or_insert_with(|| uuid::Uuid::now_v7().to_string())
            .clone();
        let bytes = serde_json::to_vec(&event)?;
        let store = self.store.clone();
        let sequence = tokio::task::spawn_blocking(move || store.append(&bytes))
            .await
            .map_err(|e| self.store.error(e))??;
        self.store.pending.send_modify(|n| *n += 1);
        let _ = self.wake.try_send(());
        Ok(OutboxReceipt { id, sequence })
    }

    /// Events stored but not yet acknowledged by the broker.
    pub fn pending(&self) -> usize {
        *self.store.pending.borrow()
    }

    /// Waits until every pending event is published (or dead-lettered). Waits as long as the
    /// broker is unreachable: bound it with a timeout where that matters.
    pub async fn flush(&self) {
        let mut pending = self.store.pending.subscribe();
        let _ = pending.wait_for(|n| *n == 0).await;
    }

    /// The events the broker refused, in sequence order.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.dead_letters())
            .await
            .map_err(|e| self.store.error(e))?
    }
}

impl Store {
    fn error(&self, e: impl std::fmt::Display) -> OutboxError {
        OutboxError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Appends one encoded event under the next sequence number. redb serialises write
    /// transactions, so sequence order is commit order: the flusher never sees a later event
    /// before an earlier one.
    fn append(&self, bytes: &[u8]) -> Result<u64, OutboxError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let sequence = {
            let mut meta = txn.open_table(META).map_err(|e| self.error(e))?;
            let sequence = meta
                .get(NEXT_SEQUENCE)
                .map_err(|e| self.error(e))?
                .map_or(1, |v| v.value());
            meta.insert(NEXT_SEQUENCE, sequence + 1)
                .map_err(|e| self.error(e))?;
            let mut events = txn.open_table(EVENTS).map_err(|e| self.error(e))?;
            events.insert(sequence, bytes).map_err(|e| self.error(e))?;
            sequence
        };
        txn.commit().map_err(|e| self.error(e))?;
        Ok(sequence)
    }

    /// The first `limit` pending events in sequence order.
    fn oldest(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let events = txn.open_table(EVENTS).map_err(|e| self.error(e))?;
        let mut batch = Vec::new();
        for row in events.iter().map_err(|e| self.error(e))?.take(limit) {
            let (sequence, bytes) = row.map_err(|e| self.error(e))?;
            batch.push((sequence.value(), bytes.value().to_vec()));
        }
        Ok(batch)
    }

    /// Removes acknowledged events.
    fn remove(&self, sequences: &[u64]) -> Result<(), OutboxError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut events = txn.open_table(EVENTS).map_err(|e| self.error(e))?;
            for sequence in sequences {
                events.remove(sequence).map_err(|e| self.error(e))?;
            }
        }
        txn.commit().map_err(|e| self.error(e))
    }

    /// Moves a refused event to the dead letters, in one transaction.
    fn bury(&self, letter: &DeadLetter) -> Result<(), OutboxError> {
        let bytes = serde_json::to_vec(letter)?;
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut events = txn.open_table(EVENTS).map_err(|e| self.error(e))?;
            events.remove(letter.sequence).map_err(|e| self.error(e))?;
            let mut dead = txn.open_table(DEAD_LETTERS).map_err(|e| self.error(e))?;
            dead.insert(letter.sequence, bytes.as_slice())
                .map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }

    fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let dead = txn.open_table(DEAD_LETTERS).map_err(|e| self.error(e))?;
        let mut letters = Vec::new();
        for row in dead.iter().map_err(|e| self.error(e))? {
            let (_, bytes) = row.map_err(|e| self.error(e))?;
            letters.push(serde_json::from_slice(bytes.value())?);
        }
        Ok(letters)
    }
}

/// Whether the broker refused the request for good: a 4xx other than timeout and rate limiting.
fn refused(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Api {
            status: 400..=499,
            ..
        }
    ) && !matches!(
        error,
        ClientError::Api {
            status: 408 | 429,
            ..
        }
    )
}

/// Which event of a refused batch to dead-letter: the one the broker named, or the first when a
/// single event was sent. `None`: send the first event alone to find out.
fn refused_event(len: usize, error: &ClientError) -> Option<usize> {
    match error {
        ClientError::Api {
            index: Some(index), ..
        } if *index < len => Some(*index),
        _ if len == 1 => Some(0),
        _ => None,
    }
}

/// Runs a blocking store operation off the async threads.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    op: impl FnOnce(&Store) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    let owned = store.clone();
    tokio::task::spawn_blocking(move || op(&owned))
        .await
        .map_err(|e| store.error(e))?
}

/// Sends pending events until the last [`Outbox`] handle is gone and nothing wakes it.
async fn flush_loop(store: Arc<Store>, client: Client, mut woken: mpsc::Receiver<()>) {
    let mut backoff = FIRST_BACKOFF;
    // After an unexplained refusal of a batch, send one event at a time to find the culprit.
    let mut limit = MAX_FLUSH_BATCH;
    loop {
        let rows = match blocking(&store, move |s| s.oldest(limit)).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "outbox: cannot read pending events");
                if !pause(&mut woken, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        if rows.is_empty() {
            match woken.recv().await {
                Some(()) => continue,
                None => return,
            }
        }
        let mut sequences = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        for (sequence, bytes) in rows {
            match serde_json::from_slice::<NewEvent>(&bytes) {
                Ok(event) => {
                    sequences.push(sequence);
                    events.push(event);
                }
                Err(e) => {
                    // Only this SDK writes the table; a row it cannot read is set aside, not lost.
                    tracing::error!(sequence, error = %e, "outbox: undecodable event, dead-lettered");
                    let letter = DeadLetter {
                        sequence,
                        event: NewEvent::default(),
                        error: format!(
                            "undecodable: {e}; raw: {}",
                            String::from_utf8_lossy(&bytes)
                        ),
                    };
                    if bury(&store, letter).await.is_err() && !pause(&mut woken, &mut backoff).await
                    {
                        return;
                    }
                    break;
                }
            }
        }
        if events.is_empty() {
            continue;
        }
        match client.publish(&events).await {
            Ok(acks) => {
                let duplicates = acks.iter().filter(|ack| ack.duplicate).count();
                if duplicates > 0 {
                    tracing::debug!(duplicates, "outbox: events were already in the log");
                }
                let count = sequences.len();
                if let Err(e) = blocking(&store, move |s| s.remove(&sequences)).await {
                    // They will be sent again and acknowledged as duplicates.
                    tracing::error!(error = %e, "outbox: cannot remove published events");
                    if !pause(&mut woken, &mut backoff).await {
                        return;
                    }
                    continue;
                }
                store.pending.send_modify(|n| *n = n.saturating_sub(count));
                backoff = FIRST_BACKOFF;
                limit = MAX_FLUSH_BATCH;
            }
            Err(error) if refused(&error) => match refused_event(events.len(), &error) {
                Some(index) => {
                    tracing::error!(
                        sequence = sequences[index],
                        id = events[index].id.as_deref().unwrap_or(""),
                        error = %error,
                        "outbox: the broker refused an event; moved to the dead letters"
                    );
                    let letter = DeadLetter {
                        sequence: sequences[index],
                        event: events.swap_remove(index),
                        error: error.to_string(),
                    };
                    if bury(&store, letter).await.is_err() && !pause(&mut woken, &mut backoff).await
                    {
                        return;
                    }
                    limit = MAX_FLUSH_BATCH;
                }
                None => limit = 1,
            },
            Err(error) => {
                tracing::warn!(error = %error, retry_in = ?backoff, pending = *store.pending.borrow(), "outbox: cannot publish, will retry");
                if !pause(&mut woken, &mut backoff).await {
                    return;
                }
            }
        }
    }
}

async fn bury(store: &Arc<Store>, letter: DeadLetter) -> Result<(), OutboxError> {
    match blocking(store, move |s| s.bury(&letter)).await {
        Ok(()) => {
            store.pending.send_modify(|n| *n = n.saturating_sub(1));
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "outbox: cannot move a refused event to the dead letters");
            Err(e)
        }
    }
}

/// Sleeps `backoff` and doubles it up to the cap; false when the outbox was dropped meanwhile.
/// New events do not cut the wait short: the broker is no more reachable for them.
async fn pause(woken: &mut mpsc::Receiver<()>, backoff: &mut Duration) -> bool {
    let until = tokio::time::Instant::now() + *backoff;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return true,
            wake = woken.recv() => if wake.is_none() { return false },
        }
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
    fn only_final_refusals_dead_letter() {
        assert!(refused(&api(400, Some(0))));
        assert!(refused(&api(409, None)));
        assert!(!refused(&api(429, None)));
        assert!(!refused(&api(503, None)));
        assert!(!refused(&ClientError::Protocol("x".into())));
    }

    #[test]
    fn the_refused_event_is_the_named_one_or_found_alone() {
        assert_eq!(refused_event(10, &api(400, Some(4))), Some(4));
        assert_eq!(refused_event(10, &api(413, None)), None);
        assert_eq!(refused_event(1, &api(409, None)), Some(0));
        assert_eq!(refused_event(3, &api(400, Some(9))), None);
    }

    #[tokio::test]
    async fn events_survive_a_reopen_in_sequence_order() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        // Nothing listens on port 9 of localhost: the events stay pending.
        let client = Client::new("http://127.0.0.1:9")?;
        let outbox = Outbox::open(dir.path(), client.clone())?;
        let first = outbox.publish(NewEvent::json("a.happened", &1)?).await?;
        let second = outbox.publish(NewEvent::json("a.happened", &2)?).await?;
        assert!(first.sequence < second.sequence);
        assert_eq!(outbox.pending(), 2);
        let rows = outbox.store.oldest(10)?;
        let ids: Vec<Option<String>> = rows
            .iter()
            .map(|(_, bytes)| serde_json::from_slice::<NewEvent>(bytes).map(|e| e.id))
            .collect::<Result<_, _>>()?;
        assert_eq!(ids, vec![Some(first.id), Some(second.id)]);
        Ok(())
    }
}
