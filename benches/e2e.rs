//! End to end through a real herald process:
//!
//! 1. Live delivery latency, POST → the device holds the frame, p50/p99, at a steady rate
//!    spread over connected devices, on the embedded queue and on RabbitMQ.
//! 2. Fallback throughput: notifications for offline devices, each target an APNs token,
//!    POST → queue → dispatcher → APNs double; beside a raw HTTP/2 client's ceiling against
//!    the same double in the same run.
//!
//! `cargo bench --bench e2e` (needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl). Loopback
//! only, bounded in time.

#[path = "../tests/support/apns_double.rs"]
mod apns_double;
#[path = "common/raw_apns.rs"]
mod raw_apns;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use herald::config::Secret;
use herald::domain::DeviceId;
use herald::gateway::DeviceTokens;
use server::{KEY, Server};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "bench-device-secret-0123456789abcdef";
const DEVICES: usize = 200;
const RATE_PER_SEC: u64 = 500;
const LIVE_SECONDS: u64 = 8;
const FALLBACK_NOTIFICATIONS: usize = 200;
const TARGETS_EACH: usize = 100;

type Received = Arc<Mutex<HashMap<u64, Instant>>>;

/// Connects `DEVICES` devices that ack every notification and note when each `seq` arrived.
async fn connect_devices(server: &Server, received: Received) {
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(600));
    for i in 0..DEVICES {
        let device = DeviceId::parse(format!("dev-{i}")).unwrap();
        let (token, _) = tokens.mint(&device).unwrap();
        let mut req = format!("ws://{}/v1/connect", server.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(t) = msg else { continue };
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] != "notification" {
                    continue;
                }
                let at = Instant::now();
                if let Some(seq) = v["data"]["seq"].as_str().and_then(|s| s.parse().ok()) {
                    received.lock().unwrap().insert(seq, at);
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// POSTs at a steady rate for LIVE_SECONDS; returns (p50, p99, delivered, sent).
async fn live_latency(server: &Server) -> (Duration, Duration, usize, usize) {
    let received: Received = Arc::default();
    connect_devices(server, received.clone()).await;
    let client = reqwest::Client::new();
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    let total = RATE_PER_SEC * LIVE_SECONDS;
    let mut posts = Vec::new();
    for seq in 0..total {
        tick.tick().await;
        let body = serde_json::json!({
            "targets": [{"device_id": format!("dev-{}", seq as usize % DEVICES)}],
            "data": {"seq": seq.to_string()},
        });
        let req = client
            .post(format!("{}/v1/notify", server.base))
            .bearer_auth(KEY)
            .json(&body);
        sent.lock().unwrap().insert(seq, Instant::now());
        posts.push(tokio::spawn(async move {
            req.send().await.is_ok_and(|r| r.status() == 202)
        }));
    }
    for p in posts {
        assert!(p.await.unwrap(), "every POST accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = received.lock().unwrap();
    let sent = sent.lock().unwrap();
    let mut lat: Vec<Duration> = received
        .iter()
        .filter_map(|(seq, at)| sent.get(seq).map(|s| at.saturating_duration_since(*s)))
        .collect();
    lat.sort();
    (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len(),
        total as usize,
    )
}

fn apns_env(double: &apns_double::ApnsDouble) -> Vec<(&'static str, String)> {
    vec![
        (
            "HERALD__APNS__KEY_FILE",
            double.key_file.display().to_string(),
        ),
        ("HERALD__APNS__KEY_ID", double.key_id.clone()),
        ("HERALD__APNS__TEAM_ID", double.team_id.clone()),
        ("HERALD__APNS__TOPIC", double.topic.clone()),
        ("HERALD__APNS__ENDPOINT", double.url.clone()),
        ("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET.to_owned()),
        ("HERALD__QUEUE__MEMORY_CAPACITY", "1000000".to_owned()),
    ]
}

/// Offline targets with APNs tokens; returns sends per second the double received.
async fn fallback_rate(server: &Server, double: &apns_double::ApnsDouble) -> f64 {
    let before = double.request_count();
    let client = reqwest::Client::new();
    let started = Instant::now();
    for n in 0..FALLBACK_NOTIFICATIONS {
        let targets: Vec<_> = (0..TARGETS_EACH)
            .map(|t| serde_json::json!({"device_id": format!("off-{n}-{t}"), "apns": {"token": "ab".repeat(32)}}))
            .collect();
        let res = client
            .post(format!("{}/v1/notify", server.base))
            .bearer_auth(KEY)
            .json(&serde_json::json!({"targets": targets, "notification": {"title": "Hi"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
    }
    let want = before + FALLBACK_NOTIFICATIONS * TARGETS_EACH;
    let deadline = Instant::now() + Duration::from_secs(120);
    while double.request_count() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        double.request_count() >= want,
        "every target reached the double"
    );
    (FALLBACK_NOTIFICATIONS * TARGETS_EACH) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let vhost = server::BenchVhost::new("e2e");
    let url = vhost.url.clone();
    let double = apns_double::ApnsDouble::start().await;

    println!(
        "| live delivery, {RATE_PER_SEC}/s over {DEVICES} devices for {LIVE_SECONDS}s | p50 | p99 | delivered |"
    );
    println!("|---|---:|---:|---:|");
    for (name, queue) in [("embedded queue", None), ("RabbitMQ", Some(url.clone()))] {
        let mut env = apns_env(&double);
        if let Some(u) = &queue {
            env.push(("HERALD__QUEUE__URL", u.clone()));
        }
        let server = Server::start(&env).await;
        let (p50, p99, got, sent) = live_latency(&server).await;
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {got}/{sent} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    println!();
    println!("| fallback to the APNs double | sends/s | ratio to raw |");
    println!("|---|---:|---:|");
    let raw_client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let jwt = raw_apns::sign_jwt(&double);
    let n = {
        let req: herald::domain::NotifyRequest = serde_json::from_value(serde_json::json!({
            "targets": [{"device_id": "d"}], "notification": {"title": "Hi"}
        }))
        .unwrap();
        req.parse(
            herald::domain::NotifyLimits {
                max_targets: 1,
                default_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(86400),
            },
            std::time::SystemTime::now(),
        )
        .unwrap()
    };
    let body = serde_json::to_vec(&herald::providers::apns::payload(&n)).unwrap();
    let target = format!("{}/3/device/{}", double.url, "ab".repeat(32));
    let sends = FALLBACK_NOTIFICATIONS * TARGETS_EACH;
    let raw = raw_apns::raw(&raw_client, &target, &jwt, &body, &n, sends, 500).await;
    println!("| raw reqwest HTTP/2, 500 in flight | {raw:.0} | 100% |");
    for (name, queue) in [
        ("herald, embedded queue", None),
        ("herald, RabbitMQ", Some(url.clone())),
    ] {
        let mut env = apns_env(&double);
        if let Some(u) = &queue {
            env.push(("HERALD__QUEUE__URL", u.clone()));
        }
        let server = Server::start(&env).await;
        let rate = fallback_rate(&server, &double).await;
        println!("| {name} | {rate:.0} | {:.0}% |", 100.0 * rate / raw);
    }
}
