//! The HTTP edge: routes, shared state, and the JSON error contract.
//!
//! | route | handler |
//! |---|---|
//! | `POST /v1/notify`, `POST /notify` | [`notify::notify`] |
//! | `POST /v1/devices/{device_id}/token` | [`devices::mint_token`] |
//! | `GET /v1/connect` (gateway role) | [`crate::gateway::connect`] |
//! | `GET /healthz`, `GET /readyz`, `GET /metrics` | [`health`] |
//!
//! Anything else is a JSON 404; a known path with the wrong method is a JSON 405 with `Allow`.

mod auth;
mod devices;
mod error;
mod health;
mod notify;
mod rate;

use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, web};

pub use auth::{ApiKeys, Caller};
pub use error::ApiError;

use crate::domain::NotifyLimits;
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::shutdown::Shutdown;

/// What every handler shares.
pub struct AppState {
    pub queue: Queue,
    /// This process runs the dispatcher: ready only while its consumer runs.
    pub require_consumer: bool,
    /// Cluster mode: ready only while the cluster directory is registered.
    pub cluster: Option<crate::directory::ClusterDirectory>,
    pub metrics: Metrics,
    pub limits: NotifyLimits,
    pub max_body_bytes: usize,
    /// `notify.max_frame_bytes`: the largest live notification frame accepted.
    pub max_frame_bytes: usize,
    pub retry_after: Duration,
    pub shutdown: Shutdown,
}

/// Registers the routes of the roles this process runs.
pub fn configure(cfg: &mut web::ServiceConfig, api_role: bool) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics));
    for path in ["/healthz", "/readyz", "/metrics"] {
        // Registered after the GET routes: only other methods reach this.
        cfg.route(path, web::route().to(|| method_not_allowed("GET")));
    }
    if api_role {
        cfg.service(
            web::resource("/v1/devices/{device_id}/token")
                .route(web::post().to(devices::mint_token))
                .default_service(web::to(|| method_not_allowed("POST"))),
        );
        for path in ["/v1/notify", "/notify"] {
            cfg.service(
                web::resource(path)
                    .route(web::post().to(notify::notify))
                    .default_service(web::to(|| method_not_allowed("POST"))),
            );
        }
    }
}

/// Registers the device WebSocket endpoint (gateway role).
pub fn configure_gateway(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/connect")
            .route(web::get().to(crate::gateway::connect))
            .route(
                web::method(actix_web::http::Method::OPTIONS).to(crate::gateway::connect_preflight),
            )
            .default_service(web::to(|| method_not_allowed("GET"))),
    );
}

async fn method_not_allowed(allow: &'static str) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(allow))
}

/// The app-wide fallback: a JSON 404.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(req.path().to_owned()))
}

/// Counts and times every request by route pattern (not raw path, which would explode the
/// label set), method and status.
pub async fn record_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    // Bounded label set: an arbitrary method name must not mint a new series.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        m.http_requests
            .with_label_values(&[&route, &method, res.status().as_str()])
            .inc();
        m.http_duration
            .with_label_values(&[&route])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(res)
}
