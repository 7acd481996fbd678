//! `POST /v1/notify` (and `POST /notify`): parse, check, queue durably, answer 202.

use std::time::{Instant, SystemTime};

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::StreamExt;
use serde_json::json;
use tracing::Instrument;

use super::{ApiError, AppState, Caller};
use crate::domain::NotifyRequest;
use crate::providers;

pub async fn notify(
    state: web::Data<AppState>,
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if state.shutdown.is_cancelled() && matches!(state.queue, crate::queue::Queue::Memory(_)) {
        // The embedded queue dies with this process, which is now exiting: accepting would
        // promise what cannot be kept. (RabbitMQ keeps accepting while draining: the work
        // outlives this process.)
        return Err(ApiError::QueueUnavailable {
            retry_after: state.retry_after,
            cause: crate::queue::QueueError::Closed,
        });
    }
    // Before the body is read: an app over its rate costs herald as little as possible.
    caller.admit_notification()?;
    require_json(&req)?;
    let body = read_body(payload, state.max_body_bytes).await?;
    // serde_path_to_error names the field at fault ("targets[3].device_id: ...").
    let de = &mut serde_json::Deserializer::from_slice(&body);
    let request: NotifyRequest = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." => {
                ApiError::InvalidRequest(format!("{path}: {inner}"))
            }
            serde_json::error::Category::Data => ApiError::InvalidRequest(inner.to_string()),
            _ => ApiError::InvalidJson(inner.to_string()),
        }
    })?;
    // The body is exactly one JSON value: `{...} xx` is not "a request with some noise",
    // it is a body some other layer may read differently (a proxy, a logger, a WAF).
    de.end().map_err(|e| {
        ApiError::InvalidJson(format!(
            "the body must be exactly one JSON value; found more after it: {e}"
        ))
    })?;
    let mut notification = request.parse(state.limits, SystemTime::now())?;
    notification.app = caller.app().clone();
    providers::check_payload_sizes(&notification)?;
    check_live_frame(&notification, state.max_frame_bytes)?;

    let span = tracing::info_span!("notify", id = %notification.id, app = %notification.app, targets = notification.targets.len());
    let started = Instant::now();
    let published = state
        .queue
        .publish(&notification)
        .instrument(span.clone())
        .await;
    let m = &state.metrics;
    match published {
        Ok(()) => {
            m.queue_publish_duration
                .observe(started.elapsed().as_secs_f64());
            let app = [notification.app.as_str()];
            m.notifications_accepted.with_label_values(&app).inc();
            m.targets_accepted
                .with_label_values(&app)
                .inc_by(notification.targets.len() as u64);
            span.in_scope(|| tracing::debug!("queued"));
            Ok(HttpResponse::Accepted().json(json!({"id": notification.id.to_string()})))
        }
        Err(cause) => {
            m.queue_publish_failures
                .with_label_values(&[cause.reason()])
                .inc();
            Err(ApiError::QueueUnavailable {
                retry_after: state.retry_after,
                cause,
            })
        }
    }
}

/// The notification frame a device's session would be sent must fit `notify.max_frame_bytes`.
/// A target with only a `device_id` has no provider payload limit behind it, so without
/// this the only bound would be the request body (1 MiB): too big for a session's outgoing
/// buffer, and refused here rather than failing on every delivery attempt.
fn check_live_frame(n: &crate::domain::QueuedNotification, limit: usize) -> Result<(), ApiError> {
    let size = crate::gateway::protocol::notification_json(n).len();
    if size > limit {
        return Err(ApiError::InvalidRequest(format!(
            "the live notification frame would be {size} bytes; the limit is {limit} (notify.max_frame_bytes)"
        )));
    }
    Ok(())
}

/// `application/json`, with or without parameters such as `charset=utf-8`.
fn require_json(req: &HttpRequest) -> Result<(), ApiError> {
    let ok = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Reads the body, refusing (413) as soon as it passes `limit`: a declared Content-Length
/// over the limit is refused before reading a byte, a chunked body as soon as it crosses it.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::BodyTooLarge(limit),
            e => ApiError::InvalidRequest(format!("could not read the request body: {e}")),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
