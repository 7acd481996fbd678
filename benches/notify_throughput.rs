//! Notify throughput: notifications accepted per second through the HTTP API at several
//! client concurrencies, on both queue backends, beside the raw lapin publish-with-confirm
//! ceiling on the same broker, same message size, same concurrency, in the same run.
//!
//! Run: `cargo bench --bench notify_throughput` (needs RabbitMQ on 127.0.0.1:5672 and
//! rabbitmqctl; uses a throwaway vhost). `BENCH_SECONDS` sets each measurement's length.
//! Then the same accept path with 1 app configured against 20 (`[apps.*]`, each with its
//! keys and a rate limit): `BENCH_PART=apps` runs only that part.
//!
//! herald runs as its own process (the release binary), as in production; the load
//! generator and the raw lapin publisher run here. Everything shares the machine's cores
//! with the broker, so compare the ratio, not the absolute rates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[path = "common/env.rs"]
mod env;
#[path = "common/server.rs"]
mod server;

use env::env_or;

use server::{KEY, Server, broker_socket_counts, context_switches, cpu_time};
const CONCURRENCIES: &[usize] = &[1, 8, 32, 128, 512];
/// The raw client's AMQP connection name, to find its broker-side counters.
const RAW_CONNECTION: &str = "herald-bench raw publisher";
/// herald names its connection "herald <work queue> pid <pid>".
const HERALD_CONNECTION: &str = "herald herald.work pid";

fn body() -> serde_json::Value {
    serde_json::json!({
        "targets": [
            {"device_id": "phone-42", "apns": {"token": "ab".repeat(32)}},
            {"device_id": "tablet-7", "fcm": {"token": "f".repeat(150)}}
        ],
        "notification": {"title": "Hi", "body": "You have a message"},
        "data": {"thread": "t-1"},
        "ttl": "1h"
    })
}

/// The properties herald puts on a work message (`message_properties` in
/// src/queue/rabbitmq.rs), so the raw client publishes the same bytes.
fn herald_properties() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("herald".into())
        .with_timestamp(1_700_000_000)
        .with_message_id("0193c5e0-7b1a-7c3e-9f00-000000000000".into())
}

fn seconds() -> Duration {
    Duration::from_secs_f64(env_or("BENCH_SECONDS", 5.0))
}

/// Runs `concurrency` loops of `op` for the bench duration; returns successes per second.
async fn drive<F, Fut>(concurrency: usize, op: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, done) = (op.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    if op().await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// The RabbitMQ node's process (beam.smp), to charge its CPU too.
fn broker_pid() -> String {
    let out = std::process::Command::new("pgrep")
        .args(["-o", "beam.smp"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// CPU per message of herald, the load generator (this process) and the broker, and the
/// cores all three kept busy, over one measured phase.
struct Cost {
    herald: Duration,
    client: Duration,
    broker: Duration,
    cores_busy: f64,
    /// Context switches per message of the publishing process (herald, or this process
    /// for the raw client): its thread hand-offs.
    switches: f64,
    /// The broker's socket reads and writes per message on the publishing connection.
    broker_reads: f64,
    broker_writes: f64,
}

/// Runs one phase and charges its CPU, context switches and broker socket operations to
/// the messages it got through. `publisher` is the process holding the AMQP connection
/// (herald's pid, or "self" for the raw client), `connection` a part of its connection
/// name as the broker lists it.
async fn measure<F: std::future::Future<Output = f64>>(
    herald_pid: Option<&str>,
    vhost: &str,
    connection: &str,
    phase: F,
) -> (f64, Cost) {
    let broker = broker_pid();
    let publisher = herald_pid.unwrap_or("self");
    let (r0, w0) = broker_socket_counts(vhost, connection);
    let s0 = context_switches(publisher);
    let (h0, c0, b0) = (
        herald_pid.map(cpu_time).unwrap_or_default(),
        cpu_time("self"),
        cpu_time(&broker),
    );
    let started = Instant::now();
    let rate = phase.await;
    let wall = started.elapsed();
    let n = (rate * wall.as_secs_f64()).max(1.0);
    let h = herald_pid
        .map(cpu_time)
        .unwrap_or_default()
        .saturating_sub(h0);
    let c = cpu_time("self").saturating_sub(c0);
    let b = cpu_time(&broker).saturating_sub(b0);
    let s = context_switches(publisher).saturating_sub(s0);
    let (r1, w1) = broker_socket_counts(vhost, connection);
    let cost = Cost {
        herald: h.div_f64(n),
        client: c.div_f64(n),
        broker: b.div_f64(n),
        cores_busy: (h + c + b).as_secs_f64() / wall.as_secs_f64(),
        switches: s as f64 / n,
        broker_reads: r1.saturating_sub(r0) as f64 / n,
        broker_writes: w1.saturating_sub(w0) as f64 / n,
    };
    (rate, cost)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn api_rate(app_base: &str, concurrency: usize) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let url = format!("{app_base}/v1/notify");
    let payload = serde_json::to_vec(&body()).unwrap();
    drive(concurrency, move || {
        let req = client
            .post(&url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(payload.clone());
        async move { req.send().await.is_ok_and(|r| r.status() == 202) }
    })
    .await
}

/// API role only, so nothing drains the queue and only the accept path is measured.
fn api_only<'a>(queue_url: Option<&str>) -> Vec<(&'a str, String)> {
    let mut env = vec![
        ("HERALD__ROLES", "api".to_owned()),
        ("HERALD__QUEUE__MEMORY_CAPACITY", "10000000".to_owned()),
        // Nothing drains the embedded queue: its byte bound (128 MiB by default, ~60,000 of
        // these messages) would turn later phases into 503s. 4 GiB holds every phase.
        ("HERALD__QUEUE__MEMORY_MAX_BYTES", "4294967296".to_owned()),
    ];
    if let Some(url) = queue_url {
        env.push(("HERALD__QUEUE__URL", url.to_owned()));
    }
    env
}

#[tokio::main]
async fn main() {
    // cargo bench passes --bench; nextest/cargo test may list us: do nothing then.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var("BENCH_PART").as_deref() == Ok("apps") {
        return apps().await;
    }
    let vhost = server::BenchVhost::new("notify");
    let url = vhost.url.clone();
    let message_len = {
        // The queued message as herald would publish it, for the raw ceiling.
        let req: herald::domain::NotifyRequest = serde_json::from_value(body()).unwrap();
        req.parse(
            herald::domain::NotifyLimits {
                max_targets: 1000,
                default_ttl: Duration::from_secs(60),
                max_ttl: Duration::from_secs(86400),
            },
            std::time::SystemTime::now(),
        )
        .unwrap()
        .to_json()
    };

    let embedded = Server::start(&api_only(None)).await;
    // No dispatcher here: declare what one would, or the api-only process waits for it.
    vhost.declare_dispatcher_topology().await;
    let rabbit = Server::start(&api_only(Some(&url))).await;

    // Raw lapin: same broker, same exchange and quorum queue herald publishes to (declared
    // above), persistent + mandatory + confirmed, as herald does.
    let conn = Connection::connect(
        &url,
        ConnectionProperties::default().with_connection_name(RAW_CONNECTION.into()),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let ch = Arc::new(ch);

    println!(
        "| concurrency | raw lapin publish+confirm /s | API → RabbitMQ /s | ratio | API → embedded /s | raw: client + broker CPU µs/msg, cores busy | API: herald + client + broker CPU µs/msg, cores busy | context switches/msg, raw client · herald | broker socket reads + writes/msg, raw · herald |"
    );
    println!("|---:|---:|---:|---:|---:|---|---|---|---|");
    for &c in CONCURRENCIES {
        let (ch2, msg) = (ch.clone(), message_len.clone());
        let (raw, raw_cost) = measure(
            None,
            &vhost.name,
            RAW_CONNECTION,
            drive(c, move || {
                let (ch, msg) = (ch2.clone(), msg.clone());
                async move {
                    let confirm = ch
                        .basic_publish(
                            "herald.work".into(),
                            "notify".into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            &msg,
                            herald_properties(),
                        )
                        .await;
                    match confirm {
                        Ok(c) => c.await.is_ok_and(|c| c.is_ack()),
                        Err(_) => false,
                    }
                }
            }),
        )
        .await;
        let herald_pid = rabbit.child.id().to_string();
        let (rmq, api_cost) = measure(
            Some(&herald_pid),
            &vhost.name,
            HERALD_CONNECTION,
            api_rate(&rabbit.base, c),
        )
        .await;
        let mem = api_rate(&embedded.base, c).await;
        println!(
            "| {c} | {raw:.0} | {rmq:.0} | {:.0}% | {mem:.0} | {:.0} + {:.0}, {:.2} | {:.0} + {:.0} + {:.0}, {:.2} | {:.1} · {:.1} | {:.2} + {:.2} · {:.2} + {:.2} |",
            100.0 * rmq / raw,
            us(raw_cost.client),
            us(raw_cost.broker),
            raw_cost.cores_busy,
            us(api_cost.herald),
            us(api_cost.client),
            us(api_cost.broker),
            api_cost.cores_busy,
            raw_cost.switches,
            api_cost.switches,
            raw_cost.broker_reads,
            raw_cost.broker_writes,
            api_cost.broker_reads,
            api_cost.broker_writes,
        );
    }
    drop(embedded);
    drop(rabbit);
    let _ = conn.close(200, "bench done".into()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    apps().await;
}

/// Apps configured besides `default` in the "20 apps" server.
const APPS: usize = 19;
/// Keys per app there: every key is compared on every request (constant time), so more
/// keys is the cost a caller pays for more apps.
const KEYS_PER_APP: usize = 5;

/// The accept path with 1 app against 20: the caller resolves to its app through every
/// configured key, and its app's rate limit (set far above the load, so nothing is
/// refused) is taken on each request. Embedded queue: the cheapest accept path, where a
/// per-request cost shows most. Phases alternate (1, 20, 1, 20, ...) so a machine whose
/// load drifts affects both alike; compare the ratio.
async fn apps() {
    let one = Server::start(&api_only(None)).await;
    let mut keys = Vec::new();
    let mut app_vars = Vec::new();
    for a in 0..APPS {
        let app_keys: Vec<String> = (0..KEYS_PER_APP)
            .map(|k| format!("bench-app-{a}-key-{k}-0123456789"))
            .collect();
        app_vars.push((
            format!("HERALD__APPS__APP{a}__API_KEYS"),
            app_keys.join(","),
        ));
        app_vars.push((
            format!("HERALD__APPS__APP{a}__MAX_NOTIFY_RATE"),
            "1000000000".to_owned(),
        ));
        keys.extend(app_keys);
    }
    let mut env = api_only(None);
    env.extend(app_vars.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let twenty = Server::start(&env).await;
    // The last key configured: a linear scan would find it last (herald's compares all).
    let last_key = keys.last().unwrap().clone();
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    println!();
    println!(
        "| concurrency | round | 1 app /s | 20 apps ({} keys) /s | ratio |",
        keys.len() + 1
    );
    println!("|---:|---:|---:|---:|---:|");
    for &c in &[8usize, 64] {
        let (mut sum1, mut sum20) = (0.0, 0.0);
        for round in 1..=rounds {
            let r1 = api_rate_with(&one.base, c, KEY).await;
            let r20 = api_rate_with(&twenty.base, c, &last_key).await;
            sum1 += r1;
            sum20 += r20;
            println!(
                "| {c} | {round} | {r1:.0} | {r20:.0} | {:.1}% |",
                100.0 * r20 / r1
            );
        }
        println!(
            "| {c} | all | {sum1:.0} | {sum20:.0} | {:.1}% |",
            100.0 * sum20 / sum1
        );
    }
}

async fn api_rate_with(app_base: &str, concurrency: usize, key: &str) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let url = format!("{app_base}/v1/notify");
    let payload = serde_json::to_vec(&body()).unwrap();
    let key = key.to_owned();
    drive(concurrency, move || {
        let req = client
            .post(&url)
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(payload.clone());
        async move { req.send().await.is_ok_and(|r| r.status() == 202) }
    })
    .await
}
