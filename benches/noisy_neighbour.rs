//! Noisy neighbour between apps (issue 11), through a real herald process on RabbitMQ.
//!
//! One herald serves two apps. App `noisy` floods notifications to offline devices whose
//! only route is APNs, and its APNs double answers each request after a delay (200 ms), so
//! its deliveries are slow. App `default` sends live notifications at a steady rate to a few
//! connected devices that ack at once. The bench reports `default`'s live latency (from each
//! POST's scheduled time to the device holding the frame, so a backlog shows instead of
//! hiding) without the flood, then with it, and how much of the flood the APNs double saw.
//!
//! `cargo bench --bench noisy_neighbour` (needs RabbitMQ on 127.0.0.1:5672 and rabbitmqctl;
//! `--profile dev` runs it on a debug build). Knobs: `BENCH_LIVE_RATE` (live notifications/s,
//! default 50), `BENCH_DEVICES` (connected devices, default 10), `BENCH_FLOOD_RATE` (the
//! noisy app's notifications/s, default 500), `BENCH_FLOOD_TARGETS` (offline targets per
//! flood notification, default 1), `BENCH_APNS_DELAY_MS` (default 200), `BENCH_SECONDS`
//! (per phase, default 10), `BENCH_PREFETCH` (`queue.prefetch`, default herald's 64; a lower
//! one makes the same backlog with a lighter flood, for a loaded machine), `HERALD_BENCH_BIN`
//! (another herald build, for a before/after).

#[path = "../tests/support/apns_double.rs"]
mod apns_double;
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

const NOISY_KEY: &str = "bench-noisy-key-0123456789";

struct Knobs {
    live_rate: u64,
    devices: usize,
    flood_rate: u64,
    flood_targets: usize,
    apns_delay: Duration,
    seconds: u64,
    prefetch: u16,
}

impl Knobs {
    fn from_env() -> Knobs {
        Knobs {
            live_rate: env_or("BENCH_LIVE_RATE", 50),
            devices: env_or("BENCH_DEVICES", 10),
            flood_rate: env_or("BENCH_FLOOD_RATE", 500),
            flood_targets: env_or("BENCH_FLOOD_TARGETS", 1),
            apns_delay: Duration::from_millis(env_or("BENCH_APNS_DELAY_MS", 200)),
            seconds: env_or("BENCH_SECONDS", 10),
            prefetch: env_or("BENCH_PREFETCH", 64),
        }
    }
}

/// Offers `rate` POSTs per second for `seconds`, open loop (in 1 ms batches, sent on
/// schedule whether or not earlier ones were answered); `body(seq)` is each one's body.
/// Returns each seq's scheduled time, and for each accepted one (202) how long after its
/// scheduled time the 202 came.
async fn offer(
    base: &str,
    key: &'static str,
    rate: u64,
    seconds: u64,
    first_seq: u64,
    body: impl Fn(u64) -> serde_json::Value,
) -> (HashMap<u64, Instant>, Vec<Duration>) {
    let client = reqwest::Client::new();
    let url = format!("{base}/v1/notify");
    let total = rate * seconds;
    let mut scheduled = HashMap::new();
    let mut posts = Vec::with_capacity(total as usize);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut due = 0u64;
    while due < total {
        tick.tick().await;
        let until = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while due < until {
            let seq = first_seq + due;
            let at = started + Duration::from_secs_f64(due as f64 / rate as f64);
            scheduled.insert(seq, at);
            let req = client.post(&url).bearer_auth(key).json(&body(seq));
            posts.push(tokio::spawn(async move {
                let ok = req.send().await.is_ok_and(|r| r.status() == 202);
                ok.then(|| at.elapsed())
            }));
            due += 1;
        }
    }
    let mut accepted = Vec::with_capacity(posts.len());
    for p in posts {
        accepted.extend(p.await.unwrap());
    }
    accepted.sort();
    (scheduled, accepted)
}

struct Phase {
    /// The live notifications' POST → 202, from the scheduled time.
    accept_p50: Duration,
    accept_p99: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    delivered: usize,
    sent: usize,
    flood_accepted: usize,
    flood_sent_to_apns: usize,
}

/// One phase: the live stream for `seconds`, with or without the flood beside it; then
/// waits (up to a minute) for every accepted live notification to arrive.
async fn phase(
    server: &Server,
    double: &apns_double::ApnsDouble,
    received: &Received,
    k: &Knobs,
    first_seq: u64,
    flood: bool,
) -> Phase {
    let devices = k.devices;
    let apns_before = double.request_count();
    let flood_task = flood.then(|| {
        let base = server.base.clone();
        let (rate, seconds, targets) = (k.flood_rate, k.seconds, k.flood_targets);
        tokio::spawn(async move { flood_stream(&base, rate, seconds, targets).await })
    });
    let (scheduled, accept) = offer(
        &server.base,
        KEY,
        k.live_rate,
        k.seconds,
        first_seq,
        |seq| {
            serde_json::json!({
                "targets": [{"device_id": format!("live-{}", seq as usize % devices)}],
                "data": {"seq": seq.to_string()},
            })
        },
    )
    .await;
    let flood_accepted = match flood_task {
        Some(t) => t.await.unwrap(),
        None => 0,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let arrived =
        |r: &HashMap<u64, Instant>| scheduled.keys().filter(|s| r.contains_key(s)).count();
    while arrived(&received.lock().unwrap()) < accept.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood_sent_to_apns = double.request_count() - apns_before;
    let received = received.lock().unwrap();
    let mut lat: Vec<Duration> = scheduled
        .iter()
        .filter_map(|(s, at)| Some(received.get(s)?.saturating_duration_since(*at)))
        .collect();
    lat.sort();
    Phase {
        accept_p50: percentile(&accept, 0.5),
        accept_p99: percentile(&accept, 0.99),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        delivered: lat.len(),
        sent: scheduled.len(),
        flood_accepted,
        flood_sent_to_apns,
    }
}

/// The noisy app's flood: `rate` notifications/s for `seconds`, each to `targets` offline
/// devices with an APNs token; returns how many were accepted.
async fn flood_stream(base: &str, rate: u64, seconds: u64, targets: usize) -> usize {
    let (_, accepted) = offer(base, NOISY_KEY, rate, seconds, 0, |seq| {
        let targets: Vec<_> = (0..targets)
            .map(|t| {
                serde_json::json!({
                    "device_id": format!("away-{seq}-{t}"),
                    "apns": {"token": "ab".repeat(32)},
                })
            })
            .collect();
        serde_json::json!({"targets": targets, "notification": {"title": "Sale"}})
    })
    .await;
    accepted.len()
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let k = Knobs::from_env();
    let vhost = server::BenchVhost::new("noisy");
    let double = apns_double::ApnsDouble::start().await;
    double.reply_always(Some(apns_double::Reply::Delay(k.apns_delay)));
    let env = vec![
        ("HERALD__QUEUE__URL", vhost.url.clone()),
        ("HERALD__QUEUE__PREFETCH", k.prefetch.to_string()),
        ("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET.to_owned()),
        ("HERALD__APPS__NOISY__API_KEYS", NOISY_KEY.to_owned()),
        (
            "HERALD__APPS__NOISY__APNS__KEY_FILE",
            double.key_file.display().to_string(),
        ),
        ("HERALD__APPS__NOISY__APNS__KEY_ID", double.key_id.clone()),
        ("HERALD__APPS__NOISY__APNS__TEAM_ID", double.team_id.clone()),
        ("HERALD__APPS__NOISY__APNS__TOPIC", double.topic.clone()),
        ("HERALD__APPS__NOISY__APNS__ENDPOINT", double.url.clone()),
        // The flood is within the noisy app's rate: no edge limit hides the queue's share.
        ("HERALD__APPS__NOISY__MAX_NOTIFY_RATE", "1000000".to_owned()),
    ];
    let server = Server::start(&env).await;
    let received: Received = Arc::default();
    devices::connect(&server.addr, "live", k.devices, Some(received.clone())).await;

    println!(
        "| app `default` live, {}/s to {} devices, {} s | noisy app flood | POST → 202 p50 / p99 | POST → device p50 | p99 | max | live delivered | flood accepted | flood sent to APNs by the end of the phase |",
        k.live_rate, k.devices, k.seconds
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut first_seq = 1_000_000;
    for flood in [false, true] {
        let p = phase(&server, &double, &received, &k, first_seq, flood).await;
        first_seq += k.live_rate * k.seconds;
        let label = if flood {
            format!(
                "{}/s × {} offline APNs targets, APNs answers in {} ms, prefetch {}",
                k.flood_rate,
                k.flood_targets,
                k.apns_delay.as_millis(),
                k.prefetch
            )
        } else {
            "none".to_owned()
        };
        println!(
            "| {} | {label} | {:.1} / {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {}/{} | {} | {} |",
            if flood { "with flood" } else { "alone" },
            ms(p.accept_p50),
            ms(p.accept_p99),
            ms(p.p50),
            ms(p.p99),
            ms(p.max),
            p.delivered,
            p.sent,
            p.flood_accepted,
            p.flood_sent_to_apns,
        );
    }
}
