//! The gateway over real sockets: token checks, heartbeat death, acks, replacement, slow
//! readers, garbage, oversized frames, shutdown, and `herald connect` as a subprocess.
//!
//! Intervals are short (ping 100 ms, pong 200 ms, ack 300 ms) and every wait is on a
//! condition, never a bare sleep.

#[path = "../support/mod.rs"]
mod support;

use support::gateway as helpers;

mod admission;
mod client_cli;
mod fuzz;
mod outbound;
mod sessions;
mod tokens;
