//! Several coordinators sharing one grid's shards.
//!
//! - [`placement`]: which live member should own a shard (rendezvous hashing);
//! - [`Lease`] and [`Membership`]: this member's record in the members bucket, rewritten
//!   every heartbeat, and the lease each confirmed write renews;
//! - [`view`]: what this member knows of the others and of the claims;
//! - [`ShardManager`]: acquires and releases shards to follow the placement.
//!
//! Safety does not rest on timing alone: acquiring a shard bumps its epoch in the store
//! and every commit checks it, so an owner that missed its lease cannot commit after the
//! next owner acquired; the embedded store adds a file lock per shard.

mod lease;
mod manager;
mod membership;
pub mod placement;
pub mod view;

pub use lease::Lease;
pub use manager::{ManagerContext, ShardManager};
pub use membership::Membership;
