//! `/healthz` (the process is alive) and `/readyz` (it can do its job: send it traffic).

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready when the queue is connected (for an API process on RabbitMQ: and the work
/// exchange a dispatcher declares exists, else `queue = waiting_for_topology`), the dispatcher's consumer runs (if this process runs
/// the dispatcher), the cluster directory is registered (cluster mode), and the process is
/// not draining. Kubernetes stops
/// routing to a pod that is not ready, so during a broker outage or a shutdown callers are
/// steered to other replicas.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let queue = if state.queue.is_connected() {
        "connected"
    } else if state.queue.awaiting_topology() {
        // An API process on RabbitMQ declares nothing: the work exchange is the
        // dispatcher's, and none has declared it on this vhost yet.
        "waiting_for_topology"
    } else {
        "disconnected"
    };
    let draining = state.shutdown.is_cancelled();
    let consumers = state.metrics.consumers_running.get();
    let consuming = !state.require_consumer || consumers > 0;
    let directory = state.cluster.as_ref().map(|c| c.is_ready());
    let ready = queue == "connected" && consuming && !draining && directory != Some(false);
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "queue": queue,
            "backend": state.queue.backend_name(),
            "draining": draining,
            "consumers": consumers,
            "directory": match directory {
                None => "local",
                Some(true) => "registered",
                Some(false) => "unregistered",
            },
        }
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
