//! The flowgrid coordinator: owns shards of runs, drives the pure engine for them,
//! commits every transition to the store (group commit, epoch-fenced), and only then
//! publishes tasks to JetStream, replies and acks.
//!
//! Layout:
//! - [`node`]: process lifecycle (connect, streams, join the grid, API, drain on shutdown);
//! - `cluster`: membership, leases, placement and the shard manager (hand-overs);
//! - `routing`: requests to a shard's owner, here or forwarded over NATS;
//! - `shard`: one actor per shard (batching, commit, effects, reload);
//! - `api`: NATS request/reply API and routing to shards; `submit`: the durable submit path;
//! - `dispatch`: task publishing to JetStream; `cache`: the task cache shared by the grid.

mod api;
pub mod audit;
mod cache;
mod clock;
mod cluster;
pub mod config;
pub mod data_dir;
mod dispatch;
mod error;
pub mod metrics;
pub mod node;
mod plans;
mod pools;
mod records;
mod routing;
mod shard;
mod submit;

pub use config::CoordinatorConfig;
pub use error::{Error, Result};
pub use node::{embedded_store_id, run, run_with_store};
