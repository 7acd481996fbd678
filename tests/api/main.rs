//! The notify API over real HTTP on port 0, with the embedded queue and the real RabbitMQ
//! broker behind it, and the binary's command line. The queue contract itself is its own
//! binary, `tests/queue`.

#[path = "../support/mod.rs"]
mod support;

mod amqps;
mod apps;
mod cli;
mod errors;
mod hardening;
mod health;
mod notify;
mod notify_props;
mod rabbitmq;
