//! herald: a push-notification dispatch service.
//!
//! Follow a notification through the modules:
//!
//! - [`config`]: the settings tree, layering, validation, typed secrets.
//! - [`startup`]: binds the listener, builds the queue, starts the enabled roles; the drain.
//! - [`shutdown`]: one cancellation signal that reaches every loop; SIGTERM/SIGINT.
//! - [`api`]: the HTTP edge: `POST /v1/notify`, health, metrics, errors → HTTP.
//! - [`domain`]: parsed types: notification, targets, device ids, tokens, priority, ttl.
//! - [`providers`]: APNs and FCM payloads (and, with the dispatcher, their transports).
//! - [`queue`]: the queue contract and its two backends, embedded and RabbitMQ.
//! - [`metrics`]: every metric herald exports.
//! - [`telemetry`]: logging.
//!
//! ARCHITECTURE.md walks the data path end to end.

pub mod api;
pub mod config;
pub mod domain;
pub mod metrics;
pub mod providers;
pub mod queue;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
