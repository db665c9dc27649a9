//! The Lockstep SDK: what a service links to publish events to a Lockstep broker and read its log.
//!
//! - [`Client`]: a cheap-to-clone HTTP handle for publishing, reading and the head.
//! - [`ClientError`]: what went wrong, and whether retrying can help.
//! - Subscriptions (the registrar): [`Client::subscribe`], [`Client::pull`], [`Client::stream`]
//!   and [`Client::ack`] deliver a replica's events from where it acknowledged last.
//! - [`Publisher`]: many tasks publishing single events, sent as few batched requests.
//! - [`Outbox`]: events stored locally first and published, in order, whenever the broker is up.
//!
//! ```no_run
//! # async fn run() -> Result<(), lockstep::ClientError> {
//! use lockstep::{Client, NewEvent, ReadRequest};
//!
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let ack = client
//!     .publish_one(&NewEvent::json("account.opened", &serde_json::json!({"owner": "ann"}))?)
//!     .await?;
//! println!("stored at {} with hash {}", ack.position, ack.hash);
//!
//! let page = client.read(&ReadRequest::after(0).types("account.*")).await?;
//! for event in page.events {
//!     println!("{} {}", event.position, event.event_type);
//! }
//! # Ok(()) }
//! ```

mod client;
pub mod conformance;
mod operations;
mod outbox;
mod publisher;
mod replica;
mod runtime;
pub mod snapshot;
mod subscription;

pub use client::{Client, ClientError, Pages, ReadRequest};
pub use lockstep_proto::consistency::{
    BARRIER_TYPE, BarrierGroups, EntriesReport, EntryHash, Explanation, HashGroup, KeyDifference,
    Mark, MarkAt, MarkAtName, MarkList, OddReplica, PauseState, ROLLBACK_TYPE, RedriveResult,
    Redriven, ReplicaStanding, ReportAnswer, Rollback, RollbackData, RollbackList, RollbackTo,
    ServiceVerification, StateReport, Verdict, Verification, VerifiedSnapshot,
};
pub use lockstep_proto::subscription::{
    End, PushFormat, Start, StartName, SubscriptionInfo, SubscriptionList, SubscriptionSpec,
    SubscriptionState,
};
pub use lockstep_proto::wire::{Event, Head, NewEvent, PublishAck, ReadResponse};
pub use lockstep_proto::{ChainHash, GENESIS_HASH};
pub use outbox::{DeadLetter, MAX_FLUSH_BATCH, Outbox, OutboxError, OutboxReceipt};
pub use publisher::{
    DEFAULT_MAX_BATCH, DEFAULT_MAX_IN_FLIGHT, DEFAULT_QUEUE_CAPACITY, Publisher, PublisherBuilder,
};
pub use replica::{
    ApplyError, Entries, EventMeta, Replica, decode_state, encode_state, hash_entries, state_hash,
};
pub use runtime::{
    Bootstrap, ExternalReplica, ExternalRuntime, Runtime, RuntimeBuilder, RuntimeError, StateHandle,
};
pub use subscription::{
    MAX_STREAM_LINE_BYTES, PullRequest, STREAM_IDLE_TIMEOUT, StreamItem, SubscriptionStream,
};
