//! The embedded queue: bounded and in-process, with the same ack / retry / dead-letter
//! semantics as the RabbitMQ backend. It makes `herald serve` a working service on a bare
//! machine; it loses queued work when the process dies, and herald says so at start-up.
//!
//! One FIFO per app (the apps come from config), so one app's backlog never sits in front
//! of another app's messages: the dispatcher consumes each app's FIFO with its own budget
//! ([`MemoryQueue::consume_app`]). The count and byte bounds are the queue's, shared by
//! every app, as before. A consumer of every app ([`MemoryQueue::consume`] of the work
//! queue) takes them round-robin.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Delivery, DeliveryHandle, QueueError, QueueKind};
use crate::domain::AppId;
use crate::metrics::Metrics;

/// Dead letters kept in memory; past this the oldest is dropped (and logged). A bound,
/// because an embedded install has no operator draining a dead-letter queue.
const DEAD_LETTER_CAPACITY: usize = 10_000;
/// Bytes of dead letters kept in memory, on top of `queue.memory_max_bytes`: 10,000 dead
/// letters of up to 1 MiB each would otherwise be 10 GiB. 64 MiB keeps a few hundred large
/// ones (or all 10,000 typical ~2 KiB ones) for an operator to look at, within a pod's budget.
const DEAD_LETTER_MAX_BYTES: usize = 64 * 1024 * 1024;

struct Message {
    body: Vec<u8>,
    redelivered: bool,
    dead_reason: Option<String>,
}

/// One FIFO with its waiting consumers.
#[derive(Default)]
struct Fifo {
    ready: Mutex<VecDeque<Message>>,
    notify: Notify,
}

impl Fifo {
    fn push_back(&self, m: Message) {
        self.ready.lock().expect("queue lock").push_back(m);
        self.notify.notify_one();
    }
    fn push_front(&self, m: Message) {
        self.ready.lock().expect("queue lock").push_front(m);
        self.notify.notify_one();
    }
    fn pop(&self) -> Option<Message> {
        self.ready.lock().expect("queue lock").pop_front()
    }
}

/// What the work queue holds: ready + handed out + waiting out a retry delay.
#[derive(Default)]
struct Held {
    messages: usize,
    bytes: usize,
}

/// Which FIFO a message sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The work FIFO of `apps[i]`.
    Work(usize),
    Dead,
}

pub struct MemoryQueue {
    /// The apps, `default` first; `work[i]` is `apps[i]`'s FIFO.
    apps: Vec<AppId>,
    work: Vec<Fifo>,
    dead: Fifo,
    held: Mutex<Held>,
    capacity: usize,
    /// `queue.memory_max_bytes`: bodies held, in bytes. The message count alone does not
    /// bound memory (100,000 messages of up to 1 MiB each).
    max_bytes: usize,
    closed: tokio_util::sync::CancellationToken,
    metrics: Metrics,
}

impl MemoryQueue {
    /// A queue with one work FIFO per app of `apps` (and always one for `default`).
    pub fn new(capacity: usize, max_bytes: usize, apps: &[AppId], metrics: Metrics) -> Self {
        metrics.broker_connected.set(1);
        let mut apps = apps.to_vec();
        if !apps.first().is_some_and(AppId::is_default) {
            apps.retain(|a| !a.is_default());
            apps.insert(0, AppId::default_app());
        }
        MemoryQueue {
            work: apps.iter().map(|_| Fifo::default()).collect(),
            apps,
            dead: Fifo::default(),
            held: Mutex::new(Held::default()),
            capacity,
            max_bytes,
            closed: Default::default(),
            metrics,
        }
    }

    /// The apps with a work FIFO, `default` first.
    pub fn apps(&self) -> &[AppId] {
        &self.apps
    }

    /// The work FIFO of `app`; an app this queue was not built with (a message queued for
    /// an app since removed from config) shares `default`'s, whose dispatcher reports it.
    fn work_slot(&self, app: &AppId) -> usize {
        self.apps.iter().position(|a| a == app).unwrap_or(0)
    }

    pub fn publish(&self, app: &AppId, body: Vec<u8>) -> Result<(), QueueError> {
        if self.closed.is_cancelled() {
            return Err(QueueError::Closed);
        }
        {
            let mut held = self.held.lock().expect("queue lock");
            if held.messages >= self.capacity {
                return Err(QueueError::Full(self.capacity));
            }
            if held.bytes + body.len() > self.max_bytes {
                return Err(QueueError::FullBytes(self.max_bytes));
            }
            held.messages += 1;
            held.bytes += body.len();
            self.metrics.queue_depth.set(held.messages as i64);
        }
        self.work[self.work_slot(app)].push_back(Message {
            body,
            redelivered: false,
            dead_reason: None,
        });
        Ok(())
    }

    /// A consumer of the dead letters, or of every app's work FIFO, taken round-robin.
    pub fn consume(self: &Arc<Self>, kind: QueueKind) -> MemoryConsumer {
        let slots = match kind {
            QueueKind::Work => (0..self.work.len()).map(Slot::Work).collect(),
            QueueKind::Dead => vec![Slot::Dead],
        };
        self.consumer(slots)
    }

    /// A consumer of one app's work FIFO.
    pub fn consume_app(self: &Arc<Self>, app: &AppId) -> MemoryConsumer {
        self.consumer(vec![Slot::Work(self.work_slot(app))])
    }

    fn consumer(self: &Arc<Self>, slots: Vec<Slot>) -> MemoryConsumer {
        self.metrics.consumers_running.inc();
        MemoryConsumer {
            queue: self.clone(),
            slots,
            next_slot: 0,
        }
    }

    pub fn close(&self) {
        self.closed.cancel();
    }

    fn fifo(&self, slot: Slot) -> &Fifo {
        match slot {
            Slot::Work(i) => &self.work[i],
            Slot::Dead => &self.dead,
        }
    }

    fn release(&self, bytes: usize) {
        let mut held = self.held.lock().expect("queue lock");
        held.messages = held.messages.saturating_sub(1);
        held.bytes = held.bytes.saturating_sub(bytes);
        self.metrics.queue_depth.set(held.messages as i64);
    }

    /// Queues a copy to be delivered after `delay`. Counted in `held` while it waits, so the
    /// capacity bounds cover delayed work; never refused for capacity, since the original
    /// it replaces is released by the ack that follows (a retry copy is never larger than
    /// its original by more than its attempt record).
    /// The copy comes back to its app's FIFO.
    pub fn schedule_retry(self: &Arc<Self>, app: &AppId, body: Vec<u8>, delay: Duration) {
        {
            let mut held = self.held.lock().expect("queue lock");
            held.messages += 1;
            held.bytes += body.len();
            self.metrics.queue_depth.set(held.messages as i64);
        }
        let queue = self.clone();
        let slot = self.work_slot(app);
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = queue.closed.cancelled() => return,
            }
            queue.work[slot].push_back(Message {
                body,
                redelivered: false,
                dead_reason: None,
            });
        });
    }

    pub fn park_dead(&self, body: Vec<u8>, reason: &str) {
        let mut dead = self.dead.ready.lock().expect("queue lock");
        // Summed on each park: dead letters are rare, and 10,000 lengths are quick to add.
        let mut bytes: usize = dead.iter().map(|m| m.body.len()).sum();
        while !dead.is_empty()
            && (dead.len() >= DEAD_LETTER_CAPACITY || bytes + body.len() > DEAD_LETTER_MAX_BYTES)
        {
            if let Some(old) = dead.pop_front() {
                bytes -= old.body.len();
            }
            tracing::warn!(
                capacity = DEAD_LETTER_CAPACITY,
                max_bytes = DEAD_LETTER_MAX_BYTES,
                "embedded dead-letter queue full: dropped the oldest dead letter"
            );
        }
        dead.push_back(Message {
            body,
            redelivered: false,
            dead_reason: Some(reason.to_owned()),
        });
        drop(dead);
        self.dead.notify.notify_one();
    }
}

pub struct MemoryConsumer {
    queue: Arc<MemoryQueue>,
    /// The FIFOs this consumer takes from, round-robin.
    slots: Vec<Slot>,
    /// Where the next round starts: one past the FIFO that gave the last message.
    next_slot: usize,
}

impl MemoryConsumer {
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            // Register interest in every FIFO before looking, so a push between the look
            // and the wait still wakes us.
            let mut waits: Vec<_> = self
                .slots
                .iter()
                .map(|&s| Box::pin(self.queue.fifo(s).notify.notified()))
                .collect();
            for w in &mut waits {
                w.as_mut().enable();
            }
            if self.queue.closed.is_cancelled() {
                return None;
            }
            let n = self.slots.len();
            for k in 0..n {
                let i = (self.next_slot + k) % n;
                let slot = self.slots[i];
                if let Some(m) = self.queue.fifo(slot).pop() {
                    self.next_slot = (i + 1) % n;
                    return Some(Delivery {
                        redelivered: m.redelivered,
                        dead_reason: m.dead_reason.clone(),
                        body: m.body.clone(),
                        handle: DeliveryHandle::Memory(MemoryHandle {
                            queue: self.queue.clone(),
                            slot,
                            message: Some(m),
                        }),
                    });
                }
            }
            tokio::select! {
                _ = futures::future::select_all(waits) => {}
                _ = self.queue.closed.cancelled() => return None,
            }
        }
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.queue.metrics.consumers_running.dec();
    }
}

/// Settles one in-memory delivery. Dropped unsettled, it puts the message back at the front,
/// marked redelivered: the in-process equivalent of a broker requeueing an unacked message
/// when its consumer's channel closes.
pub struct MemoryHandle {
    queue: Arc<MemoryQueue>,
    slot: Slot,
    message: Option<Message>,
}

impl MemoryHandle {
    fn settle(mut self) -> Message {
        self.message.take().expect("settled once")
    }

    pub fn ack(self) {
        let slot = self.slot;
        let queue = self.queue.clone();
        let m = self.settle();
        if slot != Slot::Dead {
            queue.release(m.body.len());
        }
    }

    pub fn queue(&self) -> Arc<MemoryQueue> {
        self.queue.clone()
    }

    pub fn requeue(self) {
        let queue = self.queue.clone();
        let slot = self.slot;
        let mut m = self.settle();
        m.redelivered = true;
        queue.fifo(slot).push_front(m);
    }
}

impl Drop for MemoryHandle {
    fn drop(&mut self) {
        if let Some(mut m) = self.message.take() {
            m.redelivered = true;
            self.queue.fifo(self.slot).push_front(m);
        }
    }
}
