//! The actix handlers for `GET /v1/connect` requests that do not ask to upgrade, and the
//! CORS preflight for them.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use super::Gateway;
use super::refusal::Refusal;

/// How long a browser may cache the preflight answer: it never changes while a node runs.
const PREFLIGHT_MAX_AGE_SECS: &str = "86400";

/// `GET /v1/connect` *without* an `Upgrade` header: WebSocket upgrades never reach the
/// actix app (they go to [`super::upgrade`]), so this answers only plain requests: the
/// token check (a bad token is still a 401, which browser clients read to stop retrying),
/// then 400 because there is nothing to upgrade. It spends no admission limit: nothing
/// here can become a session.
pub async fn connect(req: HttpRequest, gateway: web::Data<Gateway>) -> HttpResponse {
    match gateway.authenticate(req.headers(), req.query_string()) {
        Err(refusal) => refusal.into_response(),
        Ok(_) => Refusal::plain(
            400,
            "invalid_request",
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        )
        .into_response(),
    }
}

/// `OPTIONS /v1/connect`: the CORS preflight a browser sends before the status probe
/// `GET /v1/connect` with `Authorization: Bearer` (the token off the URL, so out of
/// access logs). Any origin: the answer to the probe is a status and an error code.
pub async fn connect_preflight() -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization"))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, PREFLIGHT_MAX_AGE_SECS))
        .finish()
}
