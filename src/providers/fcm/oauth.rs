//! OAuth2 access tokens for FCM: the service-account JWT bearer flow (RFC 7523) against the
//! key file's `token_uri`, cached until shortly before they expire.
//!
//! Written here (jsonwebtoken RS256 + reqwest) rather than with gcp_auth or yup-oauth2:
//! gcp_auth builds its own hyper client with only the system roots (so a private token
//! endpoint behind `fcm.ca_file` cannot be reached), keeps its cache private with no way to
//! drop a token FCM just refused with 401, and returns one opaque error type, where herald
//! must tell "token endpoint down" (transient) from "key revoked" (configuration).
//! yup-oauth2 12 can take a client with a custom CA (`with_client`), but it reads the token
//! endpoint's answer by its body alone, ignoring the HTTP status and `Retry-After`: herald
//! could not tell an overloaded endpoint (503, try later) from a refused key, nor wait as
//! long as Google asks. The exchange itself is one signed POST.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::providers::ProviderOutcome;
use crate::providers::transport::{check_url, retry_after, transport_error};

pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime asked for in the assertion: Google's maximum, one hour.
const ASSERTION_LIFETIME: u64 = 3600;
/// Refresh this long before the access token expires (Google's own libraries use a few
/// minutes of margin), so a token never expires between the check and FCM reading it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);

/// The fields herald reads from a Google service-account key file.
#[derive(Deserialize)]
pub(crate) struct ServiceAccount {
    #[serde(rename = "type")]
    kind: String,
    pub(crate) project_id: String,
    private_key_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Clone)]
struct Cached {
    token: Arc<str>,
    refresh_at: Instant,
}

pub(crate) struct AccessTokens {
    http: reqwest::Client,
    key: EncodingKey,
    key_id: String,
    client_email: String,
    token_uri: String,
    cache: Mutex<Option<Cached>>,
}

impl ServiceAccount {
    pub(crate) fn load(path: &str) -> anyhow::Result<ServiceAccount> {
        const KEY: &str = "fcm.service_account_file";
        // Errors name the file, never its contents (it holds a private key).
        let text = std::fs::read(path).with_context(|| format!("{KEY}: cannot read {path}"))?;
        let sa: ServiceAccount = serde_json::from_slice(&text).map_err(|e| {
            anyhow::anyhow!(
                "{KEY}: {path} is not a service-account key file (line {}, column {})",
                e.line(),
                e.column()
            )
        })?;
        anyhow::ensure!(
            sa.kind == "service_account",
            "{KEY}: {path} has type {:?}, want \"service_account\"",
            sa.kind
        );
        anyhow::ensure!(!sa.project_id.is_empty(), "{KEY}: {path} has no project_id");
        anyhow::ensure!(
            !sa.client_email.is_empty(),
            "{KEY}: {path} has no client_email"
        );
        Ok(sa)
    }
}

impl AccessTokens {
    pub(crate) fn new(
        sa: &ServiceAccount,
        http: reqwest::Client,
        allow_insecure: bool,
    ) -> anyhow::Result<Self> {
        const KEY: &str = "fcm.service_account_file";
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes())
            .map_err(|e| anyhow::anyhow!("{KEY}: private_key is not an RSA PEM key: {e}"))?;
        let token_uri = check_url(&format!("{KEY}: token_uri"), &sa.token_uri, allow_insecure)?;
        let tokens = AccessTokens {
            http,
            key,
            key_id: sa.private_key_id.clone(),
            client_email: sa.client_email.clone(),
            token_uri,
            cache: Mutex::new(None),
        };
        // Sign once now so a broken key fails at start-up.
        tokens.assertion()?;
        Ok(tokens)
    }

    fn assertion(&self) -> anyhow::Result<String> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut header = Header::new(Algorithm::RS256);
        if !self.key_id.is_empty() {
            header.kid = Some(self.key_id.clone());
        }
        let claims = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| anyhow::anyhow!("signing the FCM OAuth2 assertion: {e}"))
    }

    /// A valid access token: the cached one, or a fresh one. The lock is held across the
    /// fetch, so a burst of sends after expiry makes one token request, not hundreds.
    pub(crate) async fn get(&self) -> Result<Arc<str>, ProviderOutcome> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(token)
    }

    /// FCM answered 401 to `stale`: forget it, unless it was already replaced.
    pub(crate) async fn invalidate(&self, stale: &Arc<str>) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| Arc::ptr_eq(&c.token, stale)) {
            *cache = None;
        }
    }

    async fn fetch(&self) -> Result<Cached, ProviderOutcome> {
        let assertion = self.assertion().map_err(|e| ProviderOutcome::ConfigError {
            reason: format!("{e:#}"),
        })?;
        // The JWT is base64url plus dots: nothing to escape in a form body.
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let requested = Instant::now();
        let resp = self
            .http
            .post(&self.token_uri)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| transport_error("fcm oauth", e))?;
        let status = resp.status().as_u16();
        let retry = retry_after(resp.headers());
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error("fcm oauth", e))?;
        if status == 200 {
            let t: TokenResponse =
                serde_json::from_slice(&bytes).map_err(|e| ProviderOutcome::Transient {
                    reason: format!("fcm oauth: unreadable token response: {e}"),
                    retry_after: None,
                })?;
            let lifetime = Duration::from_secs(t.expires_in);
            let margin = EXPIRY_MARGIN.min(lifetime / 2);
            return Ok(Cached {
                token: t.access_token.into(),
                refresh_at: requested + lifetime - margin,
            });
        }
        // An OAuth error body: {"error": "invalid_grant", "error_description": "..."}; neither
        // field is secret.
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .map(|v| {
                format!(
                    "{} {}",
                    v["error"].as_str().unwrap_or(""),
                    v["error_description"].as_str().unwrap_or("")
                )
            })
            .unwrap_or_default();
        let reason = format!("fcm oauth {status} {}", detail.trim());
        Err(if status == 429 || status >= 500 {
            ProviderOutcome::Transient {
                reason,
                retry_after: retry,
            }
        } else {
            // invalid_grant (key deleted, clock skew), unauthorized_client, ...: the account
            // or its key is wrong until someone fixes it.
            ProviderOutcome::ConfigError { reason }
        })
    }
}
