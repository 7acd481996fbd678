//! PostgreSQL restarted mid-stream (issue 12): while notifications for offline devices flow
//! through RabbitMQ into the inbox, the database is stopped and started again, twice (a
//! clean `pg_ctl stop -m fast`, then a crash-like `-m immediate`). herald's pool reconnects
//! on its own; a store that fails leaves its queue message unacked (retried), so every
//! accepted notification ends up in the inbox (once per device and id) and replays to its
//! device on connect.
//!
//! The database is a private PostgreSQL 15 server started for this test only
//! ([`PrivatePg`]): the machine's shared server (127.0.0.1:5432) serves other tests in
//! parallel and must never be restarted by one.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald::config::Secret;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::wait_for;
use crate::{World, gw, harness};

/// Where the PostgreSQL 15 server binaries are (`HERALD_TEST_PG_BIN` overrides).
fn pg_bin() -> PathBuf {
    PathBuf::from(
        std::env::var("HERALD_TEST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    )
}

/// A PostgreSQL server of this test's own: a fresh cluster (`initdb`, trust auth) in a
/// temporary directory, on a free loopback port, its socket in that directory. Stopped
/// (`-m immediate`) and deleted on drop, also when the test panics (its log is printed
/// then). `initdb` and `pg_ctl` refuse to run as root, so as root they run as the
/// `postgres` user (`runuser`), which owns the directory.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    pub port: u16,
}

impl PrivatePg {
    pub async fn start() -> PrivatePg {
        let bin = pg_bin();
        for tool in ["initdb", "pg_ctl", "postgres"] {
            assert!(
                bin.join(tool).is_file(),
                "PostgreSQL 15 server binaries are needed for this test: {} not found \
                 (install postgresql-15, or point HERALD_TEST_PG_BIN at its bin directory)",
                bin.join(tool).display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("herald-pg-")
            .tempdir()
            .expect("a temporary directory");
        if as_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs")
                .success();
            assert!(ok, "chown of the private PostgreSQL directory to postgres");
        }
        // A port nothing listens on (bound, then released for the server).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePg { dir, port };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .await;
        pg.start_server().await;
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The URL herald's `inbox.url` takes: the server's own `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub async fn start_server(&self) {
        // fsync off: the test's data need not survive an OS crash, and a loaded CI disk
        // should not slow the server down; a stop, even `-m immediate`, loses nothing.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let (data, log) = (self.data(), self.log().display().to_string());
        self.run(
            "pg_ctl",
            &[
                "start", "-w", "-t", "60", "-D", &data, "-l", &log, "-o", &opts,
            ],
        )
        .await;
    }

    /// `pg_ctl stop -m <mode>` (`fast`: a clean restart's shutdown, sessions terminated;
    /// `immediate`: every server process killed, crash recovery at the next start), waiting
    /// until the server is gone.
    pub async fn stop_server(&self, mode: &str) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["stop", "-w", "-t", "60", "-m", mode, "-D", &data],
        )
        .await;
    }

    /// Runs a server tool (as `postgres` when this process is root) and asserts success.
    async fn run(&self, tool: &str, args: &[&str]) {
        let mut cmd = tool_command(tool);
        cmd.args(args).stdin(Stdio::null());
        let out = tokio::process::Command::from(cmd)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{tool} could not run: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.log()).unwrap_or_default()
        );
    }
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn tool_command(tool: &str) -> Command {
    let path = pg_bin().join(tool);
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "private PostgreSQL log:\n{}",
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
        }
        // Synchronous: Drop cannot await. Already stopped is fine; the directory goes with
        // the TempDir right after.
        let _ = tool_command("pg_ctl")
            .args(["stop", "-w", "-m", "immediate", "-D", &self.data()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Inbox rows, and distinct (device, id) pairs among them, in the private database. `None`
/// while the server is down.
async fn inbox_rows(url: &str) -> Option<(i64, i64)> {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .ok()?;
    sqlx::query_as("SELECT count(*), count(DISTINCT (device_id, id)) FROM herald_inbox")
        .fetch_one(&mut c)
        .await
        .ok()
}

const DEVICES: usize = 40;
/// A notification every this often: the stream spans both outages at a rate the test's one
/// HTTP worker and the loaded CI machine keep up with.
const PACE: Duration = Duration::from_millis(10);
/// Notifications accepted while the database is down, at least, per outage.
const DURING_OUTAGE: usize = 40;
/// Stops the stream if the outages take far longer than expected, before a device's inbox
/// could reach `inbox.max_per_device` (100) and trim.
const MAX_STREAM: usize = 80 * DEVICES;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_herald_reconnects_and_nothing_is_lost() {
    let pg = PrivatePg::start().await;
    let url = pg.url();
    let w = harness::World::start_with(harness::Backend::Rabbit, |s| {
        s.gateway.ping_interval = Duration::from_secs(10);
        s.gateway.pong_timeout = Duration::from_secs(10);
        s.inbox.url = Secret::new(url.clone());
        // A store against a stopped server fails within a second (and is retried) instead
        // of holding a dispatcher slot for the default 5 s.
        s.inbox.connect_timeout = Duration::from_secs(1);
        // Retries every 100-400 ms (the harness's) for as long as an outage could last
        // here: a failed store is retried like a provider's 503, and after
        // retry.max_attempts it would be dead-lettered (reported, not lost: asserted
        // below not to happen).
        s.retry.max_attempts = 1_000;
    })
    .await;
    let w = World { w, db: None };

    // The stream: one notification every PACE, round robin over the devices, until
    // `done`. Accepted ids per device, in accepted order.
    let accepted: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let done = CancellationToken::new();
    let stream = {
        let (w, accepted, done) = (&w, accepted.clone(), done.clone());
        async move {
            let mut tick = tokio::time::interval(PACE);
            for i in 0..MAX_STREAM {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = done.cancelled() => return,
                }
                let id = w.notify_offline(&format!("pg-{}", i % DEVICES), i).await;
                accepted.lock().unwrap().push((i % DEVICES, id));
            }
            panic!("the outages did not end within {MAX_STREAM} notifications");
        }
    };
    let n_accepted = || accepted.lock().unwrap().len();
    let control = async {
        let mut outages = Vec::new();
        for mode in ["fast", "immediate"] {
            // Some writes land before each stop.
            let before = w.metric("herald_inbox_writes_total");
            wait_for(
                Duration::from_secs(30),
                "inbox writes before the stop",
                || async { (w.metric("herald_inbox_writes_total") >= before + 50.0).then_some(()) },
            )
            .await;
            let failures = w.metric("herald_inbox_store_failures_total");
            pg.stop_server(mode).await;
            let accepted_at_stop = n_accepted();
            // Down: stores fail (the dispatcher sees it) while the API keeps accepting.
            wait_for(
                Duration::from_secs(30),
                "store failures and notifications accepted while down",
                || async {
                    (w.metric("herald_inbox_store_failures_total") >= failures + 3.0
                        && n_accepted() >= accepted_at_stop + DURING_OUTAGE)
                        .then_some(())
                },
            )
            .await;
            let down_writes = w.metric("herald_inbox_writes_total");
            pg.start_server().await;
            // Up again: herald writes again without being told (its pool reconnects).
            wait_for(
                Duration::from_secs(30),
                "inbox writes after the restart",
                || async {
                    (w.metric("herald_inbox_writes_total") >= down_writes + 50.0).then_some(())
                },
            )
            .await;
            outages.push((
                mode,
                w.metric("herald_inbox_store_failures_total") - failures,
            ));
        }
        done.cancel();
        outages
    };
    let ((), outages) = tokio::join!(stream, control);
    let accepted = accepted.lock().unwrap().clone();
    eprintln!(
        "{} notifications accepted; store failures per outage: {outages:?}",
        accepted.len()
    );

    // Everything accepted is in the inbox, each (device, id) once, and nothing is left on
    // the work or retry queues, nothing dead-lettered.
    let want = accepted.len() as i64;
    wait_for(
        Duration::from_secs(60),
        "every accepted notification in the inbox",
        || async {
            let (rows, distinct) = inbox_rows(&url).await?;
            assert_eq!(rows, distinct, "a (device, id) stored twice");
            (rows == want).then_some(())
        },
    )
    .await;
    w.w.wait_settled().await;
    assert!(w.w.hook.of("dead_lettered").is_empty());
    assert_eq!(w.metric("herald_dead_letters_total"), 0.0);
    assert_eq!(w.metric("herald_inbox_dropped_total"), 0.0);

    // Each device replays exactly its notifications, in accepted order.
    let mut acked = 0;
    let mut per_device: HashMap<usize, Vec<String>> = HashMap::new();
    for (d, id) in &accepted {
        per_device.entry(*d).or_default().push(id.clone());
    }
    for d in 0..DEVICES {
        let want = per_device.remove(&d).unwrap_or_default();
        let (mut ws, hello) = gw::connect(&w.w.app, &format!("pg-{d}")).await;
        assert_eq!(hello["type"], "hello");
        let mut got = Vec::new();
        let mut last_accepted = 0;
        while got.len() < want.len() {
            let v = gw::next_json(&mut ws).await;
            if v["type"] != "notification" {
                continue;
            }
            let at = v["accepted_at_ms"].as_u64().unwrap();
            assert!(at >= last_accepted, "replayed out of accepted order");
            last_accepted = at;
            let id = v["id"].as_str().unwrap().to_owned();
            gw::send_json(&mut ws, json!({"type": "ack", "id": id})).await;
            got.push(id);
        }
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "pg-{d}: an id replayed twice");
        assert_eq!(
            unique,
            want.iter().collect::<HashSet<_>>(),
            "pg-{d}: replayed a different set than accepted"
        );
        // The session stays until its acks deleted the rows (a session that ends first
        // leaves them for the next one: a duplicate, never a loss).
        acked += got.len();
        w.wait_acked(acked).await;
    }
    // The acks deleted every row.
    wait_for(Duration::from_secs(30), "acked rows deleted", || async {
        (inbox_rows(&url).await? == (0, 0)).then_some(())
    })
    .await;
    w.stop().await;
    drop(pg);
}
