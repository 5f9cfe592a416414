//! flux-core: everything in Flux that can be decided without I/O.
//!
//! *Architecture invariant:* this crate never touches a socket, a file, a thread or the clock.
//! Time comes in as an argument (`now: Instant`); bytes come in as `Bytes`; decisions go out as
//! values. `tests/no_io_deps.rs` checks the dependency list stays that way.

pub mod limits;
pub mod mqtt;
pub mod queue;
pub mod session;
pub mod shard;
pub mod topic;

pub use limits::Limits;
pub use shard::{shard_for, ShardId};
