//! The gateway: device WebSocket sessions at `GET /v1/connect`.
//!
//! A session's life, from connect to heartbeat death:
//!
//! 1. [`connect`] checks the device token ([`token`]) *before* the upgrade: a bad token is a
//!    401 and no session ever exists.
//!    A node admits at most `gateway.max_session_rate` new sessions a second ([`Admission`]):
//!    over it, 503 `too_many_sessions`, so a reconnect storm cannot flatten it.
//! 2. The upgrade spawns one task per session ([`session`]) on the HTTP worker that
//!    accepted it. The task registers the session in the gateway's table (replacing, and
//!    closing, an older session of the same device) and, in cluster mode, in the cluster
//!    directory (a broker binding, awaited), sends `hello`, then loops over: frames from
//!    the device, notifications queued for it, and one timer for the heartbeat.
//! 3. [`Gateway::deliver`] (behind [`crate::directory::Directory`]) queues a notification
//!    frame into the session's bounded send buffer and waits for the device's ack.
//! 4. The session ends when the device closes, misses a pong, is replaced, overflows its
//!    buffer, sends too much garbage, or the node shuts down; each has its close code
//!    ([`protocol::close`]) and its `reason` label in the metrics.
//!
//! docs/protocol.md is the client-facing specification.

pub mod protocol;
mod session;
pub mod token;
pub mod upgrade;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use actix_web::http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::{HttpRequest, HttpResponse, web};
use prometheus::IntCounter;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::GatewaySettings;
use crate::directory::LiveOutcome;
use crate::directory::cluster::Registry;
use crate::domain::{DeviceId, NotificationId, QueuedNotification};
use crate::metrics::Metrics;
pub use protocol::CloseKind;
pub use token::{DeviceTokens, TokenError};

/// How long a connect waits for the cluster directory to be (re)registered before it is
/// refused with 503 `not_ready`: covers a node's first second after start and a quick
/// broker reconnect, without parking handshakes for a long outage.
const REGISTRY_READY_WAIT: Duration = Duration::from_secs(1);

/// The gateway's knobs, from `[gateway]` (each is explained in config/default.toml).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub ack_timeout: Duration,
    pub max_frame_bytes: usize,
    pub send_buffer: usize,
    pub max_bad_frames: u32,
    pub reconnect_spread: Duration,
    pub max_session_rate: u32,
    pub session_burst: u32,
}

impl From<&GatewaySettings> for GatewayConfig {
    fn from(s: &GatewaySettings) -> Self {
        GatewayConfig {
            ping_interval: s.ping_interval,
            pong_timeout: s.pong_timeout,
            ack_timeout: s.ack_timeout,
            max_frame_bytes: s.max_frame_bytes,
            send_buffer: s.send_buffer,
            max_bad_frames: s.max_bad_frames,
            reconnect_spread: s.reconnect_spread,
            max_session_rate: s.max_session_rate,
            session_burst: s.session_burst,
        }
    }
}

/// This node's live sessions. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct Gateway(Arc<Inner>);

struct Inner {
    config: GatewayConfig,
    tokens: DeviceTokens,
    metrics: Metrics,
    frames_in: IntCounter,
    frames_out: IntCounter,
    /// Device → its one current session. A plain mutex: held only to insert, remove or
    /// clone a handle, never across an await.
    sessions: Mutex<HashMap<DeviceId, SessionHandle>>,
    /// False once shutdown began: no new sessions, no new deliveries.
    accepting: AtomicBool,
    /// Deliveries waiting for an ack; shutdown lets them finish before closing sessions.
    in_flight: AtomicUsize,
    /// Session tasks still running (they decrement after sending their close frame).
    live: AtomicUsize,
    /// The cluster directory's registrar (cluster mode only): bind at connect, unbind at
    /// close, in the order this table changes.
    registry: OnceLock<Registry>,
    admission: Admission,
}

/// Admission control for new sessions: a token bucket refilled at `max_session_rate` a
/// second, holding at most `session_burst`. Hand-written: it is one bucket behind one
/// mutex, checked once per connect, smaller than wiring a rate-limiting crate's clock.
struct Admission {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, std::time::Instant)>,
}

impl Admission {
    fn new(rate: u32, burst: u32) -> Self {
        Admission {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), std::time::Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn try_admit(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let now = std::time::Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

/// What registering a new session gave.
pub(crate) enum Admitted {
    /// The node is shutting down.
    No,
    /// In the table; in cluster mode, `bound` says when the broker binding is in place.
    Yes {
        bound: Option<oneshot::Receiver<bool>>,
    },
}

/// What the table holds for a session: its send buffer and a way to close it.
#[derive(Clone)]
struct SessionHandle {
    id: uuid::Uuid,
    tx: mpsc::Sender<Box<Outbound>>,
    control: Arc<Control>,
}

/// One notification on its way to a device. Boxed in the channel so an idle session's
/// channel block holds pointers, not whole frames.
struct Outbound {
    id: NotificationId,
    frame: String,
    acked: oneshot::Sender<()>,
}

/// Closes a session from outside its task, with a reason. The first reason wins.
#[derive(Default)]
struct Control {
    kill: CancellationToken,
    reason: OnceLock<CloseKind>,
}

impl Control {
    fn close(&self, kind: CloseKind) {
        let _ = self.reason.set(kind);
        self.kill.cancel();
    }
}

/// Decrements the in-flight count however `deliver` returns.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gateway {
    pub fn new(config: GatewayConfig, tokens: DeviceTokens, metrics: Metrics) -> Self {
        Gateway(Arc::new(Inner {
            admission: Admission::new(config.max_session_rate, config.session_burst),
            frames_in: metrics.frames.with_label_values(&["in"]),
            frames_out: metrics.frames.with_label_values(&["out"]),
            config,
            tokens,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            registry: OnceLock::new(),
        }))
    }

    /// Cluster mode: register sessions with the cluster directory from now on.
    pub(crate) fn set_registry(&self, registry: Registry) {
        let _ = self.0.registry.set(registry);
    }

    /// Devices with a session on this node now (the cluster directory re-binds them after
    /// a broker reconnect).
    pub(crate) fn devices(&self) -> Vec<DeviceId> {
        self.sessions().keys().cloned().collect()
    }

    /// A newer session of `device` (id `newer`, a UUIDv7) opened on another node: close
    /// this node's session of it if it is older ("replaced").
    pub(crate) fn close_older(&self, device: &DeviceId, newer: uuid::Uuid) {
        if let Some(h) = self.sessions().get(device)
            && h.id < newer
        {
            tracing::info!(device = %device, "a newer session opened on another node: replacing");
            h.control.close(CloseKind::Replaced);
        }
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.0.config
    }

    /// Sessions currently registered on this node.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// Whether `device` has a session on this node now.
    pub fn is_connected(&self, device: &DeviceId) -> bool {
        self.sessions().contains_key(device)
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, SessionHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // operation on it is a single insert/remove/get), so a poisoned lock is still usable.
        self.0.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `n` down `device`'s session and waits up to `ack_timeout` for the ack.
    pub async fn deliver(&self, device: &DeviceId, n: &QueuedNotification) -> LiveOutcome {
        if !self.0.accepting.load(Ordering::Acquire) {
            return LiveOutcome::Offline;
        }
        let Some(handle) = self.sessions().get(device).cloned() else {
            return LiveOutcome::Offline;
        };
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        let _in_flight = InFlight(&self.0.in_flight);
        let (acked, ack) = oneshot::channel();
        let out = Box::new(Outbound {
            id: n.id,
            frame: protocol::notification_json(n),
            acked,
        });
        match handle.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The device stopped reading: close it rather than buffer more.
                tracing::info!(device = %device, "send buffer full: closing slow session");
                handle.control.close(CloseKind::SlowConsumer);
                return LiveOutcome::Offline;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return LiveOutcome::Offline,
        }
        match tokio::time::timeout(self.0.config.ack_timeout, ack).await {
            Ok(Ok(())) => LiveOutcome::Acked,
            // The session ended before the ack: the frame may or may not have arrived.
            Ok(Err(_)) => LiveOutcome::Offline,
            Err(_) => {
                self.0.metrics.ack_timeouts.inc();
                tracing::info!(device = %device, id = %n.id, "no ack within ack_timeout");
                LiveOutcome::NotAcked
            }
        }
    }

    /// The shutdown drain: refuse new sessions and deliveries, let deliveries already
    /// waiting for an ack finish (each ends within `ack_timeout`), then close every session
    /// with the "reconnect elsewhere" code and wait for their close frames to go out.
    /// Bounded by `within`.
    pub async fn shutdown(&self, within: Duration) {
        self.0.accepting.store(false, Ordering::Release);
        let deadline = tokio::time::Instant::now() + within;
        // Polling: this runs once per process lifetime and ends within ack_timeout.
        while self.0.in_flight.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sessions: Vec<SessionHandle> = {
            let mut table = self.sessions();
            if let Some(registry) = self.0.registry.get() {
                for device in table.keys() {
                    registry.unbind(device.clone());
                }
            }
            table.drain().map(|(_, h)| h).collect()
        };
        tracing::info!(
            sessions = sessions.len(),
            "closing sessions: reconnect elsewhere"
        );
        for s in &sessions {
            s.control.close(CloseKind::Shutdown);
        }
        // Deregistered from the cluster directory: lookups now get "offline" from the
        // broker instead of waiting on this node.
        if let Some(registry) = self.0.registry.get() {
            registry
                .flush(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await;
        }
        while self.0.live.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Puts a new session in the table; an older session of the same device is closed.
    /// In cluster mode the bind is asked for under the table's lock, so binds and unbinds
    /// reach the registrar in the order the table changed.
    fn register(&self, device: DeviceId, handle: SessionHandle) -> Admitted {
        if !self.0.accepting.load(Ordering::Acquire) {
            return Admitted::No;
        }
        let id = handle.id;
        let mut sessions = self.sessions();
        let bound = self.0.registry.get().map(|r| r.bind(device.clone(), id));
        if let Some(old) = sessions.insert(device, handle) {
            old.control.close(CloseKind::Replaced);
        }
        Admitted::Yes { bound }
    }

    /// Removes the session from the table (and its cluster registration), unless a newer
    /// one already took its place.
    fn unregister(&self, device: &DeviceId, id: uuid::Uuid) {
        let mut sessions = self.sessions();
        if sessions.get(device).is_some_and(|h| h.id == id) {
            sessions.remove(device);
            if let Some(registry) = self.0.registry.get() {
                registry.unbind(device.clone());
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Why a connect was refused before any session existed: the status, the stable error
/// code, and the headers that go with it. Rendered as an actix response on the plain
/// request path and as raw HTTP/1.1 bytes on the upgrade path (see [`upgrade`]).
#[derive(Debug)]
pub(crate) struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    bearer_challenge: bool,
}

impl Refusal {
    fn body(&self) -> String {
        json!({"error": {"code": self.code, "message": self.message}}).to_string()
    }

    fn into_response(self) -> HttpResponse {
        let mut res = HttpResponse::build(
            actix_web::http::StatusCode::from_u16(self.status)
                .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
        );
        if self.bearer_challenge {
            res.insert_header((WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(secs) = self.retry_after {
            res.insert_header((RETRY_AFTER, secs.to_string()));
        }
        res.content_type("application/json").body(self.body())
    }
}

impl Gateway {
    /// Everything checked before a session may exist: the device token (Bearer header or
    /// `?token=`), that the node is accepting, that it can register sessions (cluster
    /// mode), and the admission rate. Each refusal is counted by reason.
    pub(crate) async fn admit(
        &self,
        headers: &actix_web::http::header::HeaderMap,
        query: &str,
    ) -> Result<DeviceId, Refusal> {
        let refuse = |status, code, message: &str, retry_after| {
            self.0
                .metrics
                .sessions_refused
                .with_label_values(&[if status == 401 { "unauthorized" } else { code }])
                .inc();
            Err(Refusal {
                status,
                code,
                message: message.to_owned(),
                retry_after,
                bearer_challenge: status == 401,
            })
        };
        let header_token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim().to_owned())
            });
        let token = header_token.or_else(|| {
            web::Query::<TokenQuery>::from_query(query)
                .ok()
                .and_then(|q| q.into_inner().token)
        });
        let device = match token
            .as_deref()
            .map(|t| self.0.tokens.verify(t).map(|k| k.device))
        {
            Some(Ok(device)) => device,
            Some(Err(e)) => return refuse(401, "unauthorized", &e.to_string(), None),
            None => {
                return refuse(401, "unauthorized", &TokenError::Missing.to_string(), None);
            }
        };
        if !self.0.accepting.load(Ordering::Acquire) {
            return refuse(
                503,
                "shutting_down",
                "this node is shutting down; connect to another",
                Some(1),
            );
        }
        if let Some(registry) = self.0.registry.get()
            && !registry.wait_ready(REGISTRY_READY_WAIT).await
        {
            // Cluster mode with the broker away: a session here could not be routed to.
            return refuse(
                503,
                "not_ready",
                "this node cannot register sessions now (broker unavailable); retry or connect to another",
                Some(1),
            );
        }
        if let Err(wait) = self.0.admission.try_admit() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            return refuse(
                503,
                "too_many_sessions",
                "this node is admitting new sessions as fast as it allows (gateway.max_session_rate); retry after the delay or connect to another",
                Some(secs),
            );
        }
        Ok(device)
    }
}

/// `GET /v1/connect` *without* an `Upgrade` header: WebSocket upgrades never reach the
/// actix app (they go to [`upgrade`]), so this answers only plain requests: the same
/// admission checks (a bad token is still a 401), then 400 because there is nothing to
/// upgrade.
pub async fn connect(req: HttpRequest, gateway: web::Data<Gateway>) -> HttpResponse {
    match gateway.admit(req.headers(), req.query_string()).await {
        Err(refusal) => refusal.into_response(),
        Ok(_) => Refusal {
            status: 400,
            code: "invalid_request",
            message: "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)"
                .into(),
            retry_after: None,
            bearer_challenge: false,
        }
        .into_response(),
    }
}
