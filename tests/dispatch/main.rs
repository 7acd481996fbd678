//! The dispatcher end to end: the API over HTTP, the queue (embedded and the real broker),
//! device sessions over real WebSockets, and APNs / FCM doubles that are real HTTP/2
//! servers. Assertions are on what the doubles recorded, the events herald emitted, and the
//! metrics it exported.

#[path = "../support/mod.rs"]
mod support;

use support::gateway as gw;

mod harness;

mod apps;
mod broker_restart;
mod delivery;
mod drain;
mod events;
mod gateway_events;
mod neighbours;
mod outcomes;
mod slots;
mod webhook;
