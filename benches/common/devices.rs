//! Bench devices: WebSocket sessions of the `default` app, with tokens minted from
//! [`SECRET`] (which the bench hands herald as `auth.device_token_secret`), and the latency
//! statistics the benches report.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use herald::config::Secret;
use herald::domain::DeviceId;
use herald::gateway::DeviceTokens;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const SECRET: &str = "bench-device-secret-0123456789abcdef";

/// When each notification (by the `seq` in its `data`) first reached a device.
pub type Received = Arc<Mutex<HashMap<u64, Instant>>>;

/// Connects devices `{prefix}-0` … `{prefix}-{n-1}` to herald at `addr` (host:port).
/// `Some(received)`: each acks every notification and notes when its `seq` first arrived;
/// `None`: each reads every frame (so it answers pings) and never acks.
pub async fn connect(addr: &str, prefix: &str, n: usize, received: Option<Received>) {
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(3600));
    for i in 0..n {
        let device = DeviceId::parse(format!("{prefix}-{i}")).unwrap();
        let (token, _) = tokens.mint(&device).unwrap();
        let mut req = format!("ws://{addr}/v1/connect")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let Some(received) = &received else { continue };
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "notification" {
                    continue;
                }
                let at = Instant::now();
                if let Some(seq) = v["data"]["seq"].as_str().and_then(|s| s.parse().ok()) {
                    received.lock().unwrap().entry(seq).or_insert(at);
                }
                let ack = serde_json::json!({"type": "ack", "id": v["id"]});
                if ws
                    .send(Message::Text(ack.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// The `p` quantile (0..=1) of an ascending slice; zero when it is empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds, for the tables.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
