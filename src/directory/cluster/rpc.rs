//! Remote delivery: one device's frame to the node that holds its session, and the replies
//! ("received" at once, then the outcome) through the `{p}.replies` exchange into this
//! process's own reply queue, consumed on a channel of its own (never behind presence
//! traffic). Correlation ids are random, so a node can only answer what it was sent.
//!
//! Two deadlines, kept apart: the broker hop (`cluster.hop_timeout`: publish confirmed and
//! "received" back) and the device (`gateway.ack_timeout + cluster.reply_margin` for the
//! outcome once received). A node that is dead or stuck therefore costs a delivery at most
//! the hop deadline, and less when its lease expires first ([`Rpc::fail_node`]); only a
//! device that really has the frame can hold a delivery for its ack deadline.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{Channel, Confirmation};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::presence::NodeId;
use super::wire::{self, Reply};
use crate::domain::{DeviceKey, QueuedNotification};
use crate::gateway::{AwaitingAck, LiveOutcome, protocol};
use crate::metrics::Metrics;

struct Pending {
    node: NodeId,
    replies: mpsc::UnboundedSender<Reply>,
}

/// The dispatcher's side of cross-node delivery.
pub struct Rpc {
    prefix: String,
    hop_timeout: Duration,
    /// `gateway.ack_timeout + cluster.reply_margin`, counted from "received".
    outcome_timeout: Duration,
    /// The `rpc` channel (confirm mode, consuming the reply queue) and that queue's name,
    /// while it is up.
    channel: watch::Sender<Option<(Channel, ShortString)>>,
    pending: Mutex<HashMap<u128, Pending>>,
    metrics: Metrics,
}

impl Rpc {
    pub fn new(
        prefix: &str,
        hop_timeout: Duration,
        outcome_timeout: Duration,
        metrics: Metrics,
    ) -> Rpc {
        Rpc {
            prefix: prefix.to_owned(),
            hop_timeout,
            outcome_timeout,
            channel: watch::channel(None).0,
            pending: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// A new generation's channel (confirms on, consuming the reply queue) and the reply
    /// queue's name, or `None`.
    pub fn set_channel(&self, ch: Option<(Channel, ShortString)>) {
        self.channel.send_replace(ch);
        if self.channel.borrow().is_none() {
            // Replies to deliveries in flight would have come over the dead channel.
            self.fail_where(|_| true);
        }
    }

    /// `node`'s lease expired (or it restarted): its pending deliveries fall back now.
    pub fn fail_node(&self, node: &str) {
        self.fail_where(|n| &**n == node);
    }

    fn fail_where(&self, f: impl Fn(&NodeId) -> bool) {
        let mut pending = self.pending();
        pending.retain(|_, p| {
            if f(&p.node) {
                let _ = p.replies.send(Reply::NotAcked);
                false
            } else {
                true
            }
        });
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<u128, Pending>> {
        // Single insert/remove/retain operations only: a poisoned lock is still consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One live attempt for `device` on `node`.
    pub async fn deliver(
        &self,
        node: &NodeId,
        device: &DeviceKey,
        n: &QueuedNotification,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        let hop_deadline = Instant::now() + self.hop_timeout;
        let mut rx = self.channel.subscribe();
        let (ch, reply_to) =
            match tokio::time::timeout_at(hop_deadline, rx.wait_for(|c| c.is_some())).await {
                Ok(Ok(ch)) => ch.clone().expect("waited for Some"),
                // Broker away for the whole hop: unknown, so fall back (the dispatcher acks the
                // queued message only after its fallback).
                _ => return LiveOutcome::NotAcked,
            };
        let correlation = wire::new_correlation();
        let (tx, mut replies) = mpsc::unbounded_channel();
        self.pending().insert(
            correlation,
            Pending {
                node: node.clone(),
                replies: tx,
            },
        );
        let _guard = PendingGuard(self, correlation);
        let id = n.id.to_string();
        let props = wire::deliver_properties(
            &device.routing_key(),
            &id,
            reply_to.as_str(),
            correlation,
            self.hop_timeout.as_millis(),
        );
        // Only this device's frame crosses, never the whole message with every target's
        // provider tokens.
        let frame = protocol::notification_json(n);
        self.metrics
            .cluster_messages
            .with_label_values(&["deliver"])
            .inc();
        let queue = wire::node_queue(&self.prefix, node);
        let confirm = tokio::time::timeout_at(hop_deadline, async {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                // mandatory: the node's queue is gone (the node died and the broker deleted
                // its exclusive queue) → basic.return → offline, before the confirm.
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                frame.as_bytes(),
                props,
            )
            .await?
            .await
        })
        .await;
        match confirm {
            Ok(Ok(Confirmation::Ack(Some(_returned)))) => return LiveOutcome::Offline,
            Ok(Ok(Confirmation::Ack(None))) => {}
            // Nacked, channel error, or no confirm within the hop: unknown, fall back.
            _ => return LiveOutcome::NotAcked,
        }
        match tokio::time::timeout_at(hop_deadline, replies.recv()).await {
            // The node has the frame; from here it is the device's ack deadline.
            Ok(Some(Reply::Received)) => awaiting_ack(),
            Ok(Some(final_reply)) => return outcome(final_reply),
            // Failed (lease expired, channel cut) or no word within the hop: fall back.
            Ok(None) | Err(_) => return LiveOutcome::NotAcked,
        }
        match tokio::time::timeout(self.outcome_timeout, replies.recv()).await {
            Ok(Some(r)) => outcome(r),
            _ => LiveOutcome::NotAcked,
        }
    }

    /// Routes each reply on the current channel to the delivery waiting for it.
    pub async fn pump_replies(&self, mut replies: lapin::Consumer, generation: CancellationToken) {
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
                .and_then(|c| wire::parse_correlation(c.as_str()))
            else {
                continue;
            };
            let Some(reply) = Reply::parse(&d.data) else {
                continue;
            };
            if let Some(p) = self.pending().get(&correlation) {
                let _ = p.replies.send(reply);
            }
        }
    }
}

fn outcome(r: Reply) -> LiveOutcome {
    match r {
        Reply::Acked => LiveOutcome::Acked,
        Reply::Offline => LiveOutcome::Offline,
        Reply::NotAcked | Reply::Received => LiveOutcome::NotAcked,
    }
}

/// Removes a delivery's waiter however `deliver` returns.
struct PendingGuard<'a>(&'a Rpc, u128);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending().remove(&self.1);
    }
}
