//! What shards say to each other over the ring mesh. Every message is owned and `Send`;
//! payloads travel as refcounted [`Message`]s, never copied.

use std::sync::Arc;

use flux_core::queue::{ConsumerId, Offset, QueueName};
use flux_core::session::Message;
use flux_core::topic::TopicFilter;
use flux_core::ShardId;

use crate::handover::SocketHandover;

/// What the admin endpoint asks of a queue's owner.
#[derive(Debug)]
pub enum QueueAdminOp {
    /// Create it, or change its settings (and add bindings).
    Declare { config: flux_core::queue::QueueConfig, filters: Vec<TopicFilter> },
    Delete,
    Purge,
    /// Remove these bindings.
    Unbind { filters: Vec<TopicFilter> },
    /// A consumer group starts over at an offset, or at the first message appended at or after
    /// a wall-clock time (ms since the Unix epoch); answered with the offset it starts at.
    Seek { group: String, offset: Option<u64>, time_ms: Option<u64> },
    /// Send back (`AdminMessages`) the oldest messages kept, at most `max`, while in memory.
    Front { max: usize },
    /// Remove every message below `below` (a re-drive moved them); answered with how many.
    RemoveBelow { below: u64 },
}

/// A key of the replicated route table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RouteKey {
    Plain(TopicFilter),
    Shared { group: Arc<str>, filter: TopicFilter },
    /// The shard has persistent sessions subscribed to this filter (plainly or through a shared
    /// group): a QoS 1/2 publish it takes must be confirmed once their queues are durable, and
    /// shards without such sessions are not asked (their delivery never waits for a disk).
    Durable(TopicFilter),
}

impl RouteKey {
    pub fn filter(&self) -> &TopicFilter {
        match self {
            RouteKey::Plain(f) | RouteKey::Shared { filter: f, .. } | RouteKey::Durable(f) => f,
        }
    }
}

#[derive(Debug)]
pub enum ShardMsg {
    /// Deliver to this shard's local (non-shared) subscribers of the topic. `confirm`: answer
    /// `Ack`/`Failed` with this request id to the sender once what the delivery stored (queues of
    /// persistent sessions) is durable; the publisher's PUBACK waits for it.
    Publish { message: Message, confirm: Option<u64> },
    /// Deliver to one local member of the shared group; `hops` bounds re-routing when the
    /// members vanished meanwhile. `confirm`: (shard, request) to answer once durable, carried
    /// along when re-routed.
    PublishShared { message: Message, group: Arc<str>, filter: TopicFilter, hops: u8, confirm: Option<(ShardId, u64)> },
    /// Shard `shard` now has `members` local subscribers for `key` (0 = none). Absolute, so
    /// applying it twice is harmless. `req`: acknowledge with `Ack` to the sender.
    RouteUpdate { key: RouteKey, shard: ShardId, members: u32, req: Option<u64> },
    Ack { req: u64 },
    /// The request could not be carried out: the replier's log refused the write, or (`quota`)
    /// a queue was full.
    Failed { req: u64, quota: bool },
    /// Set (or, with an empty payload, clear) the retained message of its topic; sent to the
    /// topic's owner shard. `req`: acknowledge once applied and durable (the publisher's PUBACK
    /// waits).
    RetainSet { message: Message, req: Option<u64> },
    /// Send back every retained message this shard owns that matches `filter`.
    RetainQuery { filter: TopicFilter, reply_to: ShardId, req: u64 },
    RetainReply { req: u64, messages: Vec<Message> },
    /// A client connection whose session lives on the receiving shard.
    Handover(SocketHandover),
    /// Queue `name` is bound to `filter`: a publish matching it is appended to the queue (every
    /// shard keeps these bindings; the queue's owner creates the queue if it is new). `req`:
    /// acknowledge with `Ack` once applied.
    QueueBind { name: QueueName, filter: TopicFilter, req: Option<u64> },
    /// To the queue's owner: append `message`; `confirm` as for `Publish` (a full queue answers
    /// `Failed { quota: true }`).
    /// `create`: make the queue if it does not exist (`$queue/<name>` publishes, dead letters);
    /// otherwise a message for a queue deleted meanwhile is stored nowhere.
    QueueAppend { name: QueueName, message: Message, confirm: Option<u64>, create: bool },
    /// To the queue's owner: session `session` of the sending shard consumes the queue in `group`.
    QueueAttach { name: QueueName, consumer: ConsumerId, group: Arc<str>, session: u64, prefetch: u16 },
    /// To the queue's owner: the consumer is gone; what it held is delivered again.
    QueueDetach { name: QueueName, consumer: ConsumerId },
    /// From the queue's owner to the consumer's shard: deliver to session `session`.
    QueueDeliver { name: QueueName, consumer: ConsumerId, session: u64, offset: Offset, message: Message },
    /// To the queue's owner: the consumer accepted (PUBACK) or refused (reason >= 0x80) a delivery.
    QueueAck { name: QueueName, consumer: ConsumerId, offset: Offset, accepted: bool },
    /// Remove the binding of `name` to `filter` (the queue was deleted).
    QueueUnbind { name: QueueName, filter: TopicFilter },
    /// Admin: send back the stats of every queue this shard owns.
    AdminStats { req: u64 },
    AdminStatsReply { req: u64, stats: Vec<crate::broker::queues::QueueStatsView> },
    /// Admin, to the queue's owner: change a queue; answered with `AdminResult`.
    QueueAdmin { name: QueueName, op: QueueAdminOp, req: u64 },
    AdminResult { req: u64, result: Result<u64, String> },
    AdminMessages { req: u64, messages: Vec<(Offset, flux_core::session::Message)> },
}
