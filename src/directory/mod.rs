//! The directory: "deliver this notification to device D, live", answered with an
//! outcome the dispatcher acts on.
//!
//! `Local` is this node's own session table (the embedded, one-process install).
//! `Cluster` ([`cluster`]) is an in-memory replica of device → node fed by the gateways'
//! presence events over RabbitMQ, with one queue per gateway node, used whenever
//! `queue.url` is RabbitMQ; the dispatcher calls the same `deliver` on either.
//!
//! The directory depends on the gateway, never the reverse: the gateway announces its
//! table changes through [`crate::gateway::registrar`].

pub mod cluster;

use crate::domain::{DeviceKey, QueuedNotification};
use crate::gateway::Gateway;
/// The gateway owns the outcome (it produces it); re-exported here, where the dispatcher
/// asks for live deliveries.
pub use crate::gateway::{AwaitingAck, LiveOutcome};
pub use cluster::ClusterDirectory;

#[derive(Clone)]
pub enum Directory {
    Local(Gateway),
    Cluster(ClusterDirectory),
}

impl Directory {
    /// The directory a node delivers through: the cluster directory in cluster mode, else
    /// this node's own sessions; `None` on a node with neither.
    pub fn for_node(
        cluster: Option<&ClusterDirectory>,
        gateway: Option<&Gateway>,
    ) -> Option<Directory> {
        match (cluster, gateway) {
            (Some(c), _) => Some(Directory::Cluster(c.clone())),
            (None, Some(g)) => Some(Directory::Local(g.clone())),
            (None, None) => None,
        }
    }

    /// Sends `n` to `device`'s live session and waits (at most `gateway.ack_timeout`, plus
    /// the broker hop in cluster mode) for its ack.
    pub async fn deliver(&self, device: &DeviceKey, n: &QueuedNotification) -> LiveOutcome {
        self.deliver_awaiting(device, n, &|| {}).await
    }

    /// [`Directory::deliver`], calling `awaiting_ack` once only the device's ack is left to
    /// wait for ([`AwaitingAck`]).
    pub async fn deliver_awaiting(
        &self,
        device: &DeviceKey,
        n: &QueuedNotification,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        match self {
            Directory::Local(gateway) => gateway.deliver_awaiting(device, n, awaiting_ack).await,
            Directory::Cluster(cluster) => cluster.deliver_awaiting(device, n, awaiting_ack).await,
        }
    }

    /// Whether `device` holds a session on this node now (a hint: it may drop the next
    /// moment).
    pub fn is_connected(&self, device: &DeviceKey) -> bool {
        match self {
            Directory::Local(gateway) => gateway.is_connected(device),
            Directory::Cluster(cluster) => cluster.is_connected_here(device),
        }
    }
}
