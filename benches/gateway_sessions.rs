//! Gateway benchmark: idle sessions (server memory per session, CPU with the heartbeat
//! running) beside Mosquitto holding the same number of idle MQTT connections, then
//! deliver→ack round trips on one session and across 1,000.
//!
//!     cargo bench --bench gateway_sessions
//!     BENCH_SESSIONS=19000 BENCH_CLIENT_PROCS=4 BENCH_WINDOW_SECS=20 cargo bench --bench gateway_sessions
//!
//! Loopback only. The server is a real `herald serve` subprocess (so its RSS is the
//! server's alone); clients are this same binary re-executed with `BENCH_ROLE`, spread over
//! several processes (each under the 20,000 open-files cap) and source addresses
//! 127.0.0.2, 127.0.0.3, ... Mosquitto must be listening on 127.0.0.1:1883.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use futures::{SinkExt, StreamExt};
use herald::config::{Secret, Settings};
use herald::domain::{DeviceId, NotificationId, Priority, QueuedNotification, unix_millis};
use herald::gateway::DeviceTokens;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";
/// Heartbeat for the idle phase: 5 s makes the heartbeat cost visible in a short window.
const PING_INTERVAL: &str = "5s";
/// Connects in flight per client process: below actix's accept backlog (2048).
const CONNECT_CONCURRENCY: usize = 256;

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
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("ws") => rt.block_on(client_ws()),
        Ok("mqtt") => rt.block_on(client_mqtt()),
        _ => rt.block_on(driver()),
    }
}

// ---------------------------------------------------------------------------------------
// Client processes

struct ClientEnv {
    port: u16,
    src: std::net::Ipv4Addr,
    count: usize,
    offset: usize,
}

fn client_env() -> ClientEnv {
    ClientEnv {
        port: env_or("BENCH_PORT", 0),
        src: env_or("BENCH_SRC", std::net::Ipv4Addr::LOCALHOST),
        count: env_or("BENCH_COUNT", 0),
        offset: env_or("BENCH_OFFSET", 0),
    }
}

async fn tcp_from(src: std::net::Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind((src, 0).into())?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

/// Holds `count` idle WebSocket sessions, reading so tungstenite answers pings.
async fn client_ws() {
    let env = client_env();
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(3600));
    let url = format!("ws://127.0.0.1:{}/v1/connect", env.port);
    let opened = futures::stream::iter(0..env.count)
        .map(|i| {
            let device = DeviceId::parse(format!("bench-{}", env.offset + i)).expect("id");
            let token = tokens.mint(&device).expect("token").0;
            let url = url.clone();
            async move {
                let mut req = url.into_client_request().ok()?;
                req.headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().ok()?);
                let tcp = tcp_from(env.src, env.port).await.ok()?;
                // Small client buffers: client memory is not what is measured, but 19,000
                // default 128 KiB buffers would be 2.4 GB.
                let cfg = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(cfg))
                    .await
                    .ok()?;
                ws.next().await?.ok()?; // hello
                tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
                Some(())
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .filter_map(|r| async move { r })
        .count()
        .await;
    println!("ready {opened}");
    wait_for_stdin_eof().await;
}

/// Holds `count` idle MQTT 3.1.1 connections with a 5 s keepalive, sending PINGREQ on
/// time (MQTT's heartbeat is client-driven). The CONNECT packet is written by hand: it is
/// 14 bytes plus the client id, and no client library is needed for that.
async fn client_mqtt() {
    let env = client_env();
    let keepalive: u16 = 5;
    let opened = futures::stream::iter(0..env.count)
        .map(|i| async move {
            let mut tcp = tcp_from(env.src, 1883).await.ok()?;
            let id = format!("bench-{}", env.offset + i);
            let mut packet = vec![0x10];
            let remaining = 10 + 2 + id.len();
            packet.push(remaining as u8); // < 128: one length byte
            packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
            packet.extend_from_slice(&keepalive.to_be_bytes());
            packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
            packet.extend_from_slice(id.as_bytes());
            tcp.write_all(&packet).await.ok()?;
            let mut connack = [0u8; 4];
            tcp.read_exact(&mut connack).await.ok()?;
            (connack[0] == 0x20 && connack[3] == 0).then_some(())?;
            tokio::spawn(async move {
                let offset = Duration::from_millis(rand::random_range(0..4000));
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(Duration::from_secs(keepalive as u64 - 1));
                let mut resp = [0u8; 2];
                loop {
                    tick.tick().await;
                    if tcp.write_all(&[0xC0, 0x00]).await.is_err()
                        || tcp.read_exact(&mut resp).await.is_err()
                    {
                        return;
                    }
                }
            });
            Some(())
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .filter_map(|r| async move { r })
        .count()
        .await;
    println!("ready {opened}");
    wait_for_stdin_eof().await;
}

async fn wait_for_stdin_eof() {
    let mut buf = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut buf).await;
}

// ---------------------------------------------------------------------------------------
// The driver

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// CPU use of `pid` over `window`, as a fraction of one core.
async fn cpu_over(pid: u32, window: Duration) -> f64 {
    let (c0, t0) = (cpu_secs(pid), Instant::now());
    tokio::time::sleep(window).await;
    (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64()
}

/// Held while measuring: dropping it kills the client processes (kill_on_drop).
struct Clients {
    _children: Vec<tokio::process::Child>,
}

async fn spawn_clients(role: &str, port: u16, total: usize, procs: usize) -> (Clients, usize) {
    let exe = std::env::current_exe().expect("own exe");
    let mut children = Vec::new();
    let per = total.div_ceil(procs);
    for p in 0..procs {
        let count = per.min(total - (p * per).min(total));
        let child = tokio::process::Command::new(&exe)
            .env("BENCH_ROLE", role)
            .env("BENCH_PORT", port.to_string())
            .env("BENCH_SRC", format!("127.0.0.{}", 2 + p))
            .env("BENCH_COUNT", count.to_string())
            .env("BENCH_OFFSET", (p * per).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("client process");
        children.push(child);
    }
    let mut opened = 0;
    for c in &mut children {
        let mut lines = BufReader::new(c.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .expect("clients ready within 5 minutes")
            .expect("read")
            .unwrap_or_default();
        opened += line
            .strip_prefix("ready ")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
    }
    (
        Clients {
            _children: children,
        },
        opened,
    )
}

async fn metric(port: u16, name: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()
        .map(|r| r.text());
    let body = match body {
        Some(f) => f.await.unwrap_or_default(),
        None => String::new(),
    };
    // `name` exactly, or the sum of its series when it has labels (the sessions gauge is
    // per app since apps came: an exact-name match alone read 0 and divided RSS by 1).
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix(' ') {
                Some(v) => v,
                None if name.contains('{') => return None,
                None => rest.strip_prefix('{')?.split_once("} ")?.1,
            };
            value.parse::<f64>().ok()
        })
        .sum()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

async fn driver() {
    let sessions: usize = env_or("BENCH_SESSIONS", 19_000);
    let procs: usize = env_or("BENCH_CLIENT_PROCS", 4);
    let window = Duration::from_secs(env_or("BENCH_WINDOW_SECS", 20));
    println!(
        "## gateway_sessions: {sessions} idle sessions, {procs} client processes, ping_interval {PING_INTERVAL}, CPU window {window:?}"
    );

    // --- herald ---
    let port = free_port();
    // HERALD_BENCH_BIN: another build of herald under the same clients (before/after).
    let bin = std::env::var("HERALD_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_herald").to_owned());
    let mut server = tokio::process::Command::new(bin)
        .arg("serve")
        .env("HERALD__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env("HERALD__ROLES", "gateway")
        .env("HERALD__LOG__LEVEL", "warn")
        .env("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET)
        .env("HERALD__GATEWAY__PING_INTERVAL", PING_INTERVAL)
        // The bench opens every session at once on purpose; the admission limit that
        // protects a node from a reconnect storm would turn most of them away.
        .env("HERALD__GATEWAY__MAX_SESSION_RATE", "1000000")
        .env("HERALD__GATEWAY__SESSION_BURST", "1000000")
        // 4,750 sessions per source address in ~2 s: far past the per-address limit.
        .env("HERALD__GATEWAY__IP_CONNECTS_PER_SECOND", "1000000")
        .env("HERALD__GATEWAY__IP_CONNECT_BURST", "1000000")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("herald serve");
    let pid = server.id().expect("pid");
    let started = Instant::now();
    while reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "herald did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kb(pid);
    let idle_cpu = cpu_over(pid, Duration::from_secs(3)).await;
    let t = Instant::now();
    let (clients, opened) = spawn_clients("ws", port, sessions, procs).await;
    let connect_time = t.elapsed();
    tokio::time::sleep(Duration::from_secs(6)).await; // past one full ping round
    let active = metric(port, "herald_gateway_sessions_active").await;
    let rss = rss_kb(pid);
    let cpu = cpu_over(pid, window).await;
    let rtt_count = metric(port, "herald_gateway_ping_rtt_seconds_count").await;
    let closed_pong = metric(
        port,
        "herald_gateway_sessions_closed_total{reason=\"pong_timeout\"}",
    )
    .await;
    let per_session = (rss.saturating_sub(base) as f64 * 1024.0) / active.max(1.0);
    println!(
        "herald:    opened {opened} in {:.1}s, active {active}, RSS {base} kB -> {rss} kB, {:.0} B/session, CPU {:.1}% of a core with heartbeat (idle before: {:.1}%), pongs seen {rtt_count}, pong timeouts {closed_pong}",
        connect_time.as_secs_f64(),
        per_session,
        cpu * 100.0,
        idle_cpu * 100.0
    );
    drop(clients);
    let _ = server.kill().await;

    // --- mosquitto ---
    match mosquitto_pid() {
        None => println!("mosquitto: not running on this machine; skipped"),
        Some(mpid) => {
            let base = rss_kb(mpid);
            let t = Instant::now();
            let (clients, opened) = spawn_clients("mqtt", 1883, sessions, procs).await;
            let connect_time = t.elapsed();
            tokio::time::sleep(Duration::from_secs(6)).await;
            let rss = rss_kb(mpid);
            let cpu = cpu_over(mpid, window).await;
            let per = (rss.saturating_sub(base) as f64 * 1024.0) / (opened.max(1) as f64);
            println!(
                "mosquitto: opened {opened} in {:.1}s, RSS {base} kB -> {rss} kB, {:.0} B/connection, CPU {:.1}% of a core with 5 s keepalive PINGREQs",
                connect_time.as_secs_f64(),
                per,
                cpu * 100.0
            );
            drop(clients);
        }
    }

    round_trips().await;
}

fn mosquitto_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "mosquitto").then_some(pid)
    })
}

// ---------------------------------------------------------------------------------------
// Deliver → ack round trips, in process (Directory::deliver is the dispatcher's call).

fn notification() -> QueuedNotification {
    let now = unix_millis(SystemTime::now());
    let mut data = BTreeMap::new();
    data.insert("k".to_owned(), "v".repeat(100));
    QueuedNotification {
        app: Default::default(),
        id: NotificationId::generate(),
        accepted_at_ms: now,
        expires_at_ms: now + 60_000,
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn round_trips() {
    let mut s = Settings::defaults();
    s.http.addr = "127.0.0.1:0".into();
    s.roles = vec![herald::config::Role::Gateway];
    s.auth.device_token_secret = Secret::new(SECRET);
    s.log.level = "warn".into();
    // 1,000 sessions from one address at once: past the reconnect-storm limits.
    s.gateway.ip_connects_per_second = 1_000_000;
    s.gateway.max_session_rate = 1_000_000;
    s.gateway.session_burst = 1_000_000;
    s.gateway.ip_connect_burst = 1_000_000;
    let app = herald::startup::Application::build(s).await.expect("app");
    let port = app.port();
    let directory = app.directory().expect("gateway");
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(3600));
    let n_sessions = 1000;
    for i in 0..n_sessions {
        let device = DeviceId::parse(format!("rtt-{i}")).expect("id");
        let token = tokens.mint(&device).expect("token").0;
        let mut req = format!("ws://127.0.0.1:{port}/v1/connect")
            .into_client_request()
            .expect("req");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("hdr"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let Message::Text(t) = msg
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&t)
                    && v["type"] == "notification"
                {
                    let ack = serde_json::json!({"type": "ack", "id": v["id"]}).to_string();
                    if ws.send(Message::Text(ack.into())).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    let devices: Vec<herald::domain::DeviceKey> = (0..n_sessions)
        .map(|i| {
            let device = DeviceId::parse(format!("rtt-{i}")).expect("id");
            herald::domain::DeviceKey::new(Default::default(), device)
        })
        .collect();
    while !devices.iter().all(|d| directory.is_connected(d)) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One session, sequential.
    let mut one = Vec::new();
    for _ in 0..2000 {
        let n = notification();
        let t = Instant::now();
        let outcome = directory.deliver(&devices[0], &n).await;
        assert_eq!(outcome, herald::directory::LiveOutcome::Acked);
        one.push(t.elapsed());
    }
    one.sort();
    println!(
        "deliver->ack, 1 session, 2000 sequential: p50 {:?}, p99 {:?}",
        percentile(&one, 0.50),
        percentile(&one, 0.99)
    );
    // 1,000 sessions, one delivery to each at once, 5 rounds.
    let mut all = Vec::new();
    let t_all = Instant::now();
    for _ in 0..5 {
        let rounds = devices.iter().cloned().map(|d| {
            let directory = directory.clone();
            tokio::spawn(async move {
                let n = notification();
                let t = Instant::now();
                let outcome = directory.deliver(&d, &n).await;
                (outcome, t.elapsed())
            })
        });
        for r in futures::future::join_all(rounds).await {
            let (outcome, took) = r.expect("task");
            assert_eq!(outcome, herald::directory::LiveOutcome::Acked);
            all.push(took);
        }
    }
    let elapsed = t_all.elapsed();
    all.sort();
    println!(
        "deliver->ack, 1000 sessions, 1000 concurrent x 5 rounds: p50 {:?}, p99 {:?} ({:.0} deliveries/s incl. the bench's own clients on the same 2 cores)",
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        all.len() as f64 / elapsed.as_secs_f64()
    );
    shutdown.cancel();
    let _ = task.await;
}
