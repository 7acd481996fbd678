//! The gateway's handle on a session registrar: the cluster directory, in cluster mode.
//!
//! The gateway owns this type and the commands it sends; the directory is given the
//! receiving end and applies them. So the arrow runs one way (directory → gateway): the
//! gateway announces every change to its session table, in the order the table changed,
//! and does not need to know who routes by it.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::DeviceKey;

/// One change to the session table, for the registrar to apply.
pub enum Command {
    /// Route `device` to this node; `done` says whether the bind was applied.
    Bind {
        device: DeviceKey,
        session: uuid::Uuid,
        done: Option<oneshot::Sender<bool>>,
    },
    /// Stop routing `device` to this node.
    Unbind { device: DeviceKey },
    /// Answered once every command sent before it was applied.
    Flush(oneshot::Sender<()>),
}

/// The gateway's end: bind at connect, unbind at close.
#[derive(Clone)]
pub struct Registrar {
    tx: mpsc::UnboundedSender<Command>,
    ready: watch::Receiver<bool>,
    timeout: Duration,
}

/// A registrar handle for the gateway and the command stream for whoever applies them.
/// `ready` is true while the registrar can route to new sessions; `timeout` is how long a
/// new session waits for its bind (`cluster.register_timeout`).
pub fn channel(
    ready: watch::Receiver<bool>,
    timeout: Duration,
) -> (Registrar, mpsc::UnboundedReceiver<Command>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Registrar { tx, ready, timeout }, rx)
}

impl Registrar {
    /// Asks for `device` to be routed to this node; the receiver says whether the bind was
    /// applied. Called with the gateway's session lock held, so commands follow the table.
    pub(crate) fn bind(&self, device: DeviceKey, session: uuid::Uuid) -> oneshot::Receiver<bool> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Bind {
            device,
            session,
            done: Some(done),
        });
        rx
    }

    pub(crate) fn unbind(&self, device: DeviceKey) {
        let _ = self.tx.send(Command::Unbind { device });
    }

    /// Waits (at most `within`) until every bind/unbind asked for so far was applied.
    pub(crate) async fn flush(&self, within: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(within, rx).await;
        }
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
