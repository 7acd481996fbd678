//! Head-of-line blocking by devices that take frames and never ack (issue 10): live
//! latency to healthy devices while other devices hold frames for their whole ack deadline.
//!
//! One herald process per row, the same load each time: `BENCH_SILENT` (default 200)
//! connected devices that read every frame and never ack, sent `BENCH_SILENT_RATE` (default
//! 40/s) notifications; beside them `BENCH_DEVICES` (default 100) devices that ack, sent
//! `BENCH_RATE` (default 200/s) notifications, for `BENCH_SECONDS` (default 10).
//! `gateway.ack_timeout` is 5 s, `queue.prefetch` 64: the silent devices keep ~200 messages
//! waiting on acks at once, more than the 64 active slots. Rows: parking off
//! (`dispatcher.max_awaiting_ack = 0`, the dispatcher before `dispatch/slot.rs`) and on
//! (the default, 256; `BENCH_MAX_AWAITING`, default `0,256`), on the embedded queue and on
//! RabbitMQ (`BENCH_BACKENDS`, default `embedded,rabbitmq`). Reported: healthy devices' p50 / p99 / max from the POST's
//! scheduled time to the frame, and how many arrived.
//!
//! `cargo bench --bench slow_devices` (RabbitMQ on 127.0.0.1:5672 and rabbitmqctl for the
//! RabbitMQ rows).

#[path = "common/devices.rs"]
mod devices;
#[path = "common/env.rs"]
mod env;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::{Received, SECRET, ms, percentile};
use env::env_or;
use server::{KEY, Server};

/// Sends `rate`/s notifications for `seconds` round robin over `{prefix}-0..n`, open loop;
/// returns each seq's scheduled time.
async fn offer(
    server: &Server,
    prefix: &'static str,
    n: usize,
    rate: u64,
    seconds: u64,
) -> HashMap<u64, Instant> {
    let client = reqwest::Client::new();
    let url = format!("{}/v1/notify", server.base);
    let total = rate * seconds;
    let started = Instant::now();
    let mut scheduled = HashMap::new();
    let mut posts = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let mut seq = 0u64;
    while seq < total {
        tick.tick().await;
        let until = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while seq < until {
            scheduled.insert(
                seq,
                started + Duration::from_secs_f64(seq as f64 / rate as f64),
            );
            let body = serde_json::json!({
                "targets": [{"device_id": format!("{prefix}-{}", seq as usize % n)}],
                "data": {"seq": seq.to_string()},
            });
            let req = client.post(&url).bearer_auth(KEY).json(&body);
            posts.push(tokio::spawn(async move {
                req.send().await.is_ok_and(|r| r.status() == 202)
            }));
            seq += 1;
        }
    }
    for p in posts {
        assert!(p.await.unwrap(), "every notification accepted");
    }
    scheduled
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let silent: usize = env_or("BENCH_SILENT", 200);
    let silent_rate: u64 = env_or("BENCH_SILENT_RATE", 40);
    let devices: usize = env_or("BENCH_DEVICES", 100);
    let rate: u64 = env_or("BENCH_RATE", 200);
    let seconds: u64 = env_or("BENCH_SECONDS", 10);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "embedded,rabbitmq".into());
    let parked_budgets: Vec<usize> = std::env::var("BENCH_MAX_AWAITING")
        .unwrap_or_else(|_| "0,256".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    println!(
        "| {silent} silent devices at {silent_rate}/s (ack_timeout 5 s), {devices} healthy at {rate}/s, {seconds} s, queue.prefetch 64 | max_awaiting_ack | healthy p50 | p99 | max | delivered |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for backend in backends.split(',') {
        let vhost = (backend == "rabbitmq").then(|| server::BenchVhost::new("slow"));
        for &parked in &parked_budgets {
            let mut env = vec![
                ("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET.to_owned()),
                ("HERALD__GATEWAY__ACK_TIMEOUT", "5s".to_owned()),
                ("HERALD__QUEUE__PREFETCH", "64".to_owned()),
                ("HERALD__DISPATCHER__MAX_AWAITING_ACK", parked.to_string()),
            ];
            if let Some(v) = &vhost {
                env.push(("HERALD__QUEUE__URL", v.url.clone()));
            }
            let server = Server::start(&env).await;
            let received: Received = Arc::default();
            devices::connect(&server.addr, "silent", silent, None).await;
            devices::connect(&server.addr, "ok", devices, Some(received.clone())).await;
            let (silent_sched, healthy) = tokio::join!(
                offer(&server, "silent", silent, silent_rate, seconds),
                offer(&server, "ok", devices, rate, seconds),
            );
            drop(silent_sched);
            // Whatever is still queued behind the silent devices arrives within their ack
            // deadlines; wait for it (bounded) so late frames count as late, not lost.
            let deadline = Instant::now() + Duration::from_secs(30);
            while received.lock().unwrap().len() < healthy.len() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let got = received.lock().unwrap().clone();
            let mut lat: Vec<Duration> = healthy
                .iter()
                .filter_map(|(s, at)| Some(got.get(s)?.saturating_duration_since(*at)))
                .collect();
            lat.sort();
            println!(
                "| {backend} | {parked} | {:.1} ms | {:.1} ms | {:.1} ms | {}/{} |",
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(lat.last().copied().unwrap_or_default()),
                lat.len(),
                healthy.len(),
            );
        }
    }
}
