//! Node leases: a gateway node not heard from for `cluster.node_lease` is dead. Checked
//! here on a short tick; on expiry its devices are offline at once (the replica's lookups
//! skip it) and its pending deliveries fall back now instead of at their deadlines.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ClusterDirectory;

/// Lease checks per lease: expiry is noticed within a tenth of `node_lease` (150 ms at the
/// default), well inside the 2 s in which a dead node's devices must be offline.
const CHECKS_PER_LEASE: u32 = 10;

pub async fn watch(dir: ClusterDirectory, stop: CancellationToken) {
    let Some(replica) = dir.0.replica.as_ref() else {
        return;
    };
    let period = (dir.0.lease / CHECKS_PER_LEASE).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (died, nodes, devices) = {
            let mut r = dir.replica_write(replica);
            let died = r.expire(Instant::now());
            (died, r.live_nodes(), r.device_count())
        };
        for node in died {
            tracing::warn!(node = %node, lease = ?dir.0.lease, "gateway node lease expired: its devices are offline");
            dir.0.rpc.fail_node(&node);
        }
        dir.0.metrics.cluster_nodes.set(nodes as i64);
        dir.0.metrics.cluster_devices.set(devices as i64);
    }
}
