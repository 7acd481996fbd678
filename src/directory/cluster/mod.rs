//! The cluster directory: which node holds a device's session, with no per-device state in
//! the broker.
//!
//! ```text
//!  gateway node B                                            every dispatcher process
//!  session open/close ─▶ publisher ─ delta (batched) ─▶ {p}.presence (fanout) ─▶ replica
//!                        heartbeat every 500 ms ───────▶      "           device → (node, session)
//!                        snapshot ◀── snapshot_request ── {p}.node.B ◀── (new/lagging replica)
//!
//!  dispatcher: replica.lookup(D) = B ─ D's frame ─▶ {p}.node.B ─▶ session ─▶ "received", then
//!  {p}.reply.<id> ◀── "acked" / "not_acked" / "offline" ── {p}.replies (direct) ◀──┘
//! ```
//!
//! - [`presence`]: the replica and the rules that keep it right (sequence numbers,
//!   snapshots, leases); [`node`]: a gateway node's publisher and its queue; [`rpc`]: remote
//!   delivery and replies; [`lease`]: the lease clock; [`wire`]: message formats.
//! - The broker holds O(nodes) metadata: two exchanges (presence, replies), one queue per
//!   gateway node, one per process's presence subscription and one reply queue per
//!   dispatcher process.
//! - Who declares what (so each role's broker user holds only what it uses,
//!   docs/deploy.md): a dispatcher declares the presence and replies exchanges, its
//!   presence queue and its reply queue; a gateway declares only its node queue and its
//!   presence queue, and checks (passively) that the exchanges are there, waiting (not
//!   ready) until a dispatcher has declared them. A session open or close is one op in a batched,
//!   confirmed publish, never a queue or binding declaration.
//! - Offline is answered from the replica, locally, with no broker round trip; only a
//!   target whose device the replica places on another live node costs a publish, of that
//!   device's frame alone.
//! - The consistency story (what can be stale, for how long, and why it costs a fallback
//!   or a duplicate, never a loss) is in ARCHITECTURE.md, "Cluster mode".
//!
//! One supervisor per process owns this directory's channels on the queue backend's one
//! connection; when any dies it waits for the next connection, sets everything up again
//! (the replica re-syncs by snapshot where it missed events) and resumes; meanwhile
//! [`ClusterDirectory::is_ready`] is false (so `/readyz` is 503).

mod lease;
mod node;
mod presence;
mod rpc;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterSettings;
use crate::domain::{DeviceKey, QueuedNotification};
use crate::gateway::{AwaitingAck, Gateway, LiveOutcome, registrar};
use crate::metrics::Metrics;
use crate::queue::RabbitQueue;
use crate::queue::reconnect::{self, Backoff};
use presence::{NodeId, Replica};

/// How often the supervisor checks its channels are alive (belt and braces: a dead channel
/// also ends its consumers' streams, which is noticed at once).
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// What this process does in the cluster.
pub struct Roles {
    /// This node's sessions (the gateway role): announced to the cluster.
    pub gateway: Option<Gateway>,
    /// The dispatcher role: keep a replica and deliver across nodes.
    pub lookups: bool,
}

/// The cluster directory. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ClusterDirectory(Arc<Inner>);

struct Inner {
    queue: Arc<RabbitQueue>,
    prefix: String,
    exchange: String,
    /// The replies exchange (answers to dispatchers).
    replies: String,
    /// This node's id when it has the gateway role.
    node_id: Option<NodeId>,
    /// This node's sessions; `None` on a node without the gateway role.
    gateway: Option<Gateway>,
    /// The device → node replica; `None` on a node that never looks devices up (no
    /// dispatcher role): a gateway-only node only reacts to other nodes' opens.
    replica: Option<RwLock<Replica>>,
    rpc: rpc::Rpc,
    lease: Duration,
    hop_timeout: Duration,
    /// The gateway publisher's channel for the current generation.
    publink: watch::Sender<node::PubLink>,
    /// The gateway's view of readiness: new sessions can be announced.
    registrar_ready: watch::Sender<bool>,
    /// Every channel of the current generation is up.
    up: AtomicBool,
    metrics: Metrics,
    /// The directory's node in the shutdown tree (a child of the queue's): stops the
    /// supervisor, the publisher and the lease clock.
    stop: CancellationToken,
}

/// Declares the directory's exchanges (what a dispatcher does when it connects): the
/// presence fanout and the replies direct exchange, durable (they outlive a broker
/// restart; the queues bound to them are per process and exclusive, re-made by each
/// process on reconnect). Public for tests and tooling that need them before a dispatcher.
pub async fn declare_exchanges(ch: &Channel, prefix: &str) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        wire::presence_exchange(prefix).as_str().into(),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        wire::replies_exchange(prefix).as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await
}

/// Declares one of this process's own queues (exclusive and auto-delete: it dies with the
/// connection, so a dead process leaves nothing behind), binds it to each `(exchange,
/// key)` and consumes it without acks (what crosses the directory's queues is only useful
/// right now). The presence, node and reply queues are all such queues.
async fn own_queue(
    ch: &Channel,
    name: &str,
    bindings: &[(&str, &str)],
) -> lapin::Result<lapin::Consumer> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    for (exchange, key) in bindings {
        ch.queue_bind(
            name.into(),
            (*exchange).into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.basic_consume(
        name.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

impl ClusterDirectory {
    /// Starts the directory's supervisor on `queue`'s connection. With a gateway, that
    /// gateway's sessions are announced from now on; with `lookups` (the dispatcher role),
    /// this process keeps a replica and delivers across nodes.
    pub fn start(
        queue: Arc<RabbitQueue>,
        prefix: &str,
        settings: &ClusterSettings,
        ack_timeout: Duration,
        roles: Roles,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> ClusterDirectory {
        let Roles { gateway, lookups } = roles;
        let node_id = if settings.node_id.is_empty() {
            uuid::Uuid::now_v7().simple().to_string()
        } else {
            settings.node_id.clone()
        };
        let (registrar_ready, ready_rx) = watch::channel(false);
        let dir = ClusterDirectory(Arc::new(Inner {
            queue,
            prefix: prefix.to_owned(),
            exchange: wire::presence_exchange(prefix),
            replies: wire::replies_exchange(prefix),
            node_id: gateway.as_ref().map(|_| NodeId::from(node_id.as_str())),
            gateway: gateway.clone(),
            replica: lookups.then(|| RwLock::new(Replica::new(settings.node_lease))),
            rpc: rpc::Rpc::new(
                prefix,
                settings.hop_timeout,
                ack_timeout + settings.reply_margin,
                metrics.clone(),
            ),
            lease: settings.node_lease,
            hop_timeout: settings.hop_timeout,
            publink: watch::channel(None).0,
            registrar_ready,
            up: AtomicBool::new(false),
            metrics: metrics.clone(),
            stop,
        }));
        let (snap_tx, snap_rx) = mpsc::unbounded_channel();
        if let Some(g) = &gateway {
            let (handle, commands) = registrar::channel(ready_rx, settings.register_timeout);
            g.set_registrar(handle);
            let publisher = node::Publisher {
                node: node_id,
                epoch: uuid::Uuid::now_v7(),
                exchange: dir.0.exchange.clone(),
                replies: dir.0.replies.clone(),
                heartbeat: settings.heartbeat_interval,
                confirm_timeout: settings.register_timeout,
                metrics,
            };
            tokio::spawn(publisher.run(
                dir.0.publink.subscribe(),
                commands,
                snap_rx,
                dir.0.stop.clone(),
            ));
        }
        tokio::spawn(lease::watch(dir.clone(), dir.0.stop.clone()));
        tokio::spawn(dir.clone().supervise(snap_tx));
        dir
    }

    /// True while the directory's channels are up and, with a replica, it is in sync with
    /// every live gateway node.
    pub fn is_ready(&self) -> bool {
        self.0.up.load(Ordering::Acquire)
            && self
                .0
                .replica
                .as_ref()
                .is_none_or(|r| self.replica_read(r).is_synced(Instant::now()))
    }

    /// Waits until ready (or the timeout passes); true if ready. Polling: only start-up and
    /// a broker reconnect get past the first check.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_ready() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Whether `device` holds a session on *this* node.
    pub fn is_connected_here(&self, device: &DeviceKey) -> bool {
        self.0
            .gateway
            .as_ref()
            .is_some_and(|g| g.is_connected(device))
    }

    /// One live attempt for `device`, wherever its session is.
    pub async fn deliver(&self, device: &DeviceKey, n: &QueuedNotification) -> LiveOutcome {
        self.deliver_awaiting(device, n, &|| {}).await
    }

    /// [`ClusterDirectory::deliver`], calling `awaiting_ack` once the frame is with the
    /// device's session (here) or its node said "received" ([`AwaitingAck`]).
    pub async fn deliver_awaiting(
        &self,
        device: &DeviceKey,
        n: &QueuedNotification,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        // The session is on this node: no broker hop needed.
        if let Some(g) = &self.0.gateway
            && g.is_connected(device)
        {
            match g.deliver_awaiting(device, n, awaiting_ack).await {
                // Gone between the check and the send (closed, replaced): it may be on
                // another node by now, so ask the replica.
                LiveOutcome::Offline => {}
                outcome => return outcome,
            }
        }
        self.deliver_remote_awaiting(device, n, awaiting_ack).await
    }

    /// The replica path, skipping this node's own sessions: public so the benchmark can
    /// measure it.
    pub async fn deliver_remote(&self, device: &DeviceKey, n: &QueuedNotification) -> LiveOutcome {
        self.deliver_remote_awaiting(device, n, &|| {}).await
    }

    async fn deliver_remote_awaiting(
        &self,
        device: &DeviceKey,
        n: &QueuedNotification,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        let Some(replica) = &self.0.replica else {
            return LiveOutcome::Offline;
        };
        if self.replica_read(replica).catching_up(Instant::now()) {
            // A replica still catching up (start, broker reconnect) may not know the device
            // yet; wait at most a lease (every live node heartbeats within it) rather than
            // answer "offline" from a partial view. Only then: a replica that stays unsynced
            // (a node not answering its snapshot request) must not slow every delivery.
            self.wait_ready(self.0.lease).await;
        }
        let mut tried: Option<NodeId> = None;
        // Twice at most: a node saying "no such session" while the replica has since
        // learned of a newer one (the device moved) gets the newer node a try.
        for _ in 0..2 {
            let found = self.replica_read(replica).lookup(device);
            let Some((node, _session)) = found else {
                return LiveOutcome::Offline;
            };
            if tried.as_ref() == Some(&node) || self.0.node_id.as_ref() == Some(&node) {
                // Ours but not in our table (it just closed), or the same node again.
                return LiveOutcome::Offline;
            }
            match self.0.rpc.deliver(&node, device, n, awaiting_ack).await {
                LiveOutcome::Offline => tried = Some(node),
                outcome => return outcome,
            }
        }
        LiveOutcome::Offline
    }

    fn replica_read<'a>(&self, r: &'a RwLock<Replica>) -> RwLockReadGuard<'a, Replica> {
        // Every mutation is completed under the lock before it is released, except on a
        // panic inside `apply`, which leaves a replica at worst stale: still usable.
        r.read().unwrap_or_else(|p| p.into_inner())
    }

    fn replica_write<'a>(&self, r: &'a RwLock<Replica>) -> RwLockWriteGuard<'a, Replica> {
        r.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The supervisor (the shared reconnect loop): each round sets up a generation of
    /// channels and serves until one dies; then it marks not ready, fails what waits on
    /// the dead channels, and the loop starts the next round.
    async fn supervise(self, snapshots: mpsc::UnboundedSender<ShortString>) {
        let settings = self.0.queue.settings();
        let backoff = Backoff {
            min: settings.reconnect_min,
            max: settings.reconnect_max,
        };
        reconnect::supervise("cluster directory", &self.0.stop, backoff, |reconnecting| {
            self.round(reconnecting, &snapshots)
        })
        .await
    }

    /// One generation's life: up until a channel dies (`Ok`), or an error setting up.
    async fn round(
        &self,
        reconnecting: bool,
        snapshots: &mpsc::UnboundedSender<ShortString>,
    ) -> anyhow::Result<()> {
        let inner = &self.0;
        // This generation's tasks stop with it, or with the directory.
        let generation = inner.stop.child_token();
        let result = match self.setup(&generation, snapshots).await {
            Ok(channels) => {
                inner.up.store(true, Ordering::Release);
                inner.registrar_ready.send_replace(true);
                if reconnecting {
                    tracing::info!("cluster directory back on the broker");
                }
                self.serve(&channels, &generation).await;
                Ok(())
            }
            Err(e) => Err(e.context("cluster directory setup")),
        };
        generation.cancel();
        inner.up.store(false, Ordering::Release);
        inner.registrar_ready.send_replace(false);
        inner.publink.send_replace(None);
        inner.rpc.set_channel(None);
        if let Some(r) = &inner.replica {
            self.replica_write(r).stopped_listening();
        }
        result
    }

    /// Opens this generation's channels, declares what they need and starts their tasks.
    /// Returns every channel, for the health check.
    async fn setup(
        &self,
        generation: &CancellationToken,
        snapshots: &mpsc::UnboundedSender<ShortString>,
    ) -> anyhow::Result<Vec<Channel>> {
        let inner = &self.0;
        let mut channels = Vec::new();

        // Presence: only a process with a replica listens. A gateway-only node does not
        // (its deltas go to the dispatchers alone, so a session open costs O(1) work in
        // the cluster, not a parse in every gateway); a replica that sees a device claimed
        // by two nodes tells the older one to close its session (a supersede message).
        let pch = inner.queue.create_channel().await?;
        if inner.replica.is_some() {
            // A dispatcher declares the exchanges.
            declare_exchanges(&pch, &inner.prefix).await?;
        } else {
            // A gateway-only process declares no exchange (its broker user may not): it
            // checks they are there (a passive declare needs no permission), else waits.
            for ex in [&inner.exchange, &inner.replies] {
                pch.exchange_declare(
                    ex.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the exchange {ex} is not there yet ({e}); a dispatcher declares it when it connects: start one (same queue.prefix and vhost), this process retries"
                    )
                })?;
            }
        }
        if let Some(r) = &inner.replica {
            // Named (not server-named) so the per-role broker permissions can name it; a
            // fresh name per generation, so a re-declare never races the broker deleting
            // the last generation's queue.
            let own = wire::presence_queue(&inner.prefix);
            // Bound to the presence fanout, and to the replies exchange under its own name:
            // snapshots answer the replica's requests into the queue the node's deltas come
            // through.
            let consumer = own_queue(
                &pch,
                &own,
                &[
                    (inner.exchange.as_str(), ""),
                    (inner.replies.as_str(), &own),
                ],
            )
            .await?;
            self.replica_write(r).listening(Instant::now());
            tokio::spawn(self.clone().pump_presence(
                pch.clone(),
                own.as_str().into(),
                consumer,
                generation.clone(),
            ));
        }
        channels.push(pch);

        if let Some(gateway) = &inner.gateway {
            let node_id = inner.node_id.as_deref().expect("a gateway node has an id");
            let publish = inner.queue.create_channel().await?;
            publish
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let nch = inner.queue.create_channel().await?;
            let name = wire::node_queue(&inner.prefix, node_id);
            // The queue dies with this connection, so deliveries to a dead node are
            // returned (offline) instead of piling up. One queue per node, never bound
            // (dispatchers reach it through the default exchange, by name): the broker's
            // metadata is O(nodes), and no gateway can bind another node's deliveries to
            // its own queue. no_ack: a frame here is only useful to this node right now; if
            // the node dies with it, the asker's lease or hop deadline falls back.
            let deliveries = own_queue(&nch, &name, &[]).await?;
            tokio::spawn(node::serve_queue(
                nch.clone(),
                deliveries,
                gateway.clone(),
                inner.replies.as_str().into(),
                snapshots.clone(),
                inner.metrics.clone(),
                generation.clone(),
            ));
            inner
                .publink
                .send_replace(Some((publish.clone(), generation.clone())));
            channels.push(publish);
            channels.push(nch);
        }

        if inner.replica.is_some() {
            let rch = inner.queue.create_channel().await?;
            // Confirms: the confirm of a mandatory publish comes after its basic.return, so
            // "node queue gone" is known for certain when the confirm arrives.
            rch.confirm_select(ConfirmSelectOptions::default()).await?;
            // This process's reply queue: exclusive (dies with the connection), a fresh name
            // per generation, bound to the replies exchange with its own name as key, and
            // consumed on this channel, which carries nothing but deliveries and replies.
            let reply_queue = wire::reply_queue(&inner.prefix);
            // no_ack: a reply nobody waits for any more is worthless.
            let replies = own_queue(
                &rch,
                &reply_queue,
                &[(inner.replies.as_str(), &reply_queue)],
            )
            .await?;
            let (me, g) = (self.clone(), generation.clone());
            tokio::spawn(async move { me.0.rpc.pump_replies(replies, g).await });
            inner
                .rpc
                .set_channel(Some((rch.clone(), reply_queue.as_str().into())));
            channels.push(rch);
        }
        Ok(channels)
    }

    /// Waits until a channel of this generation dies or the directory stops.
    async fn serve(&self, channels: &[Channel], generation: &CancellationToken) {
        let mut check = tokio::time::interval(HEALTH_CHECK);
        loop {
            tokio::select! {
                _ = check.tick() => {
                    if channels.iter().any(|c| !c.status().connected()) {
                        return;
                    }
                }
                _ = generation.cancelled() => return,
                _ = self.0.stop.cancelled() => return,
            }
        }
    }

    /// Feeds this generation's presence messages to the replica, asks nodes for snapshots
    /// where the replica needs them, and tells nodes holding a device's older session to
    /// close it.
    async fn pump_presence(
        self,
        ch: Channel,
        own_queue: ShortString,
        mut consumer: lapin::Consumer,
        generation: CancellationToken,
    ) {
        let inner = &self.0;
        loop {
            let d = tokio::select! {
                d = consumer.next() => d,
                _ = generation.cancelled() => return,
            };
            let Some(Ok(d)) = d else {
                generation.cancel();
                return;
            };
            let Some(msg) = wire::Presence::from_json(&d.data) else {
                tracing::warn!("unparseable presence message");
                continue;
            };
            let Some(replica) = &inner.replica else {
                continue;
            };
            let fx = self.replica_write(replica).apply(msg, Instant::now());
            for node in fx.node_gone {
                inner.rpc.fail_node(&node);
            }
            for s in fx.supersede {
                self.supersede(&ch, s).await;
            }
            for node in fx.request_snapshot {
                inner
                    .metrics
                    .cluster_messages
                    .with_label_values(&["snapshot_request"])
                    .inc();
                // Through the node's own queue; the answer comes to ours. Not confirmed: a
                // lost request is asked again after a lease.
                let _ = ch
                    .basic_publish(
                        "".into(),
                        wire::node_queue(&inner.prefix, &node).as_str().into(),
                        BasicPublishOptions::default(),
                        b"",
                        BasicProperties::default()
                            .with_type(wire::KIND_SNAPSHOT_REQUEST.into())
                            .with_reply_to(own_queue.clone())
                            .with_expiration(inner.hop_timeout.as_millis().to_string().into()),
                    )
                    .await;
            }
        }
    }

    /// Tells `s.node` to close its sessions of `s.device` older than `s.session`: directly
    /// when that node is this process, else through its node queue. Not confirmed, like
    /// presence itself: if it is lost, the older session lingers until it closes (deliveries
    /// already go to the newer one, the replica's pick), and every replica of the cluster
    /// sends its own copy (closing is idempotent).
    async fn supersede(&self, ch: &Channel, s: presence::Supersede) {
        let inner = &self.0;
        if inner.node_id.as_ref() == Some(&s.node) {
            if let Some(g) = &inner.gateway {
                g.close_older(&s.device, s.session, s.peer);
            }
            return;
        }
        inner
            .metrics
            .cluster_messages
            .with_label_values(&["supersede"])
            .inc();
        let _ = ch
            .basic_publish(
                "".into(),
                wire::node_queue(&inner.prefix, &s.node).as_str().into(),
                BasicPublishOptions::default(),
                b"",
                wire::supersede_properties(
                    &s.device.routing_key(),
                    s.session,
                    s.peer.as_deref(),
                    inner.hop_timeout.as_millis(),
                ),
            )
            .await;
    }
}
