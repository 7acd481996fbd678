//! The per-app notify rate limit (`max_notify_rate`): a token bucket per app.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket refilled at `rate` a second, holding at most one second's worth
/// ([`RateLimit::burst`]): a caller may send its whole per-second allowance at once, never
/// more. Hand-written, as the gateway's admission bucket is: one bucket behind one mutex,
/// checked once per request, smaller than wiring a rate-limiting crate's clock.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// `rate` notifications per second (> 0, checked by the config).
    pub fn new(rate: f64) -> Self {
        let burst = Self::burst(rate);
        RateLimit {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// One second's worth, and at least one token, so a rate under 1/s still lets a
    /// request through now and then.
    fn burst(rate: f64) -> f64 {
        rate.max(1.0)
    }

    /// Takes one token, or says how long until one is there.
    pub fn try_take(&self) -> Result<(), Duration> {
        self.try_take_at(Instant::now())
    }

    fn try_take_at(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let limit = RateLimit::new(10.0);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limit.try_take_at(t0).is_ok());
        }
        let wait = limit.try_take_at(t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(limit.try_take_at(t0 + Duration::from_millis(100)).is_ok());
        assert!(limit.try_take_at(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_slow_rate_still_admits_one_request() {
        let limit = RateLimit::new(0.5);
        let t0 = Instant::now();
        assert!(limit.try_take_at(t0).is_ok());
        let wait = limit.try_take_at(t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
    }
}
