//! Why a connect was refused before any session existed, and its two renderings: an actix
//! response on the plain request path ([`super::handler`]) and raw HTTP/1.1 bytes on the
//! upgrade path ([`super::upgrade`]), where actix has already handed over the socket.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{
    ACCESS_CONTROL_ALLOW_ORIGIN, ALLOW, RETRY_AFTER, SEC_WEBSOCKET_VERSION, WWW_AUTHENTICATE,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::token::TokenError;

/// The status, the stable error code, and the headers that go with it.
#[derive(Debug)]
pub(crate) struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
    /// `Retry-After`, in seconds.
    retry_after: Option<u64>,
    /// `Allow: GET` (a 405 on the upgrade path).
    allow_get: bool,
    /// `Sec-WebSocket-Version: 13` (a 426 for another version, RFC 6455 §4.2.2).
    ws_version: bool,
}

impl Refusal {
    /// Any refusal without extra headers.
    pub(super) fn plain(status: u16, code: &'static str, message: &str) -> Refusal {
        Refusal {
            status,
            code,
            message: message.to_owned(),
            retry_after: None,
            allow_get: false,
            ws_version: false,
        }
    }

    /// 429: this device or address is connecting too fast; retry after `retry_after`.
    pub(super) fn too_many_connects(message: &str, retry_after: u64) -> Refusal {
        Refusal {
            retry_after: Some(retry_after),
            ..Refusal::plain(429, "too_many_connects", message)
        }
    }

    /// 426 with `Sec-WebSocket-Version: 13`: the only version this server speaks.
    pub(super) fn wrong_websocket_version() -> Refusal {
        Refusal {
            ws_version: true,
            ..Refusal::plain(
                426,
                "unsupported_websocket_version",
                "unsupported WebSocket version; this server speaks Sec-WebSocket-Version: 13",
            )
        }
    }

    /// 401 with a Bearer challenge: the device token is missing, expired or invalid.
    pub(super) fn unauthorized(e: &TokenError) -> Refusal {
        Refusal::plain(401, "unauthorized", &e.to_string())
    }

    /// 503: try again after `retry_after` seconds, or another node.
    pub(super) fn unavailable(code: &'static str, message: &str, retry_after: u64) -> Refusal {
        Refusal {
            retry_after: Some(retry_after),
            ..Refusal::plain(503, code, message)
        }
    }

    /// 405 for anything but GET.
    pub(super) fn method_not_allowed() -> Refusal {
        Refusal {
            allow_get: true,
            ..Refusal::plain(
                405,
                "method_not_allowed",
                "method not allowed; this endpoint accepts GET",
            )
        }
    }

    /// The `reason` label of `herald_gateway_sessions_refused_total`.
    pub(super) fn reason_label(&self) -> &'static str {
        self.code
    }

    fn bearer_challenge(&self) -> bool {
        self.status == 401
    }

    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The plain-request rendering. `Access-Control-Allow-Origin: *`: the answer holds no
    /// secret (an error code and message), and a browser client must read the status of a
    /// cross-origin `GET /v1/connect` to tell a refused token (401: stop) from a network
    /// failure (retry), which a WebSocket close event never says.
    pub(super) fn into_response(self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status());
        res.insert_header((ACCESS_CONTROL_ALLOW_ORIGIN, "*"));
        if self.bearer_challenge() {
            res.insert_header((WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(secs) = self.retry_after {
            res.insert_header((RETRY_AFTER, secs.to_string()));
        }
        if self.allow_get {
            res.insert_header((ALLOW, "GET"));
        }
        if self.ws_version {
            res.insert_header((SEC_WEBSOCKET_VERSION, "13"));
        }
        res.content_type("application/json")
            .body(crate::http_error::body(self.code, &self.message))
    }

    /// Writes the refusal as raw HTTP/1.1 and closes the connection (an upgrade request's
    /// connection is not reused).
    pub(super) async fn write_raw(self, io: &mut TcpStream) -> Result<(), std::io::Error> {
        let body = crate::http_error::body(self.code, &self.message);
        let reason = self.status().canonical_reason().unwrap_or("Error");
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.status,
            body.len()
        );
        if self.bearer_challenge() {
            head.push_str("www-authenticate: Bearer\r\n");
        }
        if let Some(secs) = self.retry_after {
            head.push_str(&format!("retry-after: {secs}\r\n"));
        }
        if self.allow_get {
            head.push_str("allow: GET\r\n");
        }
        if self.ws_version {
            head.push_str("sec-websocket-version: 13\r\n");
        }
        head.push_str("\r\n");
        head.push_str(&body);
        io.write_all(head.as_bytes()).await?;
        io.shutdown().await
    }
}
