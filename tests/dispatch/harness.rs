//! A herald with every role, pointed at provider doubles, a webhook that records events, and
//! one of the two queue backends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use herald::config::Settings;
use serde_json::Value;

use crate::gw;
use crate::support::apns_double::ApnsDouble;
use crate::support::fcm_double::FcmDouble;
use crate::support::{API_KEY, TestVhost, wait_for};

/// The dispatch tests' webhook signing key (24 bytes of base64, the spec's minimum).
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The Standard Webhooks symmetric signature (`v1,<base64>`) of `body` under `secret`
/// (`whsec_<base64 key>`), computed here from the spec's definition, independently of
/// herald's signer.
pub fn expected_signature(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use hmac::{KeyInit as _, Mac as _};
    let key = BASE64
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Whether `post` carries a valid signature under `secret`.
pub fn signed_with(post: &Post, secret: &str) -> bool {
    let h = &post.headers;
    let (Some(id), Some(ts), Some(sigs)) = (
        h.get("webhook-id"),
        h.get("webhook-timestamp"),
        h.get("webhook-signature"),
    ) else {
        return false;
    };
    let expected = expected_signature(secret, id, ts, &post.body);
    sigs.split(' ').any(|s| s == expected)
}

pub const APNS_TOKEN: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Memory,
    Rabbit,
}

/// One POST the webhook accepted: its headers (lower-case names) and raw body.
#[derive(Clone, Debug)]
pub struct Post {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// What the webhook server shares: the events received, the accepted POSTs, and POSTs
/// still to refuse.
type Sink = (
    Arc<Mutex<Vec<Value>>>,
    Arc<Mutex<Vec<Post>>>,
    Arc<AtomicUsize>,
);

/// Records every event POSTed to it.
pub struct Webhook {
    pub url: String,
    events: Arc<Mutex<Vec<Value>>>,
    posts: Arc<Mutex<Vec<Post>>>,
    /// POSTs still to refuse with 500 before accepting again.
    failing: Arc<AtomicUsize>,
    handle: actix_web::dev::ServerHandle,
}

impl Webhook {
    pub async fn start() -> Webhook {
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let failing: Arc<AtomicUsize> = Arc::default();
        let sink = web::Data::new((events.clone(), posts.clone(), failing.clone()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/events", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            App::new().app_data(sink.clone()).route(
                "/events",
                web::post().to(
                    |sink: web::Data<Sink>, req: HttpRequest, body: web::Bytes| async move {
                        let (events, posts, failing) = &**sink;
                        let refuse = failing
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                        if refuse {
                            return HttpResponse::InternalServerError().finish();
                        }
                        let Ok(batch) = serde_json::from_slice::<Vec<Value>>(&body) else {
                            return HttpResponse::BadRequest().finish();
                        };
                        events.lock().unwrap().extend(batch);
                        posts.lock().unwrap().push(Post {
                            headers: req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                })
                                .collect(),
                            body: body.to_vec(),
                        });
                        HttpResponse::Ok().finish()
                    },
                ),
            )
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Webhook {
            url,
            events,
            posts,
            failing,
            handle,
        }
    }

    /// Every POST accepted so far, with its headers and raw body.
    pub fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// Refuse the next `n` POSTs with 500.
    pub fn fail_next(&self, n: usize) {
        self.failing.store(n, Ordering::SeqCst);
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Events of one type.
    pub fn of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["type"] == kind)
            .collect()
    }

    /// Waits until `n` events of `kind` arrived.
    pub async fn wait(&self, kind: &str, n: usize) -> Vec<Value> {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} {kind} events"),
            || async {
                let got = self.of(kind);
                (got.len() >= n).then_some(got)
            },
        )
        .await
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let h = self.handle.clone();
        tokio::spawn(async move { h.stop(false).await });
    }
}

pub struct World {
    pub app: gw::GwApp,
    pub queue: herald::queue::Queue,
    pub http: reqwest::Client,
    pub apns: ApnsDouble,
    pub fcm: FcmDouble,
    pub hook: Webhook,
    pub vhost: Option<TestVhost>,
}

/// Settings for dispatch tests: short heartbeat and ack timeouts (from the gateway
/// helpers), retries every 100-400 ms, 3 attempts.
/// A subscriber's own queue `queue` on the `herald.events` exchange, bound with `key`, as
/// guest on the vhost at `url` (herald declared the exchange). Keep the connection: the
/// queue lives on.
pub async fn bind_events_queue(
    url: &str,
    queue: &str,
    key: &str,
) -> (lapin::Connection, lapin::Channel) {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.into(),
        "herald.events".into(),
        key.into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

pub fn base_settings() -> Settings {
    let mut s = gw::settings();
    s.retry.base_delay = Duration::from_millis(100);
    s.retry.max_delay = Duration::from_millis(400);
    s.retry.max_attempts = 3;
    s.events.webhook_flush = Duration::from_millis(20);
    s
}

impl World {
    pub async fn start(backend: Backend) -> World {
        Self::start_with(backend, |_| {}).await
    }

    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> World {
        let apns = ApnsDouble::start().await;
        let fcm = FcmDouble::start().await;
        let hook = Webhook::start().await;
        let vhost = matches!(backend, Backend::Rabbit).then(TestVhost::new);
        let mut s = match &vhost {
            Some(v) => {
                let mut s = base_settings();
                s.queue.url = v.settings().queue.url;
                s
            }
            None => base_settings(),
        };
        apns.configure(&mut s);
        fcm.configure(&mut s);
        s.events.webhook_url = herald::config::Secret::new(hook.url.clone());
        // Every webhook is signed (a URL without a key is refused); tests/dispatch/webhook.rs
        // checks the signatures.
        s.events.webhook_secret = herald::config::Secret::new(WEBHOOK_SECRET);
        tweak(&mut s);
        let app = gw::spawn(s).await;
        let queue = app.queue.clone();
        assert!(
            queue.wait_connected(Duration::from_secs(10)).await,
            "queue connected"
        );
        // Ready as an operator would see it: on RabbitMQ the cluster directory's replica
        // syncs for up to one node lease first, and a notification with a short ttl sent
        // before then could expire waiting for it.
        let readyz = format!("{}/readyz", app.base);
        wait_for(Duration::from_secs(10), "/readyz 200", || {
            let readyz = readyz.clone();
            async move {
                let r = reqwest::get(&readyz).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        World {
            app,
            queue,
            http: reqwest::Client::new(),
            apns,
            fcm,
            hook,
            vhost,
        }
    }

    /// POSTs a notification; returns its id.
    pub async fn notify(&self, body: Value) -> String {
        let res = self
            .http
            .post(format!("{}/v1/notify", self.app.base))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
        res.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.app.metric(series)
    }

    pub fn deliveries(&self, channel: &str, outcome: &str) -> f64 {
        self.metric(&format!(
            "herald_deliveries_total{{channel=\"{channel}\",outcome=\"{outcome}\"}}"
        ))
    }

    /// Waits until the dispatcher settled everything: nothing held by the work queue.
    pub async fn wait_settled(&self) {
        match &self.vhost {
            None => {
                wait_for(Duration::from_secs(20), "embedded queue empty", || async {
                    (self.metric("herald_queue_depth") == 0.0).then_some(())
                })
                .await
            }
            Some(v) => {
                wait_for(
                    Duration::from_secs(20),
                    "work and retry queues empty",
                    || async {
                        let out = crate::support::rabbitmqctl(&[
                            "list_queues",
                            "-p",
                            &v.name,
                            "name",
                            "messages",
                        ]);
                        out.lines()
                            .filter(|l| {
                                l.starts_with("herald.work") || l.starts_with("herald.retry")
                            })
                            .all(|l| l.ends_with("\t0"))
                            .then_some(())
                    },
                )
                .await
            }
        }
    }

    pub async fn stop(self) {
        self.app.stop().await;
    }
}
