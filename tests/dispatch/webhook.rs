//! The event webhook's outbound hardening (issue 14): every POST signed the Standard
//! Webhooks way, no redirect followed, Retry-After honoured, cleartext only to loopback, the
//! CA file checked at start-up, and a credential in the URL never printed or logged.
//!
//! The receiver is a real HTTP server on port 0 that records every request (path, headers,
//! body, arrival time) and answers from a script; signatures are checked against the spec's
//! algorithm computed here with hmac + sha2, independently of herald's signer.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use herald::config::{Secret, Settings, SettingsError, Sources};
use herald::events::SigningKey;
use serde_json::{Value, json};

use crate::harness::{APNS_TOKEN, Backend, WEBHOOK_SECRET, World, expected_signature};
use crate::support::apns_double::{json_response, serve_h2};
use crate::support::{API_KEY, wait_for};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
    at: Instant,
}

/// A scripted answer: status and headers.
type Answer = (u16, Vec<(&'static str, String)>);

#[derive(Default)]
struct SinkState {
    seen: Mutex<Vec<Seen>>,
    /// Answers for the next POSTs to /events (status, headers); 200 once empty.
    script: Mutex<VecDeque<Answer>>,
}

/// A webhook receiver: `/events` answers from the script, `/redirect` answers 307 to
/// `/events` (which reqwest would follow with the same POST).
struct Sink {
    base: String,
    state: Arc<SinkState>,
    handle: actix_web::dev::ServerHandle,
}

impl Sink {
    async fn start() -> Sink {
        let state: Arc<SinkState> = Arc::default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let data = web::Data::from(state.clone());
        let target = format!("{base}/events");
        let server = HttpServer::new(move || {
            let target = target.clone();
            App::new().app_data(data.clone()).default_service(web::to(
                move |req: HttpRequest, body: web::Bytes, state: web::Data<SinkState>| {
                    let target = target.clone();
                    async move {
                        state.seen.lock().unwrap().push(Seen {
                            path: req.path().to_owned(),
                            headers: req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap().to_owned())
                                })
                                .collect(),
                            body: body.to_vec(),
                            at: Instant::now(),
                        });
                        if req.path() == "/redirect" {
                            return HttpResponse::TemporaryRedirect()
                                .insert_header(("location", target))
                                .finish();
                        }
                        let (status, headers) = state
                            .script
                            .lock()
                            .unwrap()
                            .pop_front()
                            .unwrap_or((200, Vec::new()));
                        let mut res = HttpResponse::build(
                            actix_web::http::StatusCode::from_u16(status).unwrap(),
                        );
                        for h in headers {
                            res.insert_header(h);
                        }
                        res.finish()
                    }
                },
            ))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Sink {
            base,
            state,
            handle,
        }
    }

    fn then_answer(&self, status: u16, headers: Vec<(&'static str, String)>) {
        self.state
            .script
            .lock()
            .unwrap()
            .push_back((status, headers));
    }

    fn seen(&self, path: &str) -> Vec<Seen> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    async fn wait_requests(&self, path: &str, n: usize) -> Vec<Seen> {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} POSTs to {path}"),
            || async {
                let got = self.seen(path);
                (got.len() >= n).then_some(got)
            },
        )
        .await
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let h = self.handle.clone();
        tokio::spawn(async move { h.stop(false).await });
    }
}

/// A World whose webhook is `url` on our sink, signed with the harness key, retried fast.
async fn world_posting_to(url: String, tweak: impl FnOnce(&mut Settings)) -> World {
    World::start_with(Backend::Memory, |s| {
        s.events.webhook_url = Secret::new(url);
        s.events.webhook_backoff_min = Duration::from_millis(10);
        s.events.webhook_backoff_max = Duration::from_millis(20);
        tweak(s);
    })
    .await
}

fn one_apns_target() -> Value {
    json!({"targets": [{"device_id": "ios-1", "apns": {"token": APNS_TOKEN}}], "data": {"k": "v"}})
}

#[tokio::test]
async fn every_post_is_signed_and_a_retry_keeps_its_id() {
    let sink = Sink::start().await;
    sink.then_answer(500, Vec::new());
    let w = world_posting_to(format!("{}/events", sink.base), |_| {}).await;
    let id = w.notify(one_apns_target()).await;
    let posts = sink.wait_requests("/events", 2).await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for post in &posts {
        let h = &post.headers;
        let (msg_id, ts) = (&h["webhook-id"], &h["webhook-timestamp"]);
        assert!(
            msg_id.starts_with("msg_") && !msg_id.contains('.'),
            "{msg_id}"
        );
        // A receiver rejects timestamps outside its tolerance (the spec suggests 5 min).
        assert!(
            now.abs_diff(ts.parse::<u64>().unwrap()) < 300,
            "{ts} vs {now}"
        );
        let expected = expected_signature(WEBHOOK_SECRET, msg_id, ts, &post.body);
        assert!(
            h["webhook-signature"].split(' ').any(|s| s == expected),
            "signature {} is not {expected}",
            h["webhook-signature"]
        );
        assert_eq!(h["content-type"], "application/json");
        let events: Value = serde_json::from_slice(&post.body).unwrap();
        assert_eq!(events[0]["notification_id"], id.as_str());
    }
    assert_eq!(
        posts[0].headers["webhook-id"], posts[1].headers["webhook-id"],
        "the retry of a batch keeps its id, so the receiver can dedupe"
    );
    // A tampered body does not verify.
    let post = &posts[1];
    let mut forged = post.body.clone();
    forged.extend_from_slice(b" ");
    assert_ne!(
        post.headers["webhook-signature"],
        expected_signature(
            WEBHOOK_SECRET,
            &post.headers["webhook-id"],
            &post.headers["webhook-timestamp"],
            &forged
        )
    );
    w.stop().await;
}

#[test]
fn the_signer_matches_the_standard_webhooks_test_vector() {
    // From the Standard Webhooks reference libraries' tests ("sign function works").
    let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    assert_eq!(
        key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    assert!(!format!("{key:?}").contains("MfKQ"), "Debug hides the key");
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let sink = Sink::start().await;
    let w = world_posting_to(format!("{}/redirect", sink.base), |s| {
        s.events.webhook_attempts = 2
    })
    .await;
    w.notify(one_apns_target()).await;
    wait_for(
        Duration::from_secs(10),
        "the batch dropped after 2 redirected attempts",
        || async {
            (w.metric("herald_events_dropped_total{reason=\"failed\",sink=\"webhook\"}") == 1.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(sink.seen("/redirect").len(), 2);
    assert!(
        sink.seen("/events").is_empty(),
        "the redirect's target got nothing"
    );
    w.stop().await;
}

#[tokio::test]
async fn retry_after_on_429_and_503_is_honoured() {
    let sink = Sink::start().await;
    sink.then_answer(429, vec![("retry-after", "1".into())]);
    sink.then_answer(503, vec![("retry-after", "1".into())]);
    // The backoff alone would retry within 20 ms.
    let w = world_posting_to(format!("{}/events", sink.base), |_| {}).await;
    w.notify(one_apns_target()).await;
    let posts = sink.wait_requests("/events", 3).await;
    for pair in posts.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_secs(1),
            "retried {gap:?} after a Retry-After of 1s"
        );
    }
    wait_for(Duration::from_secs(5), "the batch published", || async {
        (w.metric("herald_events_published_total{sink=\"webhook\"}") == 1.0).then_some(())
    })
    .await;
    w.stop().await;
}

#[tokio::test]
async fn an_https_receiver_behind_a_private_ca_is_trusted_through_ca_file() {
    let got: Arc<Mutex<usize>> = Arc::default();
    let server = serve_h2(true, {
        let got = got.clone();
        move |_req| {
            *got.lock().unwrap() += 1;
            async { json_response(200, &json!({}), &[]) }
        }
    })
    .await;
    let ca_file = server.ca_file.clone().unwrap();
    let url = format!("{}/events", server.url);
    let dropped = "herald_events_dropped_total{reason=\"failed\",sink=\"webhook\"}";
    let published = "herald_events_published_total{sink=\"webhook\"}";

    // Without the CA the receiver's certificate is refused: nothing arrives.
    let w = world_posting_to(url.clone(), |s| s.events.webhook_attempts = 1).await;
    w.notify(one_apns_target()).await;
    wait_for(Duration::from_secs(10), "the batch dropped", || async {
        (w.metric(dropped) == 1.0).then_some(())
    })
    .await;
    assert_eq!(*got.lock().unwrap(), 0);
    w.stop().await;

    // With events.ca_file it is trusted.
    let w = world_posting_to(url, |s| {
        s.events.ca_file = ca_file.to_str().unwrap().to_owned()
    })
    .await;
    w.notify(one_apns_target()).await;
    wait_for(Duration::from_secs(10), "the batch published", || async {
        (w.metric(published) == 1.0).then_some(())
    })
    .await;
    assert_eq!(*got.lock().unwrap(), 1);
    w.stop().await;
}

fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load(Sources {
        env_vars: Some(
            vars.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Sources::default()
    })
}

const URL_VAR: &str = "HERALD__EVENTS__WEBHOOK_URL";
const SECRET_VAR: &str = "HERALD__EVENTS__WEBHOOK_SECRET";

#[test]
fn cleartext_to_a_remote_host_and_unsigned_webhooks_are_refused_at_config_time() {
    let err = load(&[
        (URL_VAR, "http://herald:hunter2@hooks.example.com/in"),
        (SECRET_VAR, WEBHOOK_SECRET),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("events.webhook_url") && err.contains("http://"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the error repeats the URL: {err}");
    for ok in [
        "https://hooks.example.com/in",
        "http://127.0.0.1:9/in",
        "http://[::1]:9/in",
        "http://localhost:9/in",
    ] {
        load(&[(URL_VAR, ok), (SECRET_VAR, WEBHOOK_SECRET)])
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // A URL without a key, and keys that are not whsec_<base64 of 24..64 bytes>.
    let short = format!("whsec_{}", BASE64.encode([7u8; 16]));
    for secret in [
        None,
        Some("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        Some(&*short),
    ] {
        let mut vars = vec![(URL_VAR, "https://hooks.example.com/in")];
        vars.extend(secret.map(|s| (SECRET_VAR, s)));
        let err = load(&vars).unwrap_err().to_string();
        assert!(err.contains("events.webhook_secret"), "{secret:?}: {err}");
        assert!(
            !err.contains("MfKQ9r8G"),
            "the error repeats the key: {err}"
        );
    }
}

#[test]
fn a_bad_ca_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    for (file, why) in [(&junk, "holds no certificate"), (&missing, "cannot read")] {
        let err = load(&[("HERALD__EVENTS__CA_FILE", file.to_str().unwrap())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("events.ca_file") && err.contains(why),
            "{}: {err}",
            file.display()
        );
    }
    let cert = rcgen::generate_simple_self_signed(vec!["hooks.internal".into()]).unwrap();
    let good = dir.path().join("ca.pem");
    std::fs::write(&good, cert.cert.pem()).unwrap();
    load(&[
        ("HERALD__EVENTS__CA_FILE", good.to_str().unwrap()),
        (URL_VAR, "https://hooks.internal/in"),
        (SECRET_VAR, WEBHOOK_SECRET),
    ])
    .expect("a PEM CA loads");
}

/// The herald binary with a clean environment for its settings: no overlay, no HERALD__*.
fn herald(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.args(args)
        .env_remove("HERALD_ENV")
        .env_remove("RUST_LOG")
        .current_dir(std::env::temp_dir());
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[tokio::test]
async fn a_credential_in_the_url_is_never_printed_or_logged() {
    const LEAKS: [&str; 2] = ["hunter2", "s3cr3t-token"];
    // check-config prints the effective settings.
    let out = herald(&["check-config"])
        .env(
            URL_VAR,
            "https://herald:hunter2@hooks.example.com/in?token=s3cr3t-token",
        )
        .env(SECRET_VAR, WEBHOOK_SECRET)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("webhook_url"), "{printed}");
    for leak in LEAKS.iter().chain(&["MfKQ9r8G"]) {
        assert!(!printed.contains(leak), "check-config printed {leak}");
    }

    // serve, with a webhook that refuses connections: the error is logged, the URL is not.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = herald(&["serve"])
        .env(
            URL_VAR,
            format!("http://herald:hunter2@{closed}/in?token=s3cr3t-token"),
        )
        .env(SECRET_VAR, WEBHOOK_SECRET)
        .env("HERALD__EVENTS__WEBHOOK_ATTEMPTS", "2")
        .env("HERALD__EVENTS__WEBHOOK_BACKOFF_MIN", "10ms")
        .env("HERALD__EVENTS__WEBHOOK_BACKOFF_MAX", "20ms")
        .env("HERALD__EVENTS__WEBHOOK_FLUSH", "10ms")
        .env("HERALD__HTTP__ADDR", "127.0.0.1:0")
        .env("HERALD__HTTP__WORKERS", "1")
        .env("HERALD__AUTH__API_KEYS", API_KEY)
        .env("HERALD__LOG__FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = std::thread::spawn({
        let (stderr, lines) = (child.stderr.take().unwrap(), lines.clone());
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        }
    });
    let log_has = |what: &str| lines.lock().unwrap().iter().any(|l| l.contains(what));
    let addr = wait_for(Duration::from_secs(20), "herald listening", || async {
        lines.lock().unwrap().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["fields"]["message"] == "herald listening")
                .then(|| v["fields"]["addr"].as_str().unwrap().to_owned())
        })
    })
    .await;
    // An APNs token with APNs not configured: dead-lettered at once, one event.
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/v1/notify"))
        .bearer_auth(API_KEY)
        .json(&one_apns_target())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    wait_for(Duration::from_secs(20), "both attempts logged", || async {
        (lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("event webhook unreachable"))
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    assert!(log_has("error sending request"), "the cause is logged");
    for leak in LEAKS {
        assert!(
            !log_has(leak),
            "the log holds {leak}:\n{}",
            lines.lock().unwrap().join("\n")
        );
    }
}
