//! The gateway node's side: tell the cluster where this node's sessions are (presence
//! deltas, heartbeats, snapshots on request), and serve this node's queue (frames for local
//! sessions, answered "received" at once and the outcome later).
//!
//! The publisher is one task for the process's life: it owns the registrar's command
//! stream, this node's session set as the cluster knows it, and the delta sequence number,
//! so a snapshot is always exactly "the sessions after delta `seq`". It publishes on its own
//! confirm-mode channel; replies to deliveries go out on the node queue's channel, so a
//! reply never waits behind registration traffic. Every answer (replies, snapshots) goes
//! through the `{p}.replies` exchange, keyed by the asker's queue name: a gateway's broker
//! user writes to the presence, replies and events exchanges only, never to a queue by
//! name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::wire::{self, Presence, Reply};
use crate::domain::{DeviceKey, NotificationId};
use crate::gateway::registrar::{self, Command};
use crate::gateway::{Gateway, LiveOutcome};
use crate::metrics::Metrics;

/// Session changes folded into one delta message. A reconnect storm of 10,000 sessions/s
/// with ~1 ms confirms gives batches of ~10; the cap bounds one message (~100 bytes an op)
/// well under any frame limit.
const MAX_BATCH: usize = 4096;

/// The publishing channel of the current broker generation, and that generation's token
/// (cancelled when a publish finds the channel dead, so the supervisor starts over).
pub type PubLink = Option<(Channel, CancellationToken)>;

/// The publisher's fixed facts.
pub struct Publisher {
    pub node: String,
    /// This incarnation (UUIDv7: a restart is newer).
    pub epoch: Uuid,
    pub exchange: String,
    /// The replies exchange: snapshots go there, keyed by the asker's presence queue.
    pub replies: String,
    pub heartbeat: Duration,
    /// How long one publish may wait for its confirm before the channel is deemed stuck.
    pub confirm_timeout: Duration,
    pub metrics: Metrics,
}

impl Publisher {
    /// Runs until `stop`: applies registrar commands as deltas, heartbeats, and answers
    /// snapshot requests (each the asker's queue name).
    pub async fn run(
        self,
        mut link: watch::Receiver<PubLink>,
        mut commands: registrar::Receiver,
        mut snapshots: mpsc::UnboundedReceiver<ShortString>,
        stop: CancellationToken,
    ) {
        let mut sessions: HashMap<DeviceKey, Uuid> = HashMap::new();
        let mut seq: u64 = 0;
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Wait for a channel: commands stay queued meanwhile (their sessions wait up to
            // cluster.register_timeout, and connects are refused while not ready).
            let current = tokio::select! {
                l = link.wait_for(|l| l.is_some()) => match l {
                    Ok(l) => l.clone().expect("waited for Some"),
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let (ch, generation) = current;
            // A fresh channel: say where we are at once (replicas that missed deltas see the
            // gap and ask for a snapshot).
            self.heartbeat(&ch, seq);
            loop {
                tokio::select! {
                    first = commands.recv() => {
                        let Some(first) = first else { return };
                        let ok = self.batch(&ch, first, &mut commands, &mut sessions, &mut seq).await;
                        if !ok {
                            generation.cancel();
                            break;
                        }
                    }
                    Some(reply_to) = snapshots.recv() => {
                        let devices = sessions.iter().map(|(d, s)| (d.to_string(), *s)).collect();
                        let msg = Presence::Snapshot {
                            node: self.node.clone(),
                            epoch: self.epoch,
                            seq,
                            devices,
                        };
                        self.metrics.cluster_messages.with_label_values(&["snapshot"]).inc();
                        // The replies exchange, key = the asker's presence queue (bound
                        // there with its own name): to that replica only, into the queue
                        // its deltas arrive in, after every delta counted in `seq` (same
                        // channel); the replica orders the rest by seq.
                        let _ = ch
                            .basic_publish(
                                self.replies.as_str().into(),
                                reply_to,
                                BasicPublishOptions::default(),
                                &msg.to_json(),
                                BasicProperties::default(),
                            )
                            .await;
                    }
                    _ = tick.tick() => self.heartbeat(&ch, seq),
                    _ = generation.cancelled() => break,
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Publishes a heartbeat without waiting for its confirm: a lost one is covered by the
    /// next (the lease is three heartbeats).
    fn heartbeat(&self, ch: &Channel, seq: u64) {
        let msg = Presence::Heartbeat {
            node: self.node.clone(),
            epoch: self.epoch,
            seq,
        };
        self.metrics
            .cluster_messages
            .with_label_values(&["heartbeat"])
            .inc();
        let (ch, exchange) = (ch.clone(), self.exchange.clone());
        tokio::spawn(async move {
            let _ = ch
                .basic_publish(
                    exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &msg.to_json(),
                    BasicProperties::default(),
                )
                .await;
        });
    }

    /// One delta from everything queued now, coalesced per device (the last change wins),
    /// published and confirmed; then the binds' waiters and flushes are answered. False if
    /// the channel failed (the delta's seq is spent: replicas see the gap and resync).
    async fn batch(
        &self,
        ch: &Channel,
        first: Command,
        commands: &mut registrar::Receiver,
        sessions: &mut HashMap<DeviceKey, Uuid>,
        seq: &mut u64,
    ) -> bool {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(c) = commands.try_recv()
        {
            batch.push(c);
        }
        let mut ops: Vec<(DeviceKey, Option<Uuid>)> = Vec::new();
        let mut peers = std::collections::BTreeMap::new();
        let mut index: HashMap<DeviceKey, usize> = HashMap::new();
        let mut waiters: Vec<oneshot::Sender<bool>> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        for c in batch {
            let (device, state) = match c {
                Command::Bind {
                    device,
                    session,
                    peer,
                    done,
                } => {
                    waiters.extend(done);
                    peers.insert(session, peer.to_string());
                    (device, Some(session))
                }
                Command::Unbind { device } => (device, None),
                Command::Flush(done) => {
                    flushes.push(done);
                    continue;
                }
            };
            match state {
                Some(s) => sessions.insert(device.clone(), s),
                None => sessions.remove(&device),
            };
            match index.get(&device) {
                Some(&i) => ops[i].1 = state,
                None => {
                    index.insert(device.clone(), ops.len());
                    ops.push((device, state));
                }
            }
        }
        let ok = if ops.is_empty() {
            true
        } else {
            *seq += 1;
            let msg = Presence::Delta {
                node: self.node.clone(),
                epoch: self.epoch,
                seq: *seq,
                // Only the sessions this delta opens (a bind coalesced away is not one).
                peers: ops
                    .iter()
                    .filter_map(|(_, s)| *s)
                    .filter_map(|s| Some((s, peers.remove(&s)?)))
                    .collect(),
                ops: ops.into_iter().map(|(d, s)| (d.to_string(), s)).collect(),
            };
            self.metrics
                .cluster_messages
                .with_label_values(&["presence"])
                .inc();
            let confirmed = tokio::time::timeout(self.confirm_timeout, async {
                ch.basic_publish(
                    self.exchange.as_str().into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &msg.to_json(),
                    BasicProperties::default(),
                )
                .await?
                .await
            })
            .await;
            matches!(confirmed, Ok(Ok(Confirmation::Ack(_))))
        };
        for w in waiters {
            let _ = w.send(ok);
        }
        for f in flushes {
            let _ = f.send(());
        }
        ok
    }
}

/// Serves this node's queue for one broker generation: deliveries to local sessions and
/// snapshot requests (handed to the publisher).
pub async fn serve_queue(
    ch: Channel,
    mut consumer: lapin::Consumer,
    gateway: Gateway,
    replies: ShortString,
    snapshots: mpsc::UnboundedSender<ShortString>,
    metrics: Metrics,
    generation: CancellationToken,
) {
    let ch = Arc::new(ch);
    loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = generation.cancelled() => return,
        };
        let Some(Ok(d)) = d else {
            generation.cancel();
            return;
        };
        let kind = d.properties.kind().as_ref().map(|k| k.as_str().to_owned());
        match kind.as_deref() {
            Some(wire::KIND_SNAPSHOT_REQUEST) => {
                if let Some(reply_to) = d.properties.reply_to().clone() {
                    let _ = snapshots.send(reply_to);
                }
            }
            // A dispatcher's replica saw a newer session of the device on another node.
            Some(wire::KIND_SUPERSEDE) => {
                let device = wire::header(&d.properties, wire::HEADER_DEVICE)
                    .and_then(|s| DeviceKey::parse_routing_key(&s));
                let session = wire::header(&d.properties, wire::HEADER_SESSION)
                    .and_then(|s| Uuid::parse_str(&s).ok());
                match (device, session) {
                    (Some(device), Some(session)) => gateway.close_older(
                        &device,
                        session,
                        wire::header(&d.properties, wire::HEADER_PEER),
                    ),
                    _ => tracing::warn!("malformed supersede message on the node queue"),
                }
            }
            Some(wire::KIND_DELIVER) => {
                let (Some(reply_to), Some(correlation)) = (
                    d.properties.reply_to().clone(),
                    d.properties.correlation_id().clone(),
                ) else {
                    continue;
                };
                let device = wire::header(&d.properties, wire::HEADER_DEVICE)
                    .and_then(|s| DeviceKey::parse_routing_key(&s));
                let id = wire::header(&d.properties, wire::HEADER_ID)
                    .and_then(|s| NotificationId::parse(&s));
                let frame = String::from_utf8(d.data).ok();
                let reply = Replier {
                    ch: ch.clone(),
                    exchange: replies.clone(),
                    reply_to,
                    correlation,
                    metrics: metrics.clone(),
                };
                let (Some(device), Some(id), Some(frame)) = (device, id, frame) else {
                    tracing::warn!("malformed deliver message on the node queue");
                    reply.send(Reply::Offline).await;
                    continue;
                };
                if !gateway.is_connected(&device) {
                    // The asker's replica is stale (the device just left or moved): say so
                    // now, so it falls back at once instead of at a deadline.
                    reply.send(Reply::Offline).await;
                    continue;
                }
                let gateway = gateway.clone();
                tokio::spawn(async move {
                    reply.send(Reply::Received).await;
                    let outcome = match gateway.deliver_frame(&device, id, frame).await {
                        LiveOutcome::Acked => Reply::Acked,
                        LiveOutcome::NotAcked => Reply::NotAcked,
                        LiveOutcome::Offline => Reply::Offline,
                    };
                    reply.send(outcome).await;
                });
            }
            _ => {}
        }
    }
}

/// Where one delivery's replies go.
struct Replier {
    ch: Arc<Channel>,
    /// The replies exchange.
    exchange: ShortString,
    reply_to: ShortString,
    correlation: ShortString,
    metrics: Metrics,
}

impl Replier {
    /// To the replies exchange with the asker's reply queue as key. A lost reply (none
    /// bound: the asker is gone) becomes the asker's deadline (fallback), so it is not
    /// retried.
    async fn send(&self, reply: Reply) {
        self.metrics
            .cluster_messages
            .with_label_values(&["reply"])
            .inc();
        let _ = self
            .ch
            .basic_publish(
                self.exchange.clone(),
                self.reply_to.clone(),
                BasicPublishOptions::default(),
                reply.as_bytes(),
                BasicProperties::default().with_correlation_id(self.correlation.clone()),
            )
            .await;
    }
}
