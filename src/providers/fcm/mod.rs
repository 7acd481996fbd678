//! FCM (HTTP v1): OAuth2 service-account auth, `messages:send` over HTTP/2, and Google's
//! answers classified.

mod message;
mod oauth;

use std::sync::Arc;

use reqwest::header::AUTHORIZATION;
use serde_json::Value;

pub use message::{MAX_PAYLOAD_BYTES, message, payload_size};
pub use oauth::SCOPE;

use super::ProviderOutcome;
use super::transport::{Bulkhead, check_url, http_client, send_timed, transport_error};
use crate::config::FcmSettings;
use crate::domain::{FcmToken, QueuedNotification};
use crate::metrics::Metrics;

/// An FCM sender: its own connection pool, bulkhead and access-token cache.
pub struct FcmClient {
    http: reqwest::Client,
    send_url: String,
    tokens: oauth::AccessTokens,
    bulkhead: Bulkhead,
    metrics: Metrics,
}

impl FcmClient {
    /// `None` when FCM is not configured (`fcm.service_account_file` empty). Errors name the
    /// key.
    pub fn from_settings(s: &FcmSettings, metrics: &Metrics) -> anyhow::Result<Option<Self>> {
        Self::for_app(s, "", metrics)
    }

    /// As [`FcmClient::from_settings`] for an app whose keys start with `prefix`
    /// (`apps.shop.`; empty for `default`), so errors name the key as written.
    pub fn for_app(
        s: &FcmSettings,
        prefix: &str,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Self>> {
        if s.service_account_file.is_empty() {
            return Ok(None);
        }
        let sa = match oauth::ServiceAccount::load(&s.service_account_file) {
            Ok(sa) => sa,
            Err(e) if prefix.is_empty() => return Err(e),
            // oauth names the key without the app; say which app's it is.
            Err(e) => return Err(e.context(format!("in {}", prefix.trim_end_matches('.')))),
        };
        let base = check_url(
            &format!("{prefix}fcm.endpoint"),
            &s.endpoint,
            s.allow_insecure_endpoints,
        )?;
        let limits = s.limits();
        let http = http_client(&format!("{prefix}fcm.ca_file"), &s.ca_file, limits.timeout)?;
        Ok(Some(FcmClient {
            send_url: format!("{base}/v1/projects/{}/messages:send", sa.project_id),
            tokens: oauth::AccessTokens::new(&sa, http.clone(), s.allow_insecure_endpoints)?,
            http,
            bulkhead: Bulkhead::new("fcm", limits),
            metrics: metrics.clone(),
        }))
    }

    /// Sends `n` to one registration token and classifies Google's answer.
    pub async fn send(&self, token: &FcmToken, n: &QueuedNotification) -> ProviderOutcome {
        let outcome = self.bulkhead.run(self.send_authenticated(token, n)).await;
        super::note_outcome(&self.metrics, "fcm", n, token, &outcome);
        outcome
    }

    async fn send_authenticated(
        &self,
        token: &FcmToken,
        n: &QueuedNotification,
    ) -> ProviderOutcome {
        // android.ttl in whole seconds, rounded up so 500 ms left is not "0s" (= now or never).
        let ttl = n.remaining_ttl(std::time::SystemTime::now());
        let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let body = message(n, token.as_str(), ttl_secs);
        let access = match self.tokens.get().await {
            Ok(t) => t,
            Err(outcome) => return outcome,
        };
        match self.post(&body, &access).await {
            Answer::Unauthenticated(reason) => {
                // The token was revoked or expired early: fetch a new one and retry once. A
                // second 401 means the account may not send at all.
                self.tokens.invalidate(&access).await;
                let fresh = match self.tokens.get().await {
                    Ok(t) => t,
                    Err(outcome) => return outcome,
                };
                match self.post(&body, &fresh).await {
                    Answer::Unauthenticated(again) => ProviderOutcome::ConfigError {
                        reason: format!(
                            "{again}, again with a fresh access token (first: {reason})"
                        ),
                    },
                    Answer::Final(o) => o,
                }
            }
            Answer::Final(o) => o,
        }
    }

    async fn post(&self, body: &Value, access: &Arc<str>) -> Answer {
        let req = self
            .http
            .post(&self.send_url)
            .header(AUTHORIZATION, format!("Bearer {access}"))
            .json(body);
        let result = send_timed(&self.metrics, "fcm", req).await;
        match result {
            Err(e) => Answer::Final(transport_error("fcm", e)),
            Ok(reply) => {
                let body = serde_json::from_slice::<Value>(&reply.body).unwrap_or(Value::Null);
                classify(reply.status, &body, reply.retry_after)
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Final(ProviderOutcome),
    /// 401: refresh the access token and retry once.
    Unauthenticated(String),
}

/// Google's answer, from the google.rpc.Status body: `error.status`, and the FcmError detail's
/// `errorCode` where there is one (it is the more specific of the two). See the v1 API's
/// ErrorCode reference.
fn classify(status: u16, body: &Value, retry_after: Option<std::time::Duration>) -> Answer {
    if (200..300).contains(&status) {
        return Answer::Final(ProviderOutcome::Delivered);
    }
    let error = &body["error"];
    let rpc_status = error["status"].as_str().unwrap_or("");
    let message = error["message"].as_str().unwrap_or("");
    let details = error["details"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let fcm_code = details
        .iter()
        .find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError")))
        .and_then(|d| d["errorCode"].as_str());
    let code = fcm_code.unwrap_or(rpc_status);
    let reason = format!("fcm {status} {code}: {message}")
        .trim_end_matches([' ', ':'])
        .to_owned();
    let transient = |reason| ProviderOutcome::Transient {
        reason,
        retry_after,
    };
    let outcome = match (status, code) {
        (_, "UNREGISTERED" | "SENDER_ID_MISMATCH") => ProviderOutcome::TokenDead { reason },
        (_, "INVALID_ARGUMENT") | (400, _) => {
            if about_the_token(details, message) {
                ProviderOutcome::TokenDead { reason }
            } else {
                // Something else in the message is wrong (a bad field, too large): herald's
                // bug or the caller's data, not fixed by sending again.
                ProviderOutcome::ConfigError { reason }
            }
        }
        (_, "QUOTA_EXCEEDED" | "UNAVAILABLE" | "INTERNAL" | "RESOURCE_EXHAUSTED")
        | (429, _)
        | (500..=599, _) => transient(reason),
        // THIRD_PARTY_AUTH_ERROR comes as a 401 too, but no access token fixes it.
        (_, "THIRD_PARTY_AUTH_ERROR") => ProviderOutcome::ConfigError { reason },
        (401, _) | (_, "UNAUTHENTICATED") => return Answer::Unauthenticated(reason),
        // THIRD_PARTY_AUTH_ERROR (APNs certificate / web push key in the Firebase project),
        // PERMISSION_DENIED (the account lacks the messaging role), NOT_FOUND without
        // UNREGISTERED (wrong project), and anything undocumented.
        _ => ProviderOutcome::ConfigError { reason },
    };
    Answer::Final(outcome)
}

/// Whether an INVALID_ARGUMENT is about the registration token (dead token) rather than
/// the rest of the message: a `google.rpc.BadRequest` field violation on `message.token`, or
/// FCM's message naming the registration token.
fn about_the_token(details: &[Value], message: &str) -> bool {
    let field_is_token = details.iter().any(|d| {
        d["fieldViolations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|f| f["field"] == "message.token"))
    });
    field_is_token || message.to_ascii_lowercase().contains("registration token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn google_error(status: u16, rpc: &str, code: Option<&str>, message: &str) -> Value {
        let mut details = vec![];
        if let Some(c) = code {
            details.push(json!({
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": c
            }));
        }
        json!({"error": {"code": status, "message": message, "status": rpc, "details": details}})
    }

    fn class(status: u16, rpc: &str, code: Option<&str>, message: &str) -> &'static str {
        match classify(status, &google_error(status, rpc, code, message), None) {
            Answer::Final(o) => o.label(),
            Answer::Unauthenticated(_) => "refresh",
        }
    }

    #[test]
    fn every_documented_error_has_its_class() {
        let cases = [
            (
                404,
                "NOT_FOUND",
                Some("UNREGISTERED"),
                "Requested entity was not found.",
                "token_dead",
            ),
            (
                403,
                "PERMISSION_DENIED",
                Some("SENDER_ID_MISMATCH"),
                "SenderId mismatch",
                "token_dead",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                "The registration token is not a valid FCM registration token",
                "token_dead",
            ),
            (
                400,
                "INVALID_ARGUMENT",
                Some("INVALID_ARGUMENT"),
                "Invalid value at 'message.android.ttl'",
                "config_error",
            ),
            (
                429,
                "RESOURCE_EXHAUSTED",
                Some("QUOTA_EXCEEDED"),
                "Quota exceeded",
                "transient",
            ),
            (
                503,
                "UNAVAILABLE",
                Some("UNAVAILABLE"),
                "The service is currently unavailable.",
                "transient",
            ),
            (
                500,
                "INTERNAL",
                Some("INTERNAL"),
                "Internal error",
                "transient",
            ),
            (502, "", None, "", "transient"),
            (
                401,
                "UNAUTHENTICATED",
                None,
                "Request had invalid authentication credentials.",
                "refresh",
            ),
            (
                401,
                "UNAUTHENTICATED",
                Some("THIRD_PARTY_AUTH_ERROR"),
                "Auth error from APNS or Web Push Service",
                "config_error",
            ),
            (
                403,
                "PERMISSION_DENIED",
                None,
                "Permission denied",
                "config_error",
            ),
            (
                404,
                "NOT_FOUND",
                None,
                "Requested entity was not found.",
                "config_error",
            ),
        ];
        for (status, rpc, code, message, want) in cases {
            assert_eq!(
                class(status, rpc, code, message),
                want,
                "{status} {rpc} {code:?}"
            );
        }
    }

    #[test]
    fn a_field_violation_on_the_token_is_a_dead_token() {
        let body = json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
        "message": "Request contains an invalid argument.",
        "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"},
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}]}
        ]}});
        assert!(matches!(
            classify(400, &body, None),
            Answer::Final(ProviderOutcome::TokenDead { .. })
        ));
    }
}
