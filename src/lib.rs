//! herald: a push-notification dispatch service.
//!
//! Follow a notification through the modules:
//!
//! - [`config`]: the settings tree, layering, validation, typed secrets.
//! - [`startup`]: binds the listener, builds the queue, starts the enabled roles; the drain.
//! - [`http_server`]: actix-web's app on actix-http, with the gateway's raw-socket upgrade.
//! - [`shutdown`]: the shutdown signal, the ordered tree of stop tokens; SIGTERM/SIGINT.
//! - [`api`]: the HTTP edge: `POST /v1/notify`, health, metrics, errors → HTTP.
//! - [`http_error`]: the one `{"error": {"code", "message"}}` body (API and gateway).
//! - [`domain`]: parsed types: notification, targets, device ids, tokens, priority, ttl.
//! - [`dispatch`]: consume, expand targets, live then fallback, the offline inbox, retries,
//!   dead letters, the inbox reaper.
//! - [`events`]: outcome events to the `herald.events` exchange and an optional webhook.
//! - [`directory`]: live delivery to a device, answered acked, not acked in time, or offline.
//! - [`gateway`]: device WebSocket sessions: token check, heartbeat, acks, close codes.
//! - [`client`]: `herald connect`, the reference device client.
//! - [`providers`]: APNs and FCM: payloads, auth, HTTP/2 transports, one outcome class per
//!   answer, a bulkhead and circuit breaker per provider.
//! - [`queue`]: the queue contract and its two backends, embedded and RabbitMQ.
//! - [`inbox`]: the offline inbox: pending notifications per device; memory and PostgreSQL.
//! - [`metrics`]: every metric herald exports.
//! - [`telemetry`]: logging setup.
//!
//! ARCHITECTURE.md walks the data path end to end.

pub mod api;
pub mod checks;
pub mod client;
pub mod config;
pub mod directory;
pub mod dispatch;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod http_error;
pub mod http_server;
pub mod inbox;
pub mod metrics;
pub mod providers;
pub mod queue;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
