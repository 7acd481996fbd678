//! The API's error type: every failure a caller can see, with its HTTP status and a stable
//! JSON body `{"error": {"code": "...", "message": "..."}}`. Causes are logged in full; the
//! caller gets the code and a message meant for them.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use actix_web::{HttpResponse, ResponseError};

use crate::domain::NotifyError;
use crate::queue::QueueError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    ProviderPayloadTooLarge(String),
    #[error("missing or invalid API key: send `Authorization: Bearer <api key>`")]
    Unauthorized,
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("method not allowed; this endpoint accepts {0}")]
    MethodNotAllowed(&'static str),
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("app `{app}` is over its max_notify_rate; retry after the time in Retry-After")]
    RateLimited {
        app: crate::domain::AppId,
        retry_after: Duration,
    },
    #[error("the notification could not be queued durably; retry later")]
    QueueUnavailable {
        retry_after: Duration,
        #[source]
        cause: QueueError,
    },
    #[error("an internal error occurred")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::ProviderPayloadTooLarge(_) => "provider_payload_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QueueUnavailable { .. } => "queue_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<NotifyError> for ApiError {
    fn from(e: NotifyError) -> Self {
        match e {
            NotifyError::Invalid(m) => ApiError::InvalidRequest(m),
            e @ NotifyError::PayloadTooLarge { .. } => {
                ApiError::ProviderPayloadTooLarge(e.to_string())
            }
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest(_)
            | ApiError::ProviderPayloadTooLarge(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueueUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut res = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                res.insert_header((WWW_AUTHENTICATE, "Bearer"));
            }
            ApiError::MethodNotAllowed(allow) => {
                res.insert_header((ALLOW, *allow));
            }
            ApiError::QueueUnavailable { retry_after, cause } => {
                tracing::warn!(error = %cause, "notify: queue unavailable, answered 503");
                res.insert_header((RETRY_AFTER, retry_after.as_secs().max(1).to_string()));
            }
            ApiError::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up: a client that waits this long finds a token.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                res.insert_header((RETRY_AFTER, secs.max(1).to_string()));
            }
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
            }
            _ => {}
        }
        res.content_type("application/json")
            .body(crate::http_error::body(self.code(), &self.to_string()))
    }
}
