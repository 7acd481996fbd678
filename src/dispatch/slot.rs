//! A message's claim on the dispatcher's two budgets.
//!
//! `queue.prefetch` bounds the messages the dispatcher *works on* at once (the active
//! budget). A live delivery whose frame is already with the device's session (or "received"
//! by the node that holds it) has nothing left for herald to do but wait for the device's
//! ack, up to `gateway.ack_timeout`. Holding an active slot for that wait would let a few
//! slow devices (or a burst to devices behind a bad network) stall every other device's
//! notifications for the ack deadline. So a message whose every running target is waiting
//! only on an ack *parks*: it gives its active slot back and holds one of
//! `dispatcher.max_awaiting_ack` parked slots instead. When an ack wait ends (acked, or the
//! deadline: then the fallback is work again) the message takes an active slot back before
//! it goes on. The consumer's broker prefetch is the sum of both budgets, so parked
//! messages do not stop new ones from arriving.
//!
//! When the parked budget is used up a message just keeps its active slot while it waits
//! (the behaviour before parking existed): bounded memory, never a deadlock. Nothing here
//! changes what happens to a message, only which budget it counts against while it waits:
//! the settlement and its at-least-once rules are untouched.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// The dispatcher's budgets, shared by every message it handles.
pub struct Budgets {
    /// `queue.prefetch`: messages being worked on.
    pub active: Arc<Semaphore>,
    /// `dispatcher.max_awaiting_ack`: messages only waiting for devices' acks.
    pub parked: Arc<Semaphore>,
    pub metrics: Metrics,
}

impl Budgets {
    pub fn new(active: usize, parked: usize, metrics: Metrics) -> Arc<Budgets> {
        Arc::new(Budgets {
            active: Arc::new(Semaphore::new(active.max(1))),
            parked: Arc::new(Semaphore::new(parked)),
            metrics,
        })
    }

    /// Waits for an active slot (the dispatcher's loop, before it takes a message).
    pub async fn take_active(&self) -> OwnedSemaphorePermit {
        self.active
            .clone()
            .acquire_owned()
            .await
            .expect("never closed")
    }
}

/// One message's slot, and what its targets are doing.
pub struct Slot {
    budgets: Arc<Budgets>,
    state: Mutex<State>,
}

struct State {
    active: Option<OwnedSemaphorePermit>,
    parked: Option<OwnedSemaphorePermit>,
    /// Targets not started yet: while any remain, the message has work to do.
    unstarted: usize,
    /// Targets running and not waiting on an ack.
    busy: usize,
    /// Targets waiting only on a device's ack.
    waiting: usize,
}

impl Slot {
    pub fn new(budgets: Arc<Budgets>, active: OwnedSemaphorePermit, targets: usize) -> Slot {
        Slot {
            budgets,
            state: Mutex::new(State {
                active: Some(active),
                parked: None,
                unstarted: targets,
                busy: 0,
                waiting: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few counter updates and permit moves: a panic inside
        // one cannot leave the state half-written in a way that matters more than a slot.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A target starts.
    pub fn start_target(&self) {
        let mut s = self.lock();
        s.unstarted = s.unstarted.saturating_sub(1);
        s.busy += 1;
    }

    /// A target ended (its report is in).
    pub fn end_target(&self) {
        let mut s = self.lock();
        s.busy = s.busy.saturating_sub(1);
        self.maybe_park(&mut s);
    }

    /// A target's live delivery now waits only for the device's ack.
    pub fn awaiting_ack(&self) {
        let mut s = self.lock();
        s.busy = s.busy.saturating_sub(1);
        s.waiting += 1;
        self.maybe_park(&mut s);
    }

    /// A target's ack wait is over (whatever its outcome): it has work to do again, so the
    /// message holds an active slot before the target goes on.
    pub async fn ack_wait_over(&self) {
        {
            let mut s = self.lock();
            s.waiting = s.waiting.saturating_sub(1);
            s.busy += 1;
            if s.active.is_some() {
                return;
            }
        }
        let permit = self.budgets.take_active().await;
        let mut s = self.lock();
        if s.active.is_none() {
            s.active = Some(permit);
            if s.parked.take().is_some() {
                self.budgets.metrics.dispatcher_parked.dec();
            }
        }
        // else: another target of this message took one meanwhile; ours goes back.
    }

    /// Parks the message if every running target only waits for an ack and none is left to
    /// start, and a parked slot is free.
    fn maybe_park(&self, s: &mut State) {
        if s.busy > 0 || s.waiting == 0 || s.unstarted > 0 || s.active.is_none() {
            return;
        }
        if let Ok(parked) = self.budgets.parked.clone().try_acquire_owned() {
            s.parked = Some(parked);
            s.active = None;
            self.budgets.metrics.dispatcher_parked.inc();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if s.parked.take().is_some() {
            self.budgets.metrics.dispatcher_parked.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(active: usize, parked: usize) -> Arc<Budgets> {
        Budgets::new(active, parked, Metrics::new())
    }

    #[tokio::test]
    async fn a_message_waiting_only_on_acks_gives_its_active_slot_back() {
        let b = budgets(1, 4);
        let slot = Slot::new(b.clone(), b.take_active().await, 1);
        slot.start_target();
        assert_eq!(b.active.available_permits(), 0);
        slot.awaiting_ack();
        assert_eq!(
            b.active.available_permits(),
            1,
            "parked: active slot lent out"
        );
        assert_eq!(b.parked.available_permits(), 3);
        slot.ack_wait_over().await;
        assert_eq!(
            b.active.available_permits(),
            0,
            "back to work: active again"
        );
        assert_eq!(b.parked.available_permits(), 4);
        slot.end_target();
        drop(slot);
        assert_eq!(b.active.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_message_with_targets_still_to_start_or_busy_keeps_its_slot() {
        let b = budgets(1, 4);
        let slot = Slot::new(b.clone(), b.take_active().await, 3);
        slot.start_target();
        slot.start_target();
        slot.awaiting_ack();
        assert_eq!(b.active.available_permits(), 0, "one target still busy");
        slot.awaiting_ack();
        assert_eq!(
            b.active.available_permits(),
            0,
            "one target not started yet"
        );
        slot.start_target();
        slot.end_target();
        assert_eq!(
            b.active.available_permits(),
            1,
            "now only ack waits are left: parked"
        );
    }

    #[tokio::test]
    async fn without_a_free_parked_slot_the_message_keeps_its_active_one() {
        let b = budgets(1, 0);
        let slot = Slot::new(b.clone(), b.take_active().await, 1);
        slot.start_target();
        slot.awaiting_ack();
        assert_eq!(b.active.available_permits(), 0);
        slot.ack_wait_over().await;
        slot.end_target();
        drop(slot);
        assert_eq!(b.active.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_parked_message_waits_for_an_active_slot_to_go_on() {
        let b = budgets(1, 4);
        let slot = Arc::new(Slot::new(b.clone(), b.take_active().await, 1));
        slot.start_target();
        slot.awaiting_ack();
        // Another message takes the lent slot.
        let other = b.take_active().await;
        let resumed = tokio::spawn({
            let slot = slot.clone();
            async move { slot.ack_wait_over().await }
        });
        tokio::task::yield_now().await;
        assert!(!resumed.is_finished(), "no active slot free: it waits");
        drop(other);
        resumed.await.unwrap();
        assert_eq!(b.active.available_permits(), 0);
        assert_eq!(b.parked.available_permits(), 4);
    }
}
