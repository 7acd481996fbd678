//! The directory: "deliver this notification to device D, live", answered with an
//! outcome the dispatcher acts on.
//!
//! `Local` is this node's own session table (the embedded, one-process install). A
//! `Cluster` variant (RabbitMQ routing by device id, replies over direct reply-to) comes
//! with the cluster backend; the dispatcher calls the same `deliver` on either.

use crate::domain::{DeviceId, QueuedNotification};
use crate::gateway::Gateway;

/// The result of one live delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveOutcome {
    /// The device acked the notification: delivered.
    Acked,
    /// The frame went out but no ack came within `gateway.ack_timeout`: fall back (the
    /// device may still have it; it dedupes by id).
    NotAcked,
    /// No session, the session died before acking, or the node is draining: fall back.
    Offline,
}

#[derive(Clone)]
pub enum Directory {
    Local(Gateway),
}

impl Directory {
    /// Sends `n` to `device`'s live session and waits (at most `gateway.ack_timeout`) for
    /// its ack.
    pub async fn deliver(&self, device: &DeviceId, n: &QueuedNotification) -> LiveOutcome {
        match self {
            Directory::Local(gateway) => gateway.deliver(device, n).await,
        }
    }

    /// Whether `device` holds a session now (a hint: it may drop the next moment).
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        match self {
            Directory::Local(gateway) => gateway.is_connected(device),
        }
    }
}
