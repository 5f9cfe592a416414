//! flux-shard: the per-core runtime (executors, ring mesh, routing, delivery).
pub mod executor;
pub mod handover;
pub mod mesh;
pub mod broker;
pub mod durable;
pub mod msg;
pub mod outbound;
pub mod routes;
pub mod signal;
pub mod spill;
