//! End to end through a real herald process:
//!
//! 1. Live delivery latency versus load, POST → the device holds the frame, p50/p99/p99.9,
//!    at offered rates from 1k to 20k notifications/s (open loop) spread over 1,000
//!    connected devices, on the embedded queue and on RabbitMQ, with the CPU split.
//! 2. Fallback throughput: notifications for offline devices, each target an APNs token,
//!    POST → queue → dispatcher → APNs double; beside a raw HTTP/2 client's ceiling against
//!    the same double in the same run.
//!
//! `cargo bench --bench e2e` (needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl). Loopback
//! only, bounded in time.

#[path = "../tests/support/apns_double.rs"]
mod apns_double;
#[path = "common/devices.rs"]
mod devices;
#[path = "common/raw_apns.rs"]
mod raw_apns;
#[path = "common/server.rs"]
mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::{Received, SECRET, ms, percentile};

/// The same allocator as herald's binary (src/main.rs), so the raw client it is measured
/// against is not handicapped by glibc's malloc (and the APNs double, which serves both,
/// costs the same in every row).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use server::{KEY, Server, cpu_time};

/// POSTs in flight at most: past it the generator, not herald, would hold the
/// file-descriptor budget (20,000 per process here); a step that hits it reports a lower
/// achieved rate instead of opening sockets without bound.
const MAX_IN_FLIGHT: usize = 2_000;
const TARGETS_EACH: usize = 100;
/// Concurrent POSTs of the fallback phase (see `fallback_rate`).
const FALLBACK_POSTERS: usize = 8;

/// Live-delivery curve knobs: `BENCH_RATES` (comma-separated notifications/s, default
/// 1000,5000,10000,20000), `BENCH_DEVICES` (default 1000), `BENCH_LIVE_SECONDS` per step
/// (default 5).
struct Curve {
    rates: Vec<u64>,
    devices: usize,
    seconds: u64,
}

impl Curve {
    fn from_env() -> Curve {
        let rates = std::env::var("BENCH_RATES")
            .unwrap_or_else(|_| "1000,5000,10000,20000".to_owned())
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        Curve {
            rates,
            devices: env_or("BENCH_DEVICES", 1000),
            seconds: env_or("BENCH_LIVE_SECONDS", 5),
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One step of the curve.
struct Step {
    offered: u64,
    /// POSTs actually started per second (below `offered` when the generator fell behind).
    achieved: f64,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    delivered: usize,
    /// POSTs answered 202: a POST refused or failed (its error is not herald's to deliver)
    /// is why `delivered` can be below `sent` without a loss.
    accepted: usize,
    sent: usize,
    /// CPU per second of the step, in cores: herald, the bench process (load generator and
    /// devices), the broker.
    cpu: (f64, f64, f64),
}

/// Offers `rate` POSTs per second for `seconds`, open loop (sent on schedule whether or not
/// earlier ones were answered, in 1 ms batches), round robin over `devices` devices.
/// Latency runs from each POST's *scheduled* time to the device holding the frame, so a
/// generator or server that falls behind shows in the figures instead of hiding
/// (coordinated omission).
async fn live_step(
    server: &Server,
    client: &reqwest::Client,
    received: &Received,
    first_seq: u64,
    rate: u64,
    devices: usize,
    seconds: u64,
) -> Step {
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let total = rate * seconds;
    let url = format!("{}/v1/notify", server.base);
    let pids = (server.child.id().to_string(), broker_pid());
    let cpu0 = (cpu_time(&pids.0), cpu_time("self"), cpu_time(&pids.1));
    let started = Instant::now();
    let mut seq = first_seq;
    let mut posts = Vec::with_capacity(total as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut due = 0u64;
    while seq < first_seq + total {
        tick.tick().await;
        // Everything scheduled up to now, so a late tick sends a bigger batch.
        let elapsed = started.elapsed();
        let until = ((elapsed.as_secs_f64() * rate as f64) as u64).min(total);
        while due < until {
            let scheduled = started + Duration::from_secs_f64(due as f64 / rate as f64);
            let permit = in_flight.clone().acquire_owned().await.unwrap();
            let body = serde_json::json!({
                "targets": [{"device_id": format!("dev-{}", seq as usize % devices)}],
                "data": {"seq": seq.to_string()},
            });
            let req = client.post(&url).bearer_auth(KEY).json(&body);
            sent.lock().unwrap().insert(seq, scheduled);
            posts.push(tokio::spawn(async move {
                let ok = req.send().await.is_ok_and(|r| r.status() == 202);
                drop(permit);
                ok
            }));
            seq += 1;
            due += 1;
        }
    }
    let sending = started.elapsed();
    let mut accepted = 0;
    for p in posts {
        accepted += usize::from(p.await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let want = |r: &HashMap<u64, Instant>| (first_seq..seq).filter(|s| r.contains_key(s)).count();
    while want(&received.lock().unwrap()) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (
        cpu_time(&pids.0).saturating_sub(cpu0.0).as_secs_f64() / wall,
        cpu_time("self").saturating_sub(cpu0.1).as_secs_f64() / wall,
        cpu_time(&pids.1).saturating_sub(cpu0.2).as_secs_f64() / wall,
    );
    let received = received.lock().unwrap();
    let sent = sent.lock().unwrap();
    let mut lat: Vec<Duration> = (first_seq..seq)
        .filter_map(|s| Some(received.get(&s)?.saturating_duration_since(*sent.get(&s)?)))
        .collect();
    lat.sort();
    Step {
        offered: rate,
        achieved: total as f64 / sending.as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        delivered: lat.len(),
        accepted,
        sent: total as usize,
        cpu,
    }
}

/// The RabbitMQ node's process (beam.smp), to charge its CPU too.
fn broker_pid() -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "beam.smp"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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

/// Offline targets with APNs tokens; returns sends per second the double received, and
/// how long the POSTs took to be accepted.
///
/// The notifications are posted by `FALLBACK_POSTERS` concurrent clients, as a backend
/// with several workers would: one client posting in turn measured the API's round trip
/// (a durable, confirmed publish of a 100-target message, ~4.5 ms on RabbitMQ while the
/// dispatcher's fallback keeps both cores busy) rather than the fallback's throughput,
/// since it had 17,600 of the 20,000 sends done by the time its last POST was answered.
async fn fallback_rate(
    server: &Server,
    double: &apns_double::ApnsDouble,
    posts: usize,
) -> Fallback {
    use futures::StreamExt;
    let before = double.request_count();
    let pids = (server.child.id().to_string(), broker_pid());
    let own = std::process::id().to_string();
    let cpu0 = (cpu_time(&pids.0), cpu_time(&pids.1), cpu_time(&own));
    let client = reqwest::Client::new();
    let bodies: Vec<serde_json::Value> = (0..posts)
        .map(|n| {
            let targets: Vec<_> = (0..TARGETS_EACH)
                .map(|t| serde_json::json!({"device_id": format!("off-{n}-{t}"), "apns": {"token": "ab".repeat(32)}}))
                .collect();
            serde_json::json!({"targets": targets, "notification": {"title": "Hi"}})
        })
        .collect();
    let url = format!("{}/v1/notify", server.base);
    let started = Instant::now();
    futures::stream::iter(bodies)
        .map(|body| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let res = client
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 202);
            }
        })
        .buffer_unordered(FALLBACK_POSTERS)
        .collect::<Vec<()>>()
        .await;
    let accepted_in = started.elapsed();
    let want = before + posts * TARGETS_EACH;
    let deadline = Instant::now() + Duration::from_secs(120);
    while double.request_count() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        double.request_count() >= want,
        "every target reached the double"
    );
    let sends = (posts * TARGETS_EACH) as f64;
    Fallback {
        rate: sends / started.elapsed().as_secs_f64(),
        accepted_in,
        herald_us: cpu_time(&pids.0).saturating_sub(cpu0.0).as_secs_f64() * 1e6 / sends,
        broker_us: cpu_time(&pids.1).saturating_sub(cpu0.1).as_secs_f64() * 1e6 / sends,
        bench_us: cpu_time(&own).saturating_sub(cpu0.2).as_secs_f64() * 1e6 / sends,
    }
}

/// One fallback phase's result.
struct Fallback {
    /// Sends per second the double received.
    rate: f64,
    /// When the last POST was answered.
    accepted_in: Duration,
    /// CPU per send, herald's and the broker's.
    herald_us: f64,
    broker_us: f64,
    /// This process: the APNs double and the posting clients.
    bench_us: f64,
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let vhost = server::BenchVhost::new("e2e");
    let url = vhost.url.clone();
    let double = apns_double::ApnsDouble::start().await;

    let curve = Curve::from_env();
    println!(
        "| live delivery, {} devices, {} s per step | offered /s | achieved /s | p50 | p99 | p99.9 | delivered / accepted / sent | CPU cores: herald + bench + broker |",
        curve.devices, curve.seconds
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for (name, queue) in [("embedded queue", None), ("RabbitMQ", Some(url.clone()))] {
        let mut env = apns_env(&double);
        if let Some(u) = &queue {
            env.push(("HERALD__QUEUE__URL", u.clone()));
        }
        let server = Server::start(&env).await;
        let received: Received = Arc::default();
        devices::connect(&server.addr, "dev", curve.devices, Some(received.clone())).await;
        let client = reqwest::Client::new();
        let mut first_seq = 0;
        for &rate in &curve.rates {
            let s = live_step(
                &server,
                &client,
                &received,
                first_seq,
                rate,
                curve.devices,
                curve.seconds,
            )
            .await;
            first_seq += rate * curve.seconds;
            println!(
                "| {name} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} / {} / {} | {:.2} + {:.2} + {:.2} |",
                s.offered,
                s.achieved,
                ms(s.p50),
                ms(s.p99),
                ms(s.p999),
                s.delivered,
                s.accepted,
                s.sent,
                s.cpu.0,
                s.cpu.1,
                s.cpu.2,
            );
        }
    }

    // POSTs of the fallback phase: `BENCH_FALLBACK_POSTS` (default 200; more for a profile).
    let posts: usize = env_or("BENCH_FALLBACK_POSTS", 200);
    println!();
    println!(
        "| fallback to the APNs double ({} POSTs x {TARGETS_EACH} targets, {FALLBACK_POSTERS} posting at once) | sends/s | ratio to raw | all POSTs accepted after | CPU µs per send: herald + broker | bench process (APNs double + client) |",
        posts
    );
    println!("|---|---:|---:|---:|---|---:|");
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
    let sends = posts * TARGETS_EACH;
    let own = std::process::id().to_string();
    let cpu0 = cpu_time(&own);
    let raw = raw_apns::raw(&raw_client, &target, &jwt, &body, &n, sends, 500).await;
    let raw_bench_us = cpu_time(&own).saturating_sub(cpu0).as_secs_f64() * 1e6 / sends as f64;
    println!("| raw reqwest HTTP/2, 500 in flight | {raw:.0} | 100% | | | {raw_bench_us:.1} |");
    for (name, queue) in [
        ("herald, embedded queue", None),
        ("herald, RabbitMQ", Some(url.clone())),
    ] {
        let mut env = apns_env(&double);
        if let Some(u) = &queue {
            env.push(("HERALD__QUEUE__URL", u.clone()));
        }
        let server = Server::start(&env).await;
        let f = fallback_rate(&server, &double, posts).await;
        println!(
            "| {name} | {:.0} | {:.0}% | {:.0} ms | {:.1} + {:.1} | {:.1} |",
            f.rate,
            100.0 * f.rate / raw,
            f.accepted_in.as_secs_f64() * 1e3,
            f.herald_us,
            f.broker_us,
            f.bench_us
        );
    }
}
