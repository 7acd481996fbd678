//! Gateway test helpers: an app with its directory, raw WebSocket clients, device tokens.
//! Used by the gateway, dispatch and cluster binaries.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use herald::config::{Secret, Settings};
use herald::directory::Directory;
use herald::domain::{DeviceId, DeviceKey};
use herald::gateway::DeviceTokens;
use herald::shutdown::Shutdown;
use herald::startup::Application;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "gateway-test-secret-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(5);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Short heartbeat intervals and a known signing secret.
pub fn settings() -> Settings {
    let mut s = super::test_settings();
    s.auth.device_token_secret = Secret::new(SECRET);
    s.gateway.ping_interval = Duration::from_millis(100);
    s.gateway.pong_timeout = Duration::from_millis(200);
    s.gateway.ack_timeout = Duration::from_millis(300);
    s.gateway.reconnect_spread = Duration::from_millis(100);
    s
}

pub struct GwApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub directory: Directory,
    pub metrics: herald::metrics::Metrics,
    /// The app's queue (the dispatch tests read its dead letters).
    #[allow(dead_code)]
    pub queue: herald::queue::Queue,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub async fn spawn(settings: Settings) -> GwApp {
    let app = Application::build(settings).await.expect("app builds");
    let directory = app.directory().expect("the gateway role is on");
    GwApp {
        addr: app.addr(),
        base: format!("http://{}", app.addr()),
        directory,
        metrics: app.metrics().clone(),
        queue: app.queue().clone(),
        shutdown: app.shutdown_handle(),
        task: tokio::spawn(app.run_until_stopped()),
    }
}

impl GwApp {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.addr)
    }

    /// Value of a metric line (name with labels, exactly as rendered), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        crate::support::metric_value(&self.metrics.render(), series).unwrap_or(0.0)
    }

    pub fn closed(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "herald_gateway_sessions_closed_total{{reason=\"{reason}\"}}"
        ))
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Device `id` of the app `default`.
pub fn device(id: &str) -> DeviceKey {
    DeviceKey::new(
        Default::default(),
        DeviceId::parse(id).expect("valid device id"),
    )
}

pub fn token(device_id: &str) -> String {
    DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(60))
        .mint(&device(device_id).device)
        .expect("mints")
        .0
}

/// Connects with the token in the Authorization header; returns the socket or the
/// handshake error.
pub async fn try_connect(app: &GwApp, token: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let mut req = app.ws_url().into_client_request()?;
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// Connects and reads the hello frame.
pub async fn connect(app: &GwApp, device_id: &str) -> (Ws, Value) {
    connect_with(app, &token(device_id)).await
}

/// Connects with `token` and reads the hello frame.
pub async fn connect_with(app: &GwApp, token: &str) -> (Ws, Value) {
    let mut ws = try_connect(app, Some(token)).await.expect("connects");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    (ws, hello)
}

/// A token for device `device_id` of app `app`.
pub fn token_in(app: &str, device_id: &str) -> String {
    DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(60))
        .mint_in(
            &herald::domain::AppId::parse(app).expect("app name"),
            &device(device_id).device,
        )
        .expect("mints")
        .0
}

/// The id of the next notification frame an acker (or reader) reports.
pub async fn next_notification_id(
    frames: &mut tokio::sync::mpsc::UnboundedReceiver<Value>,
) -> String {
    loop {
        let frame = tokio::time::timeout(WAIT, frames.recv())
            .await
            .expect("a frame within the wait")
            .expect("the session is open");
        if frame["type"] == "notification" {
            return frame["id"].as_str().expect("an id").to_owned();
        }
    }
}

/// The next text frame as JSON (pings are answered by tungstenite while reading).
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait")
            .expect("the socket is open")
            .expect("a valid frame");
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Close(f) => panic!("unexpected close: {f:?}"),
            _ => {}
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
pub async fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (u16::from(CloseCode::Status), String::new()),
            Some(Ok(_)) => {}
            other => panic!("connection ended without a close frame: {other:?}"),
        }
    }
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("sent");
}

/// A client that reads every frame, acks notifications, and reports them.
pub fn spawn_acker(mut ws: Ws) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v["type"] == "notification" {
                    let ack = serde_json::json!({"type": "ack", "id": v["id"]});
                    if ws
                        .send(Message::Text(ack.to_string().into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = tx.send(v);
            }
        }
    });
    rx
}

/// A client that reads (so it answers pings) but never acks.
pub fn spawn_reader(mut ws: Ws) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                let _ = tx.send(serde_json::from_str::<Value>(&t).expect("JSON"));
            }
        }
    });
    rx
}

/// The client's end of the session's TCP connection: the address the gateway sees as the
/// session's peer (no proxy in the tests).
pub fn local_addr(ws: &Ws) -> std::net::SocketAddr {
    match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.local_addr().expect("a local address"),
        _ => panic!("the tests connect over plain TCP"),
    }
}
