//! Admission: everything checked before a session may exist, and the limits on how fast
//! sessions may be opened: per device, per source address, per node, and how many a node
//! holds at once.
//!
//! The order is the point (issue 14): the cheap checks that need no shared state come
//! first (method, path, WebSocket headers in [`super::upgrade`]; the device token here),
//! so garbage never spends a limit meant for devices. Then the per-device bucket (a client
//! in a reconnect loop spends only its own), the per-address bucket (one host spends only
//! its own), `gateway.max_sessions`, and last the node's bucket, which only requests that
//! passed everything else can take from.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;

use super::Gateway;
use super::refusal::Refusal;
use super::token::{self, TokenError};
use crate::config::GatewaySettings;
use crate::domain::DeviceKey;

/// How long a connect waits for the cluster directory to be (re)registered before it is
/// refused with 503 `not_ready`: covers a node's first second after start and a quick
/// broker reconnect, without parking handshakes for a long outage.
const REGISTRY_READY_WAIT: Duration = Duration::from_secs(1);

/// Keys a keyed limiter tracks before it sweeps out the ones whose bucket has refilled
/// (those carry no information: a fresh bucket is full too). Only holders of valid tokens
/// reach the keyed limiters, so the key count follows real devices and addresses; the
/// sweep keeps a day of churn from piling up. 10,000 entries is ~1 MB and one sweep a
/// few hundred microseconds, done at most once per this many new keys.
const LIMITER_SWEEP_AT: usize = 10_000;

/// Where a session's device connects from, as this gateway saw it: the TCP peer, or,
/// behind a trusted proxy, the client address `X-Forwarded-For` gave
/// ([`Admission::client_ip`]), whose port is not known (the TCP port is the proxy's).
/// Displayed as `ip:port` (`[v6]:port`) or `ip`; the `session_replaced` event's `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Direct(SocketAddr),
    Forwarded(IpAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Direct(addr) => addr.fmt(f),
            Peer::Forwarded(ip) => ip.fmt(f),
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Clone, Copy)]
struct Bucket {
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn new(rate_per_sec: f64, burst: u32) -> Self {
        Bucket {
            rate: rate_per_sec.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
        }
    }

    /// Refills `state` (tokens, last refill) to `now`, then takes one token, or says how
    /// long until one is there.
    fn take(&self, state: &mut (f64, Instant), now: Instant) -> Result<(), Duration> {
        let (tokens, last) = state;
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate)
            .min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }

    /// Whether a bucket last seen in `state` would be full by `now` (forgettable).
    fn is_full(&self, state: &(f64, Instant), now: Instant) -> bool {
        state.0 + now.saturating_duration_since(state.1).as_secs_f64() * self.rate >= self.burst
    }
}

/// The node's bucket: `max_session_rate` a second, `session_burst` at once. Hand-written:
/// buckets behind a mutex, checked once per connect, smaller than wiring a rate-limiting
/// crate's clock.
pub(super) struct Admission {
    bucket: Bucket,
    state: Mutex<(f64, Instant)>,
    per_device: KeyedLimiter<DeviceKey>,
    per_ip: KeyedLimiter<IpAddr>,
    trusted_proxies: Vec<IpNet>,
}

impl Admission {
    pub(super) fn new(settings: &GatewaySettings) -> Self {
        let burst = settings.session_burst.max(1);
        Admission {
            bucket: Bucket::new(f64::from(settings.max_session_rate.max(1)), burst),
            state: Mutex::new((f64::from(burst), Instant::now())),
            per_device: KeyedLimiter::new(Bucket::new(
                f64::from(settings.device_connects_per_minute) / 60.0,
                settings.device_connect_burst,
            )),
            per_ip: KeyedLimiter::new(Bucket::new(
                f64::from(settings.ip_connects_per_second),
                settings.ip_connect_burst,
            )),
            // Validated at start-up (config.rs); an entry that does not parse is skipped.
            trusted_proxies: settings
                .trusted_proxies
                .iter()
                .filter_map(|p| IpNet::parse(p))
                .collect(),
        }
    }

    /// Takes a token from the node's bucket, or says how long until one is there.
    fn try_admit(&self) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.bucket.take(&mut state, Instant::now())
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the
    /// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy (each proxy
    /// appends the address it saw, so entries left of the first untrusted one may be forged
    /// by the client).
    pub(super) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|n| n.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let mut client = peer;
        let entries = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for entry in entries.iter().rev() {
            match entry.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(&ip) {
                        break;
                    }
                }
                // A garbled entry: nothing left of it can be believed.
                Err(_) => break,
            }
        }
        client
    }

    /// The session's [`Peer`]: the TCP peer itself unless it is a trusted proxy.
    pub(super) fn peer(&self, tcp: SocketAddr, headers: &HeaderMap) -> Peer {
        let ip = self.client_ip(tcp.ip(), headers);
        if ip == tcp.ip() {
            Peer::Direct(tcp)
        } else {
            Peer::Forwarded(ip)
        }
    }
}

/// One token bucket per key (device, source address).
struct KeyedLimiter<K> {
    bucket: Bucket,
    state: Mutex<KeyedState<K>>,
}

struct KeyedState<K> {
    buckets: HashMap<K, (f64, Instant)>,
    /// Sweep when the map reaches this size; doubles if a sweep frees little, so sweeps
    /// stay amortised O(1) per new key.
    sweep_at: usize,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    fn new(bucket: Bucket) -> Self {
        KeyedLimiter {
            bucket,
            state: Mutex::new(KeyedState {
                buckets: HashMap::new(),
                sweep_at: LIMITER_SWEEP_AT,
            }),
        }
    }

    fn take(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.buckets.len() >= state.sweep_at {
            let bucket = self.bucket;
            state.buckets.retain(|_, s| !bucket.is_full(s, now));
            state.sweep_at = (state.buckets.len() * 2).max(LIMITER_SWEEP_AT);
        }
        let entry = state
            .buckets
            .entry(key.clone())
            .or_insert((self.bucket.burst, now));
        self.bucket.take(entry, now)
    }
}

pub use crate::checks::IpNet;

impl Gateway {
    /// Counts a refusal by reason and hands it back.
    /// `app` is empty until a valid token named it.
    fn refused(&self, app: &str, refusal: Refusal) -> Refusal {
        self.0
            .metrics
            .sessions_refused
            .with_label_values(&[app, refusal.reason_label()])
            .inc();
        refusal
    }

    /// The device the connect's token names: `Authorization: Bearer`, the
    /// `Sec-WebSocket-Protocol` bearer entry, or (with `gateway.allow_query_token`)
    /// `?token=`. Spends no limit: a bad token is refused here with 401.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        query: &str,
    ) -> Result<DeviceKey, Refusal> {
        let query = if self.0.settings.allow_query_token {
            query
        } else {
            ""
        };
        match token::presented(headers, query).map(|t| self.0.tokens.verify(&t)) {
            Some(Ok(device)) => Ok(device),
            Some(Err(e)) => Err(self.refused("", Refusal::unauthorized(&e))),
            None => Err(self.refused("", Refusal::unauthorized(&TokenError::Missing))),
        }
    }

    /// Everything checked before a session may exist, once the WebSocket headers are
    /// known good: the device token, that the node is accepting, that it can register
    /// sessions (cluster mode), then the limits in the order the module doc gives. `tcp`
    /// is the TCP peer's address; the answer carries the device and where it connects
    /// from (after `gateway.trusted_proxies`). Each refusal is counted by reason.
    pub(crate) async fn admit(
        &self,
        headers: &HeaderMap,
        query: &str,
        tcp: SocketAddr,
    ) -> Result<(DeviceKey, Peer), Refusal> {
        let device = self.authenticate(headers, query)?;
        if !self.is_accepting() {
            return Err(self.refused(
                device.app.as_str(),
                Refusal::unavailable(
                    "shutting_down",
                    "this node is shutting down; connect to another",
                    1,
                ),
            ));
        }
        if let Some(registrar) = self.0.table.registrar()
            && !registrar.wait_ready(REGISTRY_READY_WAIT).await
        {
            // Cluster mode with the broker away: a session here could not be routed to.
            return Err(self.refused(device.app.as_str(), Refusal::unavailable(
                "not_ready",
                "this node cannot register sessions now (broker unavailable); retry or connect to another",
                1,
            )));
        }
        let admission = &self.0.admission;
        if let Err(wait) = admission.per_device.take(&device) {
            return Err(self.refused(device.app.as_str(), Refusal::too_many_connects(
                "this device is reconnecting faster than gateway.device_connects_per_minute allows; retry after the delay",
                retry_secs(wait),
            )));
        }
        let peer = admission.peer(tcp, headers);
        let ip = match peer {
            Peer::Direct(addr) => addr.ip(),
            Peer::Forwarded(ip) => ip,
        };
        if let Err(wait) = admission.per_ip.take(&ip) {
            return Err(self.refused(device.app.as_str(), Refusal::too_many_connects(
                "this address is opening sessions faster than gateway.ip_connects_per_second allows; retry after the delay",
                retry_secs(wait),
            )));
        }
        // A device replacing its own session does not add one.
        if self.session_count() >= self.0.settings.max_sessions && !self.is_connected(&device) {
            return Err(self.refused(device.app.as_str(), Refusal::unavailable(
                "node_full",
                "this node holds gateway.max_sessions sessions; connect to another or retry later",
                1,
            )));
        }
        if let Err(wait) = admission.try_admit() {
            return Err(self.refused(device.app.as_str(), Refusal::unavailable(
                "too_many_sessions",
                "this node is admitting new sessions as fast as it allows (gateway.max_session_rate); retry after the delay or connect to another",
                retry_secs(wait),
            )));
        }
        Ok((device, peer))
    }
}

/// `Retry-After` in whole seconds, at least 1.
fn retry_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_nets_match_by_prefix() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(&"10.1.200.3".parse().unwrap()));
        assert!(!net.contains(&"10.2.0.1".parse().unwrap()));
        assert!(net.contains(&"::ffff:10.1.0.9".parse().unwrap()));
        let one = IpNet::parse("fd00::1").unwrap();
        assert!(one.contains(&"fd00::1".parse().unwrap()));
        assert!(!one.contains(&"fd00::2".parse().unwrap()));
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains(&"8.8.8.8".parse().unwrap())
        );
        assert!(IpNet::parse("10.0.0.0/33").is_none());
        assert!(IpNet::parse("proxy.local").is_none());
    }

    #[test]
    fn keyed_buckets_are_separate() {
        // One token in ~17 minutes: nothing refills during the test.
        let limiter = KeyedLimiter::new(Bucket::new(0.001, 2));
        assert!(limiter.take(&1).is_ok());
        assert!(limiter.take(&1).is_ok());
        assert!(limiter.take(&1).is_err(), "the burst is spent");
        assert!(limiter.take(&2).is_ok(), "another key has its own bucket");
    }
}
