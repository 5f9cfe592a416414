//! Every bound Flux enforces, in one place. Each field names its unit and says what one unit of it
//! costs in memory. The `[limits]` table of `fluxd.toml` deserializes into this struct; anything not
//! given keeps its default.

use serde::Deserialize;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Open client connections across all shards (each shard enforces its share, rounded up).
    /// Cost: one socket, a few hundred bytes of connection state plus buffers that grow on demand.
    /// Over the limit a new connection is refused (MQTT 5 CONNACK 0x97 Quota exceeded / 3.1.1 code 3).
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes (fixed header included); advertised in CONNACK as
    /// Maximum Packet Size. Checked from the fixed header before the body is buffered. Bigger packets
    /// close the connection with 0x95 Packet too large. Cost: up to this much receive buffer per
    /// connection while such a packet is in flight.
    pub max_packet_size_bytes: u32,
    /// QoS 1/2 messages a client may have unacknowledged towards the server (CONNACK Receive
    /// Maximum) and the most the server keeps in flight towards a client (also capped by the
    /// client's own Receive Maximum). Four times this many acknowledgements of one connection
    /// may wait for the disk before the server stops reading from it. Cost: one queued message
    /// reference per unit.
    pub max_inflight_messages: u16,
    /// QoS 1/2 messages queued for a session beyond its inflight window (offline or slow). When
    /// full, new messages for that session are dropped, counted and logged. Cost: one message
    /// reference (payload shared) per unit.
    pub max_queued_messages: usize,
    /// Payload bytes queued for a session beyond its inflight window (counted per message by its
    /// payload, shared with other subscribers of the same message). When a message would exceed
    /// it, it is dropped, counted and logged, like `max_queued_messages`. Bounds what one slow or
    /// offline session can pin: up to this many bytes of payloads per session.
    pub max_queued_bytes: usize,
    /// Levels in a topic name or filter. Deeper ones are refused (0x90 / 0x8F).
    pub max_topic_levels: usize,
    /// Bytes in a topic name or filter (the protocol's own bound is 65535).
    pub max_topic_length_bytes: usize,
    /// Subscriptions one session may hold. More are refused in SUBACK with 0x97 Quota exceeded.
    /// Cost: one trie entry per unit.
    pub max_subscriptions_per_session: usize,
    /// Seconds the server keeps flushing a connection it is closing (DISCONNECT and what was
    /// queued before it) before it shuts the socket down anyway: a client that stopped reading
    /// cannot hold its socket and buffers forever.
    pub close_flush_timeout_secs: u32,
    /// Seconds a socket may stay open without sending CONNECT.
    pub connect_timeout_secs: u32,
    /// Largest keep alive the server accepts; a client asking for more (or 0) is told this value
    /// through Server Keep Alive (MQTT 5). 0 here means the client's value is used as is.
    pub max_keep_alive_secs: u16,
    /// Topic aliases a client may set up towards the server (CONNECT-side Topic Alias Maximum in
    /// CONNACK). Cost: one topic name reference per unit per connection.
    pub max_topic_aliases: u16,
    /// Largest session expiry the server grants, in seconds (MQTT 5 CONNACK Session Expiry Interval
    /// when the client asked for more).
    pub max_session_expiry_secs: u32,
    /// Bytes in a client identifier.
    pub max_client_id_bytes: usize,
    /// Messages each cross-shard ring holds. Cost: one pointer-sized slot per unit per ordered pair
    /// of shards. A full ring pauses reading from the sockets that feed it.
    pub ring_capacity: usize,
    /// Bytes waiting to be written to one client before the connection is treated as a slow
    /// consumer: QoS 0 messages to it are dropped (counted) and the server stops reading from it
    /// (so replies it does not read cannot pile up) until it drains. Cost: up to about twice this
    /// per connection (the buffer plus the chunk being written).
    pub max_outbound_buffer_bytes: usize,
    /// Durable queues one shard owns. Clients create queues (`$queue/<name>/<filter>`
    /// subscriptions, `PUBLISH $queue/<name>`); past this a new one is refused (the publish gets
    /// 0x97, the consumer nothing) and logged. Cost: each queue holds up to its own
    /// `max_bytes` of messages, in memory and in the log.
    pub max_queues: usize,
    /// Memory one durable queue's messages may take, in bytes (estimated: payload, topic and
    /// about 200 bytes each). Past it the queue writes runs of its oldest-unneeded messages to
    /// its shard's spill files and reads them back when consumers get there, so a backlog is
    /// bounded by the disk, not by memory. Cost: up to this much memory per queue with a backlog.
    pub queue_memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 100_000,
            max_packet_size_bytes: 1024 * 1024,
            max_inflight_messages: 128,
            max_queued_messages: 1000,
            max_queued_bytes: 64 * 1024 * 1024,
            max_topic_levels: 128,
            max_topic_length_bytes: 65_535,
            max_subscriptions_per_session: 1024,
            connect_timeout_secs: 15,
            close_flush_timeout_secs: 5,
            max_keep_alive_secs: 0,
            max_topic_aliases: 64,
            max_session_expiry_secs: u32::MAX,
            max_client_id_bytes: 256,
            ring_capacity: 1024,
            max_outbound_buffer_bytes: 4 * 1024 * 1024,
            max_queues: 10_000,
            queue_memory_bytes: 8 * 1024 * 1024,
        }
    }
}
