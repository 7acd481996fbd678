//! The gateway's handle on a session registrar: the cluster directory, in cluster mode.
//!
//! The gateway owns this type and the commands it sends; the directory is given the
//! receiving end and applies them. So the arrow runs one way (directory → gateway): the
//! gateway announces every change to its session table, in the order the table changed,
//! and does not need to know who routes by it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};

use super::admission::Peer;
use crate::domain::DeviceKey;

/// One change to the session table, for the registrar to apply.
pub enum Command {
    /// Route `device` to this node; `done` says whether the bind was applied. `peer` is
    /// where the session's device connects from: other nodes name it in the
    /// `session_replaced` event when this session closes theirs.
    Bind {
        device: DeviceKey,
        session: uuid::Uuid,
        peer: Peer,
        done: Option<oneshot::Sender<bool>>,
    },
    /// Stop routing `device` to this node.
    Unbind { device: DeviceKey },
    /// Answered once every command sent before it was applied.
    Flush(oneshot::Sender<()>),
}

/// The gateway's end: bind at connect, unbind at close.
pub struct Registrar {
    shared: Arc<Shared>,
    ready: watch::Receiver<bool>,
    timeout: Duration,
}

/// The registrar's end: the commands, in order, coalesced per device.
///
/// Bounded by devices, not by events: a device's commands not yet taken are one entry,
/// the last one asked for (bind and unbind are idempotent, so only the last matters). A
/// device that connects and disconnects in a loop while the broker is slow therefore holds
/// one entry, where an unbounded channel grew by two per loop until the node ran out of
/// memory. What is queued is at most one entry per device that had a session on this node
/// since the registrar last caught up (so at most `gateway.max_sessions` plus the devices
/// that left meanwhile), plus pending flushes (one per shutdown).
pub struct Receiver {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the receiver when a command is queued or the last sender goes.
    wake: Notify,
    /// Live [`Registrar`] handles; none left and nothing queued means the stream ended.
    senders: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<Slot>,
    /// The latest command of each device with a `Slot::Device` in `order`.
    latest: HashMap<DeviceKey, Command>,
}

enum Slot {
    Device(DeviceKey),
    Flush(oneshot::Sender<()>),
}

/// A registrar handle for the gateway and the command stream for whoever applies them.
/// `ready` is true while the registrar can route to new sessions; `timeout` is how long a
/// new session waits for its bind (`cluster.register_timeout`).
pub fn channel(ready: watch::Receiver<bool>, timeout: Duration) -> (Registrar, Receiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue::default()),
        wake: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (
        Registrar {
            shared: shared.clone(),
            ready,
            timeout,
        },
        Receiver { shared },
    )
}

impl Clone for Registrar {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::AcqRel);
        Registrar {
            shared: self.shared.clone(),
            ready: self.ready.clone(),
            timeout: self.timeout,
        }
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every operation under this lock is a single push/pop/insert: a panic cannot leave
        // the queue half-updated, so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, command: Command) {
        let mut queue = self.lock();
        match command {
            Command::Flush(done) => queue.order.push_back(Slot::Flush(done)),
            Command::Bind { ref device, .. } | Command::Unbind { ref device } => {
                let device = device.clone();
                let binds = matches!(command, Command::Bind { .. });
                match queue.latest.insert(device.clone(), command) {
                    // Superseded before it was applied. A bind's waiter (a session replaced
                    // by a newer one on this node) hears `true` when the device stays routed
                    // here, and `false` (its sender dropped) when it is being unbound.
                    Some(Command::Bind {
                        done: Some(done), ..
                    }) if binds => {
                        let _ = done.send(true);
                    }
                    Some(_) => {}
                    None => queue.order.push_back(Slot::Device(device)),
                }
            }
        }
        drop(queue);
        self.wake.notify_one();
    }
}

impl Receiver {
    /// The next command; `None` once every [`Registrar`] is gone and nothing is queued.
    pub async fn recv(&mut self) -> Option<Command> {
        let shared = self.shared.clone();
        loop {
            // Created before the check; and `notify_one` leaves a permit when nobody waits,
            // so a push between the check and the await still wakes this.
            let woken = shared.wake.notified();
            if let Ok(command) = self.try_recv() {
                return Some(command);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return self.try_recv().ok();
            }
            woken.await;
        }
    }

    /// The next command if one is queued now.
    pub fn try_recv(&mut self) -> Result<Command, Empty> {
        let mut queue = self.shared.lock();
        loop {
            match queue.order.pop_front() {
                None => return Err(Empty),
                Some(Slot::Flush(done)) => return Ok(Command::Flush(done)),
                Some(Slot::Device(device)) => {
                    if let Some(command) = queue.latest.remove(&device) {
                        return Ok(command);
                    }
                }
            }
        }
    }

    /// Entries queued now (devices with a pending command, and flushes).
    pub fn len(&self) -> usize {
        self.shared.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// [`Receiver::try_recv`] found nothing queued.
#[derive(Debug)]
pub struct Empty;

impl Registrar {
    /// Asks for `device` to be routed to this node; the receiver says whether the bind was
    /// applied. Called with the gateway's session lock held, so commands follow the table.
    pub(crate) fn bind(
        &self,
        device: DeviceKey,
        session: uuid::Uuid,
        peer: Peer,
    ) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        self.shared.push(Command::Bind {
            device,
            session,
            peer,
            done: Some(done),
        });
        rx
    }

    pub(crate) fn unbind(&self, device: DeviceKey) {
        self.shared.push(Command::Unbind { device });
    }

    /// Waits (at most `within`) until every bind/unbind asked for so far was applied.
    pub(crate) async fn flush(&self, within: Duration) {
        let (tx, rx) = oneshot::channel();
        self.shared.push(Command::Flush(tx));
        let _ = tokio::time::timeout(within, rx).await;
    }

    /// True while new sessions can be routed.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits (at most `within`) for [`Registrar::is_ready`].
    pub async fn wait_ready(&self, within: Duration) -> bool {
        let mut ready = self.ready.clone();
        matches!(
            tokio::time::timeout(within, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }

    /// How long a new session waits for its bind.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Peer = Peer::Direct(std::net::SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        40000,
    ));

    fn device(id: &str) -> DeviceKey {
        crate::domain::DeviceKey::parse_routing_key(&format!("default/{id}")).unwrap()
    }

    /// A device flapping while the registrar is stalled (broker slow) queues one entry,
    /// not two per flap; the last command wins and a flush still comes after it.
    #[tokio::test]
    async fn a_flapping_device_queues_one_entry() {
        let (_ready_tx, ready) = watch::channel(true);
        let (registrar, mut rx) = channel(ready, Duration::from_secs(1));
        let mut first = registrar.bind(device("phone-1"), uuid::Uuid::now_v7(), PEER);
        for _ in 0..10_000 {
            drop(registrar.bind(device("phone-1"), uuid::Uuid::now_v7(), PEER));
            registrar.unbind(device("phone-1"));
        }
        drop(registrar.bind(device("phone-2"), uuid::Uuid::now_v7(), PEER));
        let (flushed, _flush) = oneshot::channel();
        registrar.shared.push(Command::Flush(flushed));
        assert_eq!(rx.len(), 3, "phone-1, phone-2, the flush");
        assert!(
            matches!(rx.recv().await, Some(Command::Unbind { device }) if device.device.as_str() == "phone-1")
        );
        assert!(
            matches!(rx.recv().await, Some(Command::Bind { device, .. }) if device.device.as_str() == "phone-2")
        );
        assert!(matches!(rx.recv().await, Some(Command::Flush(_))));
        // The first bind was superseded by a bind: its session hears it stays routed here.
        assert_eq!(first.try_recv(), Ok(true));
        drop(registrar);
        assert!(
            rx.recv().await.is_none(),
            "the stream ends with the last sender"
        );
    }
}
