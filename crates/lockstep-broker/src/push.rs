//! Push delivery (being written).

use std::sync::Arc;

use crate::Broker;
use crate::registry::Subscription;

/// Starts the push worker of `sub`.
pub(crate) fn spawn(_broker: Broker, sub: Arc<Subscription>) {
    tracing::warn!(subscription = %sub.key(), "push delivery is not implemented yet");
}
