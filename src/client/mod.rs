//! `herald connect`: the reference device client.
//!
//! It does what docs/protocol.md asks of a device, and nothing clever: connect with the
//! token, read `hello`, print every new notification as one JSON line on stdout and ack
//! it (duplicates are acked again but not printed), answer pings (tungstenite answers
//! WebSocket pings itself), declare the server dead after `ping_interval + pong_timeout`
//! of silence, and reconnect with capped exponential backoff and full jitter. Logs go to
//! stderr so stdout stays a clean stream of notifications.

use std::io::Write;
use std::num::NonZeroUsize;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::gateway::protocol::close;

/// How long to wait for the TCP + WebSocket handshake and then for `hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Notification ids remembered for dedupe. A redelivery comes within the server's retry
/// window (minutes); 4,096 ids cover that for any device that is not a firehose.
pub const DEDUPE_CAPACITY: usize = 4096;

/// The client only receives notifications and small frames; tungstenite's 128 KiB default
/// read buffer would be most of an idle client's memory.
const READ_BUFFER_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub url: String,
    pub token: String,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Extra CA bundle (PEM) trusted for `wss://`, on top of the system roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Why the client stopped for good (a lost connection is never one: it reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the server refused the device token (HTTP 401: {0}); mint a new one with POST /v1/devices/{{device_id}}/token"
    )]
    Unauthorized(String),
    #[error(
        "a newer session for this device replaced this one (close code 4001); not reconnecting, so two clients do not evict each other forever"
    )]
    Replaced,
    #[error("bad --url: {0}")]
    BadUrl(String),
    #[error("bad --ca-file: {0}")]
    BadCaFile(String),
}

/// How one connection ended.
enum End {
    /// Reconnect after this long (the server's advice at shutdown).
    ReconnectAfter(Duration),
    /// Lost; `established` says whether a session had started (resets the backoff).
    Lost {
        established: bool,
    },
    Fatal(ClientError),
    Stopped,
}

/// Runs until `stop` is cancelled (Ok) or a fatal error.
pub async fn run(
    opts: ConnectOptions,
    out: &mut (dyn Write + Send),
    stop: CancellationToken,
) -> Result<(), ClientError> {
    let mut seen = lru::LruCache::new(
        NonZeroUsize::new(DEDUPE_CAPACITY).expect("DEDUPE_CAPACITY is not zero"),
    );
    // Built once: the roots do not change between reconnects, and a bad --ca-file is fatal
    // at start rather than on every attempt.
    let tls = tls_connector(&opts)?;
    let mut failures: u32 = 0;
    loop {
        let delay = match connect_once(&opts, tls.clone(), &mut seen, out, &stop).await {
            End::Stopped => return Ok(()),
            End::Fatal(e) => return Err(e),
            End::ReconnectAfter(d) => {
                failures = 0;
                tracing::info!(after = ?d, "server shutting down: reconnecting after its advised delay");
                d
            }
            End::Lost { established } => {
                if established {
                    failures = 0;
                }
                let d = backoff(opts.backoff_min, opts.backoff_max, failures);
                failures = failures.saturating_add(1);
                tracing::info!(after = ?d, attempt = failures, "connection lost: reconnecting");
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
}

/// Full jitter: uniform in [0, min(max, min * 2^failures)]. Spreads a fleet's reconnects
/// after an outage instead of having them arrive in waves.
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let ceiling = min
        .checked_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::random_range(0..=ms))
}

/// The TLS set-up for `wss://` URLs (rustls, like every other TLS herald speaks): the
/// system's roots plus the `--ca-file` bundle. `None` for `ws://`, which needs none.
fn tls_connector(opts: &ConnectOptions) -> Result<Option<Connector>, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    if !opts.url.starts_with("wss://") {
        if opts.ca_file.is_some() {
            tracing::warn!("--ca-file is only used for wss:// URLs");
        }
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "could not load some system root certificates");
    }
    let (_, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "system root certificates rustls could not use");
    }
    if let Some(path) = &opts.ca_file {
        let bad =
            |e: &dyn std::fmt::Display| ClientError::BadCaFile(format!("{}: {e}", path.display()));
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(&"holds no PEM certificate"));
        }
    }
    if roots.is_empty() {
        return Err(ClientError::BadCaFile(
            "no trusted root certificates: the system has none; pass --ca-file".into(),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::BadCaFile(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Connector::Rustls(std::sync::Arc::new(config))))
}

async fn connect_once(
    opts: &ConnectOptions,
    tls: Option<Connector>,
    seen: &mut lru::LruCache<String, ()>,
    out: &mut (dyn Write + Send),
    stop: &CancellationToken,
) -> End {
    let mut request = match opts.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return End::Fatal(ClientError::BadUrl(e.to_string())),
    };
    let auth = match format!("Bearer {}", opts.token).parse() {
        Ok(v) => v,
        Err(_) => {
            return End::Fatal(ClientError::Unauthorized(
                "token is not a valid header value".into(),
            ));
        }
    };
    request.headers_mut().insert("authorization", auth);
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, tls);
    let mut ws = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting) => match r {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tungstenite::Error::Http(res))) if res.status().as_u16() == 401 => {
                let body = res.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                let message = serde_json::from_str::<Value>(&body).ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                return End::Fatal(ClientError::Unauthorized(message));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "connect failed");
                return End::Lost { established: false };
            }
            Err(_) => {
                tracing::warn!("connect timed out");
                return End::Lost { established: false };
            }
        },
        _ = stop.cancelled() => return End::Stopped,
    };
    // Until hello says otherwise.
    let mut silence_limit = HANDSHAKE_TIMEOUT;
    let mut established = false;
    loop {
        let msg = tokio::select! {
            r = tokio::time::timeout(silence_limit, ws.next()) => match r {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "connection error");
                    return End::Lost { established };
                }
                Ok(None) => return End::Lost { established },
                Err(_) => {
                    tracing::warn!(silent_for = ?silence_limit, "no traffic from the server: declaring it dead");
                    return End::Lost { established };
                }
            },
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return End::Stopped;
            }
        };
        match msg {
            Message::Text(text) => {
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    tracing::warn!("server sent a frame that is not JSON; ignoring it");
                    continue;
                };
                match frame["type"].as_str() {
                    Some("hello") => {
                        let ms = |k: &str| frame[k].as_u64().unwrap_or(0);
                        let limit = ms("ping_interval_ms") + ms("pong_timeout_ms");
                        if limit > 0 {
                            silence_limit = Duration::from_millis(limit);
                        }
                        established = true;
                        tracing::info!(
                            session = frame["session_id"].as_str().unwrap_or(""),
                            device = frame["device_id"].as_str().unwrap_or(""),
                            "connected"
                        );
                    }
                    Some("notification") => {
                        let Some(id) = frame["id"].as_str().map(str::to_owned) else {
                            tracing::warn!("notification without an id; ignoring it");
                            continue;
                        };
                        if seen.put(id.clone(), ()).is_none() {
                            let mut printed = frame.clone();
                            if let Some(obj) = printed.as_object_mut() {
                                obj.remove("type");
                            }
                            let line = printed.to_string();
                            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                                // stdout is gone (e.g. the pipe closed): nothing left to do.
                                return End::Stopped;
                            }
                        } else {
                            tracing::debug!(id, "duplicate notification: acked, not printed");
                        }
                        let ack = serde_json::json!({"type": "ack", "id": id}).to_string();
                        if ws.send(Message::Text(ack.into())).await.is_err() {
                            return End::Lost { established };
                        }
                    }
                    Some("error") => tracing::warn!(
                        code = frame["code"].as_str().unwrap_or(""),
                        message = frame["message"].as_str().unwrap_or(""),
                        "server reported an error"
                    ),
                    _ => {}
                }
            }
            // tungstenite queued the pong while reading; push it out now.
            Message::Ping(_) if ws.flush().await.is_err() => return End::Lost { established },
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((u16::from(CloseCode::Normal), String::new()));
                tracing::info!(code, reason, "server closed the session");
                return match code {
                    close::REPLACED => End::Fatal(ClientError::Replaced),
                    close::SHUTDOWN => {
                        let advised = reason
                            .strip_prefix("reconnect_after_ms=")
                            .and_then(|ms| ms.parse::<u64>().ok())
                            .map(Duration::from_millis);
                        match advised {
                            Some(d) => End::ReconnectAfter(d.min(opts.backoff_max)),
                            None => End::Lost { established: false },
                        }
                    }
                    _ => End::Lost { established },
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        for failures in [0, 1, 5, 40, u32::MAX] {
            let ceiling = (min * 2u32.saturating_pow(failures.min(20))).min(max);
            for _ in 0..50 {
                assert!(backoff(min, max, failures) <= ceiling);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| backoff(min, max, 5)).collect();
        assert!(spread.len() > 10, "full jitter should spread delays");
    }
}
