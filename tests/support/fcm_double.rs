//! A local FCM: the HTTP v1 `messages:send` API and the OAuth2 token endpoint, on one real
//! HTTP/2 server (see [`super::apns_double::serve_h2`]).
//!
//! `/token` verifies the service-account JWT-bearer assertion as Google does (RS256 against
//! the test key's public half, `iss` = client_email, `aud` = token_uri, the FCM scope, not
//! expired) and issues an access token; `messages:send` accepts only a token it issued and
//! has not revoked, records every request, and answers with whatever a test injects (a
//! google.rpc.Status error body + optional Retry-After, a delay, no answer, a reset stream).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::apns_double::{Answer, H2Server, json_response, serve_h2};

pub const PROJECT_ID: &str = "herald-test-project";
pub const CLIENT_EMAIL: &str = "herald-sender@herald-test-project.iam.gserviceaccount.com";

/// The service account's e-mail in `project`.
pub fn client_email(project: &str) -> String {
    format!("herald-sender@{project}.iam.gserviceaccount.com")
}

/// What the double answers (instead of its own verdict).
#[derive(Debug, Clone)]
pub enum FcmReply {
    /// `status` with a google.rpc.Status body.
    Error {
        status: u16,
        body: Value,
        retry_after: Option<String>,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Never answer.
    Hang,
    /// Reset the stream.
    Reset,
}

impl FcmReply {
    /// A google.rpc.Status error; `error_code` adds the FcmError detail.
    pub fn error(status: u16, rpc_status: &str, error_code: Option<&str>, message: &str) -> Self {
        let mut details = vec![];
        if let Some(code) = error_code {
            details.push(json!({
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": code,
            }));
        }
        FcmReply::Error {
            status,
            body: json!({"error": {
                "code": status, "message": message, "status": rpc_status, "details": details,
            }}),
            retry_after: None,
        }
    }

    pub fn unregistered() -> Self {
        Self::error(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        )
    }

    /// INVALID_ARGUMENT about the registration token (as FCM words it, with the field).
    pub fn invalid_token() -> Self {
        let mut r = Self::error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            "The registration token is not a valid FCM registration token",
        );
        if let FcmReply::Error { body, .. } = &mut r {
            body["error"]["details"]
                .as_array_mut()
                .unwrap()
                .push(json!({
                    "@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.token",
                        "description": "Invalid registration token"}],
                }));
        }
        r
    }

    /// INVALID_ARGUMENT about something else in the message.
    pub fn invalid_argument(field: &str) -> Self {
        Self::error(
            400,
            "INVALID_ARGUMENT",
            Some("INVALID_ARGUMENT"),
            &format!("Invalid value at '{field}'"),
        )
    }

    pub fn sender_id_mismatch() -> Self {
        Self::error(
            403,
            "PERMISSION_DENIED",
            Some("SENDER_ID_MISMATCH"),
            "SenderId mismatch",
        )
    }

    pub fn quota_exceeded() -> Self {
        Self::error(
            429,
            "RESOURCE_EXHAUSTED",
            Some("QUOTA_EXCEEDED"),
            "Quota exceeded for quota metric",
        )
    }

    pub fn unavailable() -> Self {
        Self::error(
            503,
            "UNAVAILABLE",
            Some("UNAVAILABLE"),
            "The service is currently unavailable.",
        )
    }

    pub fn internal() -> Self {
        Self::error(
            500,
            "INTERNAL",
            Some("INTERNAL"),
            "Internal error encountered.",
        )
    }

    pub fn third_party_auth() -> Self {
        Self::error(
            401,
            "UNAUTHENTICATED",
            Some("THIRD_PARTY_AUTH_ERROR"),
            "Auth error from APNS or Web Push Service",
        )
    }

    pub fn permission_denied() -> Self {
        Self::error(
            403,
            "PERMISSION_DENIED",
            None,
            "Permission 'cloudmessaging.messages.create' denied",
        )
    }

    pub fn with_retry_after(self, value: &str) -> Self {
        match self {
            FcmReply::Error { status, body, .. } => FcmReply::Error {
                status,
                body,
                retry_after: Some(value.into()),
            },
            other => other,
        }
    }
}

/// One `messages:send` request, as it arrived.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// The bearer access token sent.
    pub access_token: Option<String>,
}

/// A verified assertion the token endpoint accepted.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub claims: Value,
    pub kid: Option<String>,
    pub access_token: String,
}

struct FcmState {
    project: String,
    token_uri: String,
    decoding: DecodingKey,
    /// Lifetime of issued access tokens.
    expires_in: Mutex<u64>,
    issued: Mutex<HashSet<String>>,
    grants: Mutex<Vec<TokenGrant>>,
    requests: Mutex<Vec<FcmRequest>>,
    per_token: Mutex<HashMap<String, FcmReply>>,
    next: Mutex<VecDeque<FcmReply>>,
    always: Mutex<Option<FcmReply>>,
}

pub struct FcmDouble {
    pub server: H2Server,
    pub url: String,
    pub service_account_file: PathBuf,
    state: Arc<FcmState>,
    _dir: tempfile::TempDir,
}

impl FcmDouble {
    pub async fn start() -> FcmDouble {
        Self::start_with(false, PROJECT_ID).await
    }

    /// TLS with ALPN h2; the client needs `server.ca_file` as `fcm.ca_file`.
    pub async fn start_tls() -> FcmDouble {
        Self::start_with(true, PROJECT_ID).await
    }

    /// Cleartext, for another Firebase project: its own service account (key, e-mail) and
    /// project path; only that account's assertions get tokens.
    pub async fn start_for_project(project: &str) -> FcmDouble {
        Self::start_with(false, project).await
    }

    async fn start_with(tls: bool, project: &str) -> FcmDouble {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        // The token URI is only known once the server is bound; the handler reads it from the
        // state, which is filled in right after.
        let state_slot: Arc<Mutex<Option<Arc<FcmState>>>> = Arc::default();
        let slot = state_slot.clone();
        let server = serve_h2(tls, move |req| {
            let state = slot.lock().unwrap().clone().expect("state set at start");
            handle(state, req)
        })
        .await;
        let token_uri = format!("{}/token", server.url);
        let state = Arc::new(FcmState {
            project: project.to_owned(),
            token_uri: token_uri.clone(),
            decoding: DecodingKey::from_rsa_pem(key.public_key_pem().as_bytes()).unwrap(),
            expires_in: Mutex::new(3600),
            issued: Mutex::default(),
            grants: Mutex::default(),
            requests: Mutex::default(),
            per_token: Mutex::default(),
            next: Mutex::default(),
            always: Mutex::default(),
        });
        *state_slot.lock().unwrap() = Some(state.clone());
        let dir = tempfile::tempdir().unwrap();
        let service_account_file = dir.path().join("service-account.json");
        let sa = json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": "test-key-id-1",
            "private_key": key.serialize_pem(),
            "client_email": client_email(project),
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        });
        std::fs::write(
            &service_account_file,
            serde_json::to_vec_pretty(&sa).unwrap(),
        )
        .unwrap();
        FcmDouble {
            url: server.url.clone(),
            server,
            service_account_file,
            state,
            _dir: dir,
        }
    }

    /// Points `[apps.<app>.fcm]` at this double (creating the app section if needed).
    pub fn configure_app(&self, s: &mut herald::config::Settings, app: &str) {
        let f = &mut s.apps.entry(app.to_owned()).or_default().fcm;
        f.service_account_file = self.service_account_file.display().to_string();
        f.endpoint = self.url.clone();
        f.ca_file = self
            .server
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
    }

    /// Points `[fcm]` at this double.
    pub fn configure(&self, s: &mut herald::config::Settings) {
        s.fcm.service_account_file = self.service_account_file.display().to_string();
        s.fcm.endpoint = self.url.clone();
        s.fcm.ca_file = self
            .server
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
    }

    pub fn reply_for_token(&self, token: &str, reply: FcmReply) {
        self.state
            .per_token
            .lock()
            .unwrap()
            .insert(token.to_owned(), reply);
    }

    pub fn reply_next(&self, n: usize, reply: FcmReply) {
        let mut next = self.state.next.lock().unwrap();
        for _ in 0..n {
            next.push_back(reply.clone());
        }
    }

    pub fn reply_always(&self, reply: Option<FcmReply>) {
        *self.state.always.lock().unwrap() = reply;
    }

    /// Every access token issued so far stops working (401 on use), as after a key rotation.
    pub fn revoke_access_tokens(&self) {
        self.state.issued.lock().unwrap().clear();
    }

    /// Lifetime (`expires_in`) of access tokens issued from now on.
    pub fn set_token_lifetime(&self, secs: u64) {
        *self.state.expires_in.lock().unwrap() = secs;
    }

    pub fn grants(&self) -> Vec<TokenGrant> {
        self.state.grants.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<FcmRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Answer {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
        &[],
    )
}

fn token_endpoint(state: &FcmState, req: &Request<Bytes>) -> Answer {
    let form: HashMap<String, String> = String::from_utf8_lossy(req.body())
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":").replace("%3a", ":")))
        .collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return oauth_error(400, "unsupported_grant_type", "Invalid grant_type");
    }
    let Some(assertion) = form.get("assertion") else {
        return oauth_error(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        );
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&state.token_uri]);
    validation.set_issuer(&[client_email(&state.project)]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let data = match jsonwebtoken::decode::<Value>(assertion, &state.decoding, &validation) {
        Ok(d) => d,
        Err(e) => return oauth_error(400, "invalid_grant", &format!("Invalid JWT: {e}")),
    };
    let scopes = data.claims["scope"].as_str().unwrap_or("");
    if !scopes
        .split(' ')
        .any(|s| s == "https://www.googleapis.com/auth/firebase.messaging")
    {
        return oauth_error(400, "invalid_scope", "Scope does not allow FCM");
    }
    let access_token = format!("ya29.test-{}", uuid::Uuid::new_v4().simple());
    state.issued.lock().unwrap().insert(access_token.clone());
    state.grants.lock().unwrap().push(TokenGrant {
        claims: data.claims,
        kid: data.header.kid,
        access_token: access_token.clone(),
    });
    let expires_in = *state.expires_in.lock().unwrap();
    json_response(
        200,
        &json!({"access_token": access_token, "expires_in": expires_in, "token_type": "Bearer"}),
        &[],
    )
}

async fn handle(state: Arc<FcmState>, req: Request<Bytes>) -> Answer {
    let path = req.uri().path().to_owned();
    if path == "/token" && req.method() == hyper::Method::POST {
        return token_endpoint(&state, &req);
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let access_token = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .map(str::to_owned);
    let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(FcmRequest {
        path: path.clone(),
        headers,
        body: body.clone(),
        access_token: access_token.clone(),
    });
    let google = |status: u16, rpc: &str, message: &str| {
        json_response(
            status,
            &json!({"error": {"code": status, "message": message, "status": rpc}}),
            &[],
        )
    };
    if path != format!("/v1/projects/{}/messages:send", state.project)
        || req.method() != hyper::Method::POST
    {
        return google(404, "NOT_FOUND", "Requested entity was not found.");
    }
    let authorized = access_token
        .as_ref()
        .is_some_and(|t| state.issued.lock().unwrap().contains(t));
    if !authorized {
        return google(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    }
    let Some(token) = body["message"]["token"].as_str().map(str::to_owned) else {
        return FcmReply::invalid_argument("message.token").into_answer();
    };
    let injected = state
        .per_token
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .or_else(|| state.next.lock().unwrap().pop_front())
        .or_else(|| state.always.lock().unwrap().clone());
    match injected {
        Some(FcmReply::Delay(d)) => tokio::time::sleep(d).await,
        Some(FcmReply::Hang) => std::future::pending::<()>().await,
        Some(reply) => return reply.into_answer(),
        None => {}
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    Ok(Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(
                &json!({"name": format!("projects/{}/messages/{id}", state.project)}),
            )
            .unwrap(),
        )))
        .unwrap())
}

impl FcmReply {
    fn into_answer(self) -> Answer {
        match self {
            FcmReply::Error {
                status,
                body,
                retry_after,
            } => {
                let headers: Vec<(&str, String)> = retry_after
                    .map(|r| ("retry-after", r))
                    .into_iter()
                    .collect();
                json_response(status, &body, &headers)
            }
            FcmReply::Reset => Err(std::io::Error::other("injected stream reset")),
            FcmReply::Delay(_) | FcmReply::Hang => unreachable!("handled by the caller"),
        }
    }
}
