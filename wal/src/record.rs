//! The records a shard writes to its log.
//!
//! Every durable effect of the broker is one [`Record`]. A record is self-describing: replaying the
//! log from its first segment (or from the last [`Record::Checkpoint`]) in LSN order rebuilds the
//! shard's durable state. Records name MQTT sessions by client identifier, retained messages by
//! topic name; all times are wall-clock milliseconds since the Unix epoch, taken by the caller
//! (the log never reads a clock).
//!
//! Fields are plain integers and strings on purpose: the log does not depend on `flux-core`'s
//! validated types, and the owner re-validates (e.g. `TopicName::new`) when it replays. Packet
//! identifiers are never 0 on the wire; a 0 found in a record is the owner's error to report.

use rkyv::{Archive, Deserialize, Serialize};

/// An application message as stored in the log (a retained message, a message queued for a
/// session, a delayed will).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct StoredMessage {
    /// The topic name it was published to.
    pub topic: String,
    /// 0, 1 or 2.
    pub qos: u8,
    /// The RETAIN flag as it is to be delivered.
    pub retain: bool,
    /// The application payload.
    pub payload: Vec<u8>,
    /// MQTT 5 properties to forward, in their wire encoding (empty for MQTT 3.1.1).
    pub properties: Vec<u8>,
    /// When the message expires (MQTT 5 Message Expiry Interval), if it does.
    pub expires_at_ms: Option<u64>,
}

/// How a session's outbound QoS 1/2 delivery advanced. Keyed by the session's own message id
/// (`msg_id` of [`Record::MessageEnqueued`]) so the owner can find the queued copy.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum OutboundState {
    /// PUBLISH sent with this packet id (the first send, or a resend after reconnect).
    Sent {
        /// The packet identifier used on the wire.
        packet_id: u16,
    },
    /// QoS 2: PUBREC received; the next step is PUBREL.
    PubrecReceived,
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) received: the message is done and can be forgotten.
    Completed,
}

/// A durable queue's settings as stored (see `flux_core::queue::QueueConfig`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct StoredQueueConfig {
    pub max_messages: u64,
    pub max_bytes: u64,
    pub message_ttl_ms: Option<u64>,
    /// Overflow policy: false = reject-publish, true = drop-head.
    pub drop_head: bool,
    pub dead_letter: Option<String>,
    pub max_deliveries: u32,
    /// 0 round-robin, 1 random, 2 least-inflight, 3 key-affine by `key_property`, 4 key-affine by
    /// `key_level`.
    pub dispatch: u8,
    pub key_property: Option<String>,
    pub key_level: Option<u32>,
    pub ack_timeout_ms: Option<u64>,
    pub default_prefetch: u16,
}

/// One durable effect. See the module documentation.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum Record {
    /// A retained message was set (replaces any earlier one on the topic).
    RetainedSet {
        /// The retained message; its `topic` is the key.
        message: StoredMessage,
    },
    /// The retained message of a topic was cleared (zero-length retained publish or expiry).
    RetainedClear {
        /// The topic name.
        topic: String,
    },
    /// A persistent session was created (or re-created after a clean start).
    SessionCreate {
        /// The MQTT client identifier.
        client_id: String,
        /// 4 for MQTT 3.1.1, 5 for MQTT 5.0.
        protocol_level: u8,
        /// Session Expiry Interval in seconds (`u32::MAX`: never expires).
        session_expiry_secs: u32,
    },
    /// A checkpoint's copy of a live persistent session: creates it if the replay does not know
    /// it (its `SessionCreate` was in a deleted segment) and otherwise changes nothing. The
    /// records that follow it in the checkpoint (subscriptions, messages) are idempotent too, so
    /// a checkpoint cut short by a crash or a full disk loses nothing.
    SessionCheckpoint {
        /// The MQTT client identifier.
        client_id: String,
        /// 4 for MQTT 3.1.1, 5 for MQTT 5.0.
        protocol_level: u8,
        /// Session Expiry Interval in seconds.
        session_expiry_secs: u32,
    },
    /// The client disconnected: the session expiry clock starts at `at_ms` (counted across restarts).
    SessionDisconnected {
        /// The MQTT client identifier.
        client_id: String,
        /// Wall-clock time of the disconnect.
        at_ms: u64,
        /// The expiry interval in force at the disconnect (MQTT 5 may change it in DISCONNECT).
        session_expiry_secs: u32,
    },
    /// The session was resumed by a new connection: its expiry clock stops.
    SessionResumed {
        /// The MQTT client identifier.
        client_id: String,
        /// 4 for MQTT 3.1.1, 5 for MQTT 5.0 (the resuming connection's).
        protocol_level: u8,
        /// Session Expiry Interval in seconds the resuming CONNECT set.
        session_expiry_secs: u32,
    },
    /// A subscription was added or replaced.
    SessionSubscribe {
        /// The MQTT client identifier.
        client_id: String,
        /// The topic filter as received.
        filter: String,
        /// The subscription options byte as on the wire (QoS, No Local, Retain As Published,
        /// Retain Handling).
        options: u8,
        /// MQTT 5 Subscription Identifier, if any.
        subscription_id: Option<u32>,
        /// The consumer group of a queue subscription (`group` user property), if any.
        group: Option<String>,
    },
    /// A subscription was removed.
    SessionUnsubscribe {
        /// The MQTT client identifier.
        client_id: String,
        /// The topic filter as received.
        filter: String,
    },
    /// The session ended (expired, clean start, or taken over with clean start): forget everything
    /// recorded for it before this record.
    SessionExpire {
        /// The MQTT client identifier.
        client_id: String,
    },
    /// A QoS 1/2 message was queued for a session (not yet sent, or sent and awaiting its ack).
    MessageEnqueued {
        /// The MQTT client identifier.
        client_id: String,
        /// The session's own, increasing message id (also the key of [`Record::Outbound`]).
        msg_id: u64,
        /// The message.
        message: StoredMessage,
    },
    /// An outbound QoS 1/2 delivery advanced.
    Outbound {
        /// The MQTT client identifier.
        client_id: String,
        /// The message id of the [`Record::MessageEnqueued`].
        msg_id: u64,
        /// The new state.
        state: OutboundState,
    },
    /// Inbound QoS 2: PUBLISH with this packet id received (PUBREC sent); a redelivery with the
    /// same id must not be routed again.
    InboundQos2Received {
        /// The MQTT client identifier.
        client_id: String,
        /// The packet identifier.
        packet_id: u16,
    },
    /// Inbound QoS 2: PUBREL received (PUBCOMP sent); the packet id is free again.
    InboundQos2Released {
        /// The MQTT client identifier.
        client_id: String,
        /// The packet identifier.
        packet_id: u16,
    },
    /// A will message is to be published at `publish_at_ms` unless the session resumes first
    /// (MQTT 5 Will Delay Interval, or the session's end, whichever comes first).
    WillDelayed {
        /// The MQTT client identifier.
        client_id: String,
        /// When to publish.
        publish_at_ms: u64,
        /// The will message.
        will: StoredMessage,
    },
    /// A delayed will was published or cancelled (the session resumed).
    WillDone {
        /// The MQTT client identifier.
        client_id: String,
    },
    /// A durable queue exists with these settings and bindings (created if unknown, else
    /// updated). Written by the queue's owner shard.
    QueueDeclare {
        name: String,
        config: StoredQueueConfig,
        filters: Vec<String>,
    },
    /// The queue and everything in it are gone.
    QueueDelete { name: String },
    /// A message was appended at `offset`.
    QueueAppend {
        name: String,
        offset: u64,
        message: StoredMessage,
        key: Option<String>,
        at_ms: u64,
    },
    /// Consumer group `group` is done with `offset` (acknowledged or dead-lettered).
    QueueDone { name: String, group: String, offset: u64 },
    /// Every message below `below` left the queue early (expired, dropped by overflow).
    QueueTrim { name: String, below: u64 },
    /// A consumer group was created.
    QueueGroup { name: String, group: String },
    /// `group` is done with every offset below `below` (checkpoints).
    QueueCommitted { name: String, group: String, below: u64 },
    /// An opaque snapshot of the owner's state. An owner that writes one, and has it committed,
    /// may replay from it and [`reclaim`](crate::Wal::reclaim_before) everything before it.
    Checkpoint {
        /// Owner-defined format tag, to evolve the snapshot encoding.
        kind: u32,
        /// The snapshot.
        data: Vec<u8>,
    },
    /// A checkpoint's reference to a run of queue messages stored outside the log (a spill
    /// file, fdatasync'd before this record was written): offsets `first..end`, `bytes` of
    /// payload, append times of its first and last message, and the file, position and length.
    QueueColdRun {
        name: String,
        first: u64,
        end: u64,
        bytes: u64,
        first_at_ms: u64,
        last_at_ms: u64,
        file: u64,
        pos: u64,
        len: u64,
    },
    /// Consumer group `group` of queue `name` starts over at offset `to` (a seek; checkpoints).
    QueueSeek { name: String, group: String, to: u64 },
    /// `group` of queue `name` is done with each of `offsets` (acknowledgements out of order,
    /// journalled in a batch).
    QueueDoneMany { name: String, group: String, offsets: Vec<u64> },
    /// `group` of queue `name` is done with every offset of the half-open ranges
    /// `starts[i]..ends[i]` (checkpoints).
    QueueDoneRanges { name: String, group: String, starts: Vec<u64>, ends: Vec<u64> },
}

impl ArchivedRecord {
    /// Deserializes the archived record into an owned [`Record`].
    ///
    /// Replay usually reads the archived form in place; this is for owners that want the owned
    /// value, and for tests.
    /// Deserializing a validated archive of these types does not fail in practice (no shared
    /// pointers, no fallible conversions), but the error is returned rather than assumed away.
    pub fn to_record(&self) -> Result<Record, rkyv::rancor::Error> {
        rkyv::deserialize::<Record, rkyv::rancor::Error>(self)
    }
}
