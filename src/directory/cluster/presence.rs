//! The directory replica: device → (node, session), kept in memory in every cluster process
//! from the presence messages gateway nodes publish, and the pump that feeds it.
//!
//! Per node the replica follows one ordered stream (one publishing channel → one fanout
//! exchange → this process's queue, which RabbitMQ keeps in order): deltas numbered 1, 2, …
//! per incarnation, heartbeats saying how many deltas came before them. A node's state is
//! *synced* while the replica has applied every delta since a known point (the node's first
//! message, or a snapshot); otherwise deltas are buffered and a snapshot is requested from
//! the node (through its node queue, answered to this process's presence queue). A snapshot
//! says "the sessions after delta S": buffered deltas after S are applied on top, older ones
//! dropped, so a snapshot and concurrent events converge in either arrival order.
//!
//! Leases: a node not heard from for `cluster.node_lease` is dead; its devices are offline
//! at once (lookups skip it) and the caller fails its pending deliveries. Its state is kept
//! (the stream is still in order), so a node that was only slow is live again on its next
//! message, with no snapshot needed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::wire::Presence;
use crate::domain::DeviceKey;

/// A node silent for this long after its lease expired is forgotten (its claims dropped),
/// so the replica stays O(live nodes). Long against any lease: a node back after this is
/// simply re-learned from its next heartbeat and a snapshot.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Deltas buffered per node while waiting for its snapshot. A snapshot normally comes within
/// a broker round trip; past this the buffer is dropped and the next snapshot alone is used
/// (it is newer than anything dropped).
const MAX_BUFFERED: usize = 10_000;

/// How long (in leases) after it starts listening a replica is considered to be catching up:
/// one lease to hear every live node's heartbeat, one for their snapshots, one to spare.
const CATCH_UP_LEASES: u32 = 3;

pub type NodeId = Arc<str>;

/// What applying a message asks of the caller.
#[derive(Debug, Default, PartialEq)]
pub struct Effects {
    /// Ask these nodes for a snapshot.
    pub request_snapshot: Vec<NodeId>,
    /// These nodes' pending deliveries can no longer be answered (the node restarted).
    pub node_gone: Vec<NodeId>,
    /// Live nodes that hold an older session of a device another node now holds a newer
    /// one of ("newer session wins", across nodes): tell each to close it.
    pub supersede: Vec<Supersede>,
}

/// "Close your sessions of `device` older than `session`": what a replica tells `node` when
/// it sees two live nodes claim one device. `peer` is where the newer session connects
/// from, when the delta that opened it said (the closing node names it in its
/// `session_replaced` event).
///
/// The replica, not every gateway, spots the conflict: a gateway then needs no presence
/// subscription at all, so a session open costs the cluster one delta to the dispatchers'
/// queues instead of one parse in every gateway (O(gateways) work per registration), and a
/// conflict is seen whichever order the two nodes' deltas arrive in.
#[derive(Debug, Clone, PartialEq)]
pub struct Supersede {
    pub node: NodeId,
    pub device: DeviceKey,
    pub session: Uuid,
    pub peer: Option<String>,
}

struct NodeState {
    epoch: Uuid,
    /// Deltas applied (valid while `synced`).
    seq: u64,
    synced: bool,
    devices: HashMap<DeviceKey, Uuid>,
    /// Deltas received while not synced, by seq.
    buffered: BTreeMap<u64, Vec<(String, Option<Uuid>)>>,
    last_heard: Instant,
    alive: bool,
    /// When a snapshot was last asked for (asked again after a lease if none came).
    requested: Option<Instant>,
}

/// The replica. Not thread-safe by itself; the directory holds it behind a lock.
pub struct Replica {
    lease: Duration,
    nodes: HashMap<NodeId, NodeState>,
    /// Device → every (node, session) claiming it. Usually one; two while a device moves.
    index: HashMap<DeviceKey, Vec<(NodeId, Uuid)>>,
    /// When this process's presence queue started consuming (None while it is down).
    listening_since: Option<Instant>,
}

impl Replica {
    pub fn new(lease: Duration) -> Replica {
        Replica {
            lease,
            nodes: HashMap::new(),
            index: HashMap::new(),
            listening_since: None,
        }
    }

    /// The presence queue is consuming again (a fresh queue: anything published while it
    /// was down is missed). Every node must prove it is in sync again, by a contiguous
    /// stream or a snapshot; until then lookups use the last known state.
    pub fn listening(&mut self, now: Instant) {
        self.listening_since = Some(now);
        for st in self.nodes.values_mut() {
            st.synced = false;
            st.buffered.clear();
            st.requested = None;
        }
    }

    pub fn stopped_listening(&mut self) {
        self.listening_since = None;
    }

    /// True once this replica can be trusted: listening for at least one lease (every live
    /// node has heartbeated since) and every live node synced.
    pub fn is_synced(&self, now: Instant) -> bool {
        match self.listening_since {
            None => false,
            Some(t) => {
                now.duration_since(t) >= self.lease
                    && self.nodes.values().all(|st| st.synced || !st.alive)
            }
        }
    }

    /// True while the replica is catching up after it (re)started listening: not synced,
    /// and listening for less than `CATCH_UP_LEASES` leases. A lookup waits for the sync
    /// then; past it (a node that never answers its snapshot request) lookups answer from
    /// the last known state rather than make every delivery wait.
    pub fn catching_up(&self, now: Instant) -> bool {
        self.listening_since
            .is_some_and(|t| now.duration_since(t) < self.lease * CATCH_UP_LEASES)
            && !self.is_synced(now)
    }

    /// Where `device`'s newest session is, among live nodes.
    pub fn lookup(&self, device: &DeviceKey) -> Option<(NodeId, Uuid)> {
        self.index
            .get(device)?
            .iter()
            .filter(|(n, _)| self.nodes.get(n).is_some_and(|st| st.alive))
            .max_by_key(|(_, s)| *s)
            .cloned()
    }

    /// Devices with at least one claim (for the gauge).
    pub fn device_count(&self) -> usize {
        self.index.len()
    }

    pub fn live_nodes(&self) -> usize {
        self.nodes.values().filter(|st| st.alive).count()
    }

    /// Applies one presence message.
    pub fn apply(&mut self, msg: Presence, now: Instant) -> Effects {
        let mut fx = Effects::default();
        let (node, epoch) = match &msg {
            Presence::Heartbeat { node, epoch, .. }
            | Presence::Delta { node, epoch, .. }
            | Presence::Snapshot { node, epoch, .. } => (node.as_str(), *epoch),
        };
        let node: NodeId = match self.nodes.get_key_value(node) {
            Some((k, _)) => k.clone(),
            None => Arc::from(node),
        };
        match self.nodes.get(&node).map(|st| st.epoch) {
            Some(e) if epoch < e => return fx, // an old incarnation's leftovers
            Some(e) if epoch > e => {
                // The node restarted: its old sessions are gone.
                self.drop_node(&node);
                fx.node_gone.push(node.clone());
            }
            _ => {}
        }
        if !self.nodes.contains_key(&node) {
            self.nodes.insert(
                node.clone(),
                NodeState {
                    epoch,
                    seq: 0,
                    // Known from its start only if this is its very start (seq 0 heartbeat
                    // or delta 1); decided below.
                    synced: false,
                    devices: HashMap::new(),
                    buffered: BTreeMap::new(),
                    last_heard: now,
                    alive: true,
                    requested: None,
                },
            );
            let st = self.nodes.get_mut(&node).expect("inserted");
            st.synced = match &msg {
                Presence::Heartbeat { seq, .. } => *seq == 0,
                Presence::Delta { seq, .. } => *seq == 1,
                Presence::Snapshot { .. } => false,
            };
        }
        {
            let st = self.nodes.get_mut(&node).expect("present");
            st.last_heard = now;
            st.alive = true;
        }
        match msg {
            Presence::Heartbeat { seq, .. } => {
                let st = self.nodes.get_mut(&node).expect("present");
                if st.synced && seq > st.seq {
                    // Deltas are published before the heartbeat on one channel: a heartbeat
                    // ahead of us means deltas were lost (our queue was re-created).
                    st.synced = false;
                }
            }
            Presence::Delta {
                seq, ops, peers, ..
            } => {
                let st = self.nodes.get_mut(&node).expect("present");
                if st.synced && seq == st.seq + 1 {
                    st.seq = seq;
                    self.apply_ops(&node, ops, &peers, &mut fx.supersede);
                } else if st.synced && seq <= st.seq {
                    // Already covered (a snapshot came first).
                } else {
                    st.synced = false;
                    if st.buffered.len() >= MAX_BUFFERED {
                        st.buffered.clear();
                    }
                    st.buffered.insert(seq, ops);
                }
            }
            Presence::Snapshot { seq, devices, .. } => {
                let old: Vec<DeviceKey> = self.nodes[&node].devices.keys().cloned().collect();
                for d in old {
                    self.remove_claim(&node, &d);
                }
                for (d, s) in devices {
                    if let Some(d) = DeviceKey::parse_routing_key(&d) {
                        self.set_claim(&node, d, s, None, &mut fx.supersede);
                    }
                }
                let st = self.nodes.get_mut(&node).expect("present");
                st.seq = seq;
                st.requested = None;
                let buffered = std::mem::take(&mut st.buffered);
                let mut contiguous = true;
                for (s, ops) in buffered.into_iter().filter(|(s, _)| *s > seq) {
                    let st = self.nodes.get_mut(&node).expect("present");
                    if s != st.seq + 1 {
                        contiguous = false;
                        st.buffered.insert(s, ops);
                        continue;
                    }
                    st.seq = s;
                    // A buffered delta's peers were not kept: a replacement it reveals is
                    // still made, its event names no new peer.
                    self.apply_ops(&node, ops, &BTreeMap::new(), &mut fx.supersede);
                }
                self.nodes.get_mut(&node).expect("present").synced = contiguous;
            }
        }
        let st = self.nodes.get_mut(&node).expect("present");
        if !st.synced
            && st
                .requested
                .is_none_or(|t| now.duration_since(t) >= self.lease)
        {
            st.requested = Some(now);
            fx.request_snapshot.push(node);
        }
        fx
    }

    /// Lease check: nodes whose lease just expired (their devices are now offline), and
    /// forgets nodes dead for long.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeId> {
        let mut died = Vec::new();
        let mut forget = Vec::new();
        for (node, st) in &mut self.nodes {
            let silent = now.duration_since(st.last_heard);
            if st.alive && silent > self.lease {
                st.alive = false;
                died.push(node.clone());
            }
            if !st.alive && silent > FORGET_AFTER {
                forget.push(node.clone());
            }
        }
        for n in forget {
            self.drop_node(&n);
        }
        died
    }

    fn apply_ops(
        &mut self,
        node: &NodeId,
        ops: Vec<(String, Option<Uuid>)>,
        peers: &BTreeMap<Uuid, String>,
        supersede: &mut Vec<Supersede>,
    ) {
        for (d, s) in ops {
            let Some(d) = DeviceKey::parse_routing_key(&d) else {
                continue;
            };
            match s {
                Some(s) => self.set_claim(node, d, s, peers.get(&s).map(String::as_str), supersede),
                None => self.remove_claim(node, &d),
            }
        }
    }

    /// Records `node`'s claim on `device`; where another live node claims it too, the
    /// node holding the older session is told to close it (`supersede`).
    fn set_claim(
        &mut self,
        node: &NodeId,
        device: DeviceKey,
        session: Uuid,
        peer: Option<&str>,
        supersede: &mut Vec<Supersede>,
    ) {
        if let Some(st) = self.nodes.get_mut(node) {
            st.devices.insert(device.clone(), session);
        }
        // The usual case, no claim yet: the key moves in, no clone on the registration path.
        let Some(claims) = self.index.get_mut(&device) else {
            self.index.insert(device, vec![(node.clone(), session)]);
            return;
        };
        match claims.iter_mut().find(|(n, _)| n == node) {
            Some(c) => c.1 = session,
            None => claims.push((node.clone(), session)),
        }
        for (other, theirs) in claims.iter() {
            if other == node || !self.nodes.get(other).is_some_and(|st| st.alive) {
                continue;
            }
            let (older, newer, peer) = if *theirs < session {
                (other, session, peer.map(str::to_owned))
            } else {
                (node, *theirs, None)
            };
            supersede.push(Supersede {
                node: older.clone(),
                device: device.clone(),
                session: newer,
                peer,
            });
        }
    }

    fn remove_claim(&mut self, node: &NodeId, device: &DeviceKey) {
        if let Some(st) = self.nodes.get_mut(node) {
            st.devices.remove(device);
        }
        if let Some(claims) = self.index.get_mut(device) {
            claims.retain(|(n, _)| n != node);
            if claims.is_empty() {
                self.index.remove(device);
            }
        }
    }

    fn drop_node(&mut self, node: &NodeId) {
        if let Some(st) = self.nodes.remove(node) {
            for d in st.devices.keys() {
                if let Some(claims) = self.index.get_mut(d) {
                    claims.retain(|(n, _)| n != node);
                    if claims.is_empty() {
                        self.index.remove(d);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(1500);

    fn dev(s: &str) -> DeviceKey {
        DeviceKey::parse_routing_key(&format!("default/{s}")).unwrap()
    }

    fn hb(node: &str, epoch: Uuid, seq: u64) -> Presence {
        Presence::Heartbeat {
            node: node.into(),
            epoch,
            seq,
        }
    }

    fn delta(node: &str, epoch: Uuid, seq: u64, ops: &[(&str, Option<Uuid>)]) -> Presence {
        Presence::Delta {
            node: node.into(),
            epoch,
            seq,
            ops: ops.iter().map(|(d, s)| (dev(d).to_string(), *s)).collect(),
            peers: BTreeMap::new(),
        }
    }

    fn listening(now: Instant) -> Replica {
        let mut r = Replica::new(LEASE);
        r.listening(now);
        r
    }

    #[test]
    fn a_node_followed_from_its_start_needs_no_snapshot() {
        let t = Instant::now();
        let mut r = listening(t);
        let e = Uuid::now_v7();
        let s1 = Uuid::now_v7();
        assert_eq!(r.apply(hb("a", e, 0), t), Effects::default());
        let fx = r.apply(delta("a", e, 1, &[("d", Some(s1))]), t);
        assert!(fx.request_snapshot.is_empty());
        assert_eq!(r.lookup(&dev("d")).unwrap().0.as_ref(), "a");
        assert!(r.is_synced(t + LEASE));
        r.apply(delta("a", e, 2, &[("d", None)]), t);
        assert_eq!(r.lookup(&dev("d")), None);
    }

    #[test]
    fn snapshot_and_concurrent_deltas_converge_in_either_order() {
        let t = Instant::now();
        let e = Uuid::now_v7();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        let snapshot = Presence::Snapshot {
            node: "a".into(),
            epoch: e,
            seq: 5,
            devices: vec![(dev("x").to_string(), s1)],
        };
        let d5 = delta("a", e, 5, &[("x", Some(s1))]);
        let d6 = delta("a", e, 6, &[("y", Some(s2)), ("x", None)]);
        // Joined late: heartbeat says 4 deltas happened before us.
        for order in [[0, 1, 2], [1, 2, 0], [1, 0, 2], [2, 0, 1]] {
            let mut r = listening(t);
            let fx = r.apply(hb("a", e, 4), t);
            assert_eq!(fx.request_snapshot.len(), 1, "unknown history: ask");
            let msgs = [snapshot.clone(), d5.clone(), d6.clone()];
            for i in order {
                r.apply(msgs[i].clone(), t);
            }
            assert_eq!(r.lookup(&dev("x")), None, "order {order:?}");
            assert_eq!(r.lookup(&dev("y")).unwrap().1, s2, "order {order:?}");
            assert!(r.is_synced(t + LEASE), "order {order:?}");
        }
    }

    #[test]
    fn a_gap_makes_the_node_unsynced_until_a_snapshot() {
        let t = Instant::now();
        let mut r = listening(t);
        let e = Uuid::now_v7();
        r.apply(hb("a", e, 0), t);
        r.apply(delta("a", e, 1, &[("d", Some(Uuid::now_v7()))]), t);
        // Delta 2 lost (our queue was re-created): the heartbeat reveals it.
        let fx = r.apply(hb("a", e, 2), t);
        assert_eq!(fx.request_snapshot.len(), 1);
        assert!(!r.is_synced(t + LEASE));
        // Asked once per lease, not per message.
        assert!(r.apply(hb("a", e, 2), t).request_snapshot.is_empty());
        r.apply(
            Presence::Snapshot {
                node: "a".into(),
                epoch: e,
                seq: 2,
                devices: vec![],
            },
            t,
        );
        assert!(r.is_synced(t + LEASE));
        assert_eq!(r.lookup(&dev("d")), None);
    }

    #[test]
    fn a_silent_node_is_dead_after_its_lease_and_alive_again_when_heard() {
        let t = Instant::now();
        let mut r = listening(t);
        let e = Uuid::now_v7();
        r.apply(delta("a", e, 1, &[("d", Some(Uuid::now_v7()))]), t);
        assert!(r.expire(t + LEASE).is_empty());
        let later = t + LEASE + Duration::from_millis(1);
        assert_eq!(r.expire(later).len(), 1);
        assert_eq!(
            r.lookup(&dev("d")),
            None,
            "a dead node's devices are offline"
        );
        r.apply(hb("a", e, 1), later);
        assert!(
            r.lookup(&dev("d")).is_some(),
            "slow, not dead: back with its state"
        );
    }

    #[test]
    fn the_newest_session_wins_while_a_device_moves_and_a_restart_clears_a_node() {
        let t = Instant::now();
        let mut r = listening(t);
        let (ea, eb) = (Uuid::now_v7(), Uuid::now_v7());
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(
            r.apply(delta("a", ea, 1, &[("d", Some(old))]), t)
                .supersede
                .is_empty()
        );
        let fx = r.apply(delta("b", eb, 1, &[("d", Some(new))]), t);
        assert_eq!(
            fx.supersede,
            vec![Supersede {
                node: "a".into(),
                device: dev("d"),
                session: new,
                peer: None
            }],
            "a is told to close its older session"
        );
        assert_eq!(r.lookup(&dev("d")).unwrap().0.as_ref(), "b");
        // Node b restarts (newer epoch): its old sessions are gone.
        let fx = r.apply(hb("b", Uuid::now_v7(), 0), t);
        assert_eq!(fx.node_gone.len(), 1);
        assert_eq!(r.lookup(&dev("d")).unwrap().0.as_ref(), "a");
        // The old incarnation's late messages are ignored.
        r.apply(delta("b", eb, 2, &[("e", Some(Uuid::now_v7()))]), t);
        assert_eq!(r.lookup(&dev("e")), None);
    }

    /// Whichever node's delta arrives first, the node with the older session is the one
    /// told to close it; the newer session's peer travels when its delta carried it; a dead
    /// node is told nothing.
    #[test]
    fn a_conflict_is_resolved_toward_the_newer_session_in_either_arrival_order() {
        let t = Instant::now();
        let (ea, eb) = (Uuid::now_v7(), Uuid::now_v7());
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        let with_peer = |node: &str, e, s| Presence::Delta {
            node: node.into(),
            epoch: e,
            seq: 1,
            ops: vec![("default/d".into(), Some(s))],
            peers: BTreeMap::from([(s, format!("192.0.2.1:{}", if s == new { 2 } else { 1 }))]),
        };
        // The newer session's delta first, the older's late: a is still told.
        let mut r = listening(t);
        r.apply(with_peer("b", eb, new), t);
        let fx = r.apply(with_peer("a", ea, old), t);
        assert_eq!(
            fx.supersede,
            vec![Supersede {
                node: "a".into(),
                device: dev("d"),
                session: new,
                peer: None
            }]
        );
        // In order: the peer of the newer session comes with it.
        let mut r = listening(t);
        r.apply(with_peer("a", ea, old), t);
        let fx = r.apply(with_peer("b", eb, new), t);
        assert_eq!(fx.supersede[0].peer.as_deref(), Some("192.0.2.1:2"));
        // A dead node holds the older claim: nobody to tell.
        let mut r = listening(t);
        r.apply(with_peer("a", ea, old), t);
        let later = t + LEASE + Duration::from_millis(1);
        assert_eq!(r.expire(later).len(), 1);
        assert!(r.apply(with_peer("b", eb, new), later).supersede.is_empty());
    }
}
