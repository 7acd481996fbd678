//! The device protocol's frames and close codes. docs/protocol.md is the specification;
//! this file is its Rust spelling.
//!
//! Every application frame is a WebSocket text frame holding one JSON object with a `type`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::{Content, Priority, QueuedNotification};

/// Close codes, in the 4000-4999 range RFC 6455 leaves to applications. One per reason, so
/// a client (and an operator reading its logs) knows what to do next without parsing text.
pub mod close {
    /// No pong within `pong_timeout` of a ping: the server declared the link dead.
    /// Reconnect with backoff.
    pub const PONG_TIMEOUT: u16 = 4000;
    /// A newer session for the same device took over. Do not reconnect automatically:
    /// two clients with one device id would otherwise evict each other forever.
    pub const REPLACED: u16 = 4001;
    /// The server is shutting down: reconnect (to another node) after the delay given in
    /// the close reason as `reconnect_after_ms=N`.
    pub const SHUTDOWN: u16 = 4002;
    /// Too many frames that are not valid protocol frames. Fix the client.
    pub const PROTOCOL_ERROR: u16 = 4003;
    /// The session's send buffer overflowed: the device stopped reading.
    pub const SLOW_CONSUMER: u16 = 4004;
    /// RFC 6455's "message too big": a frame larger than `max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// RFC 6455's "internal error": the server failed to write a frame. Not the client's
    /// doing; reconnect with backoff.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Why a session ended; the `reason` label of `herald_gateway_sessions_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    ClientClosed,
    PongTimeout,
    Replaced,
    Shutdown,
    ProtocolError,
    TooBig,
    SlowConsumer,
    /// A write failed on the server's side (never counted as the client's close).
    ServerError,
}

impl CloseKind {
    pub fn label(self) -> &'static str {
        match self {
            CloseKind::ClientClosed => "client_closed",
            CloseKind::PongTimeout => "pong_timeout",
            CloseKind::Replaced => "replaced",
            CloseKind::Shutdown => "shutdown",
            CloseKind::ProtocolError | CloseKind::TooBig => "protocol_error",
            CloseKind::SlowConsumer => "slow_consumer",
            CloseKind::ServerError => "server_error",
        }
    }

    /// The close code the server sends (none when the client closed first).
    pub fn code(self) -> Option<u16> {
        Some(match self {
            CloseKind::ClientClosed => return None,
            CloseKind::PongTimeout => close::PONG_TIMEOUT,
            CloseKind::Replaced => close::REPLACED,
            CloseKind::Shutdown => close::SHUTDOWN,
            CloseKind::ProtocolError => close::PROTOCOL_ERROR,
            CloseKind::TooBig => close::MESSAGE_TOO_BIG,
            CloseKind::SlowConsumer => close::SLOW_CONSUMER,
            CloseKind::ServerError => close::INTERNAL_ERROR,
        })
    }
}

/// Frames the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Hello {
        session_id: &'a str,
        device_id: &'a str,
        ping_interval_ms: u64,
        pong_timeout_ms: u64,
        ack_timeout_ms: u64,
        max_frame_bytes: usize,
    },
    Notification(NotificationFrame<'a>),
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        nonce: Option<&'a str>,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
}

/// What a device receives for one notification. Deliberately not the queued message
/// itself: provider tokens and other targets never go down a device's socket.
#[derive(Debug, Serialize)]
pub struct NotificationFrame<'a> {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification: Option<&'a Content>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub data: &'a BTreeMap<String, String>,
    pub priority: Priority,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<&'a str>,
    pub accepted_at_ms: u64,
    pub expires_at_ms: u64,
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

/// The notification frame for `n`, serialized.
pub fn notification_json(n: &QueuedNotification) -> String {
    ServerFrame::Notification(NotificationFrame {
        id: n.id.to_string(),
        notification: n.notification.as_ref(),
        data: &n.data,
        priority: n.priority,
        collapse_key: n.collapse_key.as_deref(),
        accepted_at_ms: n.accepted_at_ms,
        expires_at_ms: n.expires_at_ms,
    })
    .to_json()
}

/// Frames a device sends. Unknown fields are ignored (a newer client may add some);
/// an unknown `type` is an error.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Ack {
        id: String,
    },
    Ping {
        #[serde(default)]
        nonce: Option<String>,
    },
}

/// Error codes of `error` frames.
pub mod error_code {
    /// The frame is not a JSON object with a known `type` and its fields.
    pub const BAD_FRAME: &str = "bad_frame";
    /// Binary frames carry nothing in this protocol.
    pub const BINARY_NOT_SUPPORTED: &str = "binary_not_supported";
}
