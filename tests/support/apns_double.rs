//! A local APNs: a real HTTP/2 server speaking Apple's provider API.
//!
//! It verifies the provider JWT the way Apple does (ES256 signature against the test key's
//! public half, `kid`, `iss`, `iat` younger than an hour), checks the request headers,
//! records every request, and answers with whatever a test injects: per device token, for
//! the next N requests, or always (a status + `{"reason"}` + optional Retry-After, a delay,
//! a request that never gets an answer, or a reset stream).
//!
//! The HTTP/2 server itself ([`H2Server`]) is shared with the FCM double: cleartext h2 with
//! prior knowledge on 127.0.0.1:0, or TLS (ALPN h2) with a certificate from a fresh test CA
//! whose PEM is written to `ca_file`.
//!
//! Self-contained (no `super::` items), so `benches/` can include it by path.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------
// The HTTP/2 server both doubles run on.

/// A handler's answer: a response, or `Err` to reset the stream (the client sees the request
/// fail mid-flight, as on a dropped connection).
pub type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

/// A running HTTP/2 server; stops (and drops every connection) when dropped.
pub struct H2Server {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:port` or `https://127.0.0.1:port`.
    pub url: String,
    /// The CA that signed the TLS certificate (PEM), for `*.ca_file`; `None` for h2c.
    pub ca_file: Option<PathBuf>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Serves `handler` over HTTP/2 on 127.0.0.1:0 (TLS when `tls`). Each request arrives with
/// its whole body read.
pub async fn serve_h2<H, F>(tls: bool, handler: H) -> H2Server
where
    H: Fn(Request<Bytes>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, ca_file) = if tls {
        let (acceptor, ca_pem) = tls_acceptor();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca_pem).unwrap();
        (Some(acceptor), Some(path))
    } else {
        (None, None)
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let handler = handler.clone();
            let stop = stop.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve_connection(stream, handler, stop).await,
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            serve_connection(tls, handler, stop).await;
                        }
                    }
                }
            });
        }
    });
    let scheme = if tls { "https" } else { "http" };
    H2Server {
        addr,
        url: format!("{scheme}://{addr}"),
        ca_file,
        cancel,
        _dir: dir,
    }
}

async fn serve_connection<I, H, F>(io: I, handler: H, stop: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Bytes>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            handler(Request::from_parts(parts, body)).await
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        // Apple lets a provider run up to 1000 streams on one connection.
        .max_concurrent_streams(1000)
        .serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        _ = stop.cancelled() => {}
    }
}

/// A TLS acceptor (ALPN h2 only) with a leaf for 127.0.0.1/localhost from a fresh CA; returns
/// the CA's PEM.
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use tokio_rustls::rustls;
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "herald test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_cert.pem(),
    )
}

pub fn json_response(status: u16, body: &Value, headers: &[(&str, String)]) -> Answer {
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (k, v) in headers {
        resp = resp.header(*k, v);
    }
    Ok(resp
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------
// The APNs double.

/// What the double answers (instead of its own verdict).
#[derive(Debug, Clone)]
pub enum Reply {
    /// `status` with `{"reason": reason}` and an optional Retry-After header value.
    Status {
        status: u16,
        reason: String,
        retry_after: Option<String>,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Never answer (the stream stays open until the client gives up).
    Hang,
    /// Reset the stream.
    Reset,
}

impl Reply {
    pub fn reason(status: u16, reason: &str) -> Reply {
        Reply::Status {
            status,
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(self, value: &str) -> Reply {
        match self {
            Reply::Status { status, reason, .. } => Reply::Status {
                status,
                reason,
                retry_after: Some(value.into()),
            },
            other => other,
        }
    }
}

/// The provider JWT as the double decoded it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApnsJwt {
    pub raw: String,
    pub alg: String,
    pub kid: String,
    pub iss: String,
    pub iat: u64,
}

/// One request, as it arrived.
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    pub method: String,
    pub path: String,
    /// The device token from the path.
    pub token: String,
    /// Header names lower-case.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// The verified JWT; `None` if it was missing or did not verify.
    pub jwt: Option<ApnsJwt>,
}

struct ApnsState {
    key_id: String,
    team_id: String,
    decoding: DecodingKey,
    requests: Mutex<Vec<ApnsRequest>>,
    per_token: Mutex<HashMap<String, Reply>>,
    next: Mutex<VecDeque<Reply>>,
    always: Mutex<Option<Reply>>,
    /// JWTs already verified (as Apple does, a token is checked once, then its age).
    verified: Mutex<HashMap<String, Result<ApnsJwt, &'static str>>>,
}

pub struct ApnsDouble {
    pub server: H2Server,
    pub url: String,
    /// The .p8 (PKCS#8 P-256) the client must sign with.
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    /// The PEM private key, for a raw client that signs its own JWT (the benchmark).
    pub key_pem: String,
    state: Arc<ApnsState>,
    _dir: tempfile::TempDir,
}

impl ApnsDouble {
    /// Cleartext h2 (prior knowledge).
    pub async fn start() -> ApnsDouble {
        Self::start_with(false, "TESTKEY123", "TEAM987654", "com.example.herald").await
    }

    /// TLS with ALPN h2; the client needs `server.ca_file` as `apns.ca_file`.
    pub async fn start_tls() -> ApnsDouble {
        Self::start_with(true, "TESTKEY123", "TEAM987654", "com.example.herald").await
    }

    /// Cleartext, for another APNs account: its own key (every double generates one), key
    /// id, team id and topic. Only JWTs signed with this key, `kid` and `iss` verify.
    pub async fn start_as(key_id: &str, team_id: &str, topic: &str) -> ApnsDouble {
        Self::start_with(false, key_id, team_id, topic).await
    }

    /// Another endpoint of the same APNs account (same key, key id, team id, topic): the
    /// other environment's host, which accepts the same provider tokens, as Apple's do.
    pub async fn start_same_account(&self) -> ApnsDouble {
        let key = rcgen::KeyPair::from_pem(&self.key_pem).unwrap();
        Self::start_with_key(false, key, &self.key_id, &self.team_id, &self.topic).await
    }

    async fn start_with(tls: bool, key_id: &str, team_id: &str, topic: &str) -> ApnsDouble {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self::start_with_key(tls, key, key_id, team_id, topic).await
    }

    async fn start_with_key(
        tls: bool,
        key: rcgen::KeyPair,
        key_id: &str,
        team_id: &str,
        topic: &str,
    ) -> ApnsDouble {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join(format!("AuthKey_{key_id}.p8"));
        let key_pem = key.serialize_pem();
        std::fs::write(&key_file, &key_pem).unwrap();
        let state = Arc::new(ApnsState {
            key_id: key_id.into(),
            team_id: team_id.into(),
            decoding: DecodingKey::from_ec_pem(key.public_key_pem().as_bytes()).unwrap(),
            requests: Mutex::default(),
            per_token: Mutex::default(),
            next: Mutex::default(),
            always: Mutex::default(),
            verified: Mutex::default(),
        });
        let handler_state = state.clone();
        let server = serve_h2(tls, move |req| handle(handler_state.clone(), req)).await;
        ApnsDouble {
            url: server.url.clone(),
            server,
            key_file,
            key_id: state.key_id.clone(),
            team_id: state.team_id.clone(),
            topic: topic.into(),
            key_pem,
            state,
            _dir: dir,
        }
    }

    /// Points `[apns]` at this double.
    pub fn configure(&self, s: &mut herald::config::Settings) {
        s.apns.key_file = self.key_file.display().to_string();
        s.apns.key_id = self.key_id.clone();
        s.apns.team_id = self.team_id.clone();
        s.apns.topic = self.topic.clone();
        s.apns.endpoint = self.url.clone();
        s.apns.ca_file = self
            .server
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
    }

    /// Points `[apps.<app>.apns]` at this double (creating the app section if needed).
    pub fn configure_app(&self, s: &mut herald::config::Settings, app: &str) {
        let a = &mut s.apps.entry(app.to_owned()).or_default().apns;
        a.key_file = self.key_file.display().to_string();
        a.key_id = self.key_id.clone();
        a.team_id = self.team_id.clone();
        a.topic = self.topic.clone();
        a.endpoint = self.url.clone();
        a.ca_file = self
            .server
            .ca_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
    }

    /// Every request to `token` gets `reply`.
    pub fn reply_for_token(&self, token: &str, reply: Reply) {
        self.state
            .per_token
            .lock()
            .unwrap()
            .insert(token.to_owned(), reply);
    }

    /// The next `n` requests (after the per-token replies) get `reply`.
    pub fn reply_next(&self, n: usize, reply: Reply) {
        let mut next = self.state.next.lock().unwrap();
        for _ in 0..n {
            next.push_back(reply.clone());
        }
    }

    /// Every request gets `reply` (after per-token and next-N ones); `None` heals.
    pub fn reply_always(&self, reply: Option<Reply>) {
        *self.state.always.lock().unwrap() = reply;
    }

    pub fn requests(&self) -> Vec<ApnsRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
}

fn verify_jwt(state: &ApnsState, raw: &str) -> Result<ApnsJwt, &'static str> {
    let mut cache = state.verified.lock().unwrap();
    if let Some(v) = cache.get(raw) {
        return v.clone();
    }
    let verdict = (|| {
        let header = jsonwebtoken::decode_header(raw).map_err(|_| "InvalidProviderToken")?;
        if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(&state.key_id) {
            return Err("InvalidProviderToken");
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.set_issuer(&[&state.team_id]);
        let data = jsonwebtoken::decode::<Value>(raw, &state.decoding, &validation)
            .map_err(|_| "InvalidProviderToken")?;
        let iat = data.claims["iat"].as_u64().ok_or("InvalidProviderToken")?;
        Ok(ApnsJwt {
            raw: raw.to_owned(),
            alg: "ES256".into(),
            kid: state.key_id.clone(),
            iss: state.team_id.clone(),
            iat,
        })
    })();
    cache.insert(raw.to_owned(), verdict.clone());
    verdict
}

fn reason(status: u16, reason: &str, retry_after: Option<&str>, apns_id: &str) -> Answer {
    let mut headers = vec![("apns-id", apns_id.to_owned())];
    if let Some(r) = retry_after {
        headers.push(("retry-after", r.to_owned()));
    }
    let mut body = json!({ "reason": reason });
    if status == 410 {
        body["timestamp"] = json!(unix_now() * 1000);
    }
    json_response(status, &body, &headers)
}

async fn handle(state: Arc<ApnsState>, req: Request<Bytes>) -> Answer {
    let path = req.uri().path().to_owned();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let apns_id = headers.get("apns-id").cloned().unwrap_or_default();
    let token = path.strip_prefix("/3/device/").unwrap_or("").to_owned();
    let bearer = headers
        .get("authorization")
        .and_then(|a| a.strip_prefix("bearer "))
        .map(str::to_owned);
    let jwt = bearer.as_deref().map(|raw| verify_jwt(&state, raw));
    let body: Value = serde_json::from_slice(req.body()).unwrap_or(Value::Null);
    state.requests.lock().unwrap().push(ApnsRequest {
        method: req.method().to_string(),
        path: path.clone(),
        token: token.clone(),
        headers: headers.clone(),
        body: body.clone(),
        jwt: jwt.clone().and_then(Result::ok),
    });

    if req.method() != hyper::Method::POST {
        return reason(405, "MethodNotAllowed", None, &apns_id);
    }
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_hexdigit()) {
        return reason(404, "BadPath", None, &apns_id);
    }
    match jwt {
        None => return reason(403, "MissingProviderToken", None, &apns_id),
        Some(Err(r)) => return reason(403, r, None, &apns_id),
        Some(Ok(j)) if unix_now().saturating_sub(j.iat) > 3600 => {
            return reason(403, "ExpiredProviderToken", None, &apns_id);
        }
        Some(Ok(_)) => {}
    }

    let injected = state
        .per_token
        .lock()
        .unwrap()
        .get(&token)
        .cloned()
        .or_else(|| state.next.lock().unwrap().pop_front())
        .or_else(|| state.always.lock().unwrap().clone());
    match injected {
        Some(Reply::Status {
            status,
            reason: r,
            retry_after,
        }) => return reason(status, &r, retry_after.as_deref(), &apns_id),
        Some(Reply::Delay(d)) => tokio::time::sleep(d).await,
        Some(Reply::Hang) => std::future::pending::<()>().await,
        Some(Reply::Reset) => return Err(std::io::Error::other("injected stream reset")),
        None => {}
    }

    // What Apple itself checks.
    let push_type = headers.get("apns-push-type").map(String::as_str);
    let priority = headers.get("apns-priority").map(String::as_str);
    if headers.get("apns-topic").is_none_or(|t| t.is_empty()) {
        return reason(400, "MissingTopic", None, &apns_id);
    }
    if !matches!(push_type, Some("alert" | "background")) {
        return reason(400, "InvalidPushType", None, &apns_id);
    }
    if !matches!(priority, None | Some("5" | "10"))
        || (push_type == Some("background") && priority == Some("10"))
    {
        return reason(400, "BadPriority", None, &apns_id);
    }
    if uuid::Uuid::parse_str(&apns_id).is_err() {
        return reason(400, "BadMessageId", None, &apns_id);
    }
    if headers
        .get("apns-expiration")
        .is_some_and(|e| e.parse::<u64>().is_err())
    {
        return reason(400, "BadExpirationDate", None, &apns_id);
    }
    if req.body().len() > 4096 {
        return reason(413, "PayloadTooLarge", None, &apns_id);
    }
    if body.get("aps").is_none() {
        return reason(400, "PayloadEmpty", None, &apns_id);
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("apns-id", apns_id)
        .body(Full::new(Bytes::new()))
        .unwrap())
}
