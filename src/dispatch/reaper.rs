//! The inbox reaper: every `inbox.reap_interval`, delete expired inbox entries in batches of
//! `inbox.reap_batch` (an `expired` event each) and sample the pending-rows gauge (per app).
//!
//! Expired entries are never sent even before the reaper runs (`pending` filters them);
//! the reaper reclaims their space and reports them. Every dispatcher node runs one: on
//! PostgreSQL each row is returned to exactly one of them (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::record::{self, Outcome};
use crate::events::Events;
use crate::inbox::Inbox;
use crate::metrics::Metrics;

/// The reaper's settings, from `[inbox]`.
#[derive(Debug, Clone, Copy)]
pub struct ReapSettings {
    pub interval: Duration,
    pub batch: usize,
}

/// Starts the reaper; it stops when `stop` (its node of the shutdown tree, a child of the
/// dispatcher's) is cancelled.
pub fn spawn(
    inbox: Inbox,
    settings: ReapSettings,
    metrics: Metrics,
    events: Events,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(settings.interval);
        // A slow database delays the next pass; it never makes passes pile up.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            tokio::select! {
                _ = pass(&inbox, settings.batch, &metrics, &events) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// One pass: batches until one comes back short, then the gauge.
pub async fn pass(inbox: &Inbox, batch: usize, metrics: &Metrics, events: &Events) {
    let emit = |e| events.emit(e);
    loop {
        match inbox.reap_expired(batch).await {
            Ok(reaped) => {
                record::record(metrics, emit, Outcome::Reaped(&reaped));
                if reaped.len() < batch {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox reaper: could not delete expired entries; trying again next interval");
                return;
            }
        }
    }
    match inbox.pending_by_app().await {
        Ok(by_app) => record::record(metrics, emit, Outcome::InboxPending(&by_app)),
        Err(e) => tracing::debug!(error = %e, "inbox reaper: could not count pending entries"),
    }
}
