//! APNs: token (.p8) authentication, the HTTP/2 transport, and Apple's answers classified.
//!
//! Not a2: a2 0.10 only talks to Apple's two fixed hosts through its own built-in roots, so it
//! cannot be pointed at a private endpoint or at the test doubles, which the design requires
//! ("endpoint production / sandbox / any URL"). The protocol is one POST per notification.

mod jwt;
mod payload;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};

pub use jwt::REFRESH_AFTER as JWT_REFRESH_AFTER;
pub use payload::{MAX_PAYLOAD_BYTES, payload, payload_size};

use super::ProviderOutcome;
use super::transport::{Bulkhead, check_url, http_client, send_timed, transport_error};
use crate::config::ApnsSettings;
use crate::domain::{
    ApnsEnvironment, ApnsPushType, ApnsRoute, ApnsToken, Priority, QueuedNotification,
};
use crate::metrics::Metrics;

pub const PRODUCTION: &str = "https://api.push.apple.com";
pub const SANDBOX: &str = "https://api.sandbox.push.apple.com";

/// An APNs sender for one app: its own connection pool, bulkhead and provider token, and an
/// endpoint per environment. One .p8 key signs for both: Apple's provider tokens are not
/// tied to an environment.
pub struct ApnsClient {
    http: reqwest::Client,
    production: Endpoint,
    sandbox: Endpoint,
    default_environment: ApnsEnvironment,
    /// `apns.topic`, as the `apns-topic` header of a notification that does not set its own.
    topic: HeaderValue,
    jwt: jwt::ProviderToken,
    bulkhead: Bulkhead,
    metrics: Metrics,
}

impl ApnsClient {
    /// `None` when APNs is not configured (`apns.key_file` empty). Errors name the key.
    pub fn from_settings(s: &ApnsSettings, metrics: &Metrics) -> anyhow::Result<Option<Self>> {
        Self::for_app(s, "", metrics)
    }

    /// As [`ApnsClient::from_settings`] for an app whose keys start with `prefix`
    /// (`apps.shop.`; empty for `default`), so errors name the key as written.
    pub fn for_app(
        s: &ApnsSettings,
        prefix: &str,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Self>> {
        if s.key_file.is_empty() {
            return Ok(None);
        }
        for (key, value) in [
            ("key_id", &s.key_id),
            ("team_id", &s.team_id),
            ("topic", &s.topic),
        ] {
            anyhow::ensure!(
                !value.trim().is_empty(),
                "{prefix}apns.{key} must be set when {prefix}apns.key_file is"
            );
        }
        // The error names the file, never its contents.
        let pem = std::fs::read(&s.key_file)
            .with_context(|| format!("{prefix}apns.key_file: cannot read {}", s.key_file))?;
        let jwt = jwt::ProviderToken::new(&pem, s.key_id.trim(), s.team_id.trim())
            .with_context(|| format!("{prefix}apns.key_file: {}", s.key_file))?;
        let endpoint = |key: &str, value: &str| {
            let key = format!("{prefix}apns.{key}");
            let url = match value {
                "production" => PRODUCTION.to_owned(),
                "sandbox" => SANDBOX.to_owned(),
                url => check_url(&key, url, s.allow_insecure_endpoints)?,
            };
            Endpoint::parse(&key, &url)
        };
        let topic = HeaderValue::try_from(s.topic.trim()).map_err(|_| {
            anyhow::anyhow!(
                "{prefix}apns.topic is not a valid header value (it is the apns-topic header)"
            )
        })?;
        let limits = s.limits();
        Ok(Some(ApnsClient {
            http: http_client(&format!("{prefix}apns.ca_file"), &s.ca_file, limits.timeout)?,
            production: endpoint("endpoint", &s.endpoint)?,
            sandbox: endpoint("sandbox_endpoint", &s.sandbox_endpoint)?,
            default_environment: s.default_environment,
            topic,
            jwt,
            bulkhead: Bulkhead::new("apns", limits),
            metrics: metrics.clone(),
        }))
    }

    /// Re-mint the provider token once it is this old (default [`JWT_REFRESH_AFTER`]).
    /// For tests that cannot wait fifty minutes.
    #[doc(hidden)]
    pub fn with_jwt_refresh_after(mut self, d: Duration) -> Self {
        self.jwt = self.jwt.with_refresh_after(d);
        self
    }

    /// Sends `n` to one device, at its environment's endpoint, and classifies Apple's answer.
    /// `rendered` holds what every target of `n` sends alike (see [`Rendered`]): the first
    /// send renders it, the others reuse it.
    pub async fn send(
        &self,
        route: &ApnsRoute,
        n: &QueuedNotification,
        rendered: &OnceLock<Result<Rendered, String>>,
    ) -> ProviderOutcome {
        let env = route.environment.unwrap_or(self.default_environment);
        let base = match env {
            ApnsEnvironment::Production => &self.production,
            ApnsEnvironment::Sandbox => &self.sandbox,
        };
        let token = &route.token;
        let outcome = match rendered.get_or_init(|| Rendered::of(n)) {
            Ok(r) => {
                self.bulkhead
                    .run(self.send_authenticated(base, token, n, r))
                    .await
            }
            Err(reason) => ProviderOutcome::ConfigError {
                reason: reason.clone(),
            },
        };
        let outcome = explain_environment(outcome, env);
        super::note_outcome(&self.metrics, "apns", n, token, &outcome);
        outcome
    }

    async fn send_authenticated(
        &self,
        base: &Endpoint,
        token: &ApnsToken,
        n: &QueuedNotification,
        rendered: &Rendered,
    ) -> ProviderOutcome {
        let jwt = match self.jwt.get() {
            Ok(j) => j,
            Err(e) => {
                return ProviderOutcome::ConfigError {
                    reason: format!("{e:#}"),
                };
            }
        };
        match self.post(base, token, n, rendered, &jwt).await {
            Answer::ExpiredProviderToken => {
                // Refresh now and retry this one request once. Still expired after that means
                // the clock is off (iat in the future or far past): the next attempt may fare
                // better, so transient.
                self.jwt.invalidate(&jwt);
                let fresh = match self.jwt.get() {
                    Ok(j) => j,
                    Err(e) => {
                        return ProviderOutcome::ConfigError {
                            reason: format!("{e:#}"),
                        };
                    }
                };
                match self.post(base, token, n, rendered, &fresh).await {
                    Answer::ExpiredProviderToken => ProviderOutcome::Transient {
                        reason:
                            "apns 403 ExpiredProviderToken, again after a refresh (check the clock)"
                                .into(),
                        retry_after: None,
                    },
                    Answer::Final(o) => o,
                }
            }
            Answer::Final(o) => o,
        }
    }

    /// One POST. The request is assembled from parts built once where they can be (the
    /// endpoint's parsed URL, the bearer header per minted token, the topic per client, the
    /// body and `apns-id` per message): per target only the path, `apns-expiration` and the
    /// header map are new. Measured in docs/benchmarks.md ("sixth session").
    async fn post(
        &self,
        base: &Endpoint,
        token: &ApnsToken,
        n: &QueuedNotification,
        rendered: &Rendered,
        jwt: &jwt::Bearer,
    ) -> Answer {
        let (push_type, priority) = match n.apns.push_type {
            // Apple: background pushes must go at priority 5 (10 is an error for them).
            ApnsPushType::Background => ("background", "5"),
            ApnsPushType::Alert => (
                "alert",
                match n.priority {
                    Priority::High => "10",
                    Priority::Normal => "5",
                },
            ),
        };
        let now = SystemTime::now();
        // apns-expiration: until when Apple stores and retries an undeliverable notification;
        // the notification's own ttl end, as a UNIX time in seconds.
        let expiration = now.duration_since(UNIX_EPOCH).unwrap_or_default() + n.remaining_ttl(now);
        let mut req = reqwest::Request::new(reqwest::Method::POST, base.url_for(token));
        let headers = req.headers_mut();
        headers.insert(AUTHORIZATION, jwt.header.clone());
        let topic = rendered.topic.as_ref().unwrap_or(&self.topic);
        headers.insert(APNS_TOPIC, topic.clone());
        headers.insert(APNS_PUSH_TYPE, HeaderValue::from_static(push_type));
        headers.insert(APNS_PRIORITY, HeaderValue::from_static(priority));
        headers.insert(APNS_EXPIRATION, HeaderValue::from(expiration.as_secs()));
        // Apple echoes it back and shows it in its delivery logs: the same id as ours.
        headers.insert(APNS_ID, rendered.id.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(k) = &rendered.collapse_id {
            headers.insert(APNS_COLLAPSE_ID, k.clone());
        }
        *req.body_mut() = Some(rendered.body.clone().into());
        let req = reqwest::RequestBuilder::from_parts(self.http.clone(), req);
        let result = send_timed(&self.metrics, "apns", req).await;
        match result {
            Err(e) => Answer::Final(transport_error("apns", e)),
            Ok(reply) => {
                let reason = serde_json::from_slice::<serde_json::Value>(&reply.body)
                    .ok()
                    .and_then(|v| v.get("reason")?.as_str().map(str::to_owned));
                classify(reply.status, reason.as_deref(), reply.retry_after)
            }
        }
    }
}

/// What every target of one notification sends APNs alike: the JSON body, `apns-id`, and
/// the notification's own `apns-topic` and `apns-collapse-id` if it sets them. Rendered
/// once per message by its first APNs target (a 1,000-target notification is serialized
/// once, not 1,000 times) and shared by the rest.
pub struct Rendered {
    body: bytes::Bytes,
    id: HeaderValue,
    /// `apns.topic` of the notification; `None`: the client's.
    topic: Option<HeaderValue>,
    collapse_id: Option<HeaderValue>,
}

impl Rendered {
    fn of(n: &QueuedNotification) -> Result<Rendered, String> {
        let body = serde_json::to_vec(&payload(n))
            .map_err(|e| format!("apns: payload does not serialize: {e}"))?;
        let id = HeaderValue::try_from(n.id.to_string())
            .map_err(|e| format!("apns: the notification id is not a header value: {e}"))?;
        // Both are checked at the API (no control characters or spaces), so this cannot
        // fail for a notification herald accepted; one queued by hand gets a clear error.
        let header = |name: &str, value: &Option<String>| {
            value
                .as_deref()
                .map(HeaderValue::try_from)
                .transpose()
                .map_err(|_| format!("apns: the notification's {name} is not a valid header value"))
        };
        Ok(Rendered {
            body: body.into(),
            id,
            topic: header("apns.topic", &n.apns.topic)?,
            collapse_id: header("collapse_key", &n.collapse_key)?,
        })
    }
}

/// An APNs endpoint, parsed once: each request's URL is this one with its path set.
struct Endpoint {
    url: reqwest::Url,
    /// The endpoint's own path without its trailing `/` (empty for a bare host), which
    /// `/3/device/<token>` follows.
    path: String,
}

impl Endpoint {
    fn parse(key: &str, url: &str) -> anyhow::Result<Endpoint> {
        let url = reqwest::Url::parse(url).with_context(|| format!("{key}: not a URL: {url}"))?;
        Ok(Endpoint {
            path: url.path().trim_end_matches('/').to_owned(),
            url,
        })
    }

    /// `<endpoint>/3/device/<token>`: the endpoint's URL with its path set, no new parse
    /// of the whole URL per request.
    fn url_for(&self, token: &ApnsToken) -> reqwest::Url {
        let mut url = self.url.clone();
        url.set_path(&format!("{}/3/device/{}", self.path, token.as_str()));
        url
    }
}

const APNS_TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const APNS_PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const APNS_PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const APNS_EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const APNS_ID: HeaderName = HeaderName::from_static("apns-id");
const APNS_COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");

/// `BadDeviceToken` is what Apple answers when a token of one environment is sent to the
/// other's host (a development build's token to production, or the reverse), far more
/// often than for a token that is really broken. It stays `token_dead` (the token will
/// never work *there*), but its reason says so, so a caller can fix the target's
/// `environment` instead of deleting a good token.
fn explain_environment(outcome: ProviderOutcome, env: ApnsEnvironment) -> ProviderOutcome {
    match outcome {
        ProviderOutcome::TokenDead { reason } if reason.ends_with("BadDeviceToken") => {
            let other = match env {
                ApnsEnvironment::Production => ApnsEnvironment::Sandbox,
                ApnsEnvironment::Sandbox => ApnsEnvironment::Production,
            };
            ProviderOutcome::TokenDead {
                reason: format!(
                    "{reason}: sent to the {} environment; this usually means the token belongs to the {} environment (set the target's apns.environment to \"{}\") rather than a dead token",
                    env.as_str(),
                    other.as_str(),
                    other.as_str()
                ),
            }
        }
        other => other,
    }
}

/// Apple's answer to one request.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Final(ProviderOutcome),
    /// 403 ExpiredProviderToken: refresh the JWT and retry once.
    ExpiredProviderToken,
}

/// Apple's documented status codes and `reason` strings ("Handling notification responses
/// from APNs"), each put in its class once.
fn classify(status: u16, reason: Option<&str>, retry_after: Option<Duration>) -> Answer {
    let reason_text = reason.unwrap_or("(no reason)");
    let text = format!("apns {status} {reason_text}");
    let outcome = match (status, reason) {
        (200, _) => ProviderOutcome::Delivered,
        (403, Some("ExpiredProviderToken")) => return Answer::ExpiredProviderToken,
        // 410 Unregistered (the app is gone from the device) or ExpiredToken: the token will
        // never work again. A token that is not a token, or belongs to another app (topic),
        // will not either.
        (410, _) | (400, Some("BadDeviceToken" | "DeviceTokenNotForTopic")) => {
            ProviderOutcome::TokenDead { reason: text }
        }
        // Apple closed an idle connection under the request: nothing wrong with it.
        (400, Some("IdleTimeout")) => ProviderOutcome::Transient {
            reason: text,
            retry_after,
        },
        // TooManyRequests (this device, too fast) or TooManyProviderTokenUpdates.
        (429, _) | (500..=599, _) => ProviderOutcome::Transient {
            reason: text,
            retry_after,
        },
        // 400 Bad*/Missing*/TopicDisallowed/PayloadEmpty..., 403 InvalidProviderToken/
        // BadCertificate/Forbidden/MissingProviderToken, 404 BadPath, 405, 413
        // PayloadTooLarge, and anything undocumented: herald or its configuration is wrong,
        // and sending again will not change the answer.
        _ => ProviderOutcome::ConfigError { reason: text },
    };
    Answer::Final(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(status: u16, reason: &str) -> &'static str {
        match classify(status, Some(reason), None) {
            Answer::ExpiredProviderToken => "refresh",
            Answer::Final(o) => o.label(),
        }
    }

    #[test]
    fn every_documented_reason_has_its_class() {
        let cases = [
            (200, "", "delivered"),
            (410, "Unregistered", "token_dead"),
            (410, "ExpiredToken", "token_dead"),
            (400, "BadDeviceToken", "token_dead"),
            (400, "DeviceTokenNotForTopic", "token_dead"),
            (429, "TooManyRequests", "transient"),
            (429, "TooManyProviderTokenUpdates", "transient"),
            (500, "InternalServerError", "transient"),
            (503, "ServiceUnavailable", "transient"),
            (503, "Shutdown", "transient"),
            (400, "IdleTimeout", "transient"),
            (403, "ExpiredProviderToken", "refresh"),
            (403, "InvalidProviderToken", "config_error"),
            (403, "MissingProviderToken", "config_error"),
            (403, "BadCertificate", "config_error"),
            (403, "BadCertificateEnvironment", "config_error"),
            (403, "Forbidden", "config_error"),
            (400, "BadTopic", "config_error"),
            (400, "TopicDisallowed", "config_error"),
            (400, "MissingTopic", "config_error"),
            (400, "BadPriority", "config_error"),
            (400, "BadExpirationDate", "config_error"),
            (400, "BadCollapseId", "config_error"),
            (400, "BadMessageId", "config_error"),
            (400, "InvalidPushType", "config_error"),
            (400, "PayloadEmpty", "config_error"),
            (404, "BadPath", "config_error"),
            (405, "MethodNotAllowed", "config_error"),
            (413, "PayloadTooLarge", "config_error"),
        ];
        for (status, reason, want) in cases {
            assert_eq!(class(status, reason), want, "{status} {reason}");
        }
    }

    #[test]
    fn a_request_url_is_the_endpoint_with_the_device_path() {
        let token = ApnsToken::parse("ab".repeat(32)).unwrap();
        let want = |base: &str| format!("{base}/3/device/{}", "ab".repeat(32));
        let bare = Endpoint::parse("k", PRODUCTION).unwrap();
        assert_eq!(bare.url_for(&token).as_str(), want(PRODUCTION));
        // An endpoint behind a path (a relay): the device path follows it.
        let relay = Endpoint::parse("k", "http://127.0.0.1:9/apns/").unwrap();
        assert_eq!(
            relay.url_for(&token).as_str(),
            want("http://127.0.0.1:9/apns")
        );
    }

    #[test]
    fn bad_device_token_names_the_other_environment() {
        let dead = ProviderOutcome::TokenDead {
            reason: "apns 400 BadDeviceToken".into(),
        };
        let ProviderOutcome::TokenDead { reason } =
            explain_environment(dead, ApnsEnvironment::Production)
        else {
            panic!("still token_dead");
        };
        assert!(
            reason.starts_with("apns 400 BadDeviceToken: sent to the production environment"),
            "{reason}"
        );
        assert!(reason.contains("\"sandbox\""), "{reason}");
        let gone = ProviderOutcome::TokenDead {
            reason: "apns 410 Unregistered".into(),
        };
        assert_eq!(
            explain_environment(gone.clone(), ApnsEnvironment::Sandbox),
            gone
        );
    }

    #[test]
    fn retry_after_is_kept_and_reasons_are_named() {
        let got = classify(429, Some("TooManyRequests"), Some(Duration::from_secs(7)));
        assert_eq!(
            got,
            Answer::Final(ProviderOutcome::Transient {
                reason: "apns 429 TooManyRequests".into(),
                retry_after: Some(Duration::from_secs(7)),
            })
        );
    }
}
