//! The ways a target is reached: live through its session, or through APNs or FCM.

use crate::domain::TargetRoute;

/// A delivery channel. Its [`Channel::as_str`] is the `channel` label of the delivery
/// metrics and the `channel` field of events: dashboards, alerts and subscribers' routing
/// keys (`delivered.apns`) match on those exact strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Live,
    Apns,
    Fcm,
}

impl Channel {
    /// Every channel, in the order of [`crate::metrics::CHANNELS`].
    pub const ALL: [Channel; 3] = [Channel::Live, Channel::Apns, Channel::Fcm];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Live => "live",
            Channel::Apns => "apns",
            Channel::Fcm => "fcm",
        }
    }

    /// The provider channel a fallback route goes through.
    pub fn of(route: &TargetRoute<'_>) -> Channel {
        match route {
            TargetRoute::Apns(_) => Channel::Apns,
            TargetRoute::Fcm(_) => Channel::Fcm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric series pre-created at start-up are the ones the dispatcher increments:
    /// `metrics.rs` cannot name this enum (the dispatcher depends on it, not the reverse),
    /// so this keeps the two lists equal.
    #[test]
    fn labels_are_the_ones_metrics_pre_creates() {
        let labels: Vec<&str> = Channel::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, crate::metrics::CHANNELS);
        assert_eq!(labels, ["live", "apns", "fcm"]);
    }
}
