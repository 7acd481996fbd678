//! What APNs and FCM share: the HTTP/2 client per the endpoint scheme rules, the bulkhead
//! (bounded concurrency plus circuit breaker) every send goes through, and `Retry-After`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::ProviderOutcome;
use super::breaker::{Admission, CircuitBreaker, Transition};
use crate::config::ProviderLimits;

/// HTTP/2 keepalive ping period. Apple asks that connections stay open rather than be
/// re-established per burst; a ping every minute keeps NATs and load balancers from dropping
/// an idle connection and tells a dead one before the next request pays for it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// A keepalive ping unanswered this long closes the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// TCP + TLS connect deadline, apart from the whole-request timeout: a provider that does not
/// even accept connections should fail fast and count toward the circuit breaker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// `check_url` lives in config (it checks settings; config must not import providers).
pub use crate::config::check_url;

/// One provider's own client, hence its own connection pool.
///
/// Both schemes speak HTTP/2 only (`http2_prior_knowledge`): over TLS that makes reqwest offer
/// ALPN `h2` alone, so an endpoint that cannot do HTTP/2 fails loudly at connect instead of
/// silently downgrading (APNs refuses HTTP/1.1 anyway); over `http://` it is cleartext h2 with
/// prior knowledge, which is what the test doubles speak. Every request of a provider is a
/// stream on one multiplexed connection per host.
pub(crate) fn http_client(
    ca_key: &str,
    ca_file: &str,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT.min(timeout))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")));
    if !ca_file.is_empty() {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("{ca_key}: cannot read {ca_file}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{ca_key}: {ca_file} is not a PEM certificate bundle"))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "{ca_key}: {ca_file} holds no certificate"
        );
        // Added to the system roots, not instead of them.
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .with_context(|| format!("building the HTTP/2 client (check {ca_key})"))
}

/// `Retry-After` as seconds or an HTTP date.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// A provider's answer, read whole: status, Retry-After, body.
pub(crate) struct Reply {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: bytes::Bytes,
}

/// Sends one request and reads the whole answer, timing it into
/// `herald_provider_request_duration_seconds{provider}` (failures included).
pub(crate) async fn send_timed(
    metrics: &crate::metrics::Metrics,
    provider: &str,
    req: reqwest::RequestBuilder,
) -> Result<Reply, reqwest::Error> {
    let started = std::time::Instant::now();
    let result = async {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let body = resp.bytes().await?;
        Ok(Reply {
            status,
            retry_after,
            body,
        })
    }
    .await;
    metrics
        .provider_duration
        .with_label_values(&[provider])
        .observe(started.elapsed().as_secs_f64());
    result
}

/// A transport error as an outcome. Every one of them is transient (timeouts, refused or
/// reset connections, a stream reset mid-answer) except a request reqwest could not even
/// build. The URL is stripped: it holds the device token.
pub(crate) fn transport_error(provider: &str, e: reqwest::Error) -> ProviderOutcome {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else {
        "transport error"
    };
    let builder = e.is_builder();
    let detail = error_chain(&e.without_url());
    if builder {
        return ProviderOutcome::ConfigError {
            reason: format!("{provider}: cannot build the request: {detail}"),
        };
    }
    ProviderOutcome::Transient {
        reason: format!("{provider} {kind}: {detail}"),
        retry_after: None,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// A provider's bulkhead: at most `concurrency` sends in flight (a slow provider holds its
/// own slots, never another provider's), and a circuit breaker in front of them.
pub(crate) struct Bulkhead {
    provider: &'static str,
    slots: Arc<Semaphore>,
    concurrency: usize,
    /// How long a send waits for a free slot before it is answered "transient": a provider
    /// whose every slot is stuck should push work back to the retry queue, not pile it up.
    slot_wait: Duration,
    breaker: Mutex<CircuitBreaker>,
}

impl Bulkhead {
    pub(crate) fn new(provider: &'static str, limits: ProviderLimits) -> Self {
        Bulkhead {
            provider,
            slots: Arc::new(Semaphore::new(limits.concurrency)),
            concurrency: limits.concurrency,
            slot_wait: limits.timeout,
            breaker: Mutex::new(CircuitBreaker::new(
                limits.breaker_failures,
                limits.breaker_cooldown,
            )),
        }
    }

    /// Runs `send` inside the bulkhead, unless the circuit is open.
    pub(crate) async fn run<F>(&self, send: F) -> ProviderOutcome
    where
        F: Future<Output = ProviderOutcome>,
    {
        let admission = self.lock().admit(Instant::now());
        let probe = match admission {
            Admission::Rejected { retry_after } => {
                return ProviderOutcome::Transient {
                    reason: "circuit open".into(),
                    retry_after: Some(retry_after),
                };
            }
            Admission::Allowed { probe } => probe,
        };
        // From here on the admission must be reported, also if this future is dropped.
        let mut report = Report {
            bulkhead: self,
            probe,
            done: false,
        };
        let outcome = match tokio::time::timeout(self.slot_wait, self.slots.acquire()).await {
            Ok(Ok(_permit)) => send.await,
            Ok(Err(_closed)) => unreachable!("the semaphore is never closed"),
            Err(_) => {
                // Not the provider's failure: do not count it.
                return ProviderOutcome::Transient {
                    reason: format!(
                        "{}: all {} concurrency slots busy for {:?}",
                        self.provider, self.concurrency, self.slot_wait
                    ),
                    retry_after: None,
                };
            }
        };
        report.done = true;
        let failed = matches!(outcome, ProviderOutcome::Transient { .. });
        let transition = self.lock().record(Instant::now(), probe, failed);
        match transition {
            Transition::Opened => tracing::warn!(
                provider = self.provider,
                "circuit opened: provider keeps failing; sends are deferred until a probe succeeds"
            ),
            Transition::Closed => {
                tracing::info!(provider = self.provider, "circuit closed: provider is back")
            }
            Transition::None => {}
        }
        outcome
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitBreaker> {
        // The breaker's methods cannot panic midway, so a poisoned lock still holds a
        // consistent state.
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Gives an admitted probe back if the send is dropped before it has a result.
struct Report<'a> {
    bulkhead: &'a Bulkhead,
    probe: bool,
    done: bool,
}

impl Drop for Report<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.bulkhead.lock().abandon(self.probe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(300));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(290) && d <= Duration::from_secs(300),
            "{d:?}"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn urls_follow_the_scheme_rules() {
        assert_eq!(
            check_url("k", "https://api.example.com/", false).unwrap(),
            "https://api.example.com"
        );
        assert!(check_url("k", "http://127.0.0.1:9", false).is_ok());
        let err = check_url("apns.endpoint", "ftp://x", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("apns.endpoint"), "{err}");
        // Cleartext only to loopback, unless the operator allows it.
        for local in ["http://localhost:9", "http://[::1]:9", "http://127.1.2.3"] {
            assert!(check_url("k", local, false).is_ok(), "{local}");
        }
        let err = check_url("fcm.endpoint", "http://fcm.example.com", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("allow_insecure_endpoints"), "{err}");
        assert!(check_url("k", "http://fcm.example.com", true).is_ok());
        assert!(check_url("k", "nonsense", false).is_err());
    }
}
