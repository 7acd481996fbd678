//! Cluster mode against the real broker: several herald nodes on one vhost (real
//! `herald serve` processes where a node must die or be signalled; in-process
//! `Application`s for the finer cases), APNs doubles, device clients over real WebSockets.
//!
//! Not covered here on purpose: stopping the broker itself. RabbitMQ is one service for the
//! whole machine, and stopping it would break every other test running in parallel; the
//! connection-cut tests (`rabbitmqctl close_all_connections` on the test's own vhost)
//! drive the same recovery path (link lost → re-declare → re-register → resume).

#[path = "../support/mod.rs"]
mod support;

use support::gateway as gw;

mod apps;
mod broker_users;
mod in_process;
mod nodes;
mod processes;

pub const APNS_TOKEN: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
