//! One target: live first, then every fallback route; the result the message settles on.

use std::time::{Duration, SystemTime};

use super::Dispatcher;
use crate::directory::LiveOutcome;
use crate::domain::{QueuedNotification, Target, TargetRoute, unix_millis};
use crate::events::{Event, EventKind};
use crate::providers::ProviderOutcome;

/// What a target's attempt leaves to do.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetResult {
    /// Final: delivered, or every token is dead (the caller was told).
    Done,
    /// Transient: try this target again later.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
        /// The channel that failed last (label of `herald_retries_total`).
        channel: &'static str,
    },
    /// A configuration error: park it for an operator, do not retry.
    DeadLetter { reason: String },
}

fn channel_of(route: &TargetRoute<'_>) -> &'static str {
    match route {
        TargetRoute::Apns(_) => "apns",
        TargetRoute::Fcm(_) => "fcm",
    }
}

pub async fn deliver(d: &Dispatcher, n: &QueuedNotification, t: &Target) -> TargetResult {
    let m = &d.metrics;
    let live = match &d.directory {
        Some(directory) => directory.deliver(&t.device_id, n).await,
        // No gateway in this process (and no cluster directory yet): the device cannot be
        // reached live from here.
        None => LiveOutcome::Offline,
    };
    let fallback_reason = match live {
        LiveOutcome::Acked => {
            delivered(d, n, t, "live");
            return TargetResult::Done;
        }
        LiveOutcome::NotAcked => "ack_timeout",
        LiveOutcome::Offline => "offline",
    };

    let routes: Vec<TargetRoute<'_>> = t.routes().collect();
    if routes.is_empty() {
        // Live only, and not reachable now: retry later, the device may come back within
        // the ttl. Not counted as a fallback: there is nothing to fall back to.
        return TargetResult::Retry {
            reason: format!("live {fallback_reason}, no fallback route"),
            retry_after: None,
            channel: "live",
        };
    }
    m.fallbacks.with_label_values(&[fallback_reason]).inc();

    let mut transient: Option<TargetResult> = None;
    let mut config_error: Option<String> = None;
    let mut any_delivered = false;
    for route in routes {
        let channel = channel_of(&route);
        let outcome = d.providers.send(route, n).await;
        m.deliveries
            .with_label_values(&[channel, outcome.label()])
            .inc();
        match outcome {
            ProviderOutcome::Delivered => {
                delivered(d, n, t, channel);
                any_delivered = true;
            }
            ProviderOutcome::TokenDead { reason } => {
                let token = match route {
                    TargetRoute::Apns(route) => route.token.as_str().to_owned(),
                    TargetRoute::Fcm(tok) => tok.as_str().to_owned(),
                };
                tracing::info!(device = %t.device_id, channel, %reason, "token dead");
                d.events.emit(
                    Event::new(EventKind::TokenDead, n, &t.device_id)
                        .channel(channel)
                        .reason(reason)
                        .token(token),
                );
            }
            ProviderOutcome::Transient {
                reason,
                retry_after,
            } => {
                transient = Some(TargetResult::Retry {
                    reason: format!("{channel}: {reason}"),
                    retry_after,
                    channel,
                });
            }
            ProviderOutcome::ConfigError { reason } => {
                // Loud: this needs an operator, and every target on this provider fails
                // the same way until one acts.
                tracing::error!(device = %t.device_id, channel, %reason, "provider configuration error");
                config_error = Some(format!("{channel}: {reason}"));
            }
        }
    }
    if any_delivered {
        TargetResult::Done
    } else if let Some(retry) = transient {
        retry
    } else if let Some(reason) = config_error {
        TargetResult::DeadLetter { reason }
    } else {
        // Every route's token is dead: final, and the caller has the events to prune them.
        TargetResult::Done
    }
}

fn delivered(d: &Dispatcher, n: &QueuedNotification, t: &Target, channel: &'static str) {
    if channel == "live" {
        d.metrics
            .deliveries
            .with_label_values(&["live", "delivered"])
            .inc();
    }
    let latency_ms = unix_millis(SystemTime::now()).saturating_sub(n.accepted_at_ms);
    d.metrics
        .delivery_latency
        .with_label_values(&[channel])
        .observe(latency_ms as f64 / 1000.0);
    d.events
        .emit(Event::new(EventKind::Delivered, n, &t.device_id).channel(channel));
}
