//! What crosses the broker between nodes, and the names it crosses under. One place, so a
//! change of format is a change of this file only.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// AMQP `type` of a notification frame for one session, on a node queue.
pub const KIND_DELIVER: &str = "deliver";
/// AMQP `type` of a request for a node's snapshot, on its node queue (`reply_to` = the
/// asker's presence queue).
pub const KIND_SNAPSHOT_REQUEST: &str = "snapshot_request";

/// AMQP `type` of "close your sessions of this device older than this one", sent by a
/// dispatcher's replica to a node's queue (headers: device, session, and peer when known).
pub const KIND_SUPERSEDE: &str = "supersede";

/// Headers of a deliver message: which device, which notification (for the ack match).
pub const HEADER_DEVICE: &str = "device";
pub const HEADER_ID: &str = "id";
/// Headers of a supersede message: the newer session, and where it connects from.
pub const HEADER_SESSION: &str = "session";
pub const HEADER_PEER: &str = "peer";

/// The fanout exchange every presence message goes through.
pub fn presence_exchange(prefix: &str) -> String {
    format!("{prefix}.presence")
}

/// One process's presence subscription (exclusive; a fresh name per broker generation).
pub fn presence_queue(prefix: &str) -> String {
    format!("{prefix}.presence.{}", Uuid::now_v7().simple())
}

/// The direct exchange every answer to a dispatcher goes through (a node's replies to a
/// deliver message, and its snapshots), routed by the asker's queue name. Not the default
/// exchange, so the gateway's broker user can write here without being able to write into
/// any queue by name (`{p}.work` included).
pub fn replies_exchange(prefix: &str) -> String {
    format!("{prefix}.replies")
}

/// One dispatcher process's reply queue for deliveries (exclusive; a fresh name per broker
/// generation), bound to the replies exchange with its own name as key.
pub fn reply_queue(prefix: &str) -> String {
    format!("{prefix}.reply.{}", Uuid::now_v7().simple())
}

/// A fresh correlation id: random, so a node can only answer deliveries it was sent (it
/// never sees the ids of deliveries to other nodes, which share the reply queue).
pub fn new_correlation() -> u128 {
    rand::random::<u128>()
}

/// A correlation id as it crosses the wire (32 hex digits), and back.
pub fn correlation_str(c: u128) -> String {
    format!("{c:032x}")
}

pub fn parse_correlation(s: &str) -> Option<u128> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

/// A gateway node's queue: deliveries for its sessions and snapshot requests.
pub fn node_queue(prefix: &str, node: &str) -> String {
    format!("{prefix}.node.{node}")
}

/// One presence message. Every message names its node and the node's *incarnation*
/// (`epoch`, a UUIDv7 drawn at start, so a restarted node with the same id is newer) and
/// carries the node's event sequence number: `seq` is the number of deltas the node has
/// published so far in this incarnation (a heartbeat or snapshot says "up to here").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Presence {
    /// "I am alive, and I have published `seq` deltas."
    Heartbeat { node: String, epoch: Uuid, seq: u64 },
    /// Session changes, in table order, coalesced per device: `(device, Some(session))` =
    /// opened, `(device, None)` = closed.
    Delta {
        node: String,
        epoch: Uuid,
        seq: u64,
        ops: Vec<(String, Option<Uuid>)>,
        /// Where each session opened in `ops` connects from (session id → `ip:port`, or
        /// `ip` behind a trusted proxy): a node that closes its older session of the device
        /// names it in the `session_replaced` event. Optional both ways: a delta from a
        /// node without this field parses (no peers), and one with it parses on such a
        /// node (serde ignores unknown fields).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        peers: BTreeMap<Uuid, String>,
    },
    /// Every session of the node after delta `seq`: sent to one asker's queue.
    Snapshot {
        node: String,
        epoch: Uuid,
        seq: u64,
        devices: Vec<(String, Uuid)>,
    },
}

impl Presence {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("presence messages serialise")
    }

    pub fn from_json(bytes: &[u8]) -> Option<Presence> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A node's answer to a deliver message, through the replies exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The node holds a session for the device and queued the frame; the outcome follows.
    Received,
    /// The device acked.
    Acked,
    /// The frame went out but no ack within `gateway.ack_timeout`.
    NotAcked,
    /// No session for the device on that node (the replica was stale), or it closed
    /// before acking.
    Offline,
}

impl Reply {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Reply::Received => b"received",
            Reply::Acked => b"acked",
            Reply::NotAcked => b"not_acked",
            Reply::Offline => b"offline",
        }
    }

    pub fn parse(bytes: &[u8]) -> Option<Reply> {
        Some(match bytes {
            b"received" => Reply::Received,
            b"acked" => Reply::Acked,
            b"not_acked" => Reply::NotAcked,
            b"offline" => Reply::Offline,
            _ => return None,
        })
    }
}

/// The properties of a deliver message.
pub fn deliver_properties(
    device: &str,
    id: &str,
    reply_to: &str,
    correlation: u128,
    expiration_ms: u128,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_DEVICE.into(), AMQPValue::LongString(device.into()));
    headers.insert(HEADER_ID.into(), AMQPValue::LongString(id.into()));
    BasicProperties::default()
        .with_type(KIND_DELIVER.into())
        .with_content_type("application/json".into())
        .with_reply_to(reply_to.into())
        .with_correlation_id(correlation_str(correlation).into())
        .with_headers(headers)
        // Past the hop deadline the dispatcher has fallen back; the broker drops the copy
        // rather than have the owner deliver it late (a duplicate for nothing).
        .with_expiration(expiration_ms.to_string().into())
}

/// The properties of a supersede message ([`KIND_SUPERSEDE`]).
pub fn supersede_properties(
    device: &str,
    session: Uuid,
    peer: Option<&str>,
    expiration_ms: u128,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_DEVICE.into(), AMQPValue::LongString(device.into()));
    headers.insert(
        HEADER_SESSION.into(),
        AMQPValue::LongString(session.to_string().into()),
    );
    if let Some(peer) = peer {
        headers.insert(HEADER_PEER.into(), AMQPValue::LongString(peer.into()));
    }
    BasicProperties::default()
        .with_type(KIND_SUPERSEDE.into())
        .with_headers(headers)
        // A node that is not consuming (restarting) needs no stale order when it is back:
        // its sessions then are all newer.
        .with_expiration(expiration_ms.to_string().into())
}

/// A string header of a delivery, if present.
pub fn header(props: &BasicProperties, key: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(key))? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_round_trips() {
        let opened = Uuid::now_v7();
        let m = Presence::Delta {
            node: "n1".into(),
            epoch: Uuid::now_v7(),
            seq: 7,
            ops: vec![("d1".into(), Some(opened)), ("d2".into(), None)],
            peers: BTreeMap::from([(opened, "[2001:db8::7]:40211".into())]),
        };
        assert_eq!(Presence::from_json(&m.to_json()), Some(m));
        assert_eq!(Presence::from_json(b"{\"t\":\"nope\"}"), None);
    }

    /// A delta from a node that predates `peers` parses (no peers), and one with `peers`
    /// has exactly the old fields plus it, which older nodes ignore.
    #[test]
    fn a_delta_without_peers_still_parses() {
        let (epoch, s) = (Uuid::now_v7(), Uuid::now_v7());
        let old = format!(
            r#"{{"t":"delta","node":"n1","epoch":"{epoch}","seq":3,"ops":[["default/d1","{s}"]]}}"#
        );
        assert_eq!(
            Presence::from_json(old.as_bytes()),
            Some(Presence::Delta {
                node: "n1".into(),
                epoch,
                seq: 3,
                ops: vec![("default/d1".into(), Some(s))],
                peers: BTreeMap::new(),
            })
        );
        let new = Presence::Delta {
            node: "n1".into(),
            epoch,
            seq: 3,
            ops: vec![("default/d1".into(), Some(s))],
            peers: BTreeMap::from([(s, "192.0.2.1:5000".into())]),
        };
        let json: serde_json::Value = serde_json::from_slice(&new.to_json()).unwrap();
        assert_eq!(json["peers"][s.to_string()], "192.0.2.1:5000");
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Received,
            Reply::Acked,
            Reply::NotAcked,
            Reply::Offline,
        ] {
            assert_eq!(Reply::parse(r.as_bytes()), Some(r));
        }
        assert_eq!(Reply::parse(b"?"), None);
    }

    #[test]
    fn correlations_round_trip_and_differ() {
        let (a, b) = (new_correlation(), new_correlation());
        assert_ne!(a, b);
        assert_eq!(parse_correlation(&correlation_str(a)), Some(a));
        assert_eq!(parse_correlation(&correlation_str(7)), Some(7));
        assert_eq!(parse_correlation("7"), None);
        assert_eq!(parse_correlation("+0000000000000000000000000000007"), None);
    }
}
