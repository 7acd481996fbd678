//! The gateway: device WebSocket sessions at `GET /v1/connect`.
//!
//! A session's life, from connect to heartbeat death:
//!
//! 1. [`connect`] ([`handler`]) and [`upgrade`] check the device token ([`token`]) *before* the upgrade: a bad token is a
//!    401 and no session ever exists.
//!    Then the limits ([`admission`]), each spent only by requests that passed the checks
//!    before it: per device (429), per source address (429), `gateway.max_sessions` (503
//!    `node_full`) and the node's `gateway.max_session_rate` (503 `too_many_sessions`), so
//!    neither garbage, nor one looping client, nor a reconnect storm can flatten a node.
//! 2. The upgrade spawns one task per session ([`session`]) on the HTTP worker that
//!    accepted it. The task registers the session in the gateway's table (replacing, and
//!    closing, an older session of the same device; [`table`]) and, in cluster mode, with
//!    its [`registrar`] (the cluster directory: the open event, broker-confirmed,
//!    awaited), sends `hello`, then loops over: frames from the device, notifications
//!    queued for it, and one timer for the heartbeat.
//! 3. [`Gateway::deliver`] (behind [`crate::directory::Directory`]) queues a notification
//!    frame into the session's bounded send buffer and waits for the device's ack.
//! 4. The session ends when the device closes, misses a pong, is replaced, overflows its
//!    buffer, sends too much garbage, or the node shuts down; each has its close code
//!    ([`protocol::close`]) and its `reason` label in the metrics.
//!
//! docs/protocol.md is the client-facing specification.

mod admission;
mod handler;
pub mod protocol;
mod refusal;
pub mod registrar;
mod replay;
mod session;
mod table;
pub mod token;
pub mod upgrade;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewaySettings;
use crate::domain::{DeviceKey, NotificationId, QueuedNotification};
use crate::events::{Event, Events, SessionInfo};
use crate::metrics::Metrics;
use admission::Admission;
pub use admission::{IpNet, Peer};
pub use handler::{connect, connect_preflight};
pub use protocol::CloseKind;
pub(crate) use refusal::Refusal;
use registrar::Registrar;
use table::{Control, Outbound, SessionHandle, SessionTable};
pub use token::{DeviceTokens, TokenError};

/// Called (at most once) by a live delivery when the frame is with the device's session (in
/// its send buffer here, or "received" by the node that holds it) and only the device's ack
/// is left to wait for. The dispatcher then lends the message's active slot to other work
/// for that wait (`dispatch/slot.rs`): a slow device's ack deadline is not a delivery slot
/// other devices' notifications need.
pub type AwaitingAck<'a> = &'a (dyn Fn() + Send + Sync);

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

/// This node's live sessions. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    settings: GatewaySettings,
    /// `notify.max_frame_bytes`: the largest notification frame this node writes; sizes the
    /// outgoing WebSocket buffer, apart from the inbound `gateway.max_frame_bytes`.
    max_notification_frame_bytes: usize,
    tokens: DeviceTokens,
    metrics: Metrics,
    frames_in: IntCounter,
    frames_out: IntCounter,
    table: SessionTable,
    /// The gateway's node in the shutdown tree. Every session's kill token is a child:
    /// cancelling it closes them all with "reconnect elsewhere".
    stop: CancellationToken,
    /// A child of `stop`, cancelled first: no new sessions, no new deliveries.
    refusing: CancellationToken,
    /// Deliveries waiting for an ack; shutdown lets them finish before closing sessions.
    in_flight: TaskTracker,
    /// Session tasks still running (until their close frame went out).
    sessions: TaskTracker,
    admission: Admission,
    /// The offline inbox sessions replay after `hello` (set once at start-up, when there is
    /// one: `None` in cluster mode without `inbox.url`).
    inbox: std::sync::OnceLock<crate::inbox::Inbox>,
    /// Where the gateway's own events go (`session_replaced`, `replayed`); set once at
    /// start-up. Unset: they are not emitted (tests of other parts).
    events: std::sync::OnceLock<Events>,
}

/// What registering a new session gave.
pub(crate) enum Admitted {
    /// The node is shutting down.
    No,
    /// In the table; in cluster mode, `bound` says when the cluster was told (broker-confirmed).
    Yes {
        bound: Option<oneshot::Receiver<bool>>,
    },
}

impl Gateway {
    /// A gateway whose sessions all close when `stop` (its node of the shutdown tree) is
    /// cancelled; [`Gateway::shutdown`] does that in order.
    pub fn new(
        settings: GatewaySettings,
        max_notification_frame_bytes: usize,
        tokens: DeviceTokens,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Self {
        Gateway(Arc::new(Inner {
            max_notification_frame_bytes,
            admission: Admission::new(&settings),
            frames_in: metrics.frames.with_label_values(&["in"]),
            frames_out: metrics.frames.with_label_values(&["out"]),
            settings,
            tokens,
            metrics,
            table: SessionTable::default(),
            refusing: stop.child_token(),
            stop,
            in_flight: TaskTracker::new(),
            sessions: TaskTracker::new(),
            inbox: std::sync::OnceLock::new(),
            events: std::sync::OnceLock::new(),
        }))
    }

    /// Sessions replay `inbox` after `hello` from now on.
    pub fn set_inbox(&self, inbox: crate::inbox::Inbox) {
        let _ = self.0.inbox.set(inbox);
    }

    fn inbox(&self) -> Option<&crate::inbox::Inbox> {
        self.0.inbox.get()
    }

    /// The gateway's events (`session_replaced`, `replayed`) go to `events` from now on.
    /// The process's one [`Events`], shared with its dispatcher when it has that role too;
    /// it must outlive [`Gateway::shutdown`] (startup.rs stops the sinks after it).
    pub fn set_events(&self, events: Events) {
        let _ = self.0.events.set(events);
    }

    fn emit(&self, event: Event) {
        if let Some(events) = self.0.events.get() {
            events.emit(event);
        }
    }

    /// `device`'s session `old` was closed with 4001 for the newer session `new` (whose
    /// peer another node may not have said).
    fn session_replaced(
        &self,
        device: &DeviceKey,
        old: table::Closed,
        new: uuid::Uuid,
        new_peer: Option<String>,
    ) {
        tracing::info!(device = %device, old = %old.id, %new, "session replaced by a newer one");
        self.emit(Event::session_replaced(
            device,
            SessionInfo {
                id: old.id.to_string(),
                peer: Some(old.peer.to_string()),
            },
            SessionInfo {
                id: new.to_string(),
                peer: new_peer,
            },
        ));
    }

    /// If `device` has a session on this node, has it replay its inbox once more (after the
    /// replay it may be running) and returns true.
    pub fn replay_now(&self, device: &DeviceKey) -> bool {
        match self.0.table.get(device) {
            Some(h) => {
                h.request_replay();
                true
            }
            None => false,
        }
    }

    /// Cluster mode: tell `registrar` of every session from now on.
    pub(crate) fn set_registrar(&self, registrar: Registrar) {
        self.0.table.set_registrar(registrar);
    }

    /// A newer session of `device` (id `newer`, a UUIDv7, connected from `peer` when
    /// its node said) opened on another node: close this node's session of it if it is
    /// older ("replaced"), with a `session_replaced` event from this node.
    pub(crate) fn close_older(&self, device: &DeviceKey, newer: uuid::Uuid, peer: Option<String>) {
        if let Some(old) = self.0.table.close_older(device, newer) {
            tracing::info!(device = %device, "a newer session opened on another node: replacing");
            self.session_replaced(device, old, newer, peer);
        }
    }

    /// The `[gateway]` settings this gateway runs with.
    pub fn settings(&self) -> &GatewaySettings {
        &self.0.settings
    }

    /// Sessions currently registered on this node.
    pub fn session_count(&self) -> usize {
        self.0.table.len()
    }

    /// Whether `device` has a session on this node now.
    pub fn is_connected(&self, device: &DeviceKey) -> bool {
        self.0.table.contains(device)
    }

    fn is_accepting(&self) -> bool {
        !self.0.refusing.is_cancelled()
    }

    /// Sends `n` down `device`'s session and waits up to `ack_timeout` for the ack.
    pub async fn deliver(&self, device: &DeviceKey, n: &QueuedNotification) -> LiveOutcome {
        self.deliver_awaiting(device, n, &|| {}).await
    }

    /// [`Gateway::deliver`], calling `awaiting_ack` once the frame is in the session's send
    /// buffer and only the device's ack is left to wait for ([`AwaitingAck`]).
    pub async fn deliver_awaiting(
        &self,
        device: &DeviceKey,
        n: &QueuedNotification,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        self.deliver_frame_awaiting(device, n.id, protocol::notification_json(n), awaiting_ack)
            .await
    }

    /// [`Gateway::deliver`] of a frame already rendered (by [`protocol::notification_json`]):
    /// the cluster directory sends only the device's own frame across nodes.
    pub async fn deliver_frame(
        &self,
        device: &DeviceKey,
        id: NotificationId,
        frame: String,
    ) -> LiveOutcome {
        self.deliver_frame_awaiting(device, id, frame, &|| {}).await
    }

    /// [`Gateway::deliver_frame`] with the [`AwaitingAck`] signal.
    async fn deliver_frame_awaiting(
        &self,
        device: &DeviceKey,
        id: NotificationId,
        frame: String,
        awaiting_ack: AwaitingAck<'_>,
    ) -> LiveOutcome {
        if !self.is_accepting() {
            return LiveOutcome::Offline;
        }
        let Some(handle) = self.0.table.get(device) else {
            return LiveOutcome::Offline;
        };
        let _in_flight = self.0.in_flight.token();
        let (acked, ack) = oneshot::channel();
        let out = Box::new(Outbound { id, frame, acked });
        // One deadline for room in the send buffer and for the ack: a delivery still ends
        // within ack_timeout.
        let deadline = tokio::time::Instant::now() + self.0.settings.ack_timeout;
        // A full buffer is not yet a slow device: a burst (several dispatchers, each with
        // `queue.prefetch` deliveries in flight, can aim more than `send_buffer` frames at
        // one busy device at once) fills it while the device reads on. Wait for room; a
        // buffer that stays full for the whole ack_timeout means the session could not write
        // one frame in that time, i.e. the device stopped reading: close it rather than
        // buffer more.
        match tokio::time::timeout_at(deadline, handle.sender().send(out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_closed)) => return LiveOutcome::Offline,
            Err(_full_too_long) => {
                tracing::info!(device = %device, "send buffer full for ack_timeout: closing slow session");
                handle.close(CloseKind::SlowConsumer);
                return LiveOutcome::Offline;
            }
        }
        // The frame is the session's now; what is left is the device's time, not herald's.
        awaiting_ack();
        match tokio::time::timeout_at(deadline, ack).await {
            Ok(Ok(())) => LiveOutcome::Acked,
            // The session ended before the ack: the frame may or may not have arrived.
            Ok(Err(_)) => LiveOutcome::Offline,
            Err(_) => {
                self.0.metrics.ack_timeouts.inc();
                tracing::info!(device = %device, %id, "no ack within ack_timeout");
                LiveOutcome::NotAcked
            }
        }
    }

    /// The shutdown drain: refuse new sessions and deliveries, let deliveries already
    /// waiting for an ack finish (each ends within `ack_timeout`), then close every session
    /// with the "reconnect elsewhere" code and wait for their close frames to go out.
    /// Bounded by `within`.
    pub async fn shutdown(&self, within: Duration) {
        self.0.refusing.cancel();
        let deadline = tokio::time::Instant::now() + within;
        self.0.in_flight.close();
        let _ = tokio::time::timeout_at(deadline, self.0.in_flight.wait()).await;
        let sessions = self.0.table.drain();
        tracing::info!(
            sessions = sessions.len(),
            "closing sessions: reconnect elsewhere"
        );
        // Every session's kill token is a child of this one; none has a reason set, so
        // each closes as `Shutdown`.
        self.0.stop.cancel();
        // Deregistered from the cluster directory: lookups now get "offline" from the
        // broker instead of waiting on this node.
        if let Some(registrar) = self.0.table.registrar() {
            registrar
                .flush(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await;
        }
        self.0.sessions.close();
        let _ = tokio::time::timeout_at(deadline, self.0.sessions.wait()).await;
    }

    /// Runs a session task, counted until it ends (after its close frame went out).
    fn track_session<F: Future>(&self, session: F) -> impl Future<Output = F::Output> + use<F> {
        self.0.sessions.track_future(session)
    }

    /// A new session's control, closed with the gateway's `stop` or on its own.
    fn new_control(&self) -> Control {
        Control::under(&self.0.stop)
    }

    /// Puts a new session in the table; an older session of the same device is closed,
    /// with a `session_replaced` event.
    fn register(&self, device: DeviceKey, handle: SessionHandle) -> Admitted {
        if !self.is_accepting() {
            return Admitted::No;
        }
        let (id, peer) = (handle.id(), handle.peer());
        let (bound, replaced) = self.0.table.insert(device.clone(), handle);
        if let Some(old) = replaced {
            self.session_replaced(&device, old, id, Some(peer.to_string()));
        }
        Admitted::Yes { bound }
    }

    /// Removes the session from the table (and its cluster registration), unless a newer
    /// one already took its place.
    fn unregister(&self, device: &DeviceKey, id: uuid::Uuid) {
        self.0.table.remove(device, id);
    }

    /// How long a new session waits for its cluster bind (zero outside cluster mode).
    fn register_timeout(&self) -> Duration {
        self.0
            .table
            .registrar()
            .map(|r| r.timeout())
            .unwrap_or_default()
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    fn frame_in(&self) {
        self.0.frames_in.inc();
    }

    fn frame_out(&self) {
        self.0.frames_out.inc();
    }
}
