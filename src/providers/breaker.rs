//! A per-provider circuit breaker: pure state, time passed in, so its tests run on tokio's
//! paused clock.
//!
//! Written here rather than taken from a crate: the candidates (`failsafe`, `recloser`) read
//! their own clocks and wrap the call in their own future and error types, while herald needs
//! a "retry after" duration out of a rejection and a half-open probe that may be abandoned
//! (a cancelled send) without wedging the breaker. The logic is forty lines.
//!
//! Closed: every send goes through; `failure_threshold` consecutive transient failures open it.
//! Open: sends are rejected with the time left of the cool-down, without touching the network.
//! Half-open (cool-down over): exactly one probe goes through; its success closes the
//! circuit, its failure opens it for another cool-down. Only transient failures count: a dead
//! token or a configuration error is the provider answering, which is what "up" means.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

/// What a send may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; `probe` is true for the one half-open probe, which must be reported back
    /// with [`CircuitBreaker::record`] or [`CircuitBreaker::abandon`].
    Allowed { probe: bool },
    /// The circuit is open: do not send; try again after this long.
    Rejected { retry_after: Duration },
}

#[derive(Debug)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cooldown: Duration,
    state: State,
}

/// What changed, so the caller can log transitions once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Opened,
    Closed,
}

impl CircuitBreaker {
    pub fn new(failure_threshold: u32, cooldown: Duration) -> Self {
        CircuitBreaker {
            failure_threshold: failure_threshold.max(1),
            cooldown,
            state: State::Closed { failures: 0 },
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed { probe: false },
            State::Open { until } if now < until => Admission::Rejected {
                retry_after: until - now,
            },
            State::Open { .. }
            | State::HalfOpen {
                probe_in_flight: false,
            } => {
                self.state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Admission::Allowed { probe: true }
            }
            // One probe at a time; the others wait a cool-down (the dispatcher's backoff
            // would send them back sooner than a probe can tell anything new).
            State::HalfOpen {
                probe_in_flight: true,
            } => Admission::Rejected {
                retry_after: self.cooldown,
            },
        }
    }

    /// Reports an admitted send's result: `transient_failure` for 429/5xx/timeouts/resets.
    pub fn record(&mut self, now: Instant, probe: bool, transient_failure: bool) -> Transition {
        match (self.state, probe, transient_failure) {
            (State::Closed { failures }, _, true) => {
                let failures = failures + 1;
                if failures >= self.failure_threshold {
                    self.state = State::Open {
                        until: now + self.cooldown,
                    };
                    Transition::Opened
                } else {
                    self.state = State::Closed { failures };
                    Transition::None
                }
            }
            (State::Closed { .. }, _, false) => {
                self.state = State::Closed { failures: 0 };
                Transition::None
            }
            (State::HalfOpen { .. }, true, false) => {
                self.state = State::Closed { failures: 0 };
                Transition::Closed
            }
            (State::HalfOpen { .. }, true, true) => {
                self.state = State::Open {
                    until: now + self.cooldown,
                };
                Transition::Opened
            }
            // A send admitted before the circuit opened, finishing late: it says nothing the
            // probe will not say better.
            _ => Transition::None,
        }
    }

    /// The probe was cancelled before it had a result: let the next send probe instead.
    pub fn abandon(&mut self, probe: bool) {
        if probe && matches!(self.state, State::HalfOpen { .. }) {
            self.state = State::HalfOpen {
                probe_in_flight: false,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(30);

    fn fail(b: &mut CircuitBreaker, n: u32) -> Transition {
        let mut last = Transition::None;
        for _ in 0..n {
            assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: false });
            last = b.record(Instant::now(), false, true);
        }
        last
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_transient_failures_only() {
        let mut b = CircuitBreaker::new(3, COOLDOWN);
        assert_eq!(fail(&mut b, 2), Transition::None);
        // A success (or a token-dead / config answer) resets the count.
        b.record(Instant::now(), false, false);
        assert_eq!(fail(&mut b, 2), Transition::None);
        assert!(b.is_closed());
        assert_eq!(fail(&mut b, 1), Transition::Opened);
        assert!(!b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn open_rejects_with_the_time_left_then_lets_one_probe_through() {
        let mut b = CircuitBreaker::new(1, COOLDOWN);
        fail(&mut b, 1);
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Rejected {
                retry_after: COOLDOWN
            }
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Rejected {
                retry_after: Duration::from_secs(20)
            }
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: true });
        // While the probe is out, everyone else waits.
        assert!(matches!(
            b.admit(Instant::now()),
            Admission::Rejected { .. }
        ));
        assert_eq!(b.record(Instant::now(), true, false), Transition::Closed);
        assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: false });
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_a_full_cooldown() {
        let mut b = CircuitBreaker::new(2, COOLDOWN);
        fail(&mut b, 2);
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: true });
        assert_eq!(b.record(Instant::now(), true, true), Transition::Opened);
        assert_eq!(
            b.admit(Instant::now()),
            Admission::Rejected {
                retry_after: COOLDOWN
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_frees_the_slot_and_late_results_are_ignored() {
        let mut b = CircuitBreaker::new(1, COOLDOWN);
        fail(&mut b, 1);
        // A send admitted before the trip reports success late: still open.
        assert_eq!(b.record(Instant::now(), false, false), Transition::None);
        assert!(matches!(
            b.admit(Instant::now()),
            Admission::Rejected { .. }
        ));
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: true });
        b.abandon(true);
        assert_eq!(b.admit(Instant::now()), Admission::Allowed { probe: true });
    }
}
