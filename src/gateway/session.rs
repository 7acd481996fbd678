//! One device session: a task that owns the socket, the heartbeat and the pending acks.
//!
//! One task per session, one timer in it: the next ping or the pong deadline, whichever is
//! sooner. At 19,000 idle sessions that is 19,000 timer entries in tokio's wheel, which
//! costs far less than the socket buffers beside them (see docs/benchmarks.md).

use std::collections::HashMap;
use std::sync::Arc;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Error as WsError, Message};

use super::admission::Peer;
use super::protocol::{ClientFrame, CloseKind, ServerFrame, error_code};
use super::replay::Replayer;
use super::table::{Control, Outbound, SessionHandle};
use super::{Admitted, Gateway};
use crate::domain::{DeviceKey, NotificationId};

/// How long the server tries to get its close frame out before dropping the connection
/// (a slow consumer's socket may never take it).
const CLOSE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
/// A replay running inside the session's task; it hands its [`Replayer`] back when done.
type Replaying = std::pin::Pin<Box<dyn Future<Output = Replayer> + Send>>;
type Stream = SplitStream<WebSocketStream<TcpStream>>;

/// A session's task, from the moment it is admitted until its socket is closed.
///
/// Not an `async fn`: an async fn keeps its arguments in its future for the whole session
/// (rustc stores them apart from the state it overlaps), and the `WebSocketStream`
/// argument alone would sit there unused after the split. Everything before the first
/// await runs here, at spawn time, and the future holds only what the session uses; its
/// rarely taken paths (handling a frame, writing, the timer, the close handshake) are
/// boxed while they run. An idle session's task is what a gateway holding many devices
/// spends (docs/benchmarks.md, "Idle session memory").
pub(super) fn run(
    gateway: Gateway,
    device: DeviceKey,
    peer: Peer,
    ws: WebSocketStream<TcpStream>,
) -> impl Future<Output = ()> + use<> {
    let (ws, stream) = ws.split();
    let (tx, rx) = mpsc::channel(gateway.settings().send_buffer);
    let control = Arc::new(gateway.new_control());
    let id = uuid::Uuid::now_v7();
    gateway.metrics().sessions_opened.inc();
    let active = gateway
        .metrics()
        .sessions_active
        .with_label_values(&[device.app.as_str()]);
    active.inc();
    // The replay feeds the same send buffer as live deliveries. Futures are lazy: it
    // starts once `serve` has sent hello.
    let replay = gateway.inbox().map(|inbox| {
        Box::pin(
            Replayer::new(
                gateway.clone(),
                inbox.clone(),
                device.app.as_str().to_owned(),
                device.device.clone(),
                tx.clone(),
            )
            .run(),
        ) as Replaying
    });
    let registered = gateway.register(
        device.clone(),
        SessionHandle::new(id, peer, tx, control.clone()),
    );
    live(
        gateway, device, id, ws, stream, rx, control, active, replay, registered,
    )
}

/// [`run`] after its synchronous start.
#[allow(clippy::too_many_arguments)]
async fn live(
    gateway: Gateway,
    device: DeviceKey,
    id: uuid::Uuid,
    ws: Sink,
    mut stream: Stream,
    mut rx: mpsc::Receiver<Box<Outbound>>,
    control: Arc<Control>,
    active: prometheus::IntGauge,
    replay: Option<Replaying>,
    registered: Admitted,
) {
    let settings = gateway.settings();
    let metrics = gateway.metrics();
    let started = Instant::now();
    let mut session = Session {
        gateway: &gateway,
        ws,
        control: &control,
        pending: HashMap::new(),
        bad_frames: 0,
        started,
        next_ping: started + settings.ping_interval,
        pong_deadline: None,
        last_ping: None,
    };
    tracing::debug!(device = %device, session = %id, "session opened");
    let kind = match registered {
        Admitted::No => CloseKind::Shutdown,
        Admitted::Yes { bound: None } => {
            session
                .serve(&id, &device, &mut stream, &mut rx, replay)
                .await
        }
        // Cluster mode: `hello` only once other nodes can route to this session. A bind
        // that fails or takes too long (broker away) closes with "reconnect elsewhere".
        Admitted::Yes { bound: Some(bound) } => {
            match tokio::time::timeout(gateway.register_timeout(), bound).await {
                Ok(Ok(true)) => {
                    session
                        .serve(&id, &device, &mut stream, &mut rx, replay)
                        .await
                }
                _ => {
                    tracing::info!(device = %device, "cluster registration failed: closing the new session");
                    CloseKind::Shutdown
                }
            }
        }
    };
    gateway.unregister(&device, id);
    // Queued notifications and pending acks die with the session: their deliverers see
    // the channel close and answer `Offline`.
    rx.close();
    drop(session.pending);
    // Counted as closed now: the session is gone from the table and takes no deliveries;
    // what follows is only the goodbye on the wire.
    metrics
        .sessions_closed
        .with_label_values(&[kind.label()])
        .inc();
    active.dec();
    if let Some(code) = kind.code() {
        let description = match kind {
            CloseKind::Shutdown => {
                let spread = settings.reconnect_spread.as_millis().max(1) as u64;
                format!("reconnect_after_ms={}", rand::random_range(0..spread))
            }
            CloseKind::PongTimeout => "pong timeout".into(),
            CloseKind::Replaced => "replaced by a newer session".into(),
            CloseKind::ProtocolError => "protocol violation".into(),
            CloseKind::TooBig => "frame too big".into(),
            CloseKind::SlowConsumer => "slow consumer".into(),
            CloseKind::ServerError => "server error".into(),
            CloseKind::ClientClosed => String::new(),
        };
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: description.into(),
        };
        // The close handshake (RFC 6455 §7.1): send our close, then read until the
        // device's close comes back, so the device reads our reason before the TCP
        // connection goes. Bounded: a dead or hostile device gets CLOSE_WRITE_TIMEOUT.
        let _ = Box::pin(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            session.ws.send(Message::Close(Some(frame))).await?;
            while let Some(Ok(msg)) = stream.next().await {
                if msg.is_close() {
                    break;
                }
            }
            session.ws.close().await
        }))
        .await;
    } else {
        // Echo the device's close, as RFC 6455 asks (tungstenite queued the reply when it
        // read the close; flushing and closing sends it).
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, session.ws.close()).await;
    }
    tracing::debug!(device = %device, session = %id, reason = kind.label(), "session closed");
}

struct Session<'a> {
    gateway: &'a Gateway,
    ws: Sink,
    control: &'a Control,
    /// Notifications written and not yet acked, with their waiting deliverers.
    pending: HashMap<NotificationId, oneshot::Sender<()>>,
    bad_frames: u32,
    started: Instant,
    next_ping: Instant,
    /// Set when a ping goes out with none outstanding; cleared by any frame from the device.
    pong_deadline: Option<Instant>,
    /// The payload of the last ping (ms since session start) and when it was sent.
    last_ping: Option<(u64, Instant)>,
}

impl Session<'_> {
    async fn serve(
        &mut self,
        id: &uuid::Uuid,
        device: &DeviceKey,
        stream: &mut Stream,
        rx: &mut mpsc::Receiver<Box<Outbound>>,
        mut replay: Option<Replaying>,
    ) -> CloseKind {
        let hello = {
            let cfg = self.gateway.settings();
            ServerFrame::Hello {
                session_id: &id.to_string(),
                device_id: device.device.as_str(),
                ping_interval_ms: cfg.ping_interval.as_millis() as u64,
                pong_timeout_ms: cfg.pong_timeout.as_millis() as u64,
                ack_timeout_ms: cfg.ack_timeout.as_millis() as u64,
                max_frame_bytes: cfg.max_frame_bytes,
            }
            .to_json()
        };
        if let Err(kind) = Box::pin(self.send(Message::text(hello))).await {
            return kind;
        }
        // Right after hello: the device's offline inbox (replay.rs), `replay` as it was
        // handed in. One replay at a time; a request during one (`again`) runs another when
        // it ends. Between replays the replayer waits boxed (it is 128 bytes, and most
        // sessions replay once).
        let mut idle: Option<Box<Replayer>> = None;
        let mut again = false;
        loop {
            let wake = match self.pong_deadline {
                Some(d) => d.min(self.next_ping),
                None => self.next_ping,
            };
            let step = tokio::select! {
                _ = self.control.killed() => Err(self.killed()),
                msg = stream.next() => match msg {
                    None => Err(CloseKind::ClientClosed),
                    Some(Ok(msg)) => {
                        self.gateway.frame_in();
                        Box::pin(self.on_message(msg)).await
                    }
                    Some(Err(e)) => Err(protocol_error(e)),
                },
                out = rx.recv() => match out {
                    Some(out) => {
                        let Outbound { id, frame, acked } = *out;
                        self.pending.insert(id, acked);
                        match Box::pin(self.write(Message::text(frame))).await {
                            // This node could not write the frame (bigger than its outgoing
                            // buffer: accepted under a larger notify.max_frame_bytes, say).
                            // Not the device's doing, so its session stays: the frame is
                            // dropped, its deliverer sees `Offline` and falls back.
                            Err(Failed::Unwritable(e)) => {
                                self.pending.remove(&id);
                                self.gateway.0.metrics.frames_unwritable.inc();
                                tracing::warn!(device = %device, notification = %id, error = %e,
                                    "notification frame could not be written (server side): dropped, session kept");
                                Ok(())
                            }
                            r => r.map_err(Failed::close_kind),
                        }
                    }
                    // The table dropped our handle, which happens only after a kill
                    // (replaced, shutdown) whose reason is already set.
                    None => Err(self.killed()),
                },
                _ = tokio::time::sleep_until(wake) => Box::pin(self.on_timer()).await,
                _ = self.control.replay_requested() => {
                    match idle.take() {
                        Some(r) => replay = Some(Box::pin((*r).run())),
                        None => again = replay.is_some(),
                    }
                    Ok(())
                }
                r = async {
                    match replay.as_mut() {
                        Some(running) => running.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if std::mem::take(&mut again) {
                        replay = Some(Box::pin(r.run()));
                    } else {
                        replay = None;
                        idle = Some(Box::new(r));
                    }
                    Ok(())
                }
            };
            if let Err(kind) = step {
                return kind;
            }
        }
    }

    fn killed(&self) -> CloseKind {
        self.control.reason()
    }

    /// Writes one frame; a failure closes the session (see [`Failed::close_kind`]).
    async fn send(&mut self, msg: Message) -> Result<(), CloseKind> {
        self.write(msg).await.map_err(Failed::close_kind)
    }

    /// Writes one frame. A device that does not read makes this wait; the wait still ends
    /// on a kill (e.g. slow consumer, shutdown) or on the pong deadline.
    async fn write(&mut self, msg: Message) -> Result<(), Failed> {
        let deadline = self.pong_deadline;
        let pong_missed = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.ws.send(msg) => match r {
                Ok(()) => {
                    self.gateway.frame_out();
                    Ok(())
                }
                Err(e) => Err(Failed::classify(e)),
            },
            _ = self.control.killed() => Err(Failed::Closed(self.killed())),
            _ = pong_missed => Err(Failed::Closed(CloseKind::PongTimeout)),
        }
    }

    async fn on_timer(&mut self) -> Result<(), CloseKind> {
        let now = Instant::now();
        if self.pong_deadline.is_some_and(|d| now >= d) {
            return Err(CloseKind::PongTimeout);
        }
        if now < self.next_ping {
            return Ok(());
        }
        let cfg = self.gateway.settings();
        self.next_ping = now + cfg.ping_interval;
        if self.pong_deadline.is_none() {
            self.pong_deadline = Some(now + cfg.pong_timeout);
        }
        let stamp = now.duration_since(self.started).as_millis() as u64;
        self.last_ping = Some((stamp, now));
        // Deliverers that gave up (ack timeout) leave closed senders behind; sweep them
        // here rather than let a device that never acks grow the map.
        self.pending.retain(|_, s| !s.is_closed());
        self.send(Message::Ping(Bytes::copy_from_slice(&stamp.to_be_bytes())))
            .await
    }

    async fn on_message(&mut self, msg: Message) -> Result<(), CloseKind> {
        // Any frame from the device proves the link works, as well as a pong would.
        self.pong_deadline = None;
        match msg {
            Message::Text(text) => match serde_json::from_str::<ClientFrame>(&text) {
                Ok(ClientFrame::Ack { id }) => match NotificationId::parse(&id) {
                    Some(id) => {
                        if let Some(acked) = self.pending.remove(&id) {
                            self.gateway.metrics().acks.inc();
                            let _ = acked.send(());
                        }
                        // An unknown id is a late ack (after ack_timeout) or a duplicate:
                        // harmless, and the device cannot tell, so no error frame.
                        Ok(())
                    }
                    None => {
                        self.bad_frame(error_code::BAD_FRAME, "ack id is not a UUID")
                            .await
                    }
                },
                Ok(ClientFrame::Ping { nonce }) => {
                    let pong = ServerFrame::Pong {
                        nonce: nonce.as_deref(),
                    };
                    self.send(Message::text(pong.to_json())).await
                }
                Err(e) => {
                    let message = format!("not a protocol frame: {e}");
                    self.bad_frame(error_code::BAD_FRAME, &message).await
                }
            },
            Message::Binary(_) => {
                self.bad_frame(
                    error_code::BINARY_NOT_SUPPORTED,
                    "frames are JSON text frames",
                )
                .await
            }
            // tungstenite queues the pong itself and sends it with the next read or write.
            Message::Ping(_) => Ok(()),
            Message::Pong(payload) => {
                if let (Some((stamp, sent)), Ok(bytes)) =
                    (self.last_ping, <[u8; 8]>::try_from(payload.as_ref()))
                    && u64::from_be_bytes(bytes) == stamp
                {
                    self.gateway
                        .metrics()
                        .ping_rtt
                        .observe(sent.elapsed().as_secs_f64());
                    self.last_ping = None;
                }
                Ok(())
            }
            Message::Close(_) => Err(CloseKind::ClientClosed),
            // Raw frames are only produced when writing; never read.
            Message::Frame(_) => Ok(()),
        }
    }

    /// Answers a garbage frame with an error frame; too many close the session.
    async fn bad_frame(&mut self, code: &str, message: &str) -> Result<(), CloseKind> {
        self.bad_frames += 1;
        let frame = ServerFrame::Error { code, message };
        self.send(Message::text(frame.to_json())).await?;
        if self.bad_frames >= self.gateway.settings().max_bad_frames {
            return Err(CloseKind::ProtocolError);
        }
        Ok(())
    }
}

/// Why a write did not happen: whose fault decides what the session does next.
enum Failed {
    /// The session is over, for this reason (the device went away, a kill, a pong timeout).
    Closed(CloseKind),
    /// The frame does not fit the outgoing buffer; nothing was written and the socket is
    /// still good. This node's sizing, never the device's doing.
    Unwritable(WsError),
    /// Any other write error: the server's side failed (a state or protocol bug).
    Server(WsError),
}

impl Failed {
    fn classify(e: WsError) -> Failed {
        match e {
            // The socket or the peer is gone: the device's side (or its network).
            WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => {
                Failed::Closed(CloseKind::ClientClosed)
            }
            e @ (WsError::WriteBufferFull(_) | WsError::Capacity(_)) => Failed::Unwritable(e),
            e => Failed::Server(e),
        }
    }

    /// When the frame was not a notification (hello, pong, error), the session closes; a
    /// server-side failure with 1011, counted as `server_error`, never as `client_closed`.
    fn close_kind(self) -> CloseKind {
        match self {
            Failed::Closed(kind) => kind,
            Failed::Unwritable(e) | Failed::Server(e) => {
                tracing::warn!(error = %e, "websocket write failed on the server side: closing the session");
                CloseKind::ServerError
            }
        }
    }
}

fn protocol_error(e: WsError) -> CloseKind {
    match e {
        // Over gateway.max_frame_bytes (frame or reassembled message): 1009.
        WsError::Capacity(_) => CloseKind::TooBig,
        WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => {
            CloseKind::ClientClosed
        }
        e => {
            tracing::debug!(error = %e, "websocket protocol error");
            CloseKind::ProtocolError
        }
    }
}
