//! The cluster directory: which node holds a device's session, kept by RabbitMQ routing.
//!
//! ```text
//!  dispatcher (any node)                         gateway node B (holds device D)
//!  ── mandatory publish ──▶ {p}.sessions (direct) ──key D──▶ {p}.node.B (exclusive)
//!     reply_to = amq.rabbitmq.reply-to                            │ consume (no-ack)
//!     correlation_id = n                                          ▼
//!  ◀── "acked" / "not_acked" / "offline" ── default exchange ── gateway.deliver(D)
//! ```
//!
//! - **Registration.** A gateway node declares one exclusive, auto-delete queue
//!   `{p}.node.<id>` and binds it to `{p}.sessions` with routing key = device id while that
//!   device is connected there: bound before the device is told `hello`, unbound when the
//!   session closes. The broker's binding table *is* the directory; there is no other
//!   copy to go stale, and a node that dies takes its exclusive queue, and so every
//!   binding, with it.
//! - **Lookup = delivery.** A live attempt is one *mandatory* publish to `{p}.sessions` with
//!   routing key = device id on a confirm-mode channel. Nothing bound → the broker returns
//!   it (basic.return NO_ROUTE, before its confirm) → [`LiveOutcome::Offline`], an answer
//!   from the broker, not a guess. Routed → the owning node hands it to the session and
//!   answers over direct reply-to. No answer within `gateway.ack_timeout +
//!   cluster.reply_margin` → [`LiveOutcome::NotAcked`]: the dispatcher falls back, and only
//!   then acks the queued message, so a node dying mid-delivery costs a duplicate at worst.
//! - **Two sessions of one device on two nodes.** After binding, the node publishes a
//!   *kick* (same exchange, same key, carrying the session id, a UUIDv7 and so time
//!   ordered); every node bound for the device gets it, and one holding an older session
//!   closes it ("replaced") and unbinds. Deliveries racing the kick may reach either
//!   session, which at-least-once allows.
//! - **Broker cuts.** One supervisor per process (the shared [`crate::queue::reconnect`]
//!   loop) owns two channels on the queue backend's
//!   connection: `rpc` (publish + confirms + the reply-to consumer) and `node` (the session
//!   queue, binds, replies, kicks). When either dies it waits for the next connection,
//!   re-declares the node queue, re-binds every live session from the gateway's table, and
//!   resumes; meanwhile [`ClusterDirectory::is_ready`] is false (so `/readyz` is 503) and
//!   lookups fall back.
//!
//! Binds and unbinds go through one registrar task in the order the gateway's session
//! table changed (they are sent while its lock is held), coalesced per device and sent
//! pipelined, so an unbind of an old session can never land after the bind of its
//! successor on the same node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterSettings;
use crate::domain::{DeviceKey, QueuedNotification};
use crate::gateway::registrar::{self, Command};
use crate::gateway::{Gateway, LiveOutcome};
use crate::queue::RabbitQueue;
use crate::queue::reconnect::{self, Backoff};

/// RabbitMQ's pseudo-queue for direct reply-to: replies go straight to this channel's
/// consumer without a reply queue per request (or per node) to declare and clean up.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// AMQP `type` property of a notification for a session, and of a kick.
const KIND_DELIVER: &str = "deliver";
const KIND_KICK: &str = "kick";
/// Binds / unbinds sent at once by the registrar. Pipelining hides the broker round trip
/// (the rate is otherwise one bind per RTT); the cap keeps one huge batch (a re-register of
/// every session after a reconnect) from holding thousands of futures at once.
const REGISTER_PIPELINE: usize = 256;
/// How often the supervisor checks its channels are alive (belt and braces: a dead channel
/// also ends its consumers' streams, which is noticed at once).
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// The cluster directory. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct ClusterDirectory(Arc<Inner>);

struct Inner {
    queue: Arc<RabbitQueue>,
    node_id: String,
    exchange: String,
    node_queue: String,
    /// This node's sessions; `None` on a node without the gateway role.
    gateway: Option<Gateway>,
    /// `gateway.ack_timeout + cluster.reply_margin`.
    reply_deadline: Duration,
    /// The `rpc` channel while it is up.
    rpc: watch::Sender<Option<Channel>>,
    /// True while the channels are up (and a gateway node's sessions are registered).
    ready: watch::Sender<bool>,
    pending: Mutex<HashMap<u64, oneshot::Sender<LiveOutcome>>>,
    next_correlation: AtomicU64,
    /// The directory's node in the shutdown tree (a child of the queue's).
    stop: CancellationToken,
}

impl ClusterDirectory {
    /// Starts the directory's supervisor on `queue`'s connection. With a gateway, that
    /// gateway's sessions are registered from now on.
    pub fn start(
        queue: Arc<RabbitQueue>,
        prefix: &str,
        settings: &ClusterSettings,
        ack_timeout: Duration,
        gateway: Option<Gateway>,
        stop: CancellationToken,
    ) -> ClusterDirectory {
        let node_id = if settings.node_id.is_empty() {
            uuid::Uuid::now_v7().simple().to_string()
        } else {
            settings.node_id.clone()
        };
        let ready = watch::channel(false).0;
        // Without a gateway the registrar handle is dropped here: no commands ever come.
        let (registrar, rx) = registrar::channel(ready.subscribe(), settings.register_timeout);
        if let Some(g) = &gateway {
            g.set_registrar(registrar);
        }
        let dir = ClusterDirectory(Arc::new(Inner {
            queue,
            exchange: format!("{prefix}.sessions"),
            node_queue: format!("{prefix}.node.{node_id}"),
            node_id,
            gateway,
            reply_deadline: ack_timeout + settings.reply_margin,
            rpc: watch::channel(None).0,
            ready,
            pending: Mutex::new(HashMap::new()),
            next_correlation: AtomicU64::new(1),
            stop,
        }));
        tokio::spawn(dir.clone().supervise(rx));
        dir
    }

    /// True while the directory's channels are up (and, on a gateway node, its sessions
    /// are registered and its queue consumed).
    pub fn is_ready(&self) -> bool {
        *self.0.ready.borrow()
    }

    /// Waits until ready (or the timeout passes); true if ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.0.ready.subscribe();
        matches!(
            tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
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
        // The session is on this node: no broker hop needed.
        if let Some(g) = &self.0.gateway
            && g.is_connected(device)
        {
            match g.deliver(device, n).await {
                // Gone between the check and the send (closed, replaced): it may be on
                // another node by now, so ask the broker.
                LiveOutcome::Offline => {}
                outcome => return outcome,
            }
        }
        self.deliver_remote(device, n).await
    }

    /// The broker path: always used for a session on another node; public so the
    /// benchmark can measure it for a same-node session too.
    pub async fn deliver_remote(&self, device: &DeviceKey, n: &QueuedNotification) -> LiveOutcome {
        let inner = &self.0;
        let deadline = Instant::now() + inner.reply_deadline;
        let mut rx = inner.rpc.subscribe();
        let ch = match tokio::time::timeout_at(deadline, rx.wait_for(|c| c.is_some())).await {
            Ok(Ok(ch)) => ch.clone().expect("waited for Some"),
            // Broker away for the whole deadline: we cannot know, so fall back (and the
            // dispatcher acks only after the fallback).
            _ => return LiveOutcome::NotAcked,
        };
        let correlation = inner.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (tx, reply) = oneshot::channel();
        inner.pending().insert(correlation, tx);
        let _pending = PendingGuard(inner, correlation);
        let props = BasicProperties::default()
            .with_type(KIND_DELIVER.into())
            .with_content_type("application/json".into())
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(correlation.to_string().into())
            // Past the deadline the dispatcher has fallen back; the broker drops the copy
            // rather than have the owner deliver it late (a duplicate for nothing).
            .with_expiration(inner.reply_deadline.as_millis().to_string().into());
        let confirm = tokio::time::timeout_at(deadline, async {
            ch.basic_publish(
                inner.exchange.as_str().into(),
                device.routing_key().into(),
                // mandatory: no node bound for this device → basic.return → offline.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &n.to_json(),
                props,
            )
            .await?
            .await
        })
        .await;
        match confirm {
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => LiveOutcome::Offline,
            Ok(Ok(Confirmation::Ack(None))) => {
                match tokio::time::timeout_at(deadline, reply).await {
                    Ok(Ok(outcome)) => outcome,
                    // No answer in time (owner died, or the channel was cut): fall back.
                    _ => LiveOutcome::NotAcked,
                }
            }
            // Nacked, channel error, or no confirm in time: unknown, so fall back.
            _ => LiveOutcome::NotAcked,
        }
    }

    /// The supervisor (the shared reconnect loop): open channels, declare, register,
    /// serve; on any failure fail waiting lookups, mark not ready and start again.
    async fn supervise(self, commands: mpsc::UnboundedReceiver<Command>) {
        let settings = self.0.queue.settings();
        let backoff = Backoff {
            min: settings.reconnect_min,
            max: settings.reconnect_max,
        };
        // Each round borrows the command stream while it serves; rounds never overlap.
        let commands = tokio::sync::Mutex::new(commands);
        reconnect::supervise("cluster directory", &self.0.stop, backoff, |reconnecting| {
            self.round(reconnecting, &commands)
        })
        .await
    }

    /// One registration's life: up until a channel dies (`Ok`), or an error setting up.
    async fn round(
        &self,
        reconnecting: bool,
        commands: &tokio::sync::Mutex<mpsc::UnboundedReceiver<Command>>,
    ) -> anyhow::Result<()> {
        let inner = &self.0;
        // This round's consumers stop with it, or with the directory.
        let generation = inner.stop.child_token();
        let result = match self.setup(&generation).await {
            Ok(node) => {
                inner.ready.send_replace(true);
                if reconnecting {
                    tracing::info!(node = %inner.node_id, "cluster directory re-registered");
                }
                self.serve(&node, &mut *commands.lock().await, &generation)
                    .await;
                Ok(())
            }
            Err(e) => Err(e.context(format!("node {}", inner.node_id))),
        };
        generation.cancel();
        inner.ready.send_replace(false);
        inner.rpc.send_replace(None);
        // Replies to lookups in flight would have come over the dead channel.
        for (_, waiter) in inner.pending().drain() {
            let _ = waiter.send(LiveOutcome::NotAcked);
        }
        result
    }

    /// Opens both channels, declares the exchange and (gateway nodes) the node queue,
    /// re-binds every live session, and starts the consumers. Returns the `node` channel.
    async fn setup(&self, generation: &CancellationToken) -> anyhow::Result<Channel> {
        let inner = &self.0;
        let rpc = inner.queue.create_channel().await?;
        let node = inner.queue.create_channel().await?;
        node.exchange_declare(
            inner.exchange.as_str().into(),
            ExchangeKind::Direct,
            // durable: the exchange outlives a broker restart; bindings to it do not need to,
            // since their queues are exclusive and each node re-binds on reconnect.
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        // Confirms on rpc: the confirm of a mandatory publish comes after its basic.return,
        // so "routed or not" is known for certain when the confirm arrives.
        rpc.confirm_select(ConfirmSelectOptions::default()).await?;
        // Direct reply-to requires this consumer, in no-ack mode, on the publishing channel.
        let replies = rpc
            .basic_consume(
                REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        tokio::spawn(self.clone().pump_replies(replies, generation.clone()));

        if let Some(gateway) = &inner.gateway {
            node.queue_declare(
                inner.node_queue.as_str().into(),
                // exclusive: the queue dies with this connection, so a dead node's bindings
                // vanish with it and its devices are offline at once, not after a timeout.
                // auto_delete: also gone if the consumer is cancelled.
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            // Everything this node holds now; commands queued meanwhile are applied after,
            // in order, so the end state matches the table whichever came first.
            let devices = gateway.devices();
            self.apply(
                &node,
                devices.into_iter().map(|d| (d, true)).collect(),
                &mut Vec::new(),
            )
            .await?;
            let deliveries = node
                .basic_consume(
                    inner.node_queue.as_str().into(),
                    "".into(),
                    // no_ack: a message here is only useful to this node right now; if the
                    // node dies with it, the dispatcher's deadline turns that into a fallback.
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            tokio::spawn(self.clone().pump_node(
                node.clone(),
                gateway.clone(),
                deliveries,
                generation.clone(),
            ));
        }
        inner.rpc.send_replace(Some(rpc));
        Ok(node)
    }

    /// Applies registration commands until the channels die or the directory stops.
    async fn serve(
        &self,
        node: &Channel,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        generation: &CancellationToken,
    ) {
        let inner = &self.0;
        let mut check = tokio::time::interval(HEALTH_CHECK);
        loop {
            tokio::select! {
                // No gateway here (so no registry holds the sender): nothing to register,
                // serve until the channels die.
                Some(first) = commands.recv() => {
                    // Drain what is queued and coalesce: the last command per device wins
                    // (bind and unbind are idempotent), so a storm of connect/disconnect of
                    // one device costs one broker operation.
                    let mut batch = vec![first];
                    while batch.len() < 4 * REGISTER_PIPELINE
                        && let Ok(c) = commands.try_recv()
                    {
                        batch.push(c);
                    }
                    let mut wanted: Vec<(DeviceKey, bool)> = Vec::new();
                    let mut index: HashMap<DeviceKey, usize> = HashMap::new();
                    let mut binds = Vec::new();
                    let mut waiters = Vec::new();
                    let mut flushes = Vec::new();
                    for c in batch {
                        let (device, bound) = match c {
                            Command::Bind { device, session, done } => {
                                binds.push((device.clone(), session));
                                if let Some(d) = done { waiters.push(d); }
                                (device, true)
                            }
                            Command::Unbind { device } => (device, false),
                            Command::Flush(done) => { flushes.push(done); continue; }
                        };
                        match index.get(&device) {
                            Some(&i) => wanted[i].1 = bound,
                            None => {
                                index.insert(device.clone(), wanted.len());
                                wanted.push((device, bound));
                            }
                        }
                    }
                    let ok = self.apply(node, wanted, &mut binds).await.is_ok();
                    for w in waiters { let _ = w.send(ok); }
                    for f in flushes { let _ = f.send(()); }
                    if !ok {
                        return;
                    }
                }
                _ = check.tick() => {
                    let rpc_ok = inner.rpc.borrow().as_ref().is_some_and(|c| c.status().connected());
                    if !rpc_ok || !node.status().connected() {
                        return;
                    }
                }
                _ = generation.cancelled() => return,
                _ = inner.stop.cancelled() => return,
            }
        }
    }

    /// Binds / unbinds `wanted` (pipelined), then kicks older sessions of each device just
    /// bound (`binds`: device, session id) on other nodes.
    async fn apply(
        &self,
        node: &Channel,
        wanted: Vec<(DeviceKey, bool)>,
        binds: &mut Vec<(DeviceKey, uuid::Uuid)>,
    ) -> Result<(), lapin::Error> {
        let inner = &self.0;
        let ops = futures::stream::iter(wanted)
            .map(|(device, bound)| async move {
                if bound {
                    node.queue_bind(
                        inner.node_queue.as_str().into(),
                        inner.exchange.as_str().into(),
                        device.routing_key().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                } else {
                    node.queue_unbind(
                        inner.node_queue.as_str().into(),
                        inner.exchange.as_str().into(),
                        device.routing_key().into(),
                        FieldTable::default(),
                    )
                    .await
                }
            })
            .buffer_unordered(REGISTER_PIPELINE);
        let results: Vec<_> = ops.collect().await;
        if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
            return Err(e);
        }
        for (device, session) in binds.drain(..) {
            // Not mandatory and not confirmed: a kick nobody needs (the usual case) is
            // simply dropped by the broker, and a lost one leaves two sessions until the
            // older one dies, which at-least-once delivery tolerates.
            node.basic_publish(
                inner.exchange.as_str().into(),
                device.routing_key().into(),
                BasicPublishOptions::default(),
                session.to_string().as_bytes(),
                BasicProperties::default().with_type(KIND_KICK.into()),
            )
            .await?;
        }
        Ok(())
    }

    /// Routes each reply to the lookup waiting for it.
    async fn pump_replies(self, mut replies: lapin::Consumer, generation: CancellationToken) {
        loop {
            let d = tokio::select! {
                d = replies.next() => d,
                _ = generation.cancelled() => return,
            };
            let Some(Ok(d)) = d else {
                generation.cancel();
                return;
            };
            let Some(correlation) = d
                .properties
                .correlation_id()
                .as_ref()
                .and_then(|c| c.as_str().parse::<u64>().ok())
            else {
                continue;
            };
            let outcome = match d.data.as_slice() {
                b"acked" => LiveOutcome::Acked,
                b"offline" => LiveOutcome::Offline,
                _ => LiveOutcome::NotAcked,
            };
            if let Some(waiter) = self.0.pending().remove(&correlation) {
                let _ = waiter.send(outcome);
            }
        }
    }

    /// Serves this node's session queue: notifications for its sessions, and kicks.
    async fn pump_node(
        self,
        node: Channel,
        gateway: Gateway,
        mut deliveries: lapin::Consumer,
        generation: CancellationToken,
    ) {
        loop {
            let d = tokio::select! {
                d = deliveries.next() => d,
                _ = generation.cancelled() => return,
            };
            let Some(Ok(d)) = d else {
                generation.cancel();
                return;
            };
            let Some(device) = DeviceKey::parse_routing_key(d.routing_key.as_str()) else {
                continue;
            };
            let kind = d.properties.kind().as_ref().map(|k| k.as_str().to_owned());
            match kind.as_deref() {
                Some(KIND_KICK) => {
                    if let Some(session) = std::str::from_utf8(&d.data)
                        .ok()
                        .and_then(|s| uuid::Uuid::parse_str(s).ok())
                    {
                        gateway.close_older(&device, session);
                    }
                }
                Some(KIND_DELIVER) => {
                    let (Some(reply_to), Some(correlation)) = (
                        d.properties.reply_to().clone(),
                        d.properties.correlation_id().clone(),
                    ) else {
                        continue;
                    };
                    let Ok(n) = QueuedNotification::from_json(&d.data) else {
                        tracing::warn!("unparseable notification on the node queue");
                        continue;
                    };
                    let (node, gateway) = (node.clone(), gateway.clone());
                    tokio::spawn(async move {
                        let answer: &[u8] = match gateway.deliver(&device, &n).await {
                            LiveOutcome::Acked => b"acked",
                            LiveOutcome::NotAcked => b"not_acked",
                            LiveOutcome::Offline => b"offline",
                        };
                        // To the default exchange with the reply-to address as key: that is
                        // how direct reply-to reaches the asking channel. A failed reply
                        // becomes the asker's deadline (fallback), so it is not retried.
                        let _ = node
                            .basic_publish(
                                "".into(),
                                reply_to,
                                BasicPublishOptions::default(),
                                answer,
                                BasicProperties::default().with_correlation_id(correlation),
                            )
                            .await;
                    });
                }
                _ => {}
            }
        }
    }
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<LiveOutcome>>> {
        // Single insert/remove operations only: a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a lookup's waiter however `deliver_remote` returns.
struct PendingGuard<'a>(&'a Inner, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending().remove(&self.1);
    }
}
