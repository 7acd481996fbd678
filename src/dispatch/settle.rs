//! Deciding what happens to a message: a pure function of the per-target reports, the
//! message, the clock and the retry policy. No queue, no I/O: the dispatcher carries the
//! [`Settlement`] out (copies first, then the ack) and records it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::channel::Channel;
use super::target::{TargetReport, TargetResult};
use crate::directory::LiveOutcome;
use crate::domain::{AttemptRecord, Qos, QueuedNotification, Target, unix_millis};
use crate::providers::ProviderOutcome;

/// How a message ends this attempt.
// One per message, alive only while it is carried out: boxing the copies would add an
// allocation and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// Every target reached a final outcome: ack.
    Ack,
    /// Its ttl passed before delivery: ack (drop it, never send late) and report every
    /// target `expired`.
    Expired,
    /// Targets failed transiently and attempts are left: retry only them.
    Retry(Retry),
    /// Targets retrying cannot help (a configuration error, or attempts exhausted): park
    /// them for an operator.
    DeadLetter(DeadLetter),
    /// Both: some targets failed transiently, others on a configuration error.
    RetryAndDeadLetter(Retry, DeadLetter),
}

/// A retry copy: the targets still to deliver, to be queued again after `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// The message with only the retried targets, `attempt + 1` and this attempt's record.
    pub next: QueuedNotification,
    /// The exponential backoff for this attempt, and at least every provider Retry-After.
    pub delay: Duration,
    /// The channel each retried target failed on last, in `next.targets` order (the
    /// `channel` label of `herald_retries_total`).
    pub channels: Vec<Channel>,
}

/// A dead-letter copy: the targets to park, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message with only the parked targets, `attempt + 1` and the attempt history.
    pub copy: QueuedNotification,
    pub why: DeadReason,
    /// The reason stored with the dead letter and sent in each `dead_lettered` event.
    pub reason: String,
}

/// Why a message is dead-lettered: the `reason` label of `herald_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The queued body does not parse (decided before there is a notification to settle).
    Unparseable,
    ConfigError,
    AttemptsExhausted,
}

impl DeadReason {
    pub fn label(self) -> &'static str {
        match self {
            DeadReason::Unparseable => "unparseable",
            DeadReason::ConfigError => "config_error",
            DeadReason::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

impl Settlement {
    pub fn retry(&self) -> Option<&Retry> {
        match self {
            Settlement::Retry(r) | Settlement::RetryAndDeadLetter(r, _) => Some(r),
            _ => None,
        }
    }

    pub fn dead_letter(&self) -> Option<&DeadLetter> {
        match self {
            Settlement::DeadLetter(d) | Settlement::RetryAndDeadLetter(_, d) => Some(d),
            _ => None,
        }
    }
}

/// Whether a target goes to its device's offline inbox (when there is one): an
/// at_least_once notification the device did not ack live (no session, the session died or
/// did not ack), with no provider route or only routes whose tokens are dead. A target a
/// provider took is done; one a provider failed transiently or on a configuration error is
/// retried or dead-lettered as before.
pub fn wants_inbox(n: &QueuedNotification, r: &TargetReport) -> bool {
    n.qos == Qos::AtLeastOnce
        && r.live != LiveOutcome::Acked
        && r.routes
            .iter()
            .all(|route| matches!(route.outcome, ProviderOutcome::TokenDead { .. }))
}

/// Before any target is tried: a message past its ttl is settled at once, as `Expired`.
pub fn on_arrival(n: &QueuedNotification, now: SystemTime) -> Option<Settlement> {
    n.is_expired(now).then_some(Settlement::Expired)
}

/// Once every target has a report: what the message leaves to do.
///
/// `backoff(attempts)` is the delay before the next try after `attempts` attempts (jittered
/// in production, so it is passed in to keep this function pure); the retry waits for it
/// and at least for the longest Retry-After a provider asked for. Delivered targets and
/// dead tokens are final and never copied, so a retry never re-sends them.
pub fn after_delivery(
    n: &QueuedNotification,
    reports: &[TargetReport],
    now: SystemTime,
    max_attempts: u32,
    backoff: impl FnOnce(u32) -> Duration,
) -> Settlement {
    if n.qos == Qos::AtMostOnce {
        // One attempt, whatever it gave: no retry, no dead letter (and no inbox).
        return Settlement::Ack;
    }
    let mut retry: Vec<(Target, Channel)> = Vec::new();
    let mut dead: Vec<Target> = Vec::new();
    let mut first_config_error = None;
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    let mut retry_after = Duration::ZERO;
    for report in reports {
        match report.result() {
            TargetResult::Done => {}
            TargetResult::Retry {
                reason,
                retry_after: after,
                channel,
            } => {
                *failures.entry(reason).or_default() += 1;
                retry_after = retry_after.max(after.unwrap_or_default());
                retry.push((report.target.clone(), channel));
            }
            TargetResult::DeadLetter { reason } => {
                *failures.entry(reason.clone()).or_default() += 1;
                first_config_error.get_or_insert(reason);
                dead.push(report.target.clone());
            }
        }
    }
    if retry.is_empty() && dead.is_empty() {
        return Settlement::Ack;
    }

    let attempt = n.attempt + 1;
    let mut history = n.history.clone();
    history.push(AttemptRecord {
        attempt,
        at_ms: unix_millis(now),
        failures: failures.clone(),
    });
    let copy = |targets: Vec<Target>| QueuedNotification {
        targets,
        attempt,
        history: history.clone(),
        ..n.clone()
    };

    if !retry.is_empty() && attempt >= max_attempts {
        // Out of attempts: the transient targets join any misconfigured ones in one dead
        // letter, whose reason sums up every failure of this attempt.
        let summary = failures
            .iter()
            .map(|(reason, count)| format!("{reason} x{count}"))
            .collect::<Vec<_>>()
            .join(", ");
        dead.extend(retry.into_iter().map(|(t, _)| t));
        return Settlement::DeadLetter(DeadLetter {
            copy: copy(dead),
            why: DeadReason::AttemptsExhausted,
            reason: format!("attempts_exhausted after {attempt} attempts: {summary}"),
        });
    }
    let retry = (!retry.is_empty()).then(|| {
        let (targets, channels) = retry.into_iter().unzip();
        Retry {
            next: copy(targets),
            delay: backoff(attempt).max(retry_after),
            channels,
        }
    });
    let dead = first_config_error.map(|reason| DeadLetter {
        copy: copy(dead),
        why: DeadReason::ConfigError,
        reason: format!("config_error: {reason}"),
    });
    match (retry, dead) {
        (Some(r), Some(d)) => Settlement::RetryAndDeadLetter(r, d),
        (Some(r), None) => Settlement::Retry(r),
        (None, Some(d)) => Settlement::DeadLetter(d),
        (None, None) => unreachable!("a target that is not done is retried or dead-lettered"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::directory::LiveOutcome;
    use crate::domain::{NotifyLimits, NotifyRequest};
    use crate::providers::ProviderOutcome;

    const APNS: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    /// The policy of these tests: 3 attempts, and a backoff of `attempts` seconds, so a
    /// test can see which attempt the delay was computed for.
    const MAX_ATTEMPTS: u32 = 3;
    fn backoff(attempts: u32) -> Duration {
        Duration::from_secs(attempts.into())
    }

    /// A queued notification to these devices: `ios-*` carry an APNs token, `android-*`
    /// an FCM token, anything else no route.
    pub fn notification(devices: &[&str]) -> QueuedNotification {
        let targets: Vec<serde_json::Value> = devices
            .iter()
            .map(|d| {
                if d.starts_with("ios") {
                    serde_json::json!({"device_id": d, "apns": {"token": APNS}})
                } else if d.starts_with("android") {
                    serde_json::json!({"device_id": d, "fcm": {"token": format!("fcm-{d}")}})
                } else {
                    serde_json::json!({"device_id": d})
                }
            })
            .collect();
        let req: NotifyRequest = serde_json::from_value(
            serde_json::json!({"targets": targets, "data": {"k": "v"}, "ttl": "1h"}),
        )
        .unwrap();
        let limits = NotifyLimits {
            max_targets: 1000,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86400),
        };
        req.parse(limits, SystemTime::now()).unwrap()
    }

    /// The report of target `i` of `n`: live said `live`, then its one route (if any)
    /// answered `route`.
    pub fn report(
        n: &QueuedNotification,
        i: usize,
        live: LiveOutcome,
        route: Option<ProviderOutcome>,
    ) -> TargetReport {
        let target = n.targets[i].clone();
        let routes = match route {
            Some(outcome) => {
                let channel = Channel::of(&target.routes().next().expect("a route"));
                vec![super::super::target::RouteAttempt { channel, outcome }]
            }
            None => Vec::new(),
        };
        TargetReport {
            target,
            live,
            routes,
            inbox: None,
        }
    }

    pub fn transient(reason: &str, retry_after: Option<Duration>) -> Option<ProviderOutcome> {
        Some(ProviderOutcome::Transient {
            reason: reason.into(),
            retry_after,
        })
    }

    fn devices(n: &QueuedNotification) -> Vec<&str> {
        n.targets.iter().map(|t| t.device_id.as_str()).collect()
    }

    fn settle(n: &QueuedNotification, reports: &[TargetReport]) -> Settlement {
        after_delivery(n, reports, SystemTime::now(), MAX_ATTEMPTS, backoff)
    }

    #[test]
    fn all_delivered_is_an_ack() {
        use LiveOutcome::*;
        let n = notification(&["phone-1", "ios-1", "android-1", "ios-2"]);
        let reports = [
            report(&n, 0, Acked, None),
            report(&n, 1, Offline, Some(ProviderOutcome::Delivered)),
            report(&n, 2, NotAcked, Some(ProviderOutcome::Delivered)),
            // A dead token is final too: reported, never retried.
            report(
                &n,
                3,
                Offline,
                Some(ProviderOutcome::TokenDead {
                    reason: "Unregistered".into(),
                }),
            ),
        ];
        assert_eq!(settle(&n, &reports), Settlement::Ack);
    }

    #[test]
    fn transient_failures_retry_only_those_targets() {
        use LiveOutcome::*;
        let n = notification(&["ios-1", "android-1", "ios-2", "phone-1"]);
        let reports = [
            report(
                &n,
                0,
                Offline,
                transient("503 ServiceUnavailable", Some(Duration::from_secs(30))),
            ),
            report(&n, 1, Offline, Some(ProviderOutcome::Delivered)),
            report(&n, 2, Offline, transient("503 ServiceUnavailable", None)),
            report(&n, 3, Offline, None),
        ];
        let now = SystemTime::now();
        let Settlement::Retry(retry) = after_delivery(&n, &reports, now, MAX_ATTEMPTS, backoff)
        else {
            panic!("expected a retry");
        };
        // Only the failed targets; the delivered one is never re-sent.
        assert_eq!(devices(&retry.next), ["ios-1", "ios-2", "phone-1"]);
        assert_eq!(
            retry.channels,
            [Channel::Apns, Channel::Apns, Channel::Live]
        );
        assert_eq!(retry.next.attempt, 1);
        assert_eq!(retry.next.id, n.id);
        // The largest Retry-After wins over the backoff (1 s after the first attempt).
        assert_eq!(retry.delay, Duration::from_secs(30));
        let record = &retry.next.history[0];
        assert_eq!(record.attempt, 1);
        assert_eq!(record.at_ms, unix_millis(now));
        assert_eq!(
            record.failures,
            BTreeMap::from([
                ("apns: 503 ServiceUnavailable".to_owned(), 2),
                ("live offline, no fallback route".to_owned(), 1),
            ])
        );
    }

    #[test]
    fn the_delay_is_the_backoff_for_the_attempts_made() {
        let mut n = notification(&["ios-1"]);
        n.attempt = 1;
        let reports = [report(
            &n,
            0,
            LiveOutcome::NotAcked,
            transient("timeout", None),
        )];
        let s = settle(&n, &reports);
        let retry = s.retry().expect("a retry");
        assert_eq!(retry.delay, backoff(2));
        assert_eq!(retry.next.attempt, 2);
    }

    #[test]
    fn exhausted_attempts_dead_letter_with_the_reason_and_history() {
        let mut n = notification(&["ios-1", "android-1", "ios-2"]);
        n.attempt = MAX_ATTEMPTS - 1;
        n.history = vec![AttemptRecord {
            attempt: 1,
            at_ms: 1,
            failures: BTreeMap::from([("apns: 500 InternalServerError".to_owned(), 2)]),
        }];
        let reports = [
            report(
                &n,
                0,
                LiveOutcome::Offline,
                transient("500 InternalServerError", None),
            ),
            report(
                &n,
                1,
                LiveOutcome::Offline,
                Some(ProviderOutcome::Delivered),
            ),
            report(
                &n,
                2,
                LiveOutcome::Offline,
                transient("500 InternalServerError", None),
            ),
        ];
        let Settlement::DeadLetter(dead) = settle(&n, &reports) else {
            panic!("expected a dead letter");
        };
        assert_eq!(dead.why, DeadReason::AttemptsExhausted);
        assert_eq!(dead.why.label(), "attempts_exhausted");
        assert_eq!(
            dead.reason,
            "attempts_exhausted after 3 attempts: apns: 500 InternalServerError x2"
        );
        assert_eq!(devices(&dead.copy), ["ios-1", "ios-2"]);
        assert_eq!(dead.copy.attempt, 3);
        assert_eq!(dead.copy.history.len(), 2, "the earlier record is kept");
    }

    #[test]
    fn a_config_error_is_dead_lettered_without_a_retry() {
        let n = notification(&["ios-1", "ios-2"]);
        let config = || {
            Some(ProviderOutcome::ConfigError {
                reason: "APNs is not configured".into(),
            })
        };
        let reports = [
            report(&n, 0, LiveOutcome::Offline, config()),
            report(&n, 1, LiveOutcome::Offline, config()),
        ];
        let Settlement::DeadLetter(dead) = settle(&n, &reports) else {
            panic!("expected a dead letter");
        };
        assert_eq!(dead.why, DeadReason::ConfigError);
        assert_eq!(dead.reason, "config_error: apns: APNs is not configured");
        assert_eq!(devices(&dead.copy), ["ios-1", "ios-2"]);
        assert_eq!(dead.copy.attempt, 1);
    }

    #[test]
    fn mixed_outcomes_split_into_a_retry_and_a_dead_letter() {
        use LiveOutcome::*;
        let n = notification(&["phone-1", "ios-1", "android-1", "ios-2", "android-2"]);
        let reports = [
            report(&n, 0, Acked, None),
            report(&n, 1, Offline, Some(ProviderOutcome::Delivered)),
            report(&n, 2, NotAcked, transient("UNAVAILABLE", None)),
            report(
                &n,
                3,
                Offline,
                Some(ProviderOutcome::ConfigError {
                    reason: "403 TopicDisallowed".into(),
                }),
            ),
            report(
                &n,
                4,
                Offline,
                Some(ProviderOutcome::TokenDead {
                    reason: "UNREGISTERED".into(),
                }),
            ),
        ];
        let Settlement::RetryAndDeadLetter(retry, dead) = settle(&n, &reports) else {
            panic!("expected a retry and a dead letter");
        };
        assert_eq!(devices(&retry.next), ["android-1"]);
        assert_eq!(retry.channels, [Channel::Fcm]);
        assert_eq!(retry.delay, backoff(1));
        assert_eq!(devices(&dead.copy), ["ios-2"]);
        assert_eq!(dead.why, DeadReason::ConfigError);
        assert_eq!(dead.reason, "config_error: apns: 403 TopicDisallowed");
        // One record of the attempt, the same in both copies.
        assert_eq!(retry.next.history, dead.copy.history);
        assert_eq!(
            retry.next.history[0].failures,
            BTreeMap::from([
                ("apns: 403 TopicDisallowed".to_owned(), 1),
                ("fcm: UNAVAILABLE".to_owned(), 1),
            ])
        );
    }

    #[test]
    fn mixed_outcomes_out_of_attempts_park_every_undelivered_target() {
        let mut n = notification(&["ios-1", "android-1", "android-2"]);
        n.attempt = MAX_ATTEMPTS - 1;
        let reports = [
            report(
                &n,
                0,
                LiveOutcome::Offline,
                Some(ProviderOutcome::ConfigError {
                    reason: "403 TopicDisallowed".into(),
                }),
            ),
            report(&n, 1, LiveOutcome::Offline, transient("UNAVAILABLE", None)),
            report(
                &n,
                2,
                LiveOutcome::Offline,
                Some(ProviderOutcome::Delivered),
            ),
        ];
        let Settlement::DeadLetter(dead) = settle(&n, &reports) else {
            panic!("expected one dead letter");
        };
        assert_eq!(dead.why, DeadReason::AttemptsExhausted);
        assert_eq!(
            dead.reason,
            "attempts_exhausted after 3 attempts: apns: 403 TopicDisallowed x1, fcm: UNAVAILABLE x1"
        );
        // The misconfigured target first, then the exhausted one.
        assert_eq!(devices(&dead.copy), ["ios-1", "android-1"]);
    }

    #[test]
    fn expired_is_settled_on_arrival() {
        let n = notification(&["ios-1", "phone-1"]);
        let now = SystemTime::now();
        assert_eq!(on_arrival(&n, now), None);
        let later = now + Duration::from_secs(3601);
        assert_eq!(on_arrival(&n, later), Some(Settlement::Expired));
    }

    fn at_most_once(devices: &[&str]) -> QueuedNotification {
        QueuedNotification {
            qos: Qos::AtMostOnce,
            ..notification(devices)
        }
    }

    #[test]
    fn at_most_once_is_one_attempt_then_done() {
        use LiveOutcome::*;
        let n = at_most_once(&["phone-1", "ios-1", "android-1", "phone-2"]);
        let reports = [
            // Offline, no route: not retried, not stored, not dead-lettered.
            report(&n, 0, Offline, None),
            report(
                &n,
                1,
                Offline,
                transient("503", Some(Duration::from_secs(5))),
            ),
            report(
                &n,
                2,
                Offline,
                Some(ProviderOutcome::ConfigError {
                    reason: "bad key".into(),
                }),
            ),
            report(&n, 3, NotAcked, None),
        ];
        assert_eq!(settle(&n, &reports), Settlement::Ack);
        assert!(reports.iter().all(|r| !wants_inbox(&n, r)));
        // The one attempt: live if a session took the frame, else the provider.
        assert!(super::super::target::falls_back(Qos::AtMostOnce, Offline));
        assert!(!super::super::target::falls_back(Qos::AtMostOnce, NotAcked));
        assert!(!super::super::target::falls_back(Qos::AtMostOnce, Acked));
        assert!(super::super::target::falls_back(Qos::AtLeastOnce, NotAcked));
        assert!(super::super::target::falls_back(Qos::AtLeastOnce, Offline));
        assert!(!super::super::target::falls_back(Qos::AtLeastOnce, Acked));
    }

    #[test]
    fn the_inbox_takes_unreached_targets_without_a_working_route() {
        use LiveOutcome::*;
        let n = notification(&[
            "phone-1",
            "phone-2",
            "ios-1",
            "ios-2",
            "android-1",
            "phone-3",
        ]);
        let dead = || {
            Some(ProviderOutcome::TokenDead {
                reason: "Unregistered".into(),
            })
        };
        let reports = [
            report(&n, 0, Offline, None),
            report(&n, 1, NotAcked, None),
            report(&n, 2, Offline, dead()),
            report(&n, 3, Offline, transient("503", None)),
            report(&n, 4, Offline, Some(ProviderOutcome::Delivered)),
            report(&n, 5, Acked, None),
        ];
        let wanted: Vec<bool> = reports.iter().map(|r| wants_inbox(&n, r)).collect();
        assert_eq!(wanted, [true, true, true, false, false, false]);
    }

    #[test]
    fn a_stored_target_is_done_and_a_failed_store_is_retried() {
        use super::super::target::InboxResult;
        use LiveOutcome::*;
        let n = notification(&["phone-1", "phone-2", "ios-1"]);
        let mut reports = [
            report(&n, 0, Offline, None),
            report(&n, 1, Offline, None),
            report(
                &n,
                2,
                Offline,
                Some(ProviderOutcome::TokenDead {
                    reason: "Unregistered".into(),
                }),
            ),
        ];
        reports[0].inbox = Some(InboxResult::Stored);
        reports[2].inbox = Some(InboxResult::Stored);
        reports[1].inbox = Some(InboxResult::Failed {
            reason: "the inbox database is unavailable".into(),
        });
        let Settlement::Retry(retry) = settle(&n, &reports) else {
            panic!("expected a retry of the target whose store failed");
        };
        assert_eq!(devices(&retry.next), ["phone-2"]);
        assert_eq!(
            retry.next.history[0].failures,
            BTreeMap::from([("inbox: the inbox database is unavailable".to_owned(), 1)])
        );
        reports[1].inbox = Some(InboxResult::Stored);
        assert_eq!(settle(&n, &reports), Settlement::Ack);
    }

    #[test]
    fn a_target_reports_its_last_transient_failure_over_a_config_error() {
        let n = notification(&["ios-1"]);
        let mut r = report(
            &n,
            0,
            LiveOutcome::NotAcked,
            Some(ProviderOutcome::ConfigError {
                reason: "bad key".into(),
            }),
        );
        r.routes.push(super::super::target::RouteAttempt {
            channel: Channel::Fcm,
            outcome: ProviderOutcome::Transient {
                reason: "UNAVAILABLE".into(),
                retry_after: Some(Duration::from_secs(5)),
            },
        });
        assert_eq!(
            r.result(),
            TargetResult::Retry {
                reason: "fcm: UNAVAILABLE".into(),
                retry_after: Some(Duration::from_secs(5)),
                channel: Channel::Fcm,
            }
        );
    }
}
