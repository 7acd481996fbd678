//! Inbox replay: 1,000 devices, each with 100 pending notifications in its offline inbox,
//! reconnect at once; per device, the time from its `hello` to the last of its 100
//! notifications (each acked as it arrives, as a device does), p50/p99/max, on the
//! PostgreSQL inbox (cluster mode, RabbitMQ queue) and on the embedded install (memory
//! inbox).
//!
//! ```text
//! cargo bench --bench replay
//! BENCH_REPLAY_DEVICES=1000 BENCH_REPLAY_PENDING=100 BENCH_REPLAY_BACKENDS=postgres,memory \
//!     cargo bench --bench replay
//! ```
//!
//! A real `herald serve` process (every role) per backend. The inboxes are filled through
//! herald's own path: `BENCH_REPLAY_PENDING` notifications, each to every device (1,000
//! targets a notification at most, so more devices means more notifications), POSTed in
//! order, stored by the dispatcher (one `store_batch` per queued message) while no device is
//! connected. Then every device connects at once from this process (one socket each: 1,000
//! here and 1,000 in herald, well under the 20,000 open-files cap per process).
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (rabbitmqctl) and PostgreSQL on 127.0.0.1:5432 (user
//! postgres, trust; `HERALD_TEST_PG` overrides), for the PostgreSQL backend; runs in a
//! throwaway vhost and database, both deleted at the end.

#[path = "common/devices.rs"]
mod devices;
#[path = "common/env.rs"]
mod env;
#[path = "common/server.rs"]
mod server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::{ms, percentile};
use futures::{SinkExt, StreamExt};
use herald::config::Secret;
use herald::domain::DeviceId;
use herald::gateway::DeviceTokens;
use server::{BenchVhost, KEY, Server};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use env::env_or;

const SECRET: &str = "bench-replay-secret-0123456789abcdef";
/// Targets per notification: the API's `notify.max_targets` default.
const MAX_TARGETS: usize = 1000;

fn pg_server_url() -> String {
    std::env::var("HERALD_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn pg_admin(sql: String) {
    let mut c = PgConnection::connect(&format!("{}/postgres", pg_server_url()))
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    c.execute(AssertSqlSafe(sql))
        .await
        .expect("admin statement");
}

/// A metric summed over all its series, from herald's `/metrics`.
async fn metric(http: &reqwest::Client, server: &Server, name: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls until `name` reaches `want` (bounded: a stuck herald fails the bench).
async fn wait_metric(http: &reqwest::Client, server: &Server, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while metric(http, server, name).await < want {
        assert!(Instant::now() < deadline, "{name} never reached {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one device measured.
struct DeviceRun {
    connect_to_hello: Duration,
    hello_to_last: Duration,
}

/// Connects (after the barrier), reads `hello`, then reads and acks `pending` notification
/// frames, checking they come in accepted order (`data.seq` 0, 1, ...).
async fn device(
    url: String,
    token: String,
    pending: usize,
    barrier: Arc<Barrier>,
) -> Result<DeviceRun, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    barrier.wait().await;
    let started = Instant::now();
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(60),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| "connect: no handshake within 60 s".to_owned())?
    .map_err(|e| format!("connect: {e}"))?;
    let mut hello_at = None;
    let mut got = 0;
    while got < pending {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .map_err(|_| format!("stalled after {got} notifications"))?
            .ok_or("session ended")?
            .map_err(|e| e.to_string())?;
        let Message::Text(t) = msg else { continue };
        let v: serde_json::Value = serde_json::from_str(&t).map_err(|e| e.to_string())?;
        match v["type"].as_str() {
            Some("hello") => hello_at = Some(Instant::now()),
            Some("notification") => {
                let seq: usize = v["data"]["seq"].as_str().unwrap_or("").parse().unwrap_or(0);
                if seq != got {
                    return Err(format!("got seq {seq} as notification {got}"));
                }
                got += 1;
                let ack = serde_json::json!({"type": "ack", "id": v["id"]}).to_string();
                ws.send(Message::Text(ack.into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            _ => {}
        }
    }
    let last = Instant::now();
    let hello_at = hello_at.ok_or("no hello before the notifications")?;
    // Keep the session until every device is done (a close would not change the rows:
    // they are deleted on ack), then close politely.
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    });
    Ok(DeviceRun {
        connect_to_hello: hello_at - started,
        hello_to_last: last - hello_at,
    })
}

async fn run(backend: &str, devices: usize, pending: usize) {
    let http = reqwest::Client::new();
    let mut env: Vec<(&str, String)> = vec![
        ("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET.into()),
        (
            "HERALD__INBOX__MAX_PER_DEVICE",
            pending.max(100).to_string(),
        ),
    ];
    // Held until the end of the run: dropped after the server.
    let mut _vhost = None;
    let mut db = None;
    if backend == "postgres" {
        let vhost = BenchVhost::new("replay");
        env.push(("HERALD__QUEUE__URL", vhost.url.clone()));
        _vhost = Some(vhost);
        let name = format!("herald_bench_{}", uuid::Uuid::new_v4().simple());
        pg_admin(format!(r#"CREATE DATABASE "{name}""#)).await;
        env.push(("HERALD__INBOX__URL", format!("{}/{name}", pg_server_url())));
        db = Some(name);
    }
    let server = Server::start(&env).await;

    // Fill: notification k goes to every device, so each device's inbox holds seq 0..pending
    // in accepted order.
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::parse(format!("replay-{i}")).unwrap())
        .collect();
    let fill = Instant::now();
    for k in 0..pending {
        for chunk in ids.chunks(MAX_TARGETS) {
            let targets: Vec<_> = chunk
                .iter()
                .map(|d| serde_json::json!({"device_id": d.as_str()}))
                .collect();
            let res = http
                .post(format!("{}/v1/notify", server.base))
                .bearer_auth(KEY)
                .json(&serde_json::json!({"targets": targets, "data": {"seq": k.to_string()}}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
        }
    }
    let rows = (devices * pending) as f64;
    eprintln!(
        "{backend}: {pending} × {devices} targets accepted in {:.1?}",
        fill.elapsed()
    );
    wait_metric(&http, &server, "herald_inbox_writes_total", rows).await;
    let fill = fill.elapsed();
    eprintln!("{backend}: {rows} inbox rows stored in {fill:.1?}; reconnecting {devices} devices");

    // The storm: every device connects at once.
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(3600));
    let url = format!("ws://{}/v1/connect", server.addr);
    let barrier = Arc::new(Barrier::new(devices));
    let tasks: Vec<_> = ids
        .iter()
        .map(|d| {
            let token = tokens.mint(d).unwrap().0;
            tokio::spawn(device(url.clone(), token, pending, barrier.clone()))
        })
        .collect();
    let storm = Instant::now();
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => runs.push(r),
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{backend}: {} of {devices} devices failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let all_received = storm.elapsed();
    eprintln!("{backend}: every device got its {pending} in {all_received:.1?}");
    wait_metric(&http, &server, "herald_inbox_acked_total", rows).await;
    let all_deleted = storm.elapsed();

    let mut replay: Vec<Duration> = runs.iter().map(|r| r.hello_to_last).collect();
    let mut hello: Vec<Duration> = runs.iter().map(|r| r.connect_to_hello).collect();
    replay.sort();
    hello.sort();
    println!(
        "| {backend} | {devices} × {pending} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} s | {:.1} s |",
        ms(percentile(&hello, 0.5)),
        ms(percentile(&hello, 0.99)),
        ms(percentile(&replay, 0.5)),
        ms(percentile(&replay, 0.99)),
        ms(*replay.last().unwrap()),
        ms(all_received),
        all_deleted.as_secs_f64(),
        fill.as_secs_f64(),
    );
    drop(server);
    if let Some(name) = db {
        pg_admin(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)).await;
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let devices: usize = env_or("BENCH_REPLAY_DEVICES", 1000);
    let pending: usize = env_or("BENCH_REPLAY_PENDING", 100);
    let backends =
        std::env::var("BENCH_REPLAY_BACKENDS").unwrap_or_else(|_| "postgres,memory".into());
    println!(
        "| inbox | devices × pending | connect → hello p50 | p99 | hello → last notification p50 | p99 | max | storm → every device done | → every row deleted | fill |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for backend in backends.split(',').map(str::trim) {
        assert!(
            matches!(backend, "postgres" | "memory"),
            "BENCH_REPLAY_BACKENDS: postgres and/or memory, not {backend:?}"
        );
        run(backend, devices, pending).await;
    }
}
