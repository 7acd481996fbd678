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
//!
//! And each app has its own: its own key, topic, project, connection pools and bulkheads.
//! A notification goes only through its own app's clients ([`Providers::send`] picks them
//! by `n.app`), so one app's credentials never carry another's notification, and one app's
//! slow provider holds only its own slots.

pub mod apns;
mod breaker;
pub mod fcm;
mod transport;

use std::collections::HashMap;
use std::sync::OnceLock;

pub use transport::check_url;

use std::time::Duration;

pub use apns::ApnsClient;
pub use breaker::{Admission, CircuitBreaker, Transition};
pub use fcm::FcmClient;

use crate::config::{AppConfig, Settings};
use crate::domain::{AppId, NotifyError, QueuedNotification, TargetRoute};
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

/// Every app's providers. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Providers {
    apps: HashMap<AppId, AppProviders>,
}

/// One app's providers (either may be unconfigured).
struct AppProviders {
    apns: Option<ApnsClient>,
    fcm: Option<FcmClient>,
    /// `apps.<name>.` or empty for `default`: how the config names this app's keys.
    prefix: String,
}

impl Providers {
    /// Builds every app's providers ([`Settings::apps`]; an empty `apns.key_file` /
    /// `fcm.service_account_file` leaves that one out). Reads and checks the key files now;
    /// errors name the config key.
    pub fn from_settings(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Providers> {
        Self::from_apps(&settings.apps()?, metrics)
    }

    /// Builds the providers of `apps`.
    pub fn from_apps(apps: &[AppConfig], metrics: &Metrics) -> anyhow::Result<Providers> {
        let mut built = HashMap::new();
        for app in apps {
            let prefix = app.key_prefix.clone();
            built.insert(
                app.id.clone(),
                AppProviders {
                    apns: ApnsClient::for_app(&app.apns, &prefix, metrics)?,
                    fcm: FcmClient::for_app(&app.fcm, &prefix, metrics)?,
                    prefix,
                },
            );
        }
        Ok(Providers { apps: built })
    }

    /// The `default` app's providers, from clients directly (tests that tune a client, e.g.
    /// its JWT refresh age).
    pub fn new(apns: Option<ApnsClient>, fcm: Option<FcmClient>) -> Providers {
        let default = AppProviders {
            apns,
            fcm,
            prefix: String::new(),
        };
        Providers {
            apps: HashMap::from([(AppId::default_app(), default)]),
        }
    }

    /// Whether `app` has the provider of `route` configured.
    pub fn has(&self, app: &AppId, route: &TargetRoute<'_>) -> bool {
        self.apps.get(app).is_some_and(|p| match route {
            TargetRoute::Apns(_) => p.apns.is_some(),
            TargetRoute::Fcm(_) => p.fcm.is_some(),
        })
    }

    /// Sends `n` through `route`'s provider of `n`'s app, never another app's. The caller
    /// drops expired notifications first; the provider is told the remaining ttl
    /// (apns-expiration, android.ttl).
    pub async fn send(&self, route: TargetRoute<'_>, n: &QueuedNotification) -> ProviderOutcome {
        self.send_with(route, n, &Rendered::default()).await
    }

    /// As [`Providers::send`], for one of several targets of `n`: `rendered` is shared by
    /// all of them, so what they send alike is rendered once.
    pub async fn send_with(
        &self,
        route: TargetRoute<'_>,
        n: &QueuedNotification,
        rendered: &Rendered,
    ) -> ProviderOutcome {
        let Some(app) = self.apps.get(&n.app) else {
            // Queued under an app this node's config no longer (or does not yet) have.
            return ProviderOutcome::ConfigError {
                reason: format!("app `{}` is not configured on this node", n.app),
            };
        };
        let p = &app.prefix;
        match route {
            TargetRoute::Apns(apns) => match &app.apns {
                Some(c) => c.send(apns, n, &rendered.apns).await,
                None => ProviderOutcome::ConfigError {
                    reason: format!(
                        "APNs is not configured for app `{}` ({p}apns.key_file is empty)",
                        n.app
                    ),
                },
            },
            TargetRoute::Fcm(token) => match &app.fcm {
                Some(c) => c.send(token, n).await,
                None => ProviderOutcome::ConfigError {
                    reason: format!(
                        "FCM is not configured for app `{}` ({p}fcm.service_account_file is empty)",
                        n.app
                    ),
                },
            },
        }
    }
}

/// What every target of one message sends a provider alike, rendered by the first target
/// that needs it and reused by the others: one per message, shared by its targets.
///
/// Only APNs has such a part (the body and `apns-id` do not depend on the device). An FCM
/// request carries its registration token inside the JSON body, so it is built per target.
#[derive(Default)]
pub struct Rendered {
    apns: OnceLock<Result<apns::Rendered, String>>,
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
            metrics
                .tokens_dead
                .with_label_values(&[n.app.as_str(), provider])
                .inc();
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
