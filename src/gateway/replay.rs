//! Replay: a device's offline inbox, sent right after its `hello`.
//!
//! The session runs one [`Replayer`] at a time, as a future polled inside its own task (no
//! extra task per session, and nothing at all for a session with no replay running). The
//! replayer pages through the device's pending entries in accepted order and queues each
//! into the session's send buffer, the same bounded buffer live deliveries use, so a
//! replay is paced by the device's reading: a full buffer makes it wait, and a device that
//! stops reading is closed by the heartbeat as usual. The frame is the stored notification
//! frame, byte for byte what a live delivery sends, with the same id.
//!
//! Each ack of a replayed id emits a `replayed` event and deletes its inbox row
//! ([`Inbox::ack`]). An entry sent but not
//! acked within `gateway.ack_timeout` stays in the inbox for the next session. A device
//! that drops mid-replay keeps every row it did not ack, so its next session replays the
//! rest.
//!
//! A pass pages from the start (`after = None`); passes repeat until one finds nothing it
//! has not already sent in this session. So the replay always ends with one pass from the
//! start, which sees an entry stored behind the cursor while the replay paged (a retried
//! older notification), and acked rows are gone, so that pass is short. The dispatcher,
//! after storing for a device that has a session, asks for another replay
//! ([`super::Gateway::replay_now`]); the session runs it when the current one ends.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use super::Gateway;
use super::table::Outbound;
use crate::domain::{DeviceId, NotificationId};
use crate::events::{Event, EventKind};
use crate::inbox::{Cursor, Inbox};

/// Entries read per query. The default `inbox.max_per_device` (100) fits one page, so a
/// typical replay is one query plus the closing pass.
const PAGE: usize = 100;
/// Inbox row deletions in flight at once for one replay: a few hide the database round
/// trip without one device's replay taking many pooled connections.
const ACK_DELETES: usize = 4;

/// One session's replay state, handed from one run to the next.
pub(super) struct Replayer {
    gateway: Gateway,
    inbox: Inbox,
    app: String,
    device: DeviceId,
    tx: mpsc::Sender<Box<Outbound>>,
    /// Ids this session already sent by replay: never sent twice by it (the device acked
    /// them, or has them, or the session is failing).
    sent: HashSet<NotificationId>,
}

impl Replayer {
    pub(super) fn new(
        gateway: Gateway,
        inbox: Inbox,
        app: String,
        device: DeviceId,
        tx: mpsc::Sender<Box<Outbound>>,
    ) -> Replayer {
        Replayer {
            gateway,
            inbox,
            app,
            device,
            tx,
            sent: HashSet::new(),
        }
    }

    /// One replay: passes from the start until one sends nothing new, while deleting the
    /// rows of acked entries; returns once every sent entry was acked, timed out, or the
    /// session ended. Gives itself back for the next replay.
    pub(super) async fn run(mut self) -> Replayer {
        let ack_timeout = self.gateway.settings().ack_timeout;
        let mut acks = FuturesUnordered::new();
        // Each pass only queues; acks are waited for after the last one (the device acks
        // while the passes run, and each wait has its own deadline from its send).
        while let Ok(queued) = self.pass(&mut acks, ack_timeout).await {
            if queued == 0 {
                break;
            }
        }
        let me = &self;
        let deleted: Vec<NotificationId> = acks
            .filter_map(std::future::ready)
            .map(|id| async move { me.acked(id).await.then_some(id) })
            .buffer_unordered(ACK_DELETES)
            .filter_map(std::future::ready)
            .collect()
            .await;
        // Their rows are gone: should one be stored again (a redelivered queue message),
        // it is new to this session.
        for id in deleted {
            self.sent.remove(&id);
        }
        self
    }

    /// One pass from the start. Returns how many entries it queued, or `Err` when the
    /// session is gone or the inbox failed (the rows stay for the next replay).
    async fn pass(
        &mut self,
        acks: &mut FuturesUnordered<AckWait>,
        ack_timeout: Duration,
    ) -> Result<usize, ()> {
        let mut after: Option<Cursor> = None;
        let mut queued = 0;
        loop {
            let page = match self
                .inbox
                .pending(&self.app, self.device.as_str(), after, PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(device = %self.device, error = %e, "inbox replay: could not read pending entries; they wait for the next replay");
                    return Err(());
                }
            };
            let full = page.len() == PAGE;
            after = page.last().map(|e| e.cursor);
            for entry in page {
                if !self.sent.insert(entry.id) {
                    continue;
                }
                let frame = match String::from_utf8(entry.frame.to_vec()) {
                    Ok(f) => f,
                    Err(_) => {
                        // Frames are written by herald from JSON; a non-UTF-8 one is a bug.
                        tracing::error!(device = %self.device, id = %entry.id, "inbox frame is not UTF-8: skipped");
                        continue;
                    }
                };
                let (acked, ack) = oneshot::channel();
                let out = Box::new(Outbound {
                    id: entry.id,
                    frame,
                    acked,
                });
                // Waits for room in the send buffer: the replay's pacing.
                if self.tx.send(out).await.is_err() {
                    return Err(());
                }
                self.gateway
                    .metrics()
                    .inbox_replayed
                    .with_label_values(&[self.app.as_str()])
                    .inc();
                queued += 1;
                acks.push(wait_ack(entry.id, ack, ack_timeout));
            }
            if !full {
                return Ok(queued);
            }
        }
    }

    /// The device acked `id`: a `replayed` event, and delete its row. True once deleted.
    async fn acked(&self, id: NotificationId) -> bool {
        // On the ack, not the send: it is the inbox's `delivered` (docs/events.md). Channel
        // `live` (the session it went down); the type says it came from the inbox. The
        // queue attempt count is not in the inbox: absent.
        self.gateway.emit(
            Event::about(EventKind::Replayed, &self.app, id, self.device.as_str(), 0)
                .channel("live"),
        );
        match self.inbox.ack(&self.app, self.device.as_str(), id).await {
            Ok(_) => {
                self.gateway
                    .metrics()
                    .inbox_acked
                    .with_label_values(&[self.app.as_str()])
                    .inc();
                true
            }
            // The row stays: the device gets it again next time and dedupes by id.
            Err(e) => {
                tracing::info!(device = %self.device, %id, error = %e, "inbox replay: could not delete an acked entry");
                false
            }
        }
    }
}

type AckWait = std::pin::Pin<Box<dyn Future<Output = Option<NotificationId>> + Send>>;

/// Resolves to the id once the device acked it; `None` if no ack came within `timeout` or
/// the session ended first.
fn wait_ack(id: NotificationId, ack: oneshot::Receiver<()>, timeout: Duration) -> AckWait {
    // The deadline runs from the send, not from when the wait is first polled.
    let deadline = tokio::time::Instant::now() + timeout;
    Box::pin(async move {
        match tokio::time::timeout_at(deadline, ack).await {
            Ok(Ok(())) => Some(id),
            _ => None,
        }
    })
}
