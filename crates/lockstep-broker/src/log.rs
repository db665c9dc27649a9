//! The durable log: events in redb, appended by one writer thread with group commit.
//!
//! Tables (all in `DATA/log.redb`):
//! - `event_chunks`: position of a chunk's first event → the chunk: a run of consecutive stored
//!   records (canonical bytes ‖ chain hash), see [`chunk`]; positions are gapless from 1;
//! - `event_ids`: event id → position, for idempotent publish;
//! - `key_heads`: entity key → position of the last event with that key, for `expected_position`;
//! - `rollbacks`: position of a `lockstep.rollback` record → its target, see [`superseded`].
//!
//! Invariants, kept by the writer alone: positions are gapless; `time` never decreases along
//! positions; the chain of [`lockstep_proto::record`] holds at every position; the tables change in the same
//! transaction, so a crash leaves all of them at the same committed prefix.
//!
//! Every append goes through [`Log::append`], which queues a request to the writer thread. The
//! writer takes every request waiting in the queue, applies them in order in one redb transaction
//! and commits it durably (fsync) before answering any of them: concurrent publishers share a
//! commit, so throughput grows with concurrency while each caller still waits for durability.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use chrono::Utc;
use lockstep_proto::record::{ChainHash, GENESIS_HASH, HEADER_LEN, RecordRef, content_digest};
use lockstep_proto::wire::PublishAck;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{AppendError, ConflictKind, StoreError};
use crate::metrics::LogMetrics;

mod chunk;
pub mod superseded;

use chunk::ChunkBuilder;
use superseded::{RollbackEntry, Superseded};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_chunks");
const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
const KEY_HEADS: TableDefinition<&str, u64> = TableDefinition::new("key_heads");
const ROLLBACKS: TableDefinition<u64, u64> = TableDefinition::new("rollbacks");

/// The superseded positions as of the last commit, swapped whole by the writer.
type SharedSuperseded = Arc<std::sync::RwLock<Arc<Superseded>>>;

/// Requests waiting for the writer; publishers wait (back-pressure) when it is full.
const QUEUE_CAPACITY: usize = 4096;

/// Most events one group commit takes; a larger backlog is split over several commits.
const MAX_GROUP_EVENTS: usize = 20_000;

/// An event checked and ready to append. Its canonical bytes are encoded by the request's own
/// task, with position and time left zero: the writer only stamps those, hashes and inserts, so
/// the one thread every publish goes through does as little as possible.
#[derive(Debug, Clone)]
pub struct Draft {
    id: String,
    id_generated: bool,
    key: Option<String>,
    expected_head: Option<u64>,
    expected_position: Option<u64>,
    /// Canonical bytes with position and time zero, with capacity for the chain hash after them.
    canonical: Vec<u8>,
    /// blake3 of the canonical bytes after the header, computed on the request's task.
    content_digest: [u8; 32],
    /// For a rollback record: its target, checked and stored by the writer.
    rollback_target: Option<u64>,
    /// For a rollback record: keys whose last event it supersedes, with the position of their
    /// last live event (0: none), for `expected_position`.
    key_resets: Vec<(String, u64)>,
}

impl Draft {
    /// Encodes `record` (its position and time are ignored) for appending.
    ///
    /// `id_generated` says the broker made `record.id` up (a fresh UUIDv7), so the dedup lookup
    /// can be skipped. `expected_head` and `expected_position` are the optimistic-concurrency
    /// checks; `expected_position` applies to `record.key`.
    pub fn new(
        record: &RecordRef<'_>,
        id_generated: bool,
        expected_head: Option<u64>,
        expected_position: Option<u64>,
    ) -> Self {
        let record = RecordRef {
            position: 0,
            time_ns: 0,
            ..*record
        };
        let mut canonical = Vec::with_capacity(record.encoded_len() + 32);
        record.encode(&mut canonical);
        let content_digest = content_digest(&canonical[HEADER_LEN..]);
        Self {
            id: record.id.to_owned(),
            id_generated,
            key: record.key.map(str::to_owned),
            expected_head,
            expected_position,
            canonical,
            content_digest,
            rollback_target: None,
            key_resets: Vec::new(),
        }
    }

    /// Makes this draft a rollback record naming `target`: the writer checks the target against
    /// the log as it is when the record is appended, and supersedes the positions in between.
    pub fn rollback_to(mut self, target: u64) -> Self {
        self.rollback_target = Some(target);
        self
    }

    /// For a rollback record: appended only if the head is still `head` (the key resets were
    /// computed against it), setting each key's last position as given (0: none).
    pub fn with_key_resets(mut self, head: u64, resets: Vec<(String, u64)>) -> Self {
        self.expected_head = Some(head);
        self.key_resets = resets;
        self
    }

    /// The event as encoded (position and time still zero).
    pub fn record(&self) -> Result<RecordRef<'_>, StoreError> {
        Ok(RecordRef::decode(&self.canonical)?)
    }

    /// The event's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The optimistic-concurrency checks: (`expected_head`, `expected_position`).
    pub fn expectations(&self) -> (Option<u64>, Option<u64>) {
        (self.expected_head, self.expected_position)
    }
}

/// What the writer did with one event; turned into a [`PublishAck`] by the caller's task.
#[derive(Debug, Clone, Copy)]
struct Appended {
    position: u64,
    hash: ChainHash,
    time_ns: i64,
    duplicate: bool,
    /// A duplicate of an event a rollback superseded.
    superseded: bool,
}

/// The last committed event: what `GET /v1/head` shows and what long-polls wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    /// Position of the last event (0 when empty).
    pub position: u64,
    /// Chain hash at `position`.
    pub hash: ChainHash,
    /// Time of the last event, ns (0 when empty).
    pub time_ns: i64,
}

impl Tip {
    const EMPTY: Tip = Tip {
        position: 0,
        hash: GENESIS_HASH,
        time_ns: 0,
    };
}

/// The writer's answer; the drafts travel back so their memory is freed off the writer thread.
type Reply = oneshot::Sender<(Vec<Draft>, Result<Vec<Appended>, AppendError>)>;

enum Command {
    Append { drafts: Vec<Draft>, reply: Reply },
    Stop,
}

/// Handle to the log. Cheap to clone; all clones share one database and one writer.
#[derive(Clone)]
pub struct Log {
    db: Arc<Database>,
    commands: mpsc::Sender<Command>,
    tip: watch::Receiver<Tip>,
    writer: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
    metrics: Arc<LogMetrics>,
    superseded: SharedSuperseded,
}

impl Log {
    /// Opens (or creates) the log in `dir` and starts its writer thread.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::new(format!("creating data directory {}: {e}", dir.display()))
        })?;
        let path = dir.join("log.redb");
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| StoreError::new(format!("opening {}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        txn.open_table(EVENTS)?;
        txn.open_table(EVENT_IDS)?;
        txn.open_table(KEY_HEADS)?;
        txn.open_table(ROLLBACKS)?;
        txn.commit()?;
        let db = Arc::new(db);
        let tip = read_tip(&db)?;
        let superseded = Arc::new(std::sync::RwLock::new(Arc::new(read_rollbacks(&db)?)));
        let (tip_tx, tip_rx) = watch::channel(tip);
        let (commands, queue) = mpsc::channel(QUEUE_CAPACITY);
        let metrics = Arc::new(LogMetrics::default());
        let writer = Writer {
            db: Arc::clone(&db),
            tip,
            published: tip_tx,
            metrics: Arc::clone(&metrics),
            chunk: ChunkBuilder::new(),
            group: Vec::new(),
            group_start: tip.position,
            superseded: Arc::clone(&superseded),
            pending: None,
        };
        let writer = std::thread::Builder::new()
            .name("lockstep-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StoreError::new(format!("starting writer thread: {e}")))?;
        Ok(Self {
            db,
            commands,
            tip: tip_rx,
            writer: Arc::new(std::sync::Mutex::new(Some(writer))),
            metrics,
            superseded,
        })
    }

    /// The positions superseded by rollbacks, as of the last commit.
    pub fn superseded(&self) -> Arc<Superseded> {
        Arc::clone(
            &self
                .superseded
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Appends `drafts` atomically and durably; answers once the commit is on disk.
    pub async fn append(&self, drafts: Vec<Draft>) -> Result<Vec<PublishAck>, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append { drafts, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        let (drafts, appended) = answer.await.map_err(|_| AppendError::Closed)?;
        let appended = appended?;
        Ok(drafts
            .into_iter()
            .zip(appended)
            .map(|(draft, a)| PublishAck {
                position: a.position,
                id: draft.id,
                hash: a.hash.to_hex(),
                time: chrono::DateTime::from_timestamp_nanos(a.time_ns),
                duplicate: a.duplicate,
                superseded: a.superseded,
            })
            .collect())
    }

    /// The last committed event.
    pub fn tip(&self) -> Tip {
        *self.tip.borrow()
    }

    /// The log's counters.
    pub fn metrics(&self) -> &LogMetrics {
        &self.metrics
    }

    /// A receiver that wakes on every commit.
    pub fn watch_tip(&self) -> watch::Receiver<Tip> {
        self.tip.clone()
    }

    /// Visits events after `after` in order until `visit` breaks or the log ends; blocking.
    /// Returns the position of the last event visited (or `after` if none).
    pub fn scan(
        &self,
        after: u64,
        mut visit: impl FnMut(&RecordRef<'_>, &ChainHash) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(EVENTS)?;
        let start = after.saturating_add(1);
        // The chunk holding `start` begins at or before it.
        let first_chunk = match chunks.range(..=start)?.next_back() {
            Some(entry) => entry?.0.value(),
            None => start,
        };
        let mut last = after;
        for entry in chunks.range(first_chunk..)? {
            let (_, chunk) = entry?;
            let stopped = chunk::for_each_record(chunk.value(), |record, hash| {
                if record.position < start {
                    return ControlFlow::Continue(());
                }
                last = record.position;
                visit(record, hash)
            })?;
            if stopped {
                break;
            }
        }
        Ok(last)
    }

    /// Calls `f` with the event at `position`, if there is one; blocking.
    pub fn get<T>(
        &self,
        position: u64,
        f: impl FnOnce(&RecordRef<'_>, &ChainHash) -> T,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(EVENTS)?;
        chunk::get(&chunks, position, f)
    }

    /// The first position whose time is at or after `time_ns`, or `head + 1` if none; blocking.
    /// Binary search: times never decrease along positions.
    pub fn first_at_or_after(&self, time_ns: i64) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(EVENTS)?;
        let head = chunk::last(&chunks, |record, _| record.position)?.unwrap_or(0);
        // Invariant: every event before `lo` is older than `time_ns`; every event from `hi` on
        // is not. Each probe reads one chunk and narrows by its first and last event.
        let (mut lo, mut hi) = (1u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let entry = chunks
                .range(..=mid)?
                .next_back()
                .ok_or_else(|| StoreError::new(format!("no chunk holds position {mid}")))??;
            let mut older_in_chunk = false;
            let found = chunk::for_each_record(entry.1.value(), |record, _| {
                if record.time_ns < time_ns {
                    lo = lo.max(record.position + 1);
                    older_in_chunk = true;
                    ControlFlow::Continue(())
                } else {
                    hi = hi.min(record.position);
                    ControlFlow::Break(())
                }
            })?;
            if found && older_in_chunk {
                // An older event right before it in the same chunk: this is the first.
                lo = hi;
            }
        }
        Ok(lo)
    }

    /// For each of `keys`, the position of the last live (not superseded) event with that key
    /// at or before `at`; keys with none are absent. Reads backwards chunk by chunk until every
    /// key is found or the log's start; blocking.
    pub fn last_live_positions(
        &self,
        mut keys: HashSet<String>,
        at: u64,
        superseded: &Superseded,
    ) -> Result<HashMap<String, u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(EVENTS)?;
        let mut found = HashMap::new();
        let mut in_chunk: Vec<(u64, String)> = Vec::new();
        for entry in chunks.range(..=at)?.rev() {
            if keys.is_empty() {
                break;
            }
            let (_, chunk) = entry?;
            in_chunk.clear();
            chunk::for_each_record(chunk.value(), |record, _| {
                if let Some(key) = record.key
                    && record.position <= at
                    && keys.contains(key)
                    && !superseded.contains(record.position)
                {
                    in_chunk.push((record.position, key.to_owned()));
                }
                ControlFlow::Continue(())
            })?;
            for (position, key) in in_chunk.drain(..).rev() {
                if keys.remove(&key) {
                    found.insert(key, position);
                }
            }
        }
        Ok(found)
    }

    /// How many handles share the database: clones of this log (and the writer until it stops).
    pub fn database_handles(&self) -> usize {
        Arc::strong_count(&self.db)
    }

    /// Stops the writer after the requests already queued, and waits for it.
    pub async fn close(&self) {
        // A full queue means appends are still queued: they are answered before Stop is seen.
        let _ = self.commands.send(Command::Stop).await;
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn read_rollbacks(db: &Database) -> Result<Superseded, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(ROLLBACKS)?;
    let mut rollbacks = Vec::new();
    for entry in table.iter()? {
        let (at, target) = entry?;
        rollbacks.push(RollbackEntry {
            at: at.value(),
            target: target.value(),
        });
    }
    Ok(Superseded::from_rollbacks(rollbacks))
}

fn read_tip(db: &Database) -> Result<Tip, StoreError> {
    let txn = db.begin_read()?;
    let chunks = txn.open_table(EVENTS)?;
    let tip = chunk::last(&chunks, |record, hash| Tip {
        position: record.position,
        hash: *hash,
        time_ns: record.time_ns,
    })?;
    Ok(tip.unwrap_or(Tip::EMPTY))
}

/// The one thread that writes the log.
struct Writer {
    db: Arc<Database>,
    /// Tip including the commits of the group being built; equals the committed tip between groups.
    tip: Tip,
    published: watch::Sender<Tip>,
    metrics: Arc<LogMetrics>,
    /// The chunk being filled; flushed when full and at the end of every group.
    chunk: ChunkBuilder,
    /// Events appended by the group being built, from position `group_start + 1`: a duplicate id
    /// may point at one of them before its chunk is in the table.
    group: Vec<Appended>,
    group_start: u64,
    /// Superseded positions as readers see them; replaced after a commit that adds a rollback.
    superseded: SharedSuperseded,
    /// The group's own rollbacks added to the committed ones, until the commit lands.
    pending: Option<Superseded>,
}

/// What one event of a request turns into, decided before anything of the request is written.
enum Plan {
    /// Already stored: answer with the original.
    Stored(Appended),
    /// Same id as an earlier event of this request: answer with that one's ack.
    SameAs(usize),
    /// Append at this position.
    Append(u64),
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut group: Vec<(Vec<Draft>, Reply)> = Vec::new();
        let mut stopping = false;
        while !stopping {
            match queue.blocking_recv() {
                Some(Command::Append { drafts, reply }) => group.push((drafts, reply)),
                Some(Command::Stop) | None => break,
            }
            let mut events = group[0].0.len();
            while events < MAX_GROUP_EVENTS {
                match queue.try_recv() {
                    Ok(Command::Append { drafts, reply }) => {
                        events += drafts.len();
                        group.push((drafts, reply));
                    }
                    Ok(Command::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group);
        }
        queue.close();
        while let Ok(command) = queue.try_recv() {
            if let Command::Append { drafts, reply } = command {
                let _ = reply.send((drafts, Err(AppendError::Closed)));
            }
        }
        tracing::debug!("log writer stopped");
    }

    fn commit_group(&mut self, group: &mut Vec<(Vec<Draft>, Reply)>) {
        let started = std::time::Instant::now();
        let before = self.tip;
        match self.write_group(group) {
            Ok(results) => {
                // Readers must see a rollback's superseded range before its record.
                if let Some(superseded) = self.pending.take() {
                    *self
                        .superseded
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Arc::new(superseded);
                }
                self.published.send_replace(self.tip);
                self.metrics
                    .record_commit(started.elapsed(), self.tip.position - before.position);
                for ((drafts, reply), result) in group.drain(..).zip(results) {
                    let _ = reply.send((drafts, result));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "log commit failed; the group's publishes are refused");
                self.tip = before;
                self.pending = None;
                for (drafts, reply) in group.drain(..) {
                    let _ = reply.send((drafts, Err(AppendError::Storage(err.clone()))));
                }
            }
        }
    }

    /// Applies every request of the group in one transaction and commits it. A request that fails
    /// its own checks gets its error and writes nothing; the others are unaffected.
    fn write_group(
        &mut self,
        group: &mut [(Vec<Draft>, Reply)],
    ) -> Result<Vec<Result<Vec<Appended>, AppendError>>, StoreError> {
        let txn = self.db.begin_write()?;
        let mut results = Vec::with_capacity(group.len());
        self.chunk.clear();
        self.group.clear();
        self.group_start = self.tip.position;
        {
            let mut tables = Tables {
                events: txn.open_table(EVENTS)?,
                ids: txn.open_table(EVENT_IDS)?,
                keys: txn.open_table(KEY_HEADS)?,
                rollbacks: txn.open_table(ROLLBACKS)?,
            };
            let now = Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
            for (drafts, _) in group.iter_mut() {
                results.push(self.apply(&mut tables, now, drafts)?);
            }
            self.flush_chunk(&mut tables)?;
        }
        txn.commit()?;
        Ok(results)
    }

    fn flush_chunk(&mut self, tables: &mut Tables<'_>) -> Result<(), StoreError> {
        if let Some((first, bytes)) = self.chunk.take() {
            tables.events.insert(first, bytes)?;
        }
        Ok(())
    }

    fn apply(
        &mut self,
        tables: &mut Tables<'_>,
        now: i64,
        drafts: &mut [Draft],
    ) -> Result<Result<Vec<Appended>, AppendError>, StoreError> {
        let plan = match self.plan(tables, drafts)? {
            Ok(plan) => plan,
            Err(conflict) => return Ok(Err(conflict)),
        };
        let mut appended: Vec<Appended> = Vec::with_capacity(drafts.len());
        for (draft, step) in drafts.iter_mut().zip(plan) {
            let outcome = match step {
                Plan::Stored(stored) => stored,
                Plan::SameAs(index) => Appended {
                    duplicate: true,
                    ..appended[index]
                },
                Plan::Append(position) => {
                    debug_assert_eq!(position, self.tip.position + 1);
                    let time_ns = now.max(self.tip.time_ns);
                    RecordRef::stamp(&mut draft.canonical, position, time_ns)?;
                    let hash = self
                        .tip
                        .hash
                        .next_parts(&draft.canonical[..HEADER_LEN], &draft.content_digest);
                    draft.canonical.extend_from_slice(&hash.0);
                    if self.chunk.is_full_for(draft.canonical.len()) {
                        self.flush_chunk(tables)?;
                    }
                    self.chunk.push(position, &draft.canonical);
                    tables.ids.insert(draft.id.as_str(), position)?;
                    if let Some(key) = &draft.key {
                        tables.keys.insert(key.as_str(), position)?;
                    }
                    if let Some(target) = draft.rollback_target {
                        tables.rollbacks.insert(position, target)?;
                        for (key, last) in &draft.key_resets {
                            if *last == 0 {
                                tables.keys.remove(key.as_str())?;
                            } else {
                                tables.keys.insert(key.as_str(), *last)?;
                            }
                        }
                        let mut pending = match self.pending.take() {
                            Some(pending) => pending,
                            None => self.committed_superseded(),
                        };
                        pending.add(RollbackEntry {
                            at: position,
                            target,
                        });
                        self.pending = Some(pending);
                    }
                    self.tip = Tip {
                        position,
                        hash,
                        time_ns,
                    };
                    let new = Appended {
                        position,
                        hash,
                        time_ns,
                        duplicate: false,
                        superseded: false,
                    };
                    self.group.push(new);
                    new
                }
            };
            appended.push(outcome);
        }
        Ok(Ok(appended))
    }

    /// Decides each event's fate and checks every expectation before anything is written, so a
    /// request either appends all its new events or none.
    fn plan(
        &self,
        tables: &Tables<'_>,
        drafts: &[Draft],
    ) -> Result<Result<Vec<Plan>, AppendError>, StoreError> {
        let mut plan = Vec::with_capacity(drafts.len());
        let mut head = self.tip.position;
        // Client-given ids and key heads of this request's own new events.
        let mut new_ids: HashMap<&str, usize> = HashMap::new();
        let mut new_keys: HashMap<&str, u64> = HashMap::new();
        for (index, draft) in drafts.iter().enumerate() {
            if let Some(&first) = new_ids.get(draft.id.as_str()) {
                plan.push(Plan::SameAs(first));
                continue;
            }
            // A broker-generated id (a fresh UUIDv7) cannot be stored yet: skip the lookup.
            if !draft.id_generated
                && let Some(position) = tables.ids.get(draft.id.as_str())?
            {
                plan.push(Plan::Stored(self.stored(&tables.events, position.value())?));
                continue;
            }
            if let Some(expected) = draft.expected_head
                && expected != head
            {
                return Ok(Err(AppendError::Conflict {
                    index,
                    kind: ConflictKind::Head,
                    expected,
                    current: head,
                }));
            }
            if let (Some(expected), Some(key)) = (draft.expected_position, draft.key.as_deref()) {
                let current = match new_keys.get(key) {
                    Some(&position) => position,
                    None => tables.keys.get(key)?.map_or(0, |p| p.value()),
                };
                if expected != current {
                    return Ok(Err(AppendError::Conflict {
                        index,
                        kind: ConflictKind::Key(key.to_owned()),
                        expected,
                        current,
                    }));
                }
            }
            if let Some(target) = draft.rollback_target {
                let checked = match &self.pending {
                    Some(pending) => pending.check_target(target, head + 1),
                    None => self.committed_superseded().check_target(target, head + 1),
                };
                if let Err(message) = checked {
                    return Ok(Err(AppendError::Refused { index, message }));
                }
            }
            head += 1;
            if !draft.id_generated {
                new_ids.insert(&draft.id, index);
            }
            if let Some(key) = draft.key.as_deref() {
                new_keys.insert(key, head);
            }
            plan.push(Plan::Append(head));
        }
        Ok(Ok(plan))
    }
}

impl Writer {
    /// The superseded positions as of the last commit.
    fn committed_superseded(&self) -> Superseded {
        Superseded::clone(
            &self
                .superseded
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The original of an event stored earlier, as a duplicate's answer.
    fn stored(
        &self,
        events: &redb::Table<'_, u64, &'static [u8]>,
        position: u64,
    ) -> Result<Appended, StoreError> {
        if let Some(index) = position.checked_sub(self.group_start + 1) {
            if let Some(appended) = self.group.get(index as usize) {
                return Ok(Appended {
                    duplicate: true,
                    ..*appended
                });
            }
        }
        let superseded = match &self.pending {
            Some(pending) => pending.contains(position),
            None => self
                .superseded
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(position),
        };
        chunk::get(events, position, |record, hash| Appended {
            position,
            hash: *hash,
            time_ns: record.time_ns,
            duplicate: true,
            superseded,
        })?
        .ok_or_else(|| StoreError::new(format!("id index points at missing position {position}")))
    }
}

struct Tables<'txn> {
    events: redb::Table<'txn, u64, &'static [u8]>,
    ids: redb::Table<'txn, &'static str, u64>,
    keys: redb::Table<'txn, &'static str, u64>,
    rollbacks: redb::Table<'txn, u64, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(id: &str) -> Draft {
        draft_with(id, None, None, None)
    }

    fn draft_with(
        id: &str,
        key: Option<&str>,
        expected_head: Option<u64>,
        expected_position: Option<u64>,
    ) -> Draft {
        let record = RecordRef {
            position: 0,
            time_ns: 0,
            id,
            event_type: "thing.happened",
            source: "test",
            key,
            occurred_at_ns: None,
            content_type: "application/json",
            data: b"{}",
        };
        Draft::new(&record, false, expected_head, expected_position)
    }

    fn chain_of(log: &Log) -> Vec<(u64, i64, ChainHash)> {
        let mut out = Vec::new();
        let mut prev = GENESIS_HASH;
        log.scan(0, |record, hash| {
            let mut canonical = Vec::new();
            record.encode(&mut canonical);
            assert_eq!(prev.next(&canonical), *hash, "chain at {}", record.position);
            prev = *hash;
            out.push((record.position, record.time_ns, *hash));
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    #[tokio::test]
    async fn positions_are_gapless_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5 {
            let acks = log
                .append(vec![draft(&format!("a{i}")), draft(&format!("b{i}"))])
                .await
                .unwrap();
            assert_eq!(acks[0].position, 2 * i + 1);
            assert_eq!(acks[1].position, 2 * i + 2);
        }
        let tip = log.tip();
        log.close().await;
        drop(log);
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.tip(), tip);
        let chain = chain_of(&log);
        assert_eq!(chain.len(), 10);
        assert!(chain.windows(2).all(|w| w[1].1 >= w[0].1), "time decreased");
    }

    #[tokio::test]
    async fn duplicate_ids_inside_a_request_and_across_requests() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        let acks = log.append(vec![draft("x"), draft("x")]).await.unwrap();
        assert_eq!(acks[0].position, 1);
        assert_eq!((acks[1].position, acks[1].duplicate), (1, true));
        let again = log.append(vec![draft("x")]).await.unwrap();
        assert_eq!(again[0].hash, acks[0].hash);
        assert!(again[0].duplicate);
        assert_eq!(log.tip().position, 1);
    }

    #[tokio::test]
    async fn a_failed_expectation_writes_nothing_of_its_request() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        log.append(vec![draft("a")]).await.unwrap();
        let bad = draft_with("c", None, Some(7), None);
        let err = log.append(vec![draft("b"), bad]).await.unwrap_err();
        assert!(matches!(
            err,
            AppendError::Conflict {
                index: 1,
                current: 2,
                expected: 7,
                ..
            }
        ));
        assert_eq!(log.tip().position, 1);
        assert_eq!(chain_of(&log).len(), 1);
    }

    #[tokio::test]
    async fn key_expectations_see_earlier_events_of_the_same_request() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        let first = draft_with("k1", Some("acct"), None, Some(0));
        let second = draft_with("k2", Some("acct"), None, Some(1));
        log.append(vec![first, second]).await.unwrap();
        let stale = draft_with("k3", Some("acct"), None, Some(1));
        let err = log.append(vec![stale]).await.unwrap_err();
        assert!(matches!(err, AppendError::Conflict { current: 2, .. }));
    }

    #[tokio::test]
    async fn time_search_finds_the_first_event_at_or_after() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        for i in 0..20 {
            log.append(vec![draft(&format!("t{i}"))]).await.unwrap();
        }
        let chain = chain_of(&log);
        for &(position, time_ns, _) in &chain {
            let first = chain.iter().find(|c| c.1 >= time_ns).unwrap().0;
            assert_eq!(
                log.first_at_or_after(time_ns).unwrap(),
                first,
                "at {position}"
            );
        }
        assert_eq!(log.first_at_or_after(i64::MAX).unwrap(), 21);
        assert_eq!(log.first_at_or_after(0).unwrap(), 1);
    }

    #[tokio::test]
    async fn batches_spanning_many_chunks_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        for b in 0..3 {
            let drafts = (0..700).map(|i| draft(&format!("b{b}-{i}"))).collect();
            log.append(drafts).await.unwrap();
        }
        let chain = chain_of(&log);
        assert_eq!(chain.len(), 2100);
        for after in [0, 1, 255, 256, 257, 699, 700, 701, 1500, 2099, 2100] {
            let mut first = None;
            let last = log
                .scan(after, |record, _| {
                    first = Some(record.position);
                    ControlFlow::Break(())
                })
                .unwrap();
            let expected = (after < 2100).then_some(after + 1);
            assert_eq!(first, expected, "after {after}");
            assert_eq!(last, expected.unwrap_or(after));
        }
        for &(position, time_ns, hash) in chain.iter().step_by(37) {
            let got = log
                .get(position, |r, h| (r.position, r.time_ns, *h))
                .unwrap();
            assert_eq!(got, Some((position, time_ns, hash)));
            let first = chain.iter().find(|c| c.1 >= time_ns).unwrap().0;
            assert_eq!(log.first_at_or_after(time_ns).unwrap(), first);
        }
        assert_eq!(log.get(2101, |r, _| r.position).unwrap(), None);
        let again = log.append(vec![draft("b1-350")]).await.unwrap();
        assert_eq!((again[0].position, again[0].duplicate), (1051, true));
        assert_eq!(again[0].hash, chain[1050].2.to_hex());
    }

    /// Guards the in-group dedup path: an id appended by an earlier request of the same group
    /// is found before its chunk reaches the table.
    #[test]
    fn a_duplicate_of_an_event_earlier_in_the_same_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), 1 << 20).unwrap();
        let (tip_tx, _tip_rx) = watch::channel(Tip::EMPTY);
        let mut writer = Writer {
            db: Arc::clone(&log.db),
            tip: log.tip(),
            published: tip_tx,
            metrics: Arc::default(),
            chunk: ChunkBuilder::new(),
            group: Vec::new(),
            group_start: 0,
            superseded: Arc::default(),
            pending: None,
        };
        let (a, _) = oneshot::channel();
        let (b, _) = oneshot::channel();
        let mut group = vec![
            (vec![draft("x"), draft("y")], a),
            (vec![draft("z"), draft("y")], b),
        ];
        let results = writer.write_group(&mut group).unwrap();
        let first = results[0].as_ref().unwrap();
        let second = results[1].as_ref().unwrap();
        assert_eq!((second[0].position, second[0].duplicate), (3, false));
        assert_eq!((second[1].position, second[1].duplicate), (2, true));
        assert_eq!(second[1].hash, first[1].hash);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever mix of batches, repeated ids and expectations is appended: positions are
        /// gapless from 1, times never decrease, the chain verifies, every id is stored once and
        /// every ack names what is stored at its position.
        #[test]
        fn log_invariants_hold_for_any_appends(
            requests in proptest::collection::vec(
                proptest::collection::vec((0u8..40, proptest::option::of(0u64..30)), 1..40),
                1..12,
            ),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let log = Log::open(dir.path(), 1 << 20).unwrap();
                let mut acked = Vec::new();
                for request in &requests {
                    let drafts = request
                        .iter()
                        .map(|(id, head)| draft_with(&format!("id-{id}"), None, *head, None))
                        .collect();
                    if let Ok(acks) = log.append(drafts).await {
                        acked.extend(acks);
                    }
                }
                let chain = chain_of(&log);
                let positions: Vec<u64> = chain.iter().map(|c| c.0).collect();
                assert_eq!(positions, (1..=chain.len() as u64).collect::<Vec<_>>());
                assert!(chain.windows(2).all(|w| w[0].1 <= w[1].1));
                let mut ids = std::collections::HashSet::new();
                log.scan(0, |record, _| {
                    assert!(ids.insert(record.id.to_owned()), "{} stored twice", record.id);
                    ControlFlow::Continue(())
                })
                .unwrap();
                for ack in &acked {
                    let (id, hash) = log
                        .get(ack.position, |r, h| (r.id.to_owned(), h.to_hex()))
                        .unwrap()
                        .unwrap();
                    assert_eq!((id.as_str(), hash.as_str()), (ack.id.as_str(), ack.hash.as_str()));
                }
                assert_eq!(log.tip().position, chain.len() as u64);
            });
        }
    }
}
