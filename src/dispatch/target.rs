//! One target: live first, then every fallback route. [`deliver`] does the I/O and reports
//! what each channel answered; what that leaves to do ([`TargetReport::result`]) is pure.

use std::time::Duration;

use super::Dispatcher;
use super::channel::Channel;
use super::slot::Slot;
use crate::directory::LiveOutcome;
use crate::domain::{DeviceKey, Qos, QueuedNotification, Target};
use crate::providers::{ProviderOutcome, Rendered};

/// What one target's attempt did, channel by channel: the input of the settlement (through
/// [`TargetReport::result`]) and of the metrics and events ([`super::record`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetReport {
    pub target: Target,
    pub live: LiveOutcome,
    /// The fallback routes tried, in order: none when live acked or the target has none.
    pub routes: Vec<RouteAttempt>,
    /// Whether it went to the device's offline inbox (`settle::wants_inbox`);
    /// `None` when it did not need to.
    pub inbox: Option<InboxResult>,
}

/// What writing a target to the offline inbox gave.
#[derive(Debug, Clone, PartialEq)]
pub enum InboxResult {
    /// Committed (or dropped on arrival and reported: expired, oversized, replaced): final.
    Stored,
    /// Nothing was written (database unavailable, memory inbox full): retry the target.
    Failed { reason: String },
}

/// One fallback route tried, and the provider's classification of its answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAttempt {
    pub channel: Channel,
    pub outcome: ProviderOutcome,
}

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
        channel: Channel,
    },
    /// A configuration error: park it for an operator, do not retry.
    DeadLetter { reason: String },
}

/// Why a target that was not acked live falls back (the `reason` label of
/// `herald_fallbacks_total`); `None` when it was acked.
pub fn fallback_reason(live: LiveOutcome) -> Option<&'static str> {
    match live {
        LiveOutcome::Acked => None,
        LiveOutcome::NotAcked => Some("ack_timeout"),
        LiveOutcome::Offline => Some("offline"),
    }
}

impl TargetReport {
    /// Classifies the attempt: any delivery is final; otherwise a transient failure means
    /// retry (the last one's reason and Retry-After), a configuration error means park it,
    /// and only dead tokens means final too.
    pub fn result(&self) -> TargetResult {
        let Some(fallback_reason) = fallback_reason(self.live) else {
            return TargetResult::Done;
        };
        match &self.inbox {
            // In the inbox: the device gets it on its next hello; this attempt is done.
            Some(InboxResult::Stored) => return TargetResult::Done,
            // Never acked without the inbox commit: retried like a provider's 503.
            Some(InboxResult::Failed { reason }) => {
                return TargetResult::Retry {
                    reason: format!("inbox: {reason}"),
                    retry_after: None,
                    channel: Channel::Live,
                };
            }
            None => {}
        }
        if self.routes.is_empty() {
            // Live only, and not reachable now: retry later, the device may come back
            // within the ttl.
            return TargetResult::Retry {
                reason: format!("live {fallback_reason}, no fallback route"),
                retry_after: None,
                channel: Channel::Live,
            };
        }
        let mut transient = None;
        let mut config_error = None;
        for route in &self.routes {
            let channel = route.channel;
            match &route.outcome {
                ProviderOutcome::Delivered => return TargetResult::Done,
                ProviderOutcome::TokenDead { .. } => {}
                ProviderOutcome::Transient {
                    reason,
                    retry_after,
                } => {
                    transient = Some(TargetResult::Retry {
                        reason: format!("{}: {reason}", channel.as_str()),
                        retry_after: *retry_after,
                        channel,
                    });
                }
                ProviderOutcome::ConfigError { reason } => {
                    config_error = Some(format!("{}: {reason}", channel.as_str()));
                }
            }
        }
        transient
            .or(config_error.map(|reason| TargetResult::DeadLetter { reason }))
            // Every route's token is dead: final, and the caller has the events to prune them.
            .unwrap_or(TargetResult::Done)
    }
}

/// Tries the live session, then, unless it acked (or the notification is at_most_once and
/// a session took the frame: [`falls_back`]), every route the target carries.
///
/// While only the device's ack is awaited the message may lend its active slot out
/// (`slot`); it takes one back before the fallback.
pub async fn deliver(
    d: &Dispatcher,
    n: &QueuedNotification,
    target: Target,
    slot: &Slot,
    rendered: &Rendered,
) -> TargetReport {
    let live = match &d.directory {
        // The device of this notification's app: a session of another app's device with
        // the same id is another device.
        Some(directory) => {
            let device = DeviceKey::new(n.app.clone(), target.device_id.clone());
            let waited = std::sync::atomic::AtomicBool::new(false);
            let awaiting_ack = || {
                if !waited.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    slot.awaiting_ack();
                }
            };
            let live = directory.deliver_awaiting(&device, n, &awaiting_ack).await;
            if waited.load(std::sync::atomic::Ordering::Relaxed) {
                slot.ack_wait_over().await;
            }
            live
        }
        // No gateway in this process (and no cluster directory yet): the device cannot be
        // reached live from here.
        None => LiveOutcome::Offline,
    };
    let mut routes = Vec::new();
    if falls_back(n.qos, live) {
        for route in target.routes() {
            let channel = Channel::of(&route);
            let outcome = d.providers.send_with(route, n, rendered).await;
            routes.push(RouteAttempt { channel, outcome });
        }
    }
    TargetReport {
        target,
        live,
        routes,
        inbox: None,
    }
}

/// After the live attempt: whether to try the target's provider routes. Not after a live
/// ack. An at_most_once notification gets one attempt: live if a session existed (the frame
/// went out, acked or not), else the provider routes.
pub fn falls_back(qos: Qos, live: LiveOutcome) -> bool {
    match qos {
        Qos::AtLeastOnce => live != LiveOutcome::Acked,
        Qos::AtMostOnce => live == LiveOutcome::Offline,
    }
}
