//! The WebSocket upgrade, done on the raw socket.
//!
//! Every HTTP/1.1 request that asks to upgrade (`Connection: Upgrade`) is handed here by
//! actix-http's dispatcher *with the TCP stream itself* (see `startup.rs`, which installs
//! this as the server's upgrade service). herald checks the device token and the node's
//! admission exactly as for any connect, answers the WebSocket handshake, drops actix's
//! per-connection read and write buffers (8 KiB each, kept for the life of a connection
//! that stays inside actix, twice the per-session memory target on their own), and runs
//! the session on tokio-tungstenite configured with small buffers. docs/benchmarks.md
//! ("Gateway") has the before and after.

use actix_codec::Framed;
use actix_http::{HttpMessage, Method, Request, h1};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::{Gateway, Refusal, session, token};

/// tungstenite's read buffer per session. Device frames are acks and pings of ~100 bytes;
/// 1 KiB holds several, and the buffer grows (up to `gateway.max_frame_bytes`) for the
/// rare larger frame. tungstenite's default, 128 KiB, would be ~16x the whole session
/// budget.
const READ_BUFFER_BYTES: usize = 1024;

/// The upgrade service: `gateway` is `None` on a node without the gateway role. A failed
/// write means the client went away; actix logs the error and drops the connection.
pub async fn handle(
    gateway: Option<Gateway>,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error> {
    upgrade(gateway, req, framed).await.map_err(Into::into)
}

async fn upgrade(
    gateway: Option<Gateway>,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), std::io::Error> {
    let parts = framed.into_parts();
    let mut io = parts.io;
    // Bytes the client sent after its request head (it may pipeline its first frames).
    let early = parts.read_buf.to_vec();
    drop(parts.write_buf);

    let Some(gateway) = gateway.filter(|_| req.path() == "/v1/connect") else {
        return Refusal::plain(
            404,
            "not_found",
            &format!("no such endpoint: {}", req.path()),
        )
        .write_raw(&mut io)
        .await;
    };
    if req.method() != Method::GET {
        return Refusal::method_not_allowed().write_raw(&mut io).await;
    }
    let headers = req.headers();
    // The handshake's own headers first: they cost nothing to check, and a request that
    // could never become a session must not spend a token check or any admission limit.
    let key = match handshake_key(headers) {
        Ok(key) => key,
        Err(refusal) => return refusal.write_raw(&mut io).await,
    };
    let tcp = io
        .peer_addr()
        .unwrap_or((std::net::Ipv4Addr::UNSPECIFIED, 0).into());
    let (device, peer) = match gateway
        .admit(headers, req.uri().query().unwrap_or(""), tcp)
        .await
    {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.write_raw(&mut io).await,
    };
    // A browser that offered subprotocols (its token rides in one) fails the handshake
    // unless one comes back: select `herald.v1` when offered, never the bearer entry.
    let offered = headers
        .get_all("sec-websocket-protocol")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == token::PROTOCOL);
    let protocol = if offered {
        format!("Sec-WebSocket-Protocol: {}\r\n", token::PROTOCOL)
    } else {
        String::new()
    };
    let accept = derive_accept_key(key.as_bytes());
    io.write_all(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
        )
        .as_bytes(),
    )
    .await?;

    let max = gateway.settings().max_frame_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        // 0: every frame is written out at once; notification frames are latency-bound,
        // and nothing is held back in a per-session buffer.
        .write_buffer_size(0)
        // The most unsent bytes tungstenite holds. Sized from what the server writes (the
        // largest notification frame, notify.max_frame_bytes), not from what devices may
        // send: a frame bigger than this cannot be written at all. Twice it leaves room
        // for a control or error frame queued behind one large notification. A device
        // that stops reading is stopped earlier, by gateway.send_buffer (4004).
        .max_write_buffer_size(gateway.0.max_notification_frame_bytes * 2)
        .max_frame_size(Some(max))
        .max_message_size(Some(max));
    let ws = WebSocketStream::from_partially_read(io, early, Role::Server, Some(config)).await;
    actix_web::rt::spawn(gateway.track_session(session::run(gateway.clone(), device, peer, ws)));
    Ok(())
}

/// Checks the WebSocket handshake headers (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Key`: `Upgrade: websocket`, version 13 (else 426 naming it, §4.2.2), and
/// a key that is the base64 of 16 bytes (else 400).
fn handshake_key(headers: &actix_http::header::HeaderMap) -> Result<&str, Refusal> {
    use base64::Engine;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if !header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return Err(Refusal::plain(
            400,
            "invalid_request",
            "expected a WebSocket upgrade (Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)",
        ));
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal::wrong_websocket_version());
    }
    let key = header("sec-websocket-key").map(str::trim).unwrap_or("");
    let decoded = base64::engine::general_purpose::STANDARD.decode(key);
    if !decoded.is_ok_and(|k| k.len() == 16) {
        return Err(Refusal::plain(
            400,
            "invalid_request",
            "Sec-WebSocket-Key must be the base64 of 16 bytes (RFC 6455 section 4.1)",
        ));
    }
    Ok(key)
}
