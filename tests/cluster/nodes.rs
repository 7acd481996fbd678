//! Real herald processes (`herald serve`) on one vhost, and a device client that follows
//! them around.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::gw;
use crate::support::apns_double::ApnsDouble;
use crate::support::{API_KEY, wait_for};

/// One `herald serve` child. Killed (SIGKILL) on drop, so a panicking test leaves nothing.
pub struct Node {
    child: Child,
    /// Log lines naming a broker refusal (ACCESS_REFUSED) so far.
    pub refusals: Arc<std::sync::atomic::AtomicUsize>,
    pub base: String,
    pub ws_url: String,
    pub name: String,
}

/// Settings every node of a test shares, as `HERALD__…` variables.
pub fn node_env(vhost_url: &str, apns: &ApnsDouble) -> Vec<(String, String)> {
    let mut s = herald::config::Settings::defaults();
    apns.configure(&mut s);
    [
        ("QUEUE__URL", vhost_url.to_owned()),
        ("HTTP__ADDR", "127.0.0.1:0".into()),
        ("HTTP__WORKERS", "1".into()),
        ("HTTP__SHUTDOWN_GRACE", "5s".into()),
        ("AUTH__API_KEYS", API_KEY.into()),
        ("AUTH__DEVICE_TOKEN_SECRET", gw::SECRET.into()),
        ("LOG__FORMAT", "json".into()),
        ("LOG__LEVEL", "info,lapin=error".into()),
        ("QUEUE__RECONNECT_MIN", "50ms".into()),
        ("QUEUE__RECONNECT_MAX", "500ms".into()),
        ("GATEWAY__PING_INTERVAL", "1s".into()),
        ("GATEWAY__PONG_TIMEOUT", "1s".into()),
        ("GATEWAY__ACK_TIMEOUT", "500ms".into()),
        ("GATEWAY__RECONNECT_SPREAD", "100ms".into()),
        ("CLUSTER__REPLY_MARGIN", "500ms".into()),
        ("RETRY__BASE_DELAY", "100ms".into()),
        ("RETRY__MAX_DELAY", "400ms".into()),
        ("APNS__KEY_FILE", s.apns.key_file),
        ("APNS__KEY_ID", s.apns.key_id),
        ("APNS__TEAM_ID", s.apns.team_id),
        ("APNS__TOPIC", s.apns.topic),
        ("APNS__ENDPOINT", s.apns.endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (format!("HERALD__{k}"), v))
    .collect()
}

impl Node {
    /// Starts `herald serve` with `roles` and waits until it listens and is ready.
    pub async fn start(name: &str, env: &[(String, String)], roles: &str) -> Node {
        let node = Node::spawn(name, env, roles).await;
        node.wait_ready().await;
        node
    }

    /// Starts `herald serve` with `roles` and waits until it listens (not for ready).
    pub async fn spawn(name: &str, env: &[(String, String)], roles: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().cloned())
            .env("HERALD__ROLES", roles)
            .env("HERALD__CLUSTER__NODE_ID", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("herald starts");
        // The bound port comes from the "herald listening" log line; the rest of stderr is
        // drained (so the child never blocks on a full pipe) and echoed on failure only.
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let tag = name.to_owned();
        let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = refusals.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ACCESS_REFUSED") {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if v["fields"]["message"] == "herald listening" {
                    let _ = tx.send(v["fields"]["addr"].as_str().unwrap_or("").to_owned());
                } else if v["level"] == "WARN" || v["level"] == "ERROR" || v.is_null() {
                    eprintln!("[{tag}] {line}");
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("the node logs its address");
        Node {
            child,
            refusals,
            base: format!("http://{addr}"),
            ws_url: format!("ws://{addr}/v1/connect"),
            name: name.to_owned(),
        }
    }

    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        wait_for(
            Duration::from_secs(20),
            &format!("{} ready", self.name),
            || async {
                let r = http
                    .get(format!("{}/readyz", self.base))
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no unbind; the broker notices the dead connection.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes does; does not wait.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit (after SIGTERM) and returns whether it exited 0.
    pub async fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.success();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within {within:?} of SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs a notification for `device` (with an APNs route) to `base`; the id on 202.
pub async fn notify(http: &reqwest::Client, base: &str, device: &str) -> Option<String> {
    let body = json!({
        "targets": [{"device_id": device, "apns": {"token": crate::APNS_TOKEN}}],
        "data": {"k": "v"},
    });
    let res = http
        .post(format!("{base}/v1/notify"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .ok()?;
    if res.status() != 202 {
        return None;
    }
    res.json::<Value>().await.ok()?["id"]
        .as_str()
        .map(str::to_owned)
}

/// What a device saw: notification ids (with counts), and each session's close code (1006
/// when it ended without a close frame).
#[derive(Default)]
pub struct Seen {
    pub ids: HashMap<String, u32>,
    pub closes: Vec<u16>,
    pub sessions: u32,
}

/// A device that acks every notification and, when its session ends, reconnects to the
/// next URL in `urls` (in order, wrapping), as `herald connect` would.
pub struct Device {
    pub seen: Arc<Mutex<Seen>>,
    /// The nodes it may connect to; empty = stay disconnected until some are given.
    nodes: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub fn start(device_id: &str, urls: Vec<String>) -> Device {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let nodes = Arc::new(Mutex::new(urls));
        let token = gw::token(device_id);
        let (s, n) = (seen.clone(), nodes.clone());
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            loop {
                let url = {
                    let n = n.lock().unwrap();
                    (!n.is_empty()).then(|| n[i % n.len()].clone())
                };
                let Some(url) = url else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let mut req = url.into_client_request().unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
                    // That node is down or refusing: try the next one shortly.
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                s.lock().unwrap().sessions += 1;
                // RFC 6455's 1006 (abnormal closure) stands for a session that ended without
                // a close frame, so a test can tell "closed with code X" from "cut".
                let mut close = 1006;
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) => {
                            let v: Value = serde_json::from_str(&t).unwrap();
                            if v["type"] == "notification" {
                                let id = v["id"].as_str().unwrap().to_owned();
                                *s.lock().unwrap().ids.entry(id.clone()).or_default() += 1;
                                let ack = json!({"type": "ack", "id": id}).to_string();
                                if ws.send(Message::Text(ack.into())).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Message::Close(f) => {
                            close = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                            break;
                        }
                        _ => {}
                    }
                }
                s.lock().unwrap().closes.push(close);
                i += 1;
            }
        });
        Device { seen, nodes, task }
    }

    /// The nodes to (re)connect to from now on.
    pub fn set_nodes(&self, urls: Vec<String>) {
        *self.nodes.lock().unwrap() = urls;
    }

    /// Waits until the device has opened `n` sessions in all.
    pub async fn wait_sessions(&self, n: u32) {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} sessions"),
            || async { (self.sessions() >= n).then_some(()) },
        )
        .await
    }

    /// Waits until notification `id` arrived live.
    pub async fn wait_got(&self, id: &str) {
        wait_for(Duration::from_secs(20), &format!("{id} live"), || async {
            self.got(id).then_some(())
        })
        .await
    }

    pub fn sessions(&self) -> u32 {
        self.seen.lock().unwrap().sessions
    }

    pub fn got(&self, id: &str) -> bool {
        self.seen.lock().unwrap().ids.contains_key(id)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until every accepted id reached a device client (live) or APNs (fallback), then
/// reports (eprintln) how many went each way and the duplicates over both channels.
pub async fn assert_all_delivered(accepted: &[String], devices: &[&Device], apns: &ApnsDouble) {
    let check = || {
        let mut seen = Seen::default();
        for d in devices {
            for (id, n) in &d.seen.lock().unwrap().ids {
                *seen.ids.entry(id.clone()).or_default() += n;
            }
        }
        let mut fallback: HashMap<String, u32> = HashMap::new();
        for r in apns.requests() {
            if let Some(id) = r.headers.get("apns-id") {
                *fallback.entry(id.clone()).or_default() += 1;
            }
        }
        let missing: Vec<&String> = accepted
            .iter()
            .filter(|id| !seen.ids.contains_key(*id) && !fallback.contains_key(*id))
            .collect();
        let live = accepted
            .iter()
            .filter(|id| seen.ids.contains_key(*id))
            .count();
        let duplicates: u32 = accepted
            .iter()
            .map(|id| {
                (seen.ids.get(id).copied().unwrap_or(0) + fallback.get(id).copied().unwrap_or(0))
                    .saturating_sub(1)
            })
            .sum();
        (missing.len(), live, fallback.len(), duplicates)
    };
    let result = wait_for(
        Duration::from_secs(60),
        "every accepted notification delivered",
        || async {
            let (missing, live, fallback, dups) = check();
            (missing == 0).then_some((live, fallback, dups))
        },
    )
    .await;
    eprintln!(
        "delivered {} accepted notifications: {} live, {} via APNs, {} duplicates",
        accepted.len(),
        result.0,
        result.1,
        result.2
    );
}
