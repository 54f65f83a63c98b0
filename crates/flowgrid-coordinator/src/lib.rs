//! The flowgrid coordinator: owns shards of runs, drives the pure engine for them,
//! commits every transition to the store (group commit, epoch-fenced), and only then
//! publishes tasks to JetStream, replies and acks.
//!
//! Layout:
//! - [`node`]: process lifecycle (connect, streams, shards, API, shutdown);
//! - `shard`: one actor per shard (batching, commit, effects, reload);
//! - `api`: NATS request/reply API and routing to shards; `submit`: the durable submit path;
//! - `dispatch`: task publishing to JetStream.

mod api;
pub mod audit;
mod clock;
pub mod config;
mod dispatch;
mod error;
pub mod metrics;
pub mod node;
mod plans;
mod records;
mod shard;
mod submit;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use node::{run, run_with_store};
