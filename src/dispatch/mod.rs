//! The dispatcher: consume queued notifications and deliver every target, live first, then
//! through APNs/FCM; settle each message once every target reached a final outcome.
//!
//! One consumer per app (its own work queue, [`Queue::consume_app`]), each with its own
//! budget of `queue.prefetch` messages in flight, so one app's backlog or slow provider
//! holds only its own slots and never delays another app's messages.
//!
//! Per message (one task, at most `queue.prefetch` at once per app):
//!
//! 1. Unparseable → dead letter (`unparseable`). Past its ttl → settled at once as
//!    expired ([`settle::on_arrival`]): acked with an `expired` event per target, dropped,
//!    never sent late.
//! 2. Each target (at most `dispatcher.target_concurrency` at once): the directory tries the
//!    live session; `Acked` is final. `Offline` or `NotAcked` → fallback through every route
//!    the target carries ([`target`]). Each target's [`TargetReport`] is recorded as soon as
//!    it ends.
//! 3. Settle ([`settle::after_delivery`], pure): targets that failed transiently go into one
//!    retry copy (only them, attempt+1, after an exponential, jittered delay, at least any
//!    provider Retry-After); when attempts run out, or on a configuration error, they go
//!    into one dead letter with the reason and the attempt history.
//! 4. Carry it out: the copies are made safe first ([`Delivery::retry`],
//!    [`Delivery::dead_letter`]), then the original is acked, so a crash in between
//!    duplicates rather than loses. Then record the settlement.
//!
//! Between 2 and 3, the offline inbox ([`Dispatcher::store_offline`]): an at_least_once
//! target the device did not ack live, with no provider route or only dead tokens
//! ([`settle::wants_inbox`]), is written to its device's inbox in one batch per message; the
//! queue message is acked only after that commit (a failed write retries those targets).
//! Then the race with a device that connected meanwhile is closed: if the device has a
//! session now, its gateway replays the inbox again (see [`Dispatcher::recheck`]).
//!
//! The [`reaper`] deletes expired inbox entries every `inbox.reap_interval` (an `expired`
//! event each) and samples the pending-rows gauge; it stops with the dispatcher.
//!
//! Metrics, events and outcome logs are written in one place, [`record`], from the target
//! reports and the settlement.

mod channel;
pub mod reaper;
mod record;
mod settle;
mod slot;
mod target;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::RetrySettings;
use crate::directory::{Directory, LiveOutcome};
use crate::domain::{AppId, DeviceId, DeviceKey, QueuedNotification};
use crate::events::Events;
use crate::gateway::{Gateway, protocol};
use crate::inbox::{Inbox, InboxEntry, InboxWrite};
use crate::metrics::Metrics;
use crate::providers::{Providers, Rendered};
use crate::queue::{Delivery, Queue, SettleError, backoff_with_jitter};

pub use channel::Channel;
pub use record::Outcome;
pub use settle::{DeadLetter, DeadReason, Retry, Settlement};
pub use target::{InboxResult, RouteAttempt, TargetReport, TargetResult};

/// Everything a dispatcher needs; one per process running the dispatcher role.
pub struct Dispatcher {
    pub queue: Queue,
    pub directory: Option<Directory>,
    /// This node's gateway, if it runs one: asked to replay a device's inbox when the
    /// device connected while its notification was being stored.
    pub gateway: Option<Gateway>,
    /// The offline inbox; `None` in cluster mode without `inbox.url` (retry, then
    /// dead-letter, as before the inbox existed).
    pub inbox: Option<Inbox>,
    pub providers: Arc<Providers>,
    pub events: Events,
    pub metrics: Metrics,
    pub retry: RetrySettings,
    /// Messages worked on at once per app (`queue.prefetch`, each app's consumer's active
    /// budget): the process works on at most this many times the number of apps.
    pub in_flight: usize,
    /// Messages beyond those that may wait only for devices' acks (`dispatcher.max_awaiting_ack`,
    /// see [`slot`]).
    pub max_awaiting_ack: usize,
    pub target_concurrency: usize,
}

/// A running dispatcher; [`DispatcherHandle::drain`] stops it.
pub struct DispatcherHandle {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DispatcherHandle {
    /// Stops taking messages, lets in-flight ones finish within `grace`, then abandons the
    /// rest: their deliveries are dropped unsettled, so the queue gives them to another
    /// consumer (or to this node after a restart). Returns true if it drained in time.
    pub async fn drain(mut self, grace: Duration) -> bool {
        self.stop.cancel();
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(_) => true,
            Err(_) => {
                self.task.abort();
                false
            }
        }
    }
}

impl Dispatcher {
    pub fn spawn(self) -> DispatcherHandle {
        self.spawn_under(CancellationToken::new())
    }

    /// Runs until `stop` (the dispatcher's node of the shutdown tree) is cancelled, by
    /// [`DispatcherHandle::drain`] or by a parent.
    pub fn spawn_under(self, stop: CancellationToken) -> DispatcherHandle {
        let task = tokio::spawn(Arc::new(self).run(stop.clone()));
        DispatcherHandle { stop, task }
    }

    /// One consumer loop per app, each with its own budget; returns once every loop has
    /// stopped and finished its in-flight work.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut apps = JoinSet::new();
        for app in self.queue.apps() {
            apps.spawn(self.clone().run_app(app, stop.clone()));
        }
        while apps.join_next().await.is_some() {}
    }

    /// Consumes one app's work queue: at most `in_flight` messages worked on at once, plus
    /// `max_awaiting_ack` parked on devices' acks ([`slot`]), both budgets the app's own.
    async fn run_app(self: Arc<Self>, app: AppId, stop: CancellationToken) {
        // The broker may hand this consumer both budgets' worth: parked messages (waiting
        // only on acks) must not stop new work from arriving.
        let mut consumer = self.queue.consume_app(&app, self.max_awaiting_ack);
        let budgets =
            slot::Budgets::new(self.in_flight, self.max_awaiting_ack, self.metrics.clone());
        let mut tasks = JoinSet::new();
        loop {
            let delivery = tokio::select! {
                d = consumer.next() => match d {
                    Some(d) => d,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            // The message first, then its active slot: a loop idling on an empty queue must
            // not hold a slot a parked message needs to go on after its ack wait. (Dropped
            // here on stop, the delivery goes back to the queue.)
            let permit = tokio::select! {
                p = budgets.take_active() => p,
                _ = stop.cancelled() => break,
            };
            let me = self.clone();
            let budgets = budgets.clone();
            tasks.spawn(async move {
                me.handle(delivery, budgets, permit).await;
            });
            while tasks.try_join_next().is_some() {}
        }
        // Stop consuming before waiting for in-flight work, so nothing new is prefetched.
        drop(consumer);
        while tasks.join_next().await.is_some() {}
    }

    /// One message, from its active slot (`permit`) to its settlement.
    async fn handle(
        self: &Arc<Self>,
        delivery: Delivery,
        budgets: Arc<slot::Budgets>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let n = match delivery.notification() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "unparseable queued message: dead-lettering it");
                let body = delivery.body.clone();
                let reason = format!("{}: {e}", DeadReason::Unparseable.label());
                if copies_safe(delivery.dead_letter(body, &reason).await) {
                    self.record(Outcome::Unparseable);
                }
                return;
            }
        };
        let span = tracing::info_span!("dispatch", id = %n.id, attempt = n.attempt + 1, targets = n.targets.len());
        let slot = Arc::new(slot::Slot::new(budgets, permit, n.targets.len()));
        self.dispatch(delivery, n, slot).instrument(span).await
    }

    /// Delivers every target (unless the message expired), settles on the reports, carries
    /// the settlement out and records it.
    async fn dispatch(
        self: &Arc<Self>,
        delivery: Delivery,
        n: QueuedNotification,
        slot: Arc<slot::Slot>,
    ) {
        let settlement = match settle::on_arrival(&n, SystemTime::now()) {
            Some(expired) => expired,
            None => {
                let mut reports = self.deliver_all(&n, &slot).await;
                self.store_offline(&n, &mut reports).await;
                let retry = &self.retry;
                settle::after_delivery(
                    &n,
                    &reports,
                    SystemTime::now(),
                    retry.max_attempts,
                    |attempts| backoff_with_jitter(attempts - 1, retry.base_delay, retry.max_delay),
                )
            }
        };
        if copies_safe(carry_out(delivery, &settlement).await) {
            self.record(Outcome::Settled(&n, &settlement));
        }
    }

    /// Every target, at most `target_concurrency` at once, each recorded as it ends.
    async fn deliver_all(
        self: &Arc<Self>,
        n: &QueuedNotification,
        slot: &Arc<slot::Slot>,
    ) -> Vec<TargetReport> {
        // Owned per-target futures (an Arc of the message, a clone of the target): a
        // stream of futures borrowing from this frame cannot be spawned.
        // What the targets send a provider alike (the APNs body) is rendered once, by the
        // first that needs it.
        let shared = Arc::new((n.clone(), Rendered::default()));
        futures::stream::iter(n.targets.clone())
            .map(|t| {
                let (me, shared, slot) = (self.clone(), shared.clone(), slot.clone());
                async move {
                    let (n, rendered) = &*shared;
                    slot.start_target();
                    let report = target::deliver(&me, n, t, &slot, rendered).await;
                    me.record(Outcome::Target(n, &report));
                    slot.end_target();
                    report
                }
            })
            .buffer_unordered(self.target_concurrency.max(1))
            .collect()
            .await
    }

    /// Writes the targets that need it ([`settle::wants_inbox`]) to their devices' offline
    /// inbox, one batch for the whole message, and marks their reports: stored (final) or
    /// failed (retried). Runs before the settlement, so the queue message is acked only
    /// after the commit.
    async fn store_offline(self: &Arc<Self>, n: &QueuedNotification, reports: &mut [TargetReport]) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        let wanted: Vec<usize> = (0..reports.len())
            .filter(|&i| settle::wants_inbox(n, &reports[i]))
            .collect();
        if wanted.is_empty() {
            return;
        }
        // The frame does not depend on the device: one serialization for every target, and
        // the replay sends exactly the bytes a live delivery would have.
        let frame = bytes::Bytes::from(protocol::notification_json(n));
        let writes = wanted
            .iter()
            .map(|&i| InboxWrite {
                app: app_of(n).to_owned(),
                device_id: reports[i].target.device_id.to_string(),
                entry: InboxEntry {
                    id: n.id,
                    accepted_at_ms: n.accepted_at_ms,
                    expires_at_ms: n.expires_at_ms,
                    collapse_key: n.collapse_key.clone(),
                    frame: frame.clone(),
                },
            })
            .collect();
        match inbox.store_batch(writes).await {
            Ok(report) => {
                for &i in &wanted {
                    reports[i].inbox = Some(InboxResult::Stored);
                }
                let devices: Vec<&DeviceId> = wanted
                    .iter()
                    .map(|&i| &reports[i].target.device_id)
                    .collect();
                self.record(Outcome::Stored(n, &devices, &report));
                let kept: Vec<DeviceId> = devices
                    .into_iter()
                    .filter(|d| {
                        !report
                            .dropped
                            .iter()
                            .any(|x| x.id == n.id && x.device_id == d.as_str())
                    })
                    .cloned()
                    .collect();
                self.recheck(inbox, n, kept).await;
            }
            Err(e) => {
                for &i in &wanted {
                    reports[i].inbox = Some(InboxResult::Failed {
                        reason: e.to_string(),
                    });
                }
                self.record(Outcome::StoreFailed(n, wanted.len(), &e));
            }
        }
    }

    /// The race: a device may have connected after its live attempt said offline and before
    /// the inbox commit, and its replay may have read the inbox before that commit. So,
    /// after the commit, look again. A session on this node: its gateway replays the inbox
    /// once more (the replay skips what it already sent). Cluster mode, no session here:
    /// the current directory can only deliver, so the notification is delivered live once
    /// more through it (a mandatory publish; "offline" from the broker costs one round
    /// trip), and an ack deletes the inbox row. Either way, a device whose session began
    /// after this look replays from the inbox, which already holds the row.
    async fn recheck(&self, inbox: &Inbox, n: &QueuedNotification, devices: Vec<DeviceId>) {
        let cluster = match &self.directory {
            Some(Directory::Cluster(c)) => Some(c),
            _ => None,
        };
        let mut remote = Vec::new();
        for device in devices {
            // The device of this notification's app, as the session table keys it.
            let device = DeviceKey::new(n.app.clone(), device);
            let replayed = self.gateway.as_ref().is_some_and(|g| g.replay_now(&device));
            if !replayed && cluster.is_some() {
                remote.push(device);
            }
        }
        let Some(cluster) = cluster else {
            return;
        };
        futures::stream::iter(remote)
            .map(|device| async move {
                if cluster.deliver(&device, n).await == LiveOutcome::Acked {
                    // Delivered after all: its row goes, as a replay's ack would take it.
                    if let Err(e) = inbox.ack(app_of(n), device.device.as_str(), n.id).await {
                        tracing::info!(%device, error = %e, "could not delete a delivered inbox row; the device dedupes the replay");
                    }
                }
            })
            .buffer_unordered(self.target_concurrency.max(1))
            .collect::<Vec<()>>()
            .await;
    }

    fn record(&self, outcome: Outcome<'_>) {
        record::record(&self.metrics, |e| self.events.emit(e), outcome);
    }
}

/// The app a notification belongs to, as the inbox keys it: a device's rows are its app's
/// (device ids are per app).
fn app_of(n: &QueuedNotification) -> &str {
    n.app.as_str()
}

/// Makes the settlement's copies safe, then acks: through [`Delivery::retry`] and
/// [`Delivery::dead_letter`], which publish (and await the confirm) before they ack.
async fn carry_out(delivery: Delivery, s: &Settlement) -> Result<(), SettleError> {
    match s {
        Settlement::Ack | Settlement::Expired => delivery.ack().await.map_err(SettleError::Ack),
        Settlement::Retry(r) => delivery.retry(&r.next, r.delay).await,
        Settlement::DeadLetter(d) => delivery.dead_letter(d.copy.to_json(), &d.reason).await,
        Settlement::RetryAndDeadLetter(r, d) => {
            // Both copies before the one ack.
            let queue = delivery.queue();
            queue
                .publish_retry(&r.next, r.delay)
                .await
                .map_err(SettleError::Publish)?;
            delivery.dead_letter(d.copy.to_json(), &d.reason).await
        }
    }
}

/// True if the settlement happened: its copies are safe, even if the ack then failed.
fn copies_safe(result: Result<(), SettleError>) -> bool {
    match result {
        Ok(()) => true,
        Err(e @ SettleError::Ack(_)) => {
            // The broker will redeliver; at-least-once means a possible duplicate, not a loss.
            tracing::warn!(error = %e, "ack failed; the message will be redelivered");
            true
        }
        Err(e @ SettleError::Publish(_)) => {
            // Not acked: the whole message comes back; delivered targets may get a
            // duplicate (they dedupe by id), nothing is lost.
            tracing::warn!(error = %e, "could not settle; leaving the message unacked");
            false
        }
    }
}
