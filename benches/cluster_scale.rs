//! Cluster at scale, one command: N device sessions over several `herald serve` gateway
//! processes and several client processes, one api+dispatcher process, one RabbitMQ.
//!
//! ```text
//! cargo bench --bench cluster_scale                       # 20,000 sessions, 6 gateways
//! BENCH_SESSIONS=100000 cargo bench --bench cluster_scale   # 7 gateways (see default_gateways)
//! ```
//!
//! Phases, each reported:
//! 1. Registration: every client process connects its share of devices as fast as the
//!    gateways admit them (connect → token check → upgrade → presence event confirmed →
//!    `hello`); the rate is sessions/s across the cluster, with the broker's CPU and memory
//!    and each gateway's RSS per session.
//! 2. Steady live delivery: notifications at `BENCH_RATE`/s to random devices; latency is
//!    from just before the POST to the device's receipt (a timestamp in the payload, one
//!    machine clock).
//! 3. Crash recovery: `kill -9` of one gateway while the same stream continues to devices on
//!    the *other* nodes; its devices reconnect to the survivors spread over
//!    `BENCH_RECONNECT_SPREAD_MS`. Reported: when the dispatcher's replica declared the node
//!    dead, when every moved device was registered again, live p50/p99 to the other nodes'
//!    devices during recovery, and sessions refused with 4002 (registration timeout).
//!
//! Each process is capped at 20,000 open files, so clients are spread over processes (this
//! same binary re-executed with `CLUSTER_SCALE_CLIENT=1`) and their sockets over source
//! addresses 127.0.0.10-209 with `IP_BIND_ADDRESS_NO_PORT`, so a source address is not
//! limited to one ephemeral port range per destination.
//!
//! Needs RabbitMQ on 127.0.0.1:5672 (guest) and `rabbitmqctl`; runs in a throwaway vhost.

#[path = "common/server.rs"]
mod common;
#[path = "common/env.rs"]
mod env;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{KEY, Server, cpu_time};
use env::env_or;
use futures::{SinkExt, StreamExt};
use herald::config::Secret;
use herald::domain::DeviceId;
use herald::gateway::DeviceTokens;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";
/// Connects in flight per client process: enough to keep every gateway's accept loop busy
/// without a SYN backlog overflow on loopback.
const CONNECT_CONCURRENCY: usize = 256;
/// Sessions per client process, under the 20,000 open-files cap with room to spare.
const SESSIONS_PER_CLIENT: usize = 15_000;

fn main() {
    // `cargo nextest run --all-targets` lists every target's tests with `--list`: a bench
    // (harness = false) has none, and must not run the whole benchmark to say so.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var("CLUSTER_SCALE_CLIENT").is_ok() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(client());
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(run());
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn device_name(i: usize) -> String {
    format!("cs-{i}")
}

// ---------------------------------------------------------------------------------------
// Client process: holds devices [lo, hi), acks everything, reports on stdout:
//   "H <i> <gw>"        a session got hello (registered)
//   "L <i> <lat_us>"    a notification arrived (latency from the payload's timestamp)
//   "C <i> <code>"      the server closed a session with this code
// ---------------------------------------------------------------------------------------

async fn client() {
    let lo: usize = env_or("CS_LO", 0);
    let hi: usize = env_or("CS_HI", 0);
    let spread = Duration::from_millis(env_or("CS_SPREAD_MS", 5000));
    let gateways: Vec<SocketAddr> = std::env::var("CS_GATEWAYS")
        .unwrap()
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let tokens = DeviceTokens::new(Some(&Secret::new(SECRET)), Duration::from_secs(3600));
    let (out, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        while let Some(l) = lines.blocking_recv() {
            let _ = writeln!(w, "{l}");
            // Flush when nothing else is queued, so the parent sees lines promptly.
            if lines.is_empty() {
                let _ = w.flush();
            }
        }
    });
    let first_wave = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::new();
    for i in lo..hi {
        let token = tokens
            .mint(&DeviceId::parse(device_name(i)).unwrap())
            .unwrap()
            .0;
        let (gateways, out, first_wave) = (gateways.clone(), out.clone(), first_wave.clone());
        tasks.push(tokio::spawn(async move {
            device(i, token, gateways, out, first_wave, spread).await
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn device(
    i: usize,
    token: String,
    gateways: Vec<SocketAddr>,
    out: tokio::sync::mpsc::UnboundedSender<String>,
    first_wave: Arc<tokio::sync::Semaphore>,
    spread: Duration,
) {
    let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (i % 200) as u8));
    let mut gw = i % gateways.len();
    let mut first = true;
    loop {
        let mut permit = if first {
            Some(first_wave.clone().acquire_owned().await.unwrap())
        } else {
            None
        };
        let ws = match connect(src, gateways[gw], &token).await {
            Ok(ws) => ws,
            Err(_) => {
                // Refused (503 admission or not ready) or the node is gone: back off a
                // little and try the next node.
                drop(permit);
                gw = other_gateway(gw, gateways.len());
                tokio::time::sleep(Duration::from_millis(50 + rand::random_range(0..200))).await;
                continue;
            }
        };
        let (mut tx, mut rx) = ws.split();
        // The first text frame is hello: registered.
        let mut registered = false;
        while let Some(Ok(m)) = rx.next().await {
            match m {
                Message::Text(t) if !registered => {
                    registered = t.contains("\"hello\"");
                    if registered {
                        let _ = out.send(format!("H {i} {gw}"));
                        // Registered: let the next device of the first wave connect.
                        permit = None;
                    }
                }
                Message::Text(t) => {
                    let v: serde_json::Value = match serde_json::from_str(&t) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    if v["type"] == "notification" {
                        if let Some(sent) = v["data"]["t_us"]
                            .as_str()
                            .and_then(|s| s.parse::<u64>().ok())
                        {
                            let _ = out.send(format!("L {i} {}", unix_us().saturating_sub(sent)));
                        }
                        let ack = serde_json::json!({"type": "ack", "id": v["id"]}).to_string();
                        if tx.send(Message::Text(ack.into())).await.is_err() {
                            break;
                        }
                    }
                }
                Message::Close(f) => {
                    let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                    let _ = out.send(format!("C {i} {code}"));
                    break;
                }
                _ => {}
            }
        }
        drop(permit);
        first = false;
        // Session gone (node killed, or closed): reconnect elsewhere after a random delay
        // in [0, spread), as herald's close frame tells a device to.
        gw = other_gateway(gw, gateways.len());
        tokio::time::sleep(Duration::from_millis(rand::random_range(
            0..spread.as_millis().max(1) as u64,
        )))
        .await;
    }
}

/// Another gateway than `gw`, at random, as a load balancer in front of the gateways would
/// pick: a dead node's devices spread over every survivor instead of all landing on its
/// neighbour (which would also take that one past the 20,000 open files a process may hold
/// here).
fn other_gateway(gw: usize, gateways: usize) -> usize {
    if gateways < 2 {
        return gw;
    }
    (gw + 1 + rand::random_range(0..gateways - 1)) % gateways
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn connect(src: IpAddr, gw: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket this function owns, with a valid pointer to a c_int
    // and its size; IP_BIND_ADDRESS_NO_PORT defers the port choice to connect(), so many
    // sockets bound to one source address share its ports across destinations.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "IP_BIND_ADDRESS_NO_PORT: {}",
        std::io::Error::last_os_error()
    );
    sock.bind(SocketAddr::new(src, 0))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(gw)).await??;
    let mut req = format!("ws://{gw}/v1/connect").into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    // A device's frames are small: tungstenite's default 128 KiB read buffer, zeroed per
    // connection, made memset and its page faults a fifth of this load generator's CPU
    // (perf), i.e. the bench measured itself. 4 KiB, as a real client would size it.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)),
    )
    .await??;
    Ok(ws)
}

// ---------------------------------------------------------------------------------------
// Parent: the cluster, the load and the report.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Seen {
    /// Device → (time of its latest hello, its gateway).
    hello: HashMap<usize, (Instant, usize)>,
    first_hello: Option<Instant>,
    last_hello: Option<Instant>,
    /// (arrival at the parent, device, latency).
    latencies: Vec<(Instant, usize, Duration)>,
    closes: HashMap<u16, usize>,
}

struct Broker {
    pid: String,
}

impl Broker {
    fn find() -> Broker {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "status", "--formatter", "json"])
            .output()
            .expect("rabbitmqctl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Broker {
            pid: v["pid"].as_u64().map(|p| p.to_string()).unwrap_or_default(),
        }
    }

    fn rss_bytes(&self) -> u64 {
        rss_bytes(&self.pid)
    }

    fn cpu(&self) -> Duration {
        cpu_time(&self.pid)
    }
}

fn rss_bytes(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn metric(http: &reqwest::Client, base: &str, series: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Sessions one gateway process may hold: the 20,000 open-file cap per process, less room
/// for its listener, broker connection and the rest.
const SESSIONS_PER_GATEWAY_MAX: usize = 18_000;

/// Whether, once one gateway is killed, the others can take its devices without passing
/// the open-file cap.
fn survivors_fit(sessions: usize, gateways: usize) -> bool {
    gateways > 1 && sessions.div_ceil(gateways - 1) <= SESSIONS_PER_GATEWAY_MAX
}

/// At least 6 gateways, and enough that the survivors fit (6 at 100,000 sessions left
/// 20,000 on each survivor, and their accepts failed with EMFILE).
fn default_gateways(sessions: usize) -> usize {
    (6..)
        .find(|&g| survivors_fit(sessions, g))
        .expect("some count fits")
}

async fn run() {
    let sessions: usize = env_or("BENCH_SESSIONS", 20_000);
    let gateways: usize = env_or("BENCH_GATEWAYS", default_gateways(sessions));
    if !survivors_fit(sessions, gateways) {
        eprintln!(
            "cluster_scale: {gateways} gateways: after the crash each survivor would hold more than {SESSIONS_PER_GATEWAY_MAX} sessions, past the 20,000 open-file cap; its accepts will fail (omit BENCH_GATEWAYS for a count that fits)"
        );
    }
    let clients: usize = env_or(
        "BENCH_CLIENT_PROCS",
        sessions.div_ceil(SESSIONS_PER_CLIENT).max(2),
    );
    let rate: u64 = env_or("BENCH_RATE", 500);
    let steady = Duration::from_secs(env_or("BENCH_STEADY_SECS", 10));
    let recovery = Duration::from_secs(env_or("BENCH_RECOVERY_SECS", 15));
    let spread_ms: u64 = env_or("BENCH_RECONNECT_SPREAD_MS", 5000);
    let session_rate: u32 = env_or("BENCH_SESSION_RATE", 5000);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "cluster_scale: {sessions} sessions, {gateways} gateways, {clients} client processes, {rate}/s live; load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let vhost = common::BenchVhost::new("cluster-scale");
    let common_env = |roles: &str, node: &str| -> Vec<(&'static str, String)> {
        vec![
            ("HERALD__ROLES", roles.into()),
            ("HERALD__QUEUE__URL", vhost.url.clone()),
            ("HERALD__AUTH__DEVICE_TOKEN_SECRET", SECRET.into()),
            ("HERALD__CLUSTER__NODE_ID", node.into()),
            ("HERALD__HTTP__WORKERS", "1".into()),
            (
                "HERALD__GATEWAY__MAX_SESSION_RATE",
                session_rate.to_string(),
            ),
            ("HERALD__GATEWAY__SESSION_BURST", session_rate.to_string()),
        ]
    };
    let dispatcher = Server::start(&common_env("api,dispatcher", "dispatcher")).await;
    let mut gws = Vec::new();
    for g in 0..gateways {
        gws.push(Server::start(&common_env("gateway", &format!("gw{g}"))).await);
    }
    let broker = Broker::find();
    let gw_addrs: Vec<String> = gws.iter().map(|g| g.addr.clone()).collect();
    let rss_before: Vec<u64> = gws
        .iter()
        .map(|g| rss_bytes(&g.child.id().to_string()))
        .collect();
    let broker_rss_before = broker.rss_bytes();
    let dispatcher_pid = dispatcher.child.id().to_string();
    let dispatcher_rss_before = rss_bytes(&dispatcher_pid);

    // 1. Registration.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let per = sessions.div_ceil(clients);
    let mut children = Vec::new();
    let cpu0 = broker.cpu();
    let herald_cpu0: Duration = gws
        .iter()
        .map(|g| cpu_time(&g.child.id().to_string()))
        .sum();
    let dispatcher_cpu0 = cpu_time(&dispatcher_pid);
    let started = Instant::now();
    for c in 0..clients {
        let (lo, hi) = (c * per, ((c + 1) * per).min(sessions));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("CLUSTER_SCALE_CLIENT", "1")
            .env("CS_LO", lo.to_string())
            .env("CS_HI", hi.to_string())
            .env("CS_SPREAD_MS", spread_ms.to_string())
            .env("CS_GATEWAYS", gw_addrs.join(","))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("client process");
        let stdout = child.stdout.take().unwrap();
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let now = Instant::now();
                let f: Vec<&str> = line.split(' ').collect();
                let mut s = seen.lock().unwrap();
                match f.as_slice() {
                    ["H", i, g] => {
                        s.hello
                            .insert(i.parse().unwrap(), (now, g.parse().unwrap()));
                        s.first_hello.get_or_insert(now);
                        s.last_hello = Some(now);
                    }
                    ["L", i, us] => {
                        let lat = Duration::from_micros(us.parse().unwrap());
                        s.latencies.push((now, i.parse().unwrap(), lat));
                    }
                    ["C", _, code] => *s.closes.entry(code.parse().unwrap()).or_default() += 1,
                    _ => {}
                }
            }
        });
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120 + sessions as u64 / 500);
    while seen.lock().unwrap().hello.len() < sessions {
        assert!(
            Instant::now() < deadline,
            "only {} of {sessions} sessions registered",
            seen.lock().unwrap().hello.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let registered_in = started.elapsed();
    let broker_cpu = broker.cpu() - cpu0;
    let herald_cpu: Duration = gws
        .iter()
        .map(|g| cpu_time(&g.child.id().to_string()))
        .sum::<Duration>()
        - herald_cpu0;
    let dispatcher_cpu = cpu_time(&dispatcher_pid) - dispatcher_cpu0;
    // The client processes started with the phase, so their whole CPU time is its.
    let client_cpu: Duration = children.iter().map(|c| cpu_time(&c.id().to_string())).sum();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<u64> = gws
        .iter()
        .map(|g| rss_bytes(&g.child.id().to_string()))
        .collect();
    let broker_rss_after = broker.rss_bytes();
    let dispatcher_rss_after = rss_bytes(&dispatcher_pid);
    let herald_rss_per_session = (rss_after.iter().sum::<u64>() as f64
        - rss_before.iter().sum::<u64>() as f64)
        / sessions as f64;
    println!();
    println!("| registration, {sessions} sessions | value |");
    println!("|---|---:|");
    println!(
        "| sessions/s across the cluster (first connect to last hello) | {:.0} |",
        sessions as f64 / registered_in.as_secs_f64()
    );
    for (who, cpu) in [
        ("broker", broker_cpu),
        ("herald (gateways)", herald_cpu),
        ("dispatcher (its replica)", dispatcher_cpu),
        ("load generator (client processes)", client_cpu),
    ] {
        println!(
            "| {who} CPU per registration | {:.0} µs |",
            cpu.as_secs_f64() * 1e6 / sessions as f64
        );
    }
    println!(
        "| cores busy during the phase (all of the above) | {:.2} of {} |",
        (broker_cpu + herald_cpu + dispatcher_cpu + client_cpu).as_secs_f64()
            / registered_in.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "| broker RSS growth per session | {:.2} KB |",
        (broker_rss_after as f64 - broker_rss_before as f64) / sessions as f64 / 1024.0
    );
    println!(
        "| herald gateway RSS per session | {:.2} KB |",
        herald_rss_per_session / 1024.0
    );
    println!(
        "| dispatcher RSS growth per device (its directory replica) | {:.2} KB |",
        (dispatcher_rss_after as f64 - dispatcher_rss_before as f64) / sessions as f64 / 1024.0
    );

    // 2. Steady live delivery.
    let http = reqwest::Client::new();
    let post_stream = |targets: Vec<usize>, window: Duration| {
        let http = http.clone();
        let base = dispatcher.base.clone();
        tokio::spawn(async move {
            let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let end = Instant::now() + window;
            let mut sent = 0u64;
            while Instant::now() < end {
                tick.tick().await;
                let i = targets[rand::random_range(0..targets.len())];
                let (http, base, accepted) = (http.clone(), base.clone(), accepted.clone());
                tokio::spawn(async move {
                    let body = serde_json::json!({
                        "targets": [{"device_id": device_name(i)}],
                        "data": {"t_us": unix_us().to_string()},
                        "ttl": "60s",
                    });
                    let res = http
                        .post(format!("{base}/v1/notify"))
                        .bearer_auth(KEY)
                        .json(&body)
                        .send()
                        .await;
                    if res.is_ok_and(|r| r.status() == 202) {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                sent += 1;
            }
            // Let the last requests finish before reporting what was accepted.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
            assert!(accepted > 0, "no notification accepted (sent {sent})");
            accepted
        })
    };
    let all: Vec<usize> = (0..sessions).collect();
    let t0 = Instant::now();
    let sent = post_stream(all, steady).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut lat: Vec<Duration> = seen
        .lock()
        .unwrap()
        .latencies
        .iter()
        .filter(|(t, _, _)| *t >= t0)
        .map(|(_, _, l)| *l)
        .collect();
    let got = lat.len();
    println!();
    println!("| live delivery, steady {rate}/s for {steady:?} | value |");
    println!("|---|---:|");
    println!("| delivered live / accepted | {got} / {sent} |");
    println!("| p50 | {} ms |", ms(percentile(&mut lat, 0.5)));
    println!("| p99 | {} ms |", ms(percentile(&mut lat, 0.99)));

    // 3. Crash recovery: kill -9 gateway 0 while the stream goes to the other nodes' devices.
    let others: Vec<usize> = (0..sessions).filter(|i| i % gateways != 0).collect();
    let moved: Vec<usize> = (0..sessions).filter(|i| i % gateways == 0).collect();
    let stream = post_stream(others, recovery);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let mut victim = gws.remove(0);
    let _ = victim.child.kill();
    let _ = victim.child.wait();
    // When did the dispatcher's replica declare the node dead?
    let mut offline_after = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        let alive = metric(&http, &dispatcher.base, "herald_cluster_nodes_alive").await;
        if alive == Some((gateways - 1) as f64) {
            offline_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = stream.await.unwrap();
    // Wait (bounded) for the moved devices to be registered again.
    let reg_deadline = killed_at + Duration::from_secs(60);
    let moved_back = loop {
        let back: Vec<Instant> = {
            let s = seen.lock().unwrap();
            moved
                .iter()
                .filter_map(|i| s.hello.get(i).map(|(t, _)| *t).filter(|t| *t > killed_at))
                .collect()
        };
        if back.len() == moved.len() || Instant::now() > reg_deadline {
            break back;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = seen.lock().unwrap();
    // Deliveries to the other nodes' devices received after the kill: (when, latency).
    let after_kill: Vec<(Instant, Duration)> = s
        .latencies
        .iter()
        .filter(|(t, i, _)| *t >= killed_at && i % gateways != 0)
        .map(|(t, _, l)| (*t, *l))
        .collect();
    let mut during: Vec<Duration> = after_kill.iter().map(|(_, l)| *l).collect();
    let last_back = moved_back.iter().max().map(|t| t.duration_since(killed_at));
    println!();
    println!(
        "| crash recovery: kill -9 of 1 of {gateways} gateways ({} sessions on it), {rate}/s to the other nodes' devices | value |",
        moved.len()
    );
    println!("|---|---:|");
    println!(
        "| dispatcher's replica declares the node dead after | {} |",
        offline_after
            .map(|d| format!("{} ms", ms(d)))
            .unwrap_or("> 10 s".into())
    );
    println!(
        "| moved devices registered again | {} / {} |",
        moved_back.len(),
        moved.len()
    );
    println!(
        "| every moved device registered again after | {} |",
        last_back
            .map(|d| format!("{:.1} s", d.as_secs_f64()))
            .unwrap_or("-".into())
    );
    println!(
        "| live to other nodes' devices after the kill / accepted in the window (which starts 2 s before it) | {} / {sent} |",
        during.len()
    );
    println!(
        "| p50 during recovery | {} ms |",
        ms(percentile(&mut during, 0.5))
    );
    println!(
        "| p99 during recovery | {} ms |",
        ms(percentile(&mut during, 0.99))
    );
    println!(
        "| sessions closed 4002 (registration timeout) | {} |",
        s.closes.get(&4002).copied().unwrap_or(0)
    );
    // When the slow ones arrived: each second after the kill (by receipt), how many
    // deliveries to the other nodes' devices and their p99, beside how many moved devices
    // were registered again in that second.
    println!();
    println!(
        "| second after the kill | delivered to other nodes | p99 | moved devices registered again |"
    );
    println!("|---:|---:|---:|---:|");
    let secs = recovery.as_secs() as usize;
    for sec in 0..secs {
        let from = killed_at + Duration::from_secs(sec as u64);
        let to = from + Duration::from_secs(1);
        let mut bucket: Vec<Duration> = after_kill
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, l)| *l)
            .collect();
        let back = moved_back
            .iter()
            .filter(|t| **t >= from && **t < to)
            .count();
        if bucket.is_empty() && back == 0 {
            continue;
        }
        println!(
            "| {sec}–{} s | {} | {} ms | {back} |",
            sec + 1,
            bucket.len(),
            ms(percentile(&mut bucket, 0.99))
        );
    }
    drop(s);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(gws);
    drop(dispatcher);
}
