//! The queue contract (`herald::queue`), on its own: every behaviour the dispatcher relies
//! on, run against both backends (the embedded queue and RabbitMQ on a fresh vhost), with no
//! API or dispatcher in the way.

#[path = "../support/mod.rs"]
mod support;

mod contract;
mod topology;
