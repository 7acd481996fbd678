//! The embedded queue: bounded and in-process, with the same ack / retry / dead-letter
//! semantics as the RabbitMQ backend. It makes `herald serve` a working service on a bare
//! machine; it loses queued work when the process dies, and herald says so at start-up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::{Delivery, DeliveryHandle, QueueError, QueueKind};
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

pub struct MemoryQueue {
    work: Fifo,
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
    pub fn new(capacity: usize, max_bytes: usize, metrics: Metrics) -> Self {
        metrics.broker_connected.set(1);
        MemoryQueue {
            work: Fifo::default(),
            dead: Fifo::default(),
            held: Mutex::new(Held::default()),
            capacity,
            max_bytes,
            closed: Default::default(),
            metrics,
        }
    }

    pub fn publish(&self, body: Vec<u8>) -> Result<(), QueueError> {
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
        self.work.push_back(Message {
            body,
            redelivered: false,
            dead_reason: None,
        });
        Ok(())
    }

    pub fn consume(self: &Arc<Self>, kind: QueueKind) -> MemoryConsumer {
        self.metrics.consumers_running.inc();
        MemoryConsumer {
            queue: self.clone(),
            kind,
        }
    }

    pub fn close(&self) {
        self.closed.cancel();
    }

    fn fifo(&self, kind: QueueKind) -> &Fifo {
        match kind {
            QueueKind::Work => &self.work,
            QueueKind::Dead => &self.dead,
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
    pub fn schedule_retry(self: &Arc<Self>, body: Vec<u8>, delay: Duration) {
        {
            let mut held = self.held.lock().expect("queue lock");
            held.messages += 1;
            held.bytes += body.len();
            self.metrics.queue_depth.set(held.messages as i64);
        }
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = queue.closed.cancelled() => return,
            }
            queue.work.push_back(Message {
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
    kind: QueueKind,
}

impl MemoryConsumer {
    pub async fn next(&mut self) -> Option<Delivery> {
        let fifo = self.queue.fifo(self.kind);
        loop {
            // Register interest before looking, so a push between the look and the wait
            // still wakes us.
            let notified = fifo.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queue.closed.is_cancelled() {
                return None;
            }
            if let Some(m) = fifo.pop() {
                return Some(Delivery {
                    redelivered: m.redelivered,
                    dead_reason: m.dead_reason.clone(),
                    body: m.body.clone(),
                    handle: DeliveryHandle::Memory(MemoryHandle {
                        queue: self.queue.clone(),
                        kind: self.kind,
                        message: Some(m),
                    }),
                });
            }
            tokio::select! {
                _ = &mut notified => {}
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
    kind: QueueKind,
    message: Option<Message>,
}

impl MemoryHandle {
    fn settle(mut self) -> Message {
        self.message.take().expect("settled once")
    }

    pub fn ack(self) {
        let kind = self.kind;
        let queue = self.queue.clone();
        let m = self.settle();
        if kind == QueueKind::Work {
            queue.release(m.body.len());
        }
    }

    pub fn queue(&self) -> Arc<MemoryQueue> {
        self.queue.clone()
    }

    pub fn requeue(self) {
        let queue = self.queue.clone();
        let kind = self.kind;
        let mut m = self.settle();
        m.redelivered = true;
        queue.fifo(kind).push_front(m);
    }
}

impl Drop for MemoryHandle {
    fn drop(&mut self) {
        if let Some(mut m) = self.message.take() {
            m.redelivered = true;
            self.queue.fifo(self.kind).push_front(m);
        }
    }
}
