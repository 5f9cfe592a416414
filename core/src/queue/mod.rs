//! Durable queues: the sans-IO engine one queue runs on, for MQTT (`$queue/...`) and, later, AMQP
//! consumers alike.
//!
//! A queue is an append-only sequence of messages numbered by [`Offset`]. Every consumer group
//! reads all of it (fan-out between groups) and its consumers compete for the messages (each
//! message goes to one consumer of the group at a time). A group tracks what its consumers hold
//! unacknowledged, what was acknowledged, and what must be delivered again (rejected, nacked,
//! timed out, or held by a consumer that went away). A message is removed from the queue once
//! every group is done with it, or earlier by the queue's limits (TTL, length, bytes).
//!
//! * [`config`]: names and settings (limits, overflow, dead-lettering, dispatch).
//! * [`engine`]: [`Queue`], the state machine: `publish`, `attach`/`detach`, `ack`/`reject`/`nack`,
//!   `dispatch`, `tick` (ack timeouts, TTL).
//!
//! Lives on the queue's owner shard (`shard_for(queue name)`); consumers and publishers on other
//! shards reach it through messages. It never reads a clock: time comes in as `now`.

pub mod config;
pub mod engine;

pub use config::{Dispatch, KeySource, Overflow, QueueConfig, QueueName, QueueNameError, QueueSettings};
pub use engine::{
    death_marked, ColdRun, ConsumerId, DeadLetter, DeadReason, Delivered, Io as QueueIo, Journal as QueueJournal,
    PublishError, Queue, QueueStats, SpillLoc, DEATH_QUEUE_PROPERTY, DEATH_REASON_PROPERTY, DEFAULT_GROUP,
    DEFAULT_RESIDENT_BYTES, RUN_MESSAGES,
};

/// A message's position in its queue: assigned at append, one more per message, never reused.
pub type Offset = u64;
