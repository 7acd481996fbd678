//! Shared test support: an app on port 0, a RabbitMQ vhost per test, small waiting helpers,
//! the one [`fixtures`] builder of queued notifications, the gateway's WebSocket helpers
//! ([`gateway`]) and the provider doubles.
//!
//! Every helper more than one test binary uses lives here, and nowhere else. Each binary
//! (a directory under `tests/` with a `main.rs`) mounts it once, with
//! `#[path = "../support/mod.rs"] mod support;`: a directory binary's `mod support;` would
//! look under its own directory, and a separate helper crate would be one more workspace
//! member to build for a few hundred lines.
#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use herald::config::{Secret, Settings};
use herald::queue::Queue;
use herald::shutdown::Shutdown;
use herald::startup::Application;

pub const API_KEY: &str = "test-api-key-0123456789";

/// A herald application running in this test on 127.0.0.1:0.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub queue: Queue,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Settings for a test: port 0, one worker, a known API key, short timeouts.
pub fn test_settings() -> Settings {
    let mut s = Settings::defaults();
    s.http.addr = "127.0.0.1:0".into();
    s.http.workers = 1;
    s.http.shutdown_grace = Duration::from_secs(5);
    s.auth.api_keys = vec![Secret::new(API_KEY)];
    s.queue.publish_timeout = Duration::from_secs(2);
    s.queue.reconnect_min = Duration::from_millis(50);
    s.queue.reconnect_max = Duration::from_millis(500);
    // Every test client connects from 127.0.0.1, thousands of devices in some tests: the
    // per-address and per-device connect limits would refuse them. tests/gateway/admission.rs
    // sets its own low limits to test them.
    s.gateway.ip_connects_per_second = 1_000_000;
    s.gateway.ip_connect_burst = 1_000_000;
    s.gateway.device_connects_per_minute = 1_000_000;
    s.gateway.device_connect_burst = 1_000_000;
    s
}

/// Only the API role: the queue keeps what the API put there, for the test to inspect.
pub fn api_only(mut s: Settings) -> Settings {
    s.roles = vec![herald::config::Role::Api];
    s
}

pub async fn spawn_app(settings: Settings) -> TestApp {
    let app = Application::build(settings).await.expect("app builds");
    let addr = app.addr();
    let queue = app.queue().clone();
    let shutdown = app.shutdown_handle();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        base: format!("http://{addr}"),
        addr,
        http: reqwest::Client::new(),
        queue,
        shutdown,
        task,
    }
}

impl TestApp {
    pub async fn post_notify(&self, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/notify", self.base))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request sent")
    }

    /// Stops the app and waits for its drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A RabbitMQ vhost owned by one test: created on `new`, deleted (with everything declared
/// in it) on drop. Tests run in parallel without seeing each other's queues or connections.
pub struct TestVhost {
    pub name: String,
    pub url: String,
}

pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (is RabbitMQ installed?)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl TestVhost {
    pub fn new() -> Self {
        let name = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{name}");
        TestVhost { name, url }
    }

    /// Closes every client connection in this vhost (only this test's), as a broker
    /// restart or a network cut would.
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &self.name,
            "herald test: connection cut",
        ]);
    }

    /// Ready messages in a queue of this vhost.
    pub fn queue_len(&self, queue: &str) -> Option<u64> {
        rabbitmqctl(&["list_queues", "-p", &self.name, "name", "messages"])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(n, _)| *n == queue)
            .and_then(|(_, m)| m.trim().parse().ok())
    }

    pub fn settings(&self) -> Settings {
        let mut s = test_settings();
        s.queue.url = Secret::new(self.url.clone());
        s
    }

    /// Declares, as the guest user, what a dispatcher with `settings` declares when it
    /// connects (the work topology, the presence and replies exchanges), for a test that
    /// starts an API or gateway process before any dispatcher: those declare nothing and
    /// wait, not ready, until a dispatcher has (`tests/cluster/broker_users.rs` covers that
    /// order; here it is not what is tested).
    pub async fn declare_dispatcher_topology(&self, settings: &Settings) {
        let conn = lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
            .await
            .expect("guest connects to the test vhost");
        let ch = conn.create_channel().await.unwrap();
        herald::queue::Topology::new(&settings.queue.prefix, &settings.retry, &settings.app_ids())
            .declare(&ch)
            .await
            .expect("the work topology declares");
        herald::directory::cluster::declare_exchanges(&ch, &settings.queue.prefix)
            .await
            .expect("the directory's exchanges declare");
        let _ = conn.close(200, "declared".into()).await;
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of `series` (`name` or `name{label="value",...}`) in a Prometheus text
/// exposition, summed over every series of that name whose labels include the ones given,
/// in any order: `herald_deliveries_total{channel="apns"}` sums over every app and outcome,
/// `...{app="shop",channel="apns",outcome="delivered"}` is one series. `None` when no
/// series matches.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let (name, wanted) = split_series(series);
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = split_series(series);
        if n == name && wanted.iter().all(|w| labels.contains(w)) {
            *sum.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// `name{a="x",b="y"}` into its name and its `a="x"` pairs (values hold no `",`).
fn split_series(series: &str) -> (&str, Vec<&str>) {
    match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let labels = rest.strip_suffix('}').unwrap_or(rest);
            let pairs = labels
                .split("\",")
                .map(|p| p.trim_end_matches('"'))
                .filter(|p| !p.is_empty())
                .collect();
            (name, pairs)
        }
    }
}

/// A notify body for `n` data-only targets.
pub fn notify_body(devices: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "targets": devices.iter().map(|d| serde_json::json!({"device_id": d})).collect::<Vec<_>>(),
        "data": {"k": "v"},
    })
}

pub mod apns_double;
pub mod fcm_double;
pub mod fixtures;
pub mod gateway;
