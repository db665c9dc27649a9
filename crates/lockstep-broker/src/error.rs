//! The broker's error types, one per operation where callers react differently.

use std::sync::Arc;

/// The store failed: I/O, a failed commit, or a record that does not decode. Not the client's
/// fault; a retry may succeed once the cause is fixed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(Arc<str>);

impl StoreError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self(Arc::from(message.into()))
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::new(e.to_string())
            }
        }
    )*};
}

store_error_from!(
    redb::Error,
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::DatabaseError,
    lockstep_proto::record::DecodeError
);

/// Which expectation of a publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConflictKind {
    /// `expected_head`: the log's head.
    Head,
    /// `expected_position`: the last event with this key.
    Key(String),
}

/// Why an append was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// An optimistic-concurrency expectation did not hold; nothing of the request was written.
    #[error("{}", conflict_message(.index, .kind, .expected, .current))]
    Conflict {
        /// Index of the failing event in the request.
        index: usize,
        /// Which expectation.
        kind: ConflictKind,
        /// What the client expected.
        expected: u64,
        /// The current value.
        current: u64,
    },
    /// The log refused an event as it stands (a rollback to a position it cannot return to);
    /// nothing of the request was written.
    #[error("event {index}: {message}; nothing was written")]
    Refused {
        /// Index of the refused event in the request.
        index: usize,
        /// Why.
        message: String,
    },
    /// The commit failed; nothing of the request was written.
    #[error("storage failure: {0}")]
    Storage(StoreError),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    Closed,
}

fn conflict_message(index: &usize, kind: &ConflictKind, expected: &u64, current: &u64) -> String {
    match kind {
        ConflictKind::Head => format!(
            "event {index}: expected_head is {expected} but the log's head is {current}; nothing was written"
        ),
        ConflictKind::Key(key) => format!(
            "event {index}: expected_position is {expected} but the last event with key {key:?} is at {current}; nothing was written"
        ),
    }
}

/// Why a publish was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The request is malformed; fix it before retrying.
    #[error("{message}")]
    Invalid {
        /// Stable error code.
        code: &'static str,
        /// What is wrong.
        message: String,
        /// The offending event of a batch.
        index: Option<usize>,
    },
    /// The log refused or failed the append.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// An operator paused publishing (around a rollback); retry later.
    #[error("publishing is paused{}; retry later", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Paused(Option<String>),
}

impl PublishError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            code: "invalid_event",
            message: message.into(),
            index: None,
        }
    }

    pub(crate) fn at(self, i: usize) -> Self {
        match self {
            Self::Invalid { code, message, .. } => Self::Invalid {
                code,
                message: format!("event {i}: {message}"),
                index: Some(i),
            },
            other => other,
        }
    }
}

/// Why a read was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// A bad parameter; fix it before retrying.
    #[error("{message}")]
    Invalid {
        /// Stable error code.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No event at that position.
    #[error("no event at position {0}")]
    NotFound(u64),
    /// The store failed.
    #[error("storage failure: {0}")]
    Store(#[from] StoreError),
}
