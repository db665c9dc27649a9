//! Lockstep's wire model: what an event is, how positions chain together, and the JSON shapes of
//! the HTTP API. No I/O lives here, so the broker, the SDK and the CLI agree by construction.
//!
//! - [`names`]: event type names (`account.opened`) and the patterns that select them (`account.*`).
//! - [`record`]: the canonical bytes of an event and the blake3 hash chain over them.
//! - [`wire`]: request and response bodies of the HTTP API, and the fast JSON writer of the read path.
//! - [`consistency`]: barriers, state-hash reports and verification.
//! - [`subscription`]: the registrar's shapes: subscriptions, their start, end, position and state.

pub mod consistency;
pub mod names;
pub mod record;
pub mod subscription;
pub mod wire;

pub use names::{TypeFilter, TypePattern};
pub use record::{ChainHash, GENESIS_HASH, RecordRef};
pub use wire::{Event, NewEvent, PublishAck};
