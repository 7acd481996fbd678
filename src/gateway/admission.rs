//! Admission: everything checked before a session may exist, and the token bucket that
//! caps how fast a node takes new sessions.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;

use super::Gateway;
use super::refusal::Refusal;
use super::token::{self, TokenError};
use crate::domain::DeviceKey;

/// How long a connect waits for the cluster directory to be (re)registered before it is
/// refused with 503 `not_ready`: covers a node's first second after start and a quick
/// broker reconnect, without parking handshakes for a long outage.
const REGISTRY_READY_WAIT: Duration = Duration::from_secs(1);

/// Admission control for new sessions: a token bucket refilled at `max_session_rate` a
/// second, holding at most `session_burst`. Hand-written: it is one bucket behind one
/// mutex, checked once per connect, smaller than wiring a rate-limiting crate's clock.
pub(super) struct Admission {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Admission {
    pub(super) fn new(rate: u32, burst: u32) -> Self {
        Admission {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), Instant::now())),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn try_admit(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

impl Gateway {
    /// Everything checked before a session may exist: the device token (Bearer header or
    /// `?token=`), that the node is accepting, that it can register sessions (cluster
    /// mode), and the admission rate. Each refusal is counted by reason.
    pub(crate) async fn admit(
        &self,
        headers: &HeaderMap,
        query: &str,
    ) -> Result<DeviceKey, Refusal> {
        // `app` is empty until a valid token named it.
        let refuse = |app: &str, refusal: Refusal| {
            self.0
                .metrics
                .sessions_refused
                .with_label_values(&[app, refusal.reason_label()])
                .inc();
            Err(refusal)
        };
        let device = match token::presented(headers, query).map(|t| self.0.tokens.verify(&t)) {
            Some(Ok(device)) => device,
            Some(Err(e)) => return refuse("", Refusal::unauthorized(&e)),
            None => return refuse("", Refusal::unauthorized(&TokenError::Missing)),
        };
        let refuse = |refusal| refuse(device.app.as_str(), refusal);
        if !self.is_accepting() {
            return refuse(Refusal::unavailable(
                "shutting_down",
                "this node is shutting down; connect to another",
                1,
            ));
        }
        if let Some(registrar) = self.0.table.registrar()
            && !registrar.wait_ready(REGISTRY_READY_WAIT).await
        {
            // Cluster mode with the broker away: a session here could not be routed to.
            return refuse(Refusal::unavailable(
                "not_ready",
                "this node cannot register sessions now (broker unavailable); retry or connect to another",
                1,
            ));
        }
        if let Err(wait) = self.0.admission.try_admit() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            return refuse(Refusal::unavailable(
                "too_many_sessions",
                "this node is admitting new sessions as fast as it allows (gateway.max_session_rate); retry after the delay or connect to another",
                secs,
            ));
        }
        Ok(device)
    }
}
