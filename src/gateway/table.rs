//! The session table: device → its one current session on this node, and the registrar
//! (cluster mode) told of every change in the order the table changed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::admission::Peer;
use super::protocol::CloseKind;
use super::registrar::Registrar;
use crate::domain::{DeviceKey, NotificationId};

/// One notification on its way to a device. Boxed in the channel so an idle session's
/// channel block holds pointers, not whole frames.
pub(super) struct Outbound {
    pub(super) id: NotificationId,
    pub(super) frame: String,
    pub(super) acked: oneshot::Sender<()>,
}

/// Closes a session from outside its task, with a reason. The first reason wins.
pub(super) struct Control {
    kill: CancellationToken,
    reason: OnceLock<CloseKind>,
    /// Another inbox replay is wanted (the dispatcher stored for this device while it was
    /// connected). A `Notify` keeps one permit, so a request made while the session is busy
    /// is not lost.
    replay: tokio::sync::Notify,
}

impl Control {
    /// A control whose session also closes when `parent` (the gateway's stop) is cancelled.
    pub(super) fn under(parent: &CancellationToken) -> Control {
        Control {
            kill: parent.child_token(),
            reason: OnceLock::new(),
            replay: tokio::sync::Notify::new(),
        }
    }

    pub(super) fn close(&self, kind: CloseKind) {
        let _ = self.reason.set(kind);
        self.kill.cancel();
    }

    /// Resolves once the session was closed from outside.
    pub(super) async fn killed(&self) {
        self.kill.cancelled().await
    }

    pub(super) fn request_replay(&self) {
        self.replay.notify_one();
    }

    /// Resolves once a replay was requested.
    pub(super) async fn replay_requested(&self) {
        self.replay.notified().await
    }

    /// Why the session was closed from outside ("shutdown" if no reason was given).
    pub(super) fn reason(&self) -> CloseKind {
        self.reason.get().copied().unwrap_or(CloseKind::Shutdown)
    }
}

/// What the table holds for a session: its send buffer, a way to close it, and who it is
/// (id and peer, for the `session_replaced` event).
#[derive(Clone)]
pub(super) struct SessionHandle {
    id: uuid::Uuid,
    peer: Peer,
    tx: mpsc::Sender<Box<Outbound>>,
    control: Arc<Control>,
}

/// A session closed because a newer one of its device took its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed {
    pub(super) id: uuid::Uuid,
    pub(super) peer: Peer,
}

impl SessionHandle {
    pub(super) fn new(
        id: uuid::Uuid,
        peer: Peer,
        tx: mpsc::Sender<Box<Outbound>>,
        control: Arc<Control>,
    ) -> Self {
        SessionHandle {
            id,
            peer,
            tx,
            control,
        }
    }

    pub(super) fn id(&self) -> uuid::Uuid {
        self.id
    }

    pub(super) fn peer(&self) -> Peer {
        self.peer
    }

    fn closed(&self) -> Closed {
        Closed {
            id: self.id,
            peer: self.peer,
        }
    }

    pub(super) fn sender(&self) -> &mpsc::Sender<Box<Outbound>> {
        &self.tx
    }

    pub(super) fn close(&self, kind: CloseKind) {
        self.control.close(kind);
    }

    pub(super) fn request_replay(&self) {
        self.control.request_replay();
    }
}

#[derive(Default)]
pub(super) struct SessionTable {
    /// A plain mutex: held only to insert, remove or clone a handle, never across an await.
    sessions: Mutex<HashMap<DeviceKey, SessionHandle>>,
    /// The cluster directory's registrar (cluster mode only): bind at connect, unbind at
    /// close, in the order this table changes.
    registrar: OnceLock<Registrar>,
}

impl SessionTable {
    pub(super) fn set_registrar(&self, registrar: Registrar) {
        let _ = self.registrar.set(registrar);
    }

    pub(super) fn registrar(&self) -> Option<&Registrar> {
        self.registrar.get()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceKey, SessionHandle>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // operation on it is a single insert/remove/get), so a poisoned lock is still usable.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    pub(super) fn contains(&self, device: &DeviceKey) -> bool {
        self.lock().contains_key(device)
    }

    pub(super) fn get(&self, device: &DeviceKey) -> Option<SessionHandle> {
        self.lock().get(device).cloned()
    }

    /// Closes `device`'s session here if it is older than `newer` (session ids are
    /// UUIDv7, so time ordered), and says which it closed.
    pub(super) fn close_older(&self, device: &DeviceKey, newer: uuid::Uuid) -> Option<Closed> {
        match self.lock().get(device) {
            Some(h) if h.id < newer => {
                h.close(CloseKind::Replaced);
                Some(h.closed())
            }
            _ => None,
        }
    }

    /// Puts a session in the table, closing an older session of the same device (handed
    /// back). In cluster mode the bind is asked for under the table's lock, so binds and
    /// unbinds reach the registrar in the order the table changed; the receiver says when
    /// the broker binding is in place.
    pub(super) fn insert(
        &self,
        device: DeviceKey,
        handle: SessionHandle,
    ) -> (Option<oneshot::Receiver<bool>>, Option<Closed>) {
        let mut sessions = self.lock();
        let bound = self
            .registrar()
            .map(|r| r.bind(device.clone(), handle.id, handle.peer));
        let replaced = sessions.insert(device, handle).map(|old| {
            old.close(CloseKind::Replaced);
            old.closed()
        });
        (bound, replaced)
    }

    /// Removes session `id` of `device` (and its registration), unless a newer one already
    /// took its place.
    pub(super) fn remove(&self, device: &DeviceKey, id: uuid::Uuid) {
        let mut sessions = self.lock();
        if sessions.get(device).is_some_and(|h| h.id == id) {
            sessions.remove(device);
            if let Some(registrar) = self.registrar() {
                registrar.unbind(device.clone());
            }
        }
    }

    /// Empties the table (unregistering every session) and hands back the handles.
    pub(super) fn drain(&self) -> Vec<SessionHandle> {
        let mut table = self.lock();
        if let Some(registrar) = self.registrar() {
            for device in table.keys() {
                registrar.unbind(device.clone());
            }
        }
        table.drain().map(|(_, h)| h).collect()
    }
}
