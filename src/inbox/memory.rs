//! The memory inbox: the embedded install's offline inbox, in process memory.
//!
//! It has the embedded queue's lifetime and says so: a process restart loses every pending
//! entry, exactly as it loses every queued message. It is bounded twice: per device by
//! `inbox.max_per_device` / `inbox.max_bytes_per_device` (oldest dropped and reported), and
//! in total by `inbox.memory_max_bytes` (further stores fail with [`InboxError::Full`], so
//! the dispatcher falls back to retry-then-dead-letter instead of the process growing
//! without bound: one misbehaving sender cannot exhaust the host).
//!
//! One mutex over everything: an embedded install is one process with modest rates, and
//! every operation touches at most one device's ≤ `max_per_device` entries plus an index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

use super::{
    Cursor, DropReason, Dropped, ExpiredEntry, InboxError, InboxLimits, InboxWrite, PendingEntry,
    StoreReport,
};
use crate::domain::{NotificationId, unix_millis};

/// Bytes charged per entry on top of its frame against `memory_max_bytes`: the entry
/// struct, its device key strings, and its slot in the expiry index (measured ~200 B;
/// rounded up so the bound errs on the side of less memory).
const ENTRY_OVERHEAD_BYTES: usize = 256;

struct Item {
    seq: u64,
    id: NotificationId,
    accepted_at_ms: u64,
    expires_at_ms: u64,
    collapse_key: Option<String>,
    frame: Bytes,
}

impl Item {
    fn order(&self) -> (u64, u64) {
        (self.accepted_at_ms, self.seq)
    }
    fn cost(&self) -> usize {
        self.frame.len() + ENTRY_OVERHEAD_BYTES
    }
}

/// One device's entries, kept sorted in accepted order (`accepted_at_ms`, then `seq`).
#[derive(Default)]
struct DeviceBox {
    items: Vec<Item>,
    frame_bytes: usize,
}

type DeviceKey = (String, String);

#[derive(Default)]
struct State {
    devices: HashMap<DeviceKey, DeviceBox>,
    /// (expires_at_ms, seq) → device, for the reaper: soonest expiry first without a scan.
    expiry: BTreeMap<(u64, u64), DeviceKey>,
    /// Frames plus per-entry overhead, against `memory_max_bytes`.
    total_bytes: usize,
    rows: usize,
    next_seq: u64,
}

impl State {
    /// Removes `items[index]` of `key`'s box and updates every index.
    fn remove_at(&mut self, key: &DeviceKey, index: usize) -> Item {
        let b = self.devices.get_mut(key).expect("device box exists");
        let item = b.items.remove(index);
        b.frame_bytes -= item.frame.len();
        self.expiry.remove(&(item.expires_at_ms, item.seq));
        self.total_bytes -= item.cost();
        self.rows -= 1;
        item
    }

    fn drop_empty(&mut self, key: &DeviceKey) {
        if self.devices.get(key).is_some_and(|b| b.items.is_empty()) {
            self.devices.remove(key);
        }
    }
}

pub struct MemoryInbox {
    state: Mutex<State>,
    limits: InboxLimits,
    max_total_bytes: usize,
}

impl MemoryInbox {
    pub fn new(limits: InboxLimits, max_total_bytes: usize) -> Self {
        MemoryInbox {
            state: Mutex::new(State::default()),
            limits,
            max_total_bytes,
        }
    }

    pub fn store_batch(&self, mut writes: Vec<InboxWrite>) -> Result<StoreReport, InboxError> {
        let now = unix_millis(SystemTime::now());
        let mut state = self.state.lock().expect("inbox lock");
        // All or nothing, like the PostgreSQL transaction: refuse the whole batch up front if
        // it could break the total bound (an upper bound: drops may free room, ignored).
        let needed: usize = writes
            .iter()
            .map(|w| w.entry.size_bytes() + ENTRY_OVERHEAD_BYTES)
            .sum();
        if state.total_bytes + needed > self.max_total_bytes {
            return Err(InboxError::Full(self.max_total_bytes));
        }
        // Applied one by one in accepted order, which is what the PostgreSQL batch's result
        // is defined as too. Stable, so equal timestamps keep the caller's order.
        writes.sort_by_key(|w| w.entry.accepted_at_ms);
        let mut report = StoreReport::default();
        for w in self.collapse_batch(writes, now, &mut report) {
            self.store_one(&mut state, w, now, &mut report);
        }
        Ok(report)
    }

    /// Within one batch (sorted in accepted order), as the PostgreSQL function does it: a
    /// repeated (device, id) is kept once, then per (device, collapse key) only the latest
    /// entry goes on; the others are reported replaced by it. Entries that will be refused
    /// on arrival (expired, oversized) take no part: `store_one` reports them.
    fn collapse_batch(
        &self,
        writes: Vec<InboxWrite>,
        now: u64,
        report: &mut StoreReport,
    ) -> Vec<InboxWrite> {
        let live = |w: &InboxWrite| {
            w.entry.expires_at_ms > now && w.entry.size_bytes() <= self.limits.max_bytes_per_device
        };
        let mut seen = HashSet::new();
        let writes: Vec<InboxWrite> = writes
            .into_iter()
            .filter(|w| !live(w) || seen.insert((w.app.clone(), w.device_id.clone(), w.entry.id)))
            .collect();
        // The last entry per key in accepted order is the winner.
        let mut winners = HashMap::new();
        for w in writes.iter().filter(|w| live(w)) {
            if let Some(ck) = &w.entry.collapse_key {
                winners.insert((&w.app, &w.device_id, ck), w.entry.id);
            }
        }
        let mut losers = HashSet::new();
        for w in writes.iter().filter(|w| live(w)) {
            if let Some(ck) = &w.entry.collapse_key {
                let by = winners[&(&w.app, &w.device_id, ck)];
                if by != w.entry.id {
                    losers.insert((w.app.clone(), w.device_id.clone(), w.entry.id));
                    report.dropped.push(Dropped {
                        app: w.app.clone(),
                        device_id: w.device_id.clone(),
                        id: w.entry.id,
                        reason: DropReason::Replaced { by },
                    });
                }
            }
        }
        writes
            .into_iter()
            .filter(|w| !losers.contains(&(w.app.clone(), w.device_id.clone(), w.entry.id)))
            .collect()
    }

    fn store_one(&self, state: &mut State, w: InboxWrite, now: u64, report: &mut StoreReport) {
        let key = (w.app, w.device_id);
        let e = w.entry;
        let report_drop = |report: &mut StoreReport, id, reason| {
            report.dropped.push(Dropped {
                app: key.0.clone(),
                device_id: key.1.clone(),
                id,
                reason,
            })
        };
        // The device's expired entries go first, so the bounds count only live ones.
        let b = state.devices.entry(key.clone()).or_default();
        let expired: Vec<usize> = (0..b.items.len())
            .filter(|&i| b.items[i].expires_at_ms <= now)
            .collect();
        for i in expired.into_iter().rev() {
            let item = state.remove_at(&key, i);
            report_drop(report, item.id, DropReason::Expired);
        }
        let b = state.devices.get(&key).expect("device box exists");
        if e.expires_at_ms <= now {
            report_drop(report, e.id, DropReason::Expired);
        } else if e.size_bytes() > self.limits.max_bytes_per_device {
            report_drop(report, e.id, DropReason::Overflow);
        } else if b.items.iter().any(|i| i.id == e.id) {
            // A redelivery of an entry already kept: keep one.
        } else if let Some(newer) =
            same_key(b, &e.collapse_key).filter(|&i| b.items[i].accepted_at_ms > e.accepted_at_ms)
        {
            // A later notification with this collapse key is already waiting: it wins.
            let by = b.items[newer].id;
            report_drop(report, e.id, DropReason::Replaced { by });
        } else {
            if let Some(i) = same_key(b, &e.collapse_key) {
                let old = state.remove_at(&key, i);
                report_drop(report, old.id, DropReason::Replaced { by: e.id });
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            let item = Item {
                seq,
                id: e.id,
                accepted_at_ms: e.accepted_at_ms,
                expires_at_ms: e.expires_at_ms,
                collapse_key: e.collapse_key,
                frame: e.frame,
            };
            state.expiry.insert((item.expires_at_ms, seq), key.clone());
            state.total_bytes += item.cost();
            state.rows += 1;
            let b = state.devices.get_mut(&key).expect("device box exists");
            b.frame_bytes += item.frame.len();
            let at = b.items.partition_point(|i| i.order() < item.order());
            b.items.insert(at, item);
            // Oldest first, until both bounds hold.
            loop {
                let b = &state.devices[&key];
                if b.items.len() <= self.limits.max_per_device
                    && b.frame_bytes <= self.limits.max_bytes_per_device
                {
                    break;
                }
                let old = state.remove_at(&key, 0);
                report_drop(report, old.id, DropReason::Overflow);
            }
        }
        state.drop_empty(&key);
    }

    pub fn pending(
        &self,
        app: &str,
        device_id: &str,
        after: Option<Cursor>,
        limit: usize,
    ) -> Vec<PendingEntry> {
        let now = unix_millis(SystemTime::now());
        let state = self.state.lock().expect("inbox lock");
        let Some(b) = state.devices.get(&(app.to_owned(), device_id.to_owned())) else {
            return Vec::new();
        };
        b.items
            .iter()
            .map(|i| (cursor(i), i))
            .filter(|(c, i)| after.is_none_or(|a| *c > a) && i.expires_at_ms > now)
            .take(limit)
            .map(|(c, i)| PendingEntry {
                cursor: c,
                id: i.id,
                accepted_at_ms: i.accepted_at_ms,
                expires_at_ms: i.expires_at_ms,
                collapse_key: i.collapse_key.clone(),
                frame: i.frame.clone(),
            })
            .collect()
    }

    pub fn ack(&self, app: &str, device_id: &str, id: NotificationId) -> bool {
        let mut state = self.state.lock().expect("inbox lock");
        let key = (app.to_owned(), device_id.to_owned());
        let Some(i) = state
            .devices
            .get(&key)
            .and_then(|b| b.items.iter().position(|i| i.id == id))
        else {
            return false;
        };
        state.remove_at(&key, i);
        state.drop_empty(&key);
        true
    }

    pub fn reap_expired(&self, batch: usize) -> Vec<ExpiredEntry> {
        let now = unix_millis(SystemTime::now());
        let mut state = self.state.lock().expect("inbox lock");
        let due: Vec<((u64, u64), DeviceKey)> = state
            .expiry
            .range(..(now + 1, 0))
            .take(batch)
            .map(|(k, d)| (*k, d.clone()))
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for ((_, seq), key) in due {
            let i = state.devices[&key]
                .items
                .iter()
                .position(|i| i.seq == seq)
                .expect("the expiry index matches the boxes");
            let item = state.remove_at(&key, i);
            state.drop_empty(&key);
            out.push(ExpiredEntry {
                app: key.0.clone(),
                device_id: key.1.clone(),
                id: item.id,
            });
        }
        out
    }

    pub fn pending_count(&self) -> u64 {
        self.state.lock().expect("inbox lock").rows as u64
    }

    /// Entries held per app (apps with none left out). One pass over the devices, so
    /// sample it, as the reaper does.
    pub fn pending_by_app(&self) -> Vec<(String, u64)> {
        let state = self.state.lock().expect("inbox lock");
        let mut by_app: HashMap<&str, u64> = HashMap::new();
        for ((app, _), b) in &state.devices {
            *by_app.entry(app.as_str()).or_default() += b.items.len() as u64;
        }
        let mut out: Vec<(String, u64)> = by_app
            .into_iter()
            .map(|(app, n)| (app.to_owned(), n))
            .collect();
        out.sort();
        out
    }
}

/// The index of the device's entry with this collapse key, if any.
fn same_key(b: &DeviceBox, key: &Option<String>) -> Option<usize> {
    let key = key.as_ref()?;
    b.items
        .iter()
        .position(|i| i.collapse_key.as_ref() == Some(key))
}

fn cursor(i: &Item) -> Cursor {
    Cursor {
        accepted_at_ms: i.accepted_at_ms as i64,
        seq: i.seq as i64,
    }
}
