//! flux-shard: the per-core runtime (executors, ring mesh, routing, delivery).
