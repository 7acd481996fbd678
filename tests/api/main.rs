//! The notify API and the queue, over real HTTP on port 0 and the real RabbitMQ broker.

#[path = "../support/mod.rs"]
mod support;

mod apps;
mod cli;
mod errors;
mod health;
mod notify;
mod queue_contract;
mod rabbitmq;
