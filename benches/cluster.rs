//! Cluster directory benchmark, one node, loopback only, bounded (a few seconds per phase);
//! `cluster_scale` is the many-process one (N sessions, crash recovery):
//!
//! 1. The raw broker ceiling of the *previous* directory design (one binding per device):
//!    `queue.bind` + `queue.unbind` per second with lapin on one channel, one at a time and
//!    pipelined (256 in flight). Kept as the reference the presence design is measured
//!    against (docs/benchmarks.md, "Cluster").
//! 2. Session churn through herald: clients connect (token check, upgrade, the open event
//!    confirmed on the presence exchange, hello) and close in a loop, at several
//!    concurrencies, on a cluster-mode gateway and, for the directory's share, on an
//!    embedded-queue gateway.
//! 3. Live delivery latency (publish → device ack → outcome back): cross-node through the
//!    broker, same-node through the broker, and same-node local, in one run.
//!
//! ```text
//! cargo bench --bench cluster
//! BENCH_WINDOW_SECS=3 BENCH_DELIVERIES=2000 cargo bench --bench cluster
//! ```
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest); runs in its own throwaway vhost.

#[path = "common/server.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::{SinkExt, StreamExt};
use herald::config::{Role, Secret, Settings};
use herald::directory::{Directory, LiveOutcome};
use herald::domain::{DeviceId, NotificationId, Priority, QueuedNotification, unix_millis};
use herald::gateway::DeviceTokens;
use herald::startup::Application;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";

#[path = "common/env.rs"]
mod env;
use env::env_or;

fn main() {
    // `cargo nextest run --all-targets` lists every target's tests with `--list`: a bench
    // (harness = false) has none, and must not run the whole benchmark to say so.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run());
}

fn settings(url: Option<&str>, roles: &[Role]) -> Settings {
    let mut s = Settings::defaults();
    s.http.addr = "127.0.0.1:0".into();
    s.http.workers = 2;
    s.roles = roles.to_vec();
    s.auth.api_keys = vec![Secret::new("bench-api-key-0123456789")];
    s.auth.device_token_secret = Secret::new(SECRET);
    s.log.level = "error".into();
    // Churn is what is measured: admission control off.
    s.gateway.max_session_rate = 1_000_000;
    s.gateway.session_burst = 1_000_000;
    if let Some(url) = url {
        s.queue.url = Secret::new(url);
    }
    s
}

struct Node {
    addr: std::net::SocketAddr,
    directory: Option<Directory>,
    cluster: Option<herald::directory::ClusterDirectory>,
    shutdown: herald::shutdown::Shutdown,
}

async fn start(s: Settings) -> Node {
    let app = Application::build(s).await.expect("builds");
    let node = Node {
        addr: app.addr(),
        directory: app.directory(),
        cluster: app.cluster().cloned(),
        shutdown: app.shutdown_handle(),
    };
    if let Some(c) = &node.cluster {
        assert!(
            c.wait_ready(Duration::from_secs(10)).await,
            "directory ready"
        );
    }
    tokio::spawn(app.run_until_stopped());
    node
}

async fn run() {
    let window = Duration::from_secs(env_or("BENCH_WINDOW_SECS", 5));
    let deliveries: usize = env_or("BENCH_DELIVERIES", 2000);
    let vhost = common::BenchVhost::new("cluster");

    // 1. Raw broker bind/unbind.
    let conn = lapin::Connection::connect(&vhost.url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "raw.sessions".into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for pipeline in [1usize, 256] {
        let done = AtomicU64::new(0);
        let started = Instant::now();
        let mut k = 0u64;
        while started.elapsed() < window {
            let keys: Vec<String> = (k..k + 1024).map(|i| format!("dev-{i}")).collect();
            k += 1024;
            for bind in [true, false] {
                futures::stream::iter(keys.iter())
                    .map(|key| {
                        let (ch, q, done) = (&ch, q.name().clone(), &done);
                        async move {
                            if bind {
                                ch.queue_bind(
                                    q,
                                    "raw.sessions".into(),
                                    key.as_str().into(),
                                    QueueBindOptions::default(),
                                    FieldTable::default(),
                                )
                                .await
                                .unwrap();
                            } else {
                                ch.queue_unbind(
                                    q,
                                    "raw.sessions".into(),
                                    key.as_str().into(),
                                    FieldTable::default(),
                                )
                                .await
                                .unwrap();
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                    .buffer_unordered(pipeline)
                    .collect::<Vec<_>>()
                    .await;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "raw lapin bind+unbind, {pipeline:>3} in flight: {:>7.0} ops/s = {:>7.0} register+deregister pairs/s",
            done.load(Ordering::Relaxed) as f64 / secs,
            done.load(Ordering::Relaxed) as f64 / secs / 2.0
        );
    }
    let _ = conn.close(200, "done".into()).await;

    // 2. Session churn.
    let cluster_gw = start(settings(
        Some(&vhost.url),
        &[Role::Gateway, Role::Dispatcher],
    ))
    .await;
    let local_gw = start(settings(None, &[Role::Gateway])).await;
    for (label, node) in [("cluster", &cluster_gw), ("embedded", &local_gw)] {
        for concurrency in [16usize, 64, 256] {
            let rate = churn(node.addr, concurrency, window).await;
            println!(
                "session churn, {label:>8} gateway, {concurrency:>3} clients: {rate:>7.0} sessions/s (connect + hello + close)"
            );
        }
    }

    // 3. Live delivery latency: a device on the gateway node, acking everything.
    let dispatcher = start(settings(Some(&vhost.url), &[Role::Dispatcher])).await;
    let device = herald::domain::DeviceKey::new(
        Default::default(),
        DeviceId::parse("bench-device").unwrap(),
    );
    let _client = acker(cluster_gw.addr, "bench-device").await;
    let cross = dispatcher.directory.clone().unwrap();
    let same_local = cluster_gw.directory.clone().unwrap();
    let same_broker = cluster_gw.cluster.clone().unwrap();
    let n = notification();
    let mut results = Vec::new();
    for (label, which) in [
        ("cross-node (broker)", 0),
        ("same-node (broker)", 1),
        ("same-node (local)", 2),
    ] {
        let mut lat = Vec::with_capacity(deliveries);
        for _ in 0..deliveries {
            let mut n = n.clone();
            n.id = NotificationId::generate();
            let t = Instant::now();
            let outcome = match which {
                0 => cross.deliver(&device, &n).await,
                1 => same_broker.deliver_remote(&device, &n).await,
                _ => same_local.deliver(&device, &n).await,
            };
            lat.push(t.elapsed());
            assert_eq!(outcome, LiveOutcome::Acked, "{label}");
        }
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        results.push((label, p(0.5), p(0.99)));
    }
    for (label, p50, p99) in results {
        println!(
            "live delivery {label:<20} {deliveries} sequential: p50 {:>6.0} µs  p99 {:>6.0} µs",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    for n in [&cluster_gw, &local_gw, &dispatcher] {
        n.shutdown.cancel();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

fn token(device: &str) -> String {
    DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(600))
        .mint(&DeviceId::parse(device).unwrap())
        .unwrap()
        .0
}

/// Sessions per second: `concurrency` clients each connect, wait for hello, and close,
/// over and over, for `window`. Every session has its own device id, so every session is
/// a bind and an unbind.
async fn churn(addr: std::net::SocketAddr, concurrency: usize, window: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while started.elapsed() < window {
                // A fresh device per session: no bind/unbind pair coalesces away.
                k += 1;
                let tok = token(&format!("churn-{c}-{k}"));
                let mut req = format!("ws://{addr}/v1/connect")
                    .into_client_request()
                    .unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {tok}").parse().unwrap());
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
                    continue;
                };
                // hello = registered (the bind is awaited before it is sent).
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Text(_)) {
                        break;
                    }
                }
                // Send the close and go: waiting for the server to drop the TCP connection
                // would measure actix's linger, not the directory. The server still sees the
                // close, ends the session and unbinds it.
                let _ = ws.close(None).await;
                drop(ws);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    // Let the unbinds of the last sessions drain before the next phase.
    tokio::time::sleep(Duration::from_millis(200)).await;
    rate
}

/// A connected device that acks every notification.
async fn acker(addr: std::net::SocketAddr, device: &str) -> tokio::task::JoinHandle<()> {
    let mut req = format!("ws://{addr}/v1/connect")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token(device)).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let _hello = ws.next().await;
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "notification" {
                    let ack = serde_json::json!({"type": "ack", "id": v["id"]}).to_string();
                    if ws.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

fn notification() -> QueuedNotification {
    let now = unix_millis(SystemTime::now());
    let mut data = std::collections::BTreeMap::new();
    data.insert("k".to_owned(), "v".repeat(64));
    QueuedNotification {
        app: Default::default(),
        id: NotificationId::generate(),
        accepted_at_ms: now,
        expires_at_ms: now + 600_000,
        priority: Priority::High,
        collapse_key: None,
        notification: None,
        data,
        apns: Default::default(),
        android: Default::default(),
        qos: Default::default(),
        targets: vec![],
        attempt: 0,
        history: Vec::new(),
    }
}
