//! Fallback throughput to the APNs double through `Providers::send`, beside a raw reqwest
//! HTTP/2 client's ceiling against the same double in the same run.
//!
//! `cargo bench --bench providers` (release build). Prints a Markdown table for
//! docs/benchmarks.md. Both clients talk cleartext h2 to one double on 127.0.0.1 that verifies
//! each JWT (cached per token, as Apple does) and records every request; the raw client sends
//! the same path, headers and body with a pre-signed JWT and does nothing else, so the ratio is
//! what herald's send path (payload building, JWT cache, bulkhead, breaker, classification,
//! metrics) costs on top of HTTP/2 itself.

#[path = "../tests/support/apns_double.rs"]
mod apns_double;
#[path = "common/raw_apns.rs"]
mod raw_apns;

use raw_apns::raw;

use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use herald::config::Settings;
use herald::domain::{ApnsToken, NotifyLimits, NotifyRequest, QueuedNotification, TargetRoute};
use herald::metrics::Metrics;
use herald::providers::{ProviderOutcome, Providers};

/// Concurrencies measured: one at a time (latency-bound), then increasingly multiplexed.
const CONCURRENCY: &[usize] = &[1, 16, 64, 256];
/// Sends per measurement; enough for a few seconds at the higher concurrencies.
const SENDS: usize = 20_000;
const SENDS_SERIAL: usize = 2_000;

fn notification() -> QueuedNotification {
    let req: NotifyRequest = serde_json::from_value(serde_json::json!({
        "targets": [{"device_id": "phone-1"}],
        "notification": {"title": "Hi", "body": "You have a message"},
        "data": {"thread": "t-1"},
        "ttl": "1h",
    }))
    .unwrap();
    let limits = NotifyLimits {
        max_targets: 1,
        default_ttl: Duration::from_secs(3600),
        max_ttl: Duration::from_secs(86400),
    };
    req.parse(limits, SystemTime::now()).unwrap()
}

async fn through_providers(p: &Providers, n: &QueuedNotification, sends: usize, c: usize) -> f64 {
    let token = herald::domain::ApnsRoute {
        token: ApnsToken::parse("ab".repeat(32)).unwrap(),
        environment: None,
    };
    let started = Instant::now();
    let delivered = futures::stream::iter(0..sends)
        .map(|_| p.send(TargetRoute::Apns(&token), n))
        .buffer_unordered(c)
        .filter(|o| futures::future::ready(*o == ProviderOutcome::Delivered))
        .count()
        .await;
    assert_eq!(delivered, sends, "every send delivered");
    sends as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo nextest run --all-targets` lists every target's tests with `--list`: a bench
    // (harness = false) has none, and must not run the whole benchmark to say so.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let double = apns_double::ApnsDouble::start().await;
        let mut s = Settings::defaults();
        double.configure(&mut s);
        let providers = Providers::from_settings(&s, &Metrics::new()).unwrap();
        let n = notification();

        // The raw client: same HTTP/2 settings that matter (prior knowledge, one connection),
        // a JWT signed once, the body serialized once.
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let jwt = raw_apns::sign_jwt(&double);
        let body = serde_json::to_vec(&herald::providers::apns::payload(&n)).unwrap();
        let url = format!("{}/3/device/{}", double.url, "ab".repeat(32));

        // Warm both connections (TLS-free, but h2 handshake and the double's JWT cache).
        through_providers(&providers, &n, 500, 16).await;
        raw(&client, &url, &jwt, &body, &n, 500, 16).await;

        println!(
            "| concurrency | sends | `Providers::send` (req/s) | raw reqwest h2 (req/s) | ratio |"
        );
        println!("|---:|---:|---:|---:|---:|");
        for &c in CONCURRENCY {
            let sends = if c == 1 { SENDS_SERIAL } else { SENDS };
            // Alternate the order per round and keep each side's best of two, so neither
            // side always runs on a warmer (or more fragmented) double.
            let mut best_p: f64 = 0.0;
            let mut best_r: f64 = 0.0;
            for round in 0..2 {
                if round % 2 == 0 {
                    best_p = best_p.max(through_providers(&providers, &n, sends, c).await);
                    best_r = best_r.max(raw(&client, &url, &jwt, &body, &n, sends, c).await);
                } else {
                    best_r = best_r.max(raw(&client, &url, &jwt, &body, &n, sends, c).await);
                    best_p = best_p.max(through_providers(&providers, &n, sends, c).await);
                }
            }
            println!(
                "| {c} | {sends} | {best_p:.0} | {best_r:.0} | {:.2} |",
                best_p / best_r
            );
        }
        println!(
            "\nrequests recorded by the double: {}",
            double.request_count()
        );
    });
}
