//! Provider fallbacks: APNs and FCM.
//!
//! Each provider builds its wire payload from a queued notification (the API uses the same
//! builders to reject a payload over a provider's size limit before it is queued), sends it
//! over its own HTTP/2 client, and classifies the answer once, into a [`ProviderOutcome`];
//! the dispatcher acts on that class and never looks at a status code.
//!
//! Each provider is a bulkhead: its own connection pool, its own bounded concurrency, its own
//! circuit breaker (`[apns]` / `[fcm]` `concurrency`, `timeout`, `breaker_*`), so an APNs
//! outage cannot starve FCM sends or the reverse.

pub mod apns;
mod breaker;
pub mod fcm;
mod transport;

pub use transport::check_url;

use std::time::Duration;

pub use apns::ApnsClient;
pub use breaker::{Admission, CircuitBreaker, Transition};
pub use fcm::FcmClient;

use crate::config::Settings;
use crate::domain::{NotifyError, QueuedNotification, TargetRoute};
use crate::metrics::Metrics;

/// Every delivery failure is classified once, here; the dispatcher acts on the class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderOutcome {
    /// The provider accepted the notification for the device.
    Delivered,
    /// The token will never work again (app uninstalled, token invalid or for another app):
    /// never retried; emit a token-dead event so the caller deletes it.
    TokenDead { reason: String },
    /// Worth retrying with backoff (429, 5xx, timeouts, resets, circuit open); wait at least
    /// `retry_after` when the provider said so.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// herald's configuration (key, topic, project, permissions) or request is wrong: loud,
    /// counted, not retried forever.
    ConfigError { reason: String },
}

impl ProviderOutcome {
    /// The `outcome` label of `herald_deliveries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderOutcome::Delivered => "delivered",
            ProviderOutcome::TokenDead { .. } => "token_dead",
            ProviderOutcome::Transient { .. } => "transient",
            ProviderOutcome::ConfigError { .. } => "config_error",
        }
    }
}

/// The configured providers. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Providers {
    apns: Option<ApnsClient>,
    fcm: Option<FcmClient>,
}

impl Providers {
    /// Builds the providers `[apns]` and `[fcm]` configure (an empty `apns.key_file` /
    /// `fcm.service_account_file` leaves that one out). Reads and checks the key files now;
    /// errors name the config key.
    pub fn from_settings(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Providers> {
        Ok(Providers {
            apns: ApnsClient::from_settings(&settings.apns, metrics)?,
            fcm: FcmClient::from_settings(&settings.fcm, metrics)?,
        })
    }

    /// Built from clients directly (tests that tune a client, e.g. its JWT refresh age).
    pub fn new(apns: Option<ApnsClient>, fcm: Option<FcmClient>) -> Providers {
        Providers { apns, fcm }
    }

    /// Whether the provider of `route` is configured.
    pub fn has(&self, route: &TargetRoute<'_>) -> bool {
        match route {
            TargetRoute::Apns(_) => self.apns.is_some(),
            TargetRoute::Fcm(_) => self.fcm.is_some(),
        }
    }

    /// Sends `n` through `route`'s provider. The caller drops expired notifications first;
    /// the provider is told the remaining ttl (apns-expiration, android.ttl).
    pub async fn send(&self, route: TargetRoute<'_>, n: &QueuedNotification) -> ProviderOutcome {
        match route {
            TargetRoute::Apns(token) => match &self.apns {
                Some(c) => c.send(token, n).await,
                None => ProviderOutcome::ConfigError {
                    reason: "APNs is not configured (apns.key_file is empty)".into(),
                },
            },
            TargetRoute::Fcm(token) => match &self.fcm {
                Some(c) => c.send(token, n).await,
                None => ProviderOutcome::ConfigError {
                    reason: "FCM is not configured (fcm.service_account_file is empty)".into(),
                },
            },
        }
    }
}

/// Counts and logs the outcomes that need a person's attention, the same way for both
/// providers. `token` is the redacted Debug form.
fn note_outcome(
    metrics: &Metrics,
    provider: &'static str,
    n: &QueuedNotification,
    token: &dyn std::fmt::Debug,
    outcome: &ProviderOutcome,
) {
    match outcome {
        ProviderOutcome::TokenDead { reason } => {
            metrics.tokens_dead.with_label_values(&[provider]).inc();
            tracing::info!(notification = %n.id, ?token, %reason, provider, "token dead");
        }
        ProviderOutcome::ConfigError { reason } => {
            tracing::warn!(notification = %n.id, ?token, %reason, provider, "provider configuration error");
        }
        _ => {}
    }
}

/// Rejects a notification whose APNs or FCM payload would exceed the provider's limit, for
/// the routes its targets actually use.
pub fn check_payload_sizes(n: &QueuedNotification) -> Result<(), NotifyError> {
    if n.targets.iter().any(|t| t.apns.is_some()) {
        let size = apns::payload_size(n);
        if size > apns::MAX_PAYLOAD_BYTES {
            return Err(NotifyError::PayloadTooLarge {
                provider: "APNs",
                size,
                limit: apns::MAX_PAYLOAD_BYTES,
            });
        }
    }
    if n.targets.iter().any(|t| t.fcm.is_some()) {
        let size = fcm::payload_size(n);
        if size > fcm::MAX_PAYLOAD_BYTES {
            return Err(NotifyError::PayloadTooLarge {
                provider: "FCM",
                size,
                limit: fcm::MAX_PAYLOAD_BYTES,
            });
        }
    }
    Ok(())
}
