//! APNs: token (.p8) authentication, the HTTP/2 transport, and Apple's answers classified.
//!
//! Not a2: a2 0.10 only talks to Apple's two fixed hosts through its own built-in roots, so it
//! cannot be pointed at a private endpoint or at the test doubles, which the design requires
//! ("endpoint production / sandbox / any URL"). The protocol is one POST per notification.

mod jwt;
mod payload;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

pub use jwt::REFRESH_AFTER as JWT_REFRESH_AFTER;
pub use payload::{MAX_PAYLOAD_BYTES, payload, payload_size};

use super::ProviderOutcome;
use super::transport::{Bulkhead, check_url, http_client, send_timed, transport_error};
use crate::config::ApnsSettings;
use crate::domain::{ApnsPushType, ApnsToken, Priority, QueuedNotification};
use crate::metrics::Metrics;

pub const PRODUCTION: &str = "https://api.push.apple.com";
pub const SANDBOX: &str = "https://api.sandbox.push.apple.com";

/// An APNs sender: its own connection pool, bulkhead and provider token.
pub struct ApnsClient {
    http: reqwest::Client,
    base: String,
    topic: String,
    jwt: jwt::ProviderToken,
    bulkhead: Bulkhead,
    metrics: Metrics,
}

impl ApnsClient {
    /// `None` when APNs is not configured (`apns.key_file` empty). Errors name the key.
    pub fn from_settings(s: &ApnsSettings, metrics: &Metrics) -> anyhow::Result<Option<Self>> {
        if s.key_file.is_empty() {
            return Ok(None);
        }
        for (key, value) in [
            ("apns.key_id", &s.key_id),
            ("apns.team_id", &s.team_id),
            ("apns.topic", &s.topic),
        ] {
            anyhow::ensure!(
                !value.trim().is_empty(),
                "{key} must be set when apns.key_file is"
            );
        }
        // The error names the file, never its contents.
        let pem = std::fs::read(&s.key_file)
            .with_context(|| format!("apns.key_file: cannot read {}", s.key_file))?;
        let jwt = jwt::ProviderToken::new(&pem, s.key_id.trim(), s.team_id.trim())
            .with_context(|| format!("apns.key_file: {}", s.key_file))?;
        let base = match s.endpoint.as_str() {
            "production" => PRODUCTION.to_owned(),
            "sandbox" => SANDBOX.to_owned(),
            url => check_url("apns.endpoint", url, s.allow_insecure_endpoints)?,
        };
        let limits = s.limits();
        Ok(Some(ApnsClient {
            http: http_client("apns.ca_file", &s.ca_file, limits.timeout)?,
            base,
            topic: s.topic.trim().to_owned(),
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

    /// Sends `n` to one device and classifies Apple's answer.
    pub async fn send(&self, token: &ApnsToken, n: &QueuedNotification) -> ProviderOutcome {
        let outcome = self.bulkhead.run(self.send_authenticated(token, n)).await;
        super::note_outcome(&self.metrics, "apns", n, token, &outcome);
        outcome
    }

    async fn send_authenticated(
        &self,
        token: &ApnsToken,
        n: &QueuedNotification,
    ) -> ProviderOutcome {
        let body = match serde_json::to_vec(&payload(n)) {
            Ok(b) => b,
            Err(e) => {
                return ProviderOutcome::ConfigError {
                    reason: format!("apns: payload does not serialize: {e}"),
                };
            }
        };
        let jwt = match self.jwt.get() {
            Ok(j) => j,
            Err(e) => {
                return ProviderOutcome::ConfigError {
                    reason: format!("{e:#}"),
                };
            }
        };
        match self.post(token, n, &body, &jwt).await {
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
                match self.post(token, n, &body, &fresh).await {
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

    async fn post(
        &self,
        token: &ApnsToken,
        n: &QueuedNotification,
        body: &[u8],
        jwt: &Arc<str>,
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
        let topic = n.apns.topic.as_deref().unwrap_or(&self.topic);
        let mut req = self
            .http
            .post(format!("{}/3/device/{}", self.base, token.as_str()))
            .header(AUTHORIZATION, format!("bearer {jwt}"))
            .header("apns-topic", topic)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-expiration", expiration.as_secs().to_string())
            // Apple echoes it back and shows it in its delivery logs: the same id as ours.
            .header("apns-id", n.id.to_string())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(k) = &n.collapse_key {
            req = req.header("apns-collapse-id", k);
        }
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
