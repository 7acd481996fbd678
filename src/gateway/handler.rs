//! The actix handler for `GET /v1/connect` requests that do not ask to upgrade.

use actix_web::{HttpRequest, HttpResponse, web};

use super::Gateway;
use super::refusal::Refusal;

/// `GET /v1/connect` *without* an `Upgrade` header: WebSocket upgrades never reach the
/// actix app (they go to [`super::upgrade`]), so this answers only plain requests: the
/// same admission checks (a bad token is still a 401), then 400 because there is nothing
/// to upgrade.
pub async fn connect(req: HttpRequest, gateway: web::Data<Gateway>) -> HttpResponse {
    match gateway.admit(req.headers(), req.query_string()).await {
        Err(refusal) => refusal.into_response(),
        Ok(_) => Refusal::plain(
            400,
            "invalid_request",
            "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        )
        .into_response(),
    }
}
