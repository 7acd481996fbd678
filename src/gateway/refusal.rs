//! Why a connect was refused before any session existed, and its two renderings: an actix
//! response on the plain request path ([`super::handler`]) and raw HTTP/1.1 bytes on the
//! upgrade path ([`super::upgrade`]), where actix has already handed over the socket.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header::{ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
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

    pub(super) fn into_response(self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status());
        if self.bearer_challenge() {
            res.insert_header((WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(secs) = self.retry_after {
            res.insert_header((RETRY_AFTER, secs.to_string()));
        }
        if self.allow_get {
            res.insert_header((ALLOW, "GET"));
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
        head.push_str("\r\n");
        head.push_str(&body);
        io.write_all(head.as_bytes()).await?;
        io.shutdown().await
    }
}
