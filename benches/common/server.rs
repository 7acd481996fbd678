//! A `herald serve` child process for benchmarks: the real release binary, configured by
//! environment variables, on a free loopback port; killed on drop.
#![allow(dead_code)]

use std::process::Command;

use std::time::Duration;

pub const KEY: &str = "bench-api-key-0123456789";

pub struct Server {
    pub child: std::process::Child,
    pub base: String,
    pub addr: String,
}

impl Server {
    /// Starts herald with `env` on top of a known API key and quiet logs, and waits until
    /// `/readyz` answers 200.
    pub async fn start(env: &[(&str, String)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        // HERALD_BENCH_BIN runs another build of herald (e.g. the one before a change) under
        // the same bench and load generator, for a before/after in one sitting.
        let bin = std::env::var("HERALD_BENCH_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_herald").to_owned());
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .env("HERALD__HTTP__ADDR", &addr)
            .env("HERALD__AUTH__API_KEYS", KEY)
            .env("HERALD__LOG__LEVEL", "error")
            // Every bench device connects from loopback, far faster than the admission
            // limits meant for the internet allow (per source address, per node); a bench
            // that measures admission sets its own in `env`, applied after these.
            .env("HERALD__GATEWAY__MAX_SESSION_RATE", "1000000")
            .env("HERALD__GATEWAY__SESSION_BURST", "1000000")
            .env("HERALD__GATEWAY__IP_CONNECTS_PER_SECOND", "1000000")
            .env("HERALD__GATEWAY__IP_CONNECT_BURST", "1000000")
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("herald starts");
        let base = format!("http://{addr}");
        let client = reqwest::Client::new();
        for _ in 0..200 {
            let ready = client.get(format!("{base}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return Server { child, base, addr };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("herald did not become ready");
    }
}

/// CPU time (user + system) a process has used so far, from /proc/<pid>/stat.
pub fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is the first, utime and stime (fields 14 and 15 of the line) the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway RabbitMQ vhost for one bench run, deleted (with everything in it) on drop.
pub struct BenchVhost {
    pub name: String,
    pub url: String,
}

fn rabbitmqctl(args: &[&str]) {
    let ok = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "rabbitmqctl {args:?}");
}

impl BenchVhost {
    pub fn new(label: &str) -> BenchVhost {
        let name = format!("herald-bench-{label}-{}", std::process::id());
        rabbitmqctl(&["add_vhost", &name]);
        rabbitmqctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        let url = format!("amqp://guest:guest@127.0.0.1:5672/{name}");
        BenchVhost { name, url }
    }

    /// Declares what a dispatcher with the default prefix and retry settings declares when
    /// it connects, for a bench that runs an api-only process (it declares nothing and is
    /// not ready until the work exchange exists).
    pub async fn declare_dispatcher_topology(&self) {
        let conn = lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
            .await
            .expect("connect to the bench vhost");
        let ch = conn.create_channel().await.unwrap();
        let s = herald::config::Settings::defaults();
        herald::queue::Topology::new(&s.queue.prefix, &s.retry, &s.app_ids())
            .declare(&ch)
            .await
            .expect("declare the work topology");
        herald::directory::cluster::declare_exchanges(&ch, &s.queue.prefix)
            .await
            .expect("declare the directory's exchanges");
        let _ = conn.close(200, "declared".into()).await;
    }
}

impl Drop for BenchVhost {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

/// Context switches (voluntary + involuntary) summed over every thread of a process, from
/// /proc/<pid>/task/*/status: each thread hand-off (a task woken on another thread, a
/// thread parked on a futex) is one. Unlike CPU time, the count per message barely moves
/// when other processes load the machine, so it compares runs on a shared box.
pub fn context_switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches")
                        || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The broker's own socket counters for the connection whose name contains `name`:
/// (socket reads, socket writes) so far, from `rabbitmqctl list_connections`. Reads per
/// published message say how well the client coalesces its publishes (one read can carry
/// many); writes per message say how well the broker can batch its confirms. Both are the
/// broker's own view, untouched by other load on the machine.
pub fn broker_socket_counts(vhost: &str, name: &str) -> (u64, u64) {
    // `name` in rabbitmqctl is the peer address; the client-given connection name is in
    // client_properties (printed last, so its tabs and spaces do not shift the columns).
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "--no-table-headers",
            "vhost",
            "recv_cnt",
            "send_cnt",
            "client_properties",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let f: Vec<&str> = line.splitn(4, '\t').collect();
        if f.len() == 4 && f[0] == vhost && f[3].contains(name) {
            return (
                f[1].trim().parse().unwrap_or(0),
                f[2].trim().parse().unwrap_or(0),
            );
        }
    }
    (0, 0)
}
