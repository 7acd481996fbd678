//! `POST /v1/devices/{device_id}/token`: mint a device token for an authenticated caller,
//! for the device `device_id` of the caller's app (the token's `app` claim).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::{ApiError, Caller};
use crate::domain::DeviceId;
use crate::gateway::DeviceTokens;

pub async fn mint_token(
    caller: Caller,
    path: web::Path<String>,
    tokens: web::Data<DeviceTokens>,
) -> Result<HttpResponse, ApiError> {
    let device = DeviceId::parse(path.into_inner()).map_err(ApiError::InvalidRequest)?;
    let (token, expires_at) = tokens
        .mint_in(caller.app(), &device)
        .map_err(ApiError::Internal)?;
    let expires_at = time::OffsetDateTime::from(expires_at)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(HttpResponse::Ok().json(json!({"token": token, "expires_at": expires_at})))
}
