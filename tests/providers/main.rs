//! The APNs and FCM clients against local HTTP/2 doubles that speak the real wire formats:
//! every outcome class, auth (JWT / OAuth2) reuse and refresh, TLS with a CA file, the
//! bulkheads and the circuit breaker.

#[path = "../support/mod.rs"]
mod support;

mod apns;
mod apps;
mod endpoints;
mod fcm;
mod resilience;

use std::time::Duration;

use herald::config::Settings;
use herald::domain::{ApnsRoute, ApnsToken, FcmToken, QueuedNotification};
use herald::metrics::Metrics;
use herald::providers::Providers;

use support::apns_double::ApnsDouble;
use support::fcm_double::FcmDouble;
pub use support::fixtures::notification;

/// Settings with both providers off and short limits; `configure` a double to turn one on.
pub fn settings() -> Settings {
    let mut s = Settings::defaults();
    s.apns.timeout = Duration::from_secs(5);
    s.fcm.timeout = Duration::from_secs(5);
    s
}

pub fn providers(s: &Settings) -> (Providers, Metrics) {
    let metrics = Metrics::new();
    let p = Providers::from_settings(s, &metrics).expect("providers build");
    (p, metrics)
}

pub fn with_apns(double: &ApnsDouble) -> (Providers, Metrics) {
    let mut s = settings();
    double.configure(&mut s);
    providers(&s)
}

pub fn with_fcm(double: &FcmDouble) -> (Providers, Metrics) {
    let mut s = settings();
    double.configure(&mut s);
    providers(&s)
}

/// A plain alert for one device.
pub fn alert() -> QueuedNotification {
    notification(serde_json::json!({
        "targets": [{"device_id": "phone-1"}],
        "notification": {"title": "Hi", "body": "You have a message"},
        "data": {"thread": "t-1"},
        "ttl": "1h",
    }))
}

/// A distinct APNs device token per `n`.
pub fn apns_token(n: u32) -> ApnsToken {
    ApnsToken::parse(format!("{n:08x}{}", "ab".repeat(28))).unwrap()
}

/// An APNs route to `token` in the app's default environment.
pub fn route(token: &ApnsToken) -> ApnsRoute {
    ApnsRoute {
        token: token.clone(),
        environment: None,
    }
}

pub fn fcm_token(name: &str) -> FcmToken {
    FcmToken::parse(format!("fcm-{name}:APA91b{}", "x".repeat(100))).unwrap()
}

/// The value of a counter/histogram-count line in the metrics text.
pub fn metric(metrics: &Metrics, line_prefix: &str) -> f64 {
    support::metric_value(&metrics.render(), line_prefix)
        .unwrap_or_else(|| panic!("no metric series {line_prefix}"))
}
