//! The MQTT session: subscriptions, QoS 1/2 state in both directions, the queue of messages
//! waiting for the inflight window, and the will. Sans-IO: packets and `now` in, packets and
//! [`Event`]s out.
//!
//! Lives on the session's home shard (`shard_for(client_id)`), inside that shard's session table;
//! only that shard's tasks touch it. A connection for it that arrives on another shard is handed
//! over to the home shard before any session code runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::limits::Limits;
use crate::mqtt::{
    encoded_len, Disconnect, Packet, PacketId, Properties, ProtocolVersion, PubResp, Publish, QoS,
    ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use crate::session::connect::{check_topic_limits, Negotiated};
use crate::session::journal::{Journal, RestoredSession};
use crate::session::message::{Delivery, Message, Publication};
use crate::topic::{SubscriptionFilter, TopicName};

/// One subscription of a session.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub filter: SubscriptionFilter,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
    /// The `group` user property of the SUBSCRIBE (the consumer group of a queue subscription).
    pub group: Option<String>,
}

/// A subscription the runtime must add to its tables before the SUBACK goes out.
#[derive(Clone, Debug)]
pub struct Subscribed {
    pub subscription: Subscription,
    /// The session already had a subscription with this exact filter (options replaced).
    pub existed: bool,
    /// The `group` user property of the SUBSCRIBE (queue consumer group), if any.
    pub group: Option<String>,
}

/// What the runtime must do beyond sending `Outbox::packets`.
#[derive(Debug)]
pub enum Event {
    /// Route `message` to matching subscribers (and the retained store when it is retained). When
    /// `ack` is set, call [`Session::publish_routed`] afterwards so the PUBACK/PUBREC goes out
    /// with the right reason code.
    Publish { message: Message, ack: Option<(PacketId, QoS)> },
    /// Add these to the subscriber table; send `suback` once every shard's route table has them;
    /// then send retained messages per each subscription's retain handling.
    Subscribe { added: Vec<Subscribed>, suback: SubAck },
    /// Remove these from the subscriber table (UNSUBACK already in `packets`).
    Unsubscribe { removed: Vec<SubscriptionFilter> },
    /// The client answered a queue delivery: `accepted` (PUBACK/PUBREC below 0x80) or refused
    /// (a reason code of 0x80 or more: deliver it to another consumer).
    QueueAck { tag: crate::session::message::QueueTag, accepted: bool },
}

/// Packets to send and events to act on, filled by the session's methods.
#[derive(Debug, Default)]
pub struct Outbox {
    pub packets: Vec<Packet>,
    pub events: Vec<Event>,
}

/// The connection must close: send DISCONNECT with `reason` first when the peer speaks MQTT 5
/// and `send_disconnect` holds; publish the will unless `discard_will`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Close {
    pub reason: ReasonCode,
    pub send_disconnect: bool,
    pub discard_will: bool,
}

impl Close {
    fn error(reason: ReasonCode) -> Close {
        Close { reason, send_disconnect: true, discard_will: false }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

#[derive(Debug)]
struct OutFlight {
    /// The session's own id of this message (the key of its journal entries).
    msg_id: u64,
    packet_id: PacketId,
    delivery: Delivery,
    state: OutState,
}

/// A message waiting for the inflight window.
#[derive(Debug)]
struct Queued {
    msg_id: u64,
    delivery: Delivery,
}

/// A will waiting for its delay (or the session's end) before it is published.
#[derive(Clone, Debug)]
pub struct PendingWill {
    pub message: Message,
    pub publish_at: Instant,
}

/// Counters a session keeps for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    // u32, saturating: every session carries these (16 bytes instead of 32); the shard's own
    // counters (`BrokerStats`) are the u64 totals.
    /// QoS 1/2 messages dropped because the queue was full.
    pub dropped_queue_full: u32,
    /// Messages that expired before they could be sent.
    pub dropped_expired: u32,
    /// Messages larger than the client's Maximum Packet Size.
    pub dropped_too_large: u32,
    /// QoS 0 messages dropped while the session was offline.
    pub dropped_qos0_offline: u32,
}

/// What became of a message handed to [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliverOutcome {
    Sent,
    Queued,
    Dropped(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    QueueFull,
    Expired,
    TooLarge,
    Qos0Offline,
}

pub struct Session {
    client_id: Arc<str>,
    protocol: ProtocolVersion,
    /// Shared by every session of the shard (one copy, not one per session: an idle connection's
    /// session is a few hundred bytes).
    limits: Arc<Limits>,
    /// Keyed by the filter text as subscribed (with `$share/<group>/` when shared).
    // B-trees rather than hash tables: 24 bytes each when empty instead of 48, and every session
    // carries these three whether it uses them or not (lookups are by small, bounded key sets).
    subscriptions: BTreeMap<String, Subscription>,
    session_expiry_secs: u32,
    /// The client's CONNECT asked for expiry 0 (before any server cap): it may then not set a
    /// nonzero expiry in DISCONNECT (MQTT 5 3.14.2.2.2).
    requested_expiry_zero: bool,
    inflight_out: VecDeque<OutFlight>,
    queue: VecDeque<Queued>,
    /// Id of the next QoS 1/2 message accepted for delivery (never reused by this session).
    next_msg_id: u64,
    /// Changes to the durable state not yet taken by the runtime (persistent sessions only).
    journal: Vec<Journal>,
    /// Payload bytes in `queue` (bounded by `max_queued_bytes`).
    queued_bytes: usize,
    next_packet_id: PacketId,
    /// QoS 2 packet ids received and acknowledged with PUBREC, waiting for PUBREL.
    qos2_in: BTreeSet<PacketId>,
    /// Boxed: a will (topic, payload, MQTT 5 properties) is ~400 bytes, and most sessions have none.
    will: Option<Box<Will>>,
    /// Boxed: rare, and every session carries the field (16 bytes saved per session).
    pending_will: Option<Box<PendingWill>>,
    /// Set while no connection is attached: when the session ends.
    expires_at: Option<Instant>,
    online: bool,
    // Connection-scoped, reset by `attach`:
    client_receive_maximum: u16,
    /// MQTT 5 forbids a Maximum Packet Size of 0, so the niche costs nothing: 4 bytes, not 8.
    client_maximum_packet_size: Option<std::num::NonZeroU32>,
    topic_aliases: BTreeMap<u16, TopicName>,
    pub stats: SessionStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client_id", &self.client_id)
            .field("online", &self.online)
            .field("subscriptions", &self.subscriptions.len())
            .field("inflight_out", &self.inflight_out.len())
            .field("queue", &self.queue.len())
            .finish()
    }
}

impl Session {
    /// A fresh session for an accepted CONNECT (not yet attached).
    pub fn new(negotiated: &Negotiated, limits: &Arc<Limits>) -> Session {
        Session::with_client_id(Arc::from(negotiated.client_id.as_str()), negotiated, limits)
    }

    /// [`Session::new`] with the client id already shared (the broker's tables and the
    /// connection keep the same allocation).
    pub fn with_client_id(client_id: Arc<str>, negotiated: &Negotiated, limits: &Arc<Limits>) -> Session {
        let mut s = Session::blank(client_id, negotiated.protocol, limits, negotiated.session_expiry_secs);
        s.requested_expiry_zero = negotiated.requested_expiry_zero();
        s
    }

    /// A session with nothing in it, offline.
    fn blank(client_id: Arc<str>, protocol: ProtocolVersion, limits: &Arc<Limits>, session_expiry_secs: u32) -> Session {
        Session {
            client_id,
            protocol,
            limits: limits.clone(),
            subscriptions: BTreeMap::new(),
            session_expiry_secs,
            requested_expiry_zero: false,
            inflight_out: VecDeque::new(),
            queue: VecDeque::new(),
            next_msg_id: 0,
            journal: Vec::new(),
            queued_bytes: 0,
            next_packet_id: PacketId::new(1).unwrap_or(PacketId(std::num::NonZeroU16::MIN)),
            qos2_in: BTreeSet::new(),
            will: None,
            pending_will: None,
            expires_at: None,
            online: false,
            client_receive_maximum: u16::MAX,
            client_maximum_packet_size: None,
            topic_aliases: BTreeMap::new(),
            stats: SessionStats::default(),
        }
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }
    pub fn protocol(&self) -> ProtocolVersion {
        self.protocol
    }
    pub fn is_online(&self) -> bool {
        self.online
    }
    pub fn subscriptions(&self) -> impl Iterator<Item = &Subscription> {
        self.subscriptions.values()
    }
    pub fn subscription(&self, filter_text: &str) -> Option<&Subscription> {
        self.subscriptions.get(filter_text)
    }
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
    pub fn inflight_len(&self) -> usize {
        self.inflight_out.len()
    }
    pub fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }
    pub fn pending_will(&self) -> Option<&PendingWill> {
        self.pending_will.as_deref()
    }
    pub fn session_expiry_secs(&self) -> u32 {
        self.session_expiry_secs
    }

    /// Whether the session outlives its connection (expiry above zero): only such a session
    /// journals its changes.
    pub fn is_persistent(&self) -> bool {
        self.session_expiry_secs > 0
    }

    fn journal_push(&mut self, entry: Journal) {
        if self.is_persistent() {
            self.journal.push(entry);
        }
    }

    /// The changes to write to the log since the last call, in order. See [`Journal`].
    pub fn take_journal(&mut self) -> Vec<Journal> {
        std::mem::take(&mut self.journal)
    }

    /// Whether there are journal entries to take.
    pub fn has_journal(&self) -> bool {
        !self.journal.is_empty()
    }

    /// The whole durable state as journal entries (subscriptions, then every message in id
    /// order with how far it got, then inbound QoS 2 ids): replayed onto an empty
    /// [`RestoredSession`] they rebuild this session. For the log's checkpoints.
    pub fn snapshot_journal(&self) -> Vec<Journal> {
        let mut out = Vec::with_capacity(self.subscriptions.len() + self.inflight_out.len() * 2 + self.queue.len());
        for (text, sub) in &self.subscriptions {
            out.push(Journal::Subscribe { filter: text.clone(), options: sub.options, id: sub.id, group: sub.group.clone() });
        }
        for f in &self.inflight_out {
            out.push(Journal::Enqueued { msg_id: f.msg_id, delivery: f.delivery.clone() });
            out.push(Journal::Sent { msg_id: f.msg_id, packet_id: f.packet_id });
            if f.state == OutState::AwaitComp {
                out.push(Journal::PubrecReceived { msg_id: f.msg_id });
            }
        }
        for q in &self.queue {
            out.push(Journal::Enqueued { msg_id: q.msg_id, delivery: q.delivery.clone() });
        }
        for &packet_id in &self.qos2_in {
            out.push(Journal::Qos2Received { packet_id });
        }
        out
    }

    /// Rebuild an offline session from its durable state (after a restart). Messages that were
    /// sent keep their packet ids and are resent with DUP when the client resumes; the rest wait
    /// in the queue. The limits apply again (a queue beyond them keeps what fits, oldest first).
    pub fn restore(image: RestoredSession, limits: &Arc<Limits>) -> Session {
        let protocol = if image.protocol_level == 5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
        let mut s = Session::blank(Arc::from(image.client_id.as_str()), protocol, limits, image.session_expiry_secs);
        s.subscriptions = image.subscriptions.into_iter().collect();
        s.qos2_in = image.qos2_in.into_iter().collect();
        s.pending_will = image.pending_will.map(Box::new);
        s.expires_at = image.expires_at;
        for m in image.messages {
            s.next_msg_id = s.next_msg_id.max(m.msg_id + 1);
            match m.packet_id {
                Some(packet_id) => {
                    let state = match (m.delivery.qos, m.pubrec_received) {
                        (QoS::ExactlyOnce, true) => OutState::AwaitComp,
                        (QoS::ExactlyOnce, false) => OutState::AwaitRec,
                        _ => OutState::AwaitAck,
                    };
                    s.inflight_out.push_back(OutFlight { msg_id: m.msg_id, packet_id, delivery: m.delivery, state });
                }
                None => {
                    let bytes = m.delivery.message.payload.len();
                    if s.queue.len() >= s.limits.max_queued_messages
                        || s.queued_bytes.saturating_add(bytes) > s.limits.max_queued_bytes
                    {
                        s.stats.dropped_queue_full = s.stats.dropped_queue_full.saturating_add(1);
                        s.journal_push(Journal::Completed { msg_id: m.msg_id });
                        continue;
                    }
                    s.queued_bytes += bytes;
                    s.queue.push_back(Queued { msg_id: m.msg_id, delivery: m.delivery });
                }
            }
        }
        if let Some(last) = s.inflight_out.back() {
            s.next_packet_id = last.packet_id.next();
        }
        s
    }

    /// Attach a connection (new or resumed session). Puts into `out` the retransmissions owed
    /// from the previous connection (DUP PUBLISH, PUBREL) and whatever the window lets out of the
    /// queue. The caller sends CONNACK first. A pending will is cancelled (MQTT 5 3.1.3.2.2).
    pub fn attach(&mut self, negotiated: &Negotiated, now: Instant, out: &mut Outbox) {
        self.protocol = negotiated.protocol;
        self.session_expiry_secs = negotiated.session_expiry_secs;
        self.requested_expiry_zero = negotiated.requested_expiry_zero();
        self.will = negotiated.will.clone().map(Box::new);
        self.pending_will = None;
        self.expires_at = None;
        self.online = true;
        self.client_receive_maximum = negotiated.client_receive_maximum.max(1);
        self.client_maximum_packet_size = negotiated.client_maximum_packet_size.and_then(std::num::NonZeroU32::new);
        self.topic_aliases.clear();
        let max_packet_size = self.client_maximum_packet_size.map(|m| m.get() as usize);
        let protocol = self.protocol;
        let mut too_large = 0;
        let persistent = self.is_persistent();
        let journal = &mut self.journal;
        self.inflight_out.retain(|flight| {
            let packet = match flight.state {
                OutState::AwaitAck | OutState::AwaitRec => {
                    let mut p = publish_packet(&flight.delivery, Some(flight.packet_id), now);
                    p.dup = true;
                    Packet::Publish(p)
                }
                OutState::AwaitComp => Packet::PubRel(PubResp::success(flight.packet_id)),
            };
            if max_packet_size.is_some_and(|max| encoded_len(&packet, protocol) > max) {
                // The client now accepts less than it did (MQTT 5 3.1.2.25): discard the
                // message as if it had been delivered.
                too_large += 1;
                if persistent {
                    journal.push(Journal::Completed { msg_id: flight.msg_id });
                }
                return false;
            }
            out.packets.push(packet);
            true
        });
        self.stats.dropped_too_large = self.stats.dropped_too_large.saturating_add(too_large);
        self.pump(now, out);
    }

    /// The connection went away. `clean`: the client sent DISCONNECT (no will unless it asked
    /// with 0x04 — see `handle`). Returns a will to publish right now (delay 0); a delayed will
    /// is kept in `pending_will` for the runtime's housekeeping. Returns whether the session
    /// ended (expiry 0) in the second field.
    pub fn detach(&mut self, now: Instant, publish_will: bool) -> (Option<Message>, bool) {
        self.online = false;
        self.topic_aliases.clear();
        // Queue deliveries go back to their queue (it redelivers what a departed consumer held).
        self.inflight_out.retain(|f| f.delivery.queue.is_none() || f.state == OutState::AwaitComp);
        let queued_bytes = &mut self.queued_bytes;
        self.queue.retain(|q| {
            let keep = q.delivery.queue.is_none();
            if !keep {
                *queued_bytes -= q.delivery.message.payload.len();
            }
            keep
        });
        let ends_now = self.session_expiry_secs == 0;
        if self.session_expiry_secs != u32::MAX {
            self.expires_at = Some(now + Duration::from_secs(u64::from(self.session_expiry_secs)));
        }
        let will = self.will.take().filter(|_| publish_will);
        let mut immediate = None;
        if let Some(will) = will {
            let delay = will.properties.will_delay_interval.unwrap_or(0).min(self.session_expiry_secs);
            if delay == 0 || ends_now {
                immediate = Some(will_message(&will, &self.client_id, now));
            } else {
                // The Message Expiry Interval counts from when the will is published (MQTT 5
                // 3.1.3.2.4), i.e. from `publish_at`, not from now.
                let publish_at = now + Duration::from_secs(u64::from(delay));
                self.pending_will =
                    Some(Box::new(PendingWill { message: will_message(&will, &self.client_id, publish_at), publish_at }));
            }
        }
        (immediate, ends_now)
    }

    /// A delayed will that is due at `now` (or because the session ends). Takes it.
    pub fn take_due_will(&mut self, now: Instant) -> Option<Message> {
        let due = self.pending_will.as_ref().is_some_and(|w| {
            w.publish_at <= now || self.expires_at.is_some_and(|e| e <= now)
        });
        if due {
            self.pending_will.take().map(|w| w.message)
        } else {
            None
        }
    }

    /// Take the will of a session that is being discarded (takeover with clean start), to be
    /// published at `now`, before its delay ran out: its message expiry still counts from when
    /// it is published (MQTT 5 3.1.3.2.4), so the deadline moves with it.
    pub fn take_pending_will(&mut self, now: Instant) -> Option<Message> {
        let PendingWill { message, publish_at } = *self.pending_will.take()?;
        let Some(expires_at) = message.expires_at else { return Some(message) };
        let interval = expires_at.saturating_duration_since(publish_at);
        Some(Arc::new(Publication {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos: message.qos,
            retain: message.retain,
            properties: message.properties.clone(),
            expires_at: Some(now + interval),
            publisher: message.publisher.clone(),
        }))
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        !self.online && self.expires_at.is_some_and(|e| e <= now)
    }

    /// Handle one packet from the attached client.
    pub fn handle(&mut self, packet: Packet, now: Instant, out: &mut Outbox) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.on_publish(p, now, out),
            Packet::PubAck(r) => {
                if let Some(tag) = self.on_ack(r.packet_id, OutState::AwaitAck) {
                    out.events.push(Event::QueueAck { tag, accepted: !r.reason.is_error() });
                }
                self.pump(now, out);
                Ok(())
            }
            Packet::PubRec(r) => {
                self.on_pubrec(r, out);
                self.pump(now, out);
                Ok(())
            }
            Packet::PubComp(r) => {
                let _ = self.on_ack(r.packet_id, OutState::AwaitComp);
                self.pump(now, out);
                Ok(())
            }
            Packet::PubRel(r) => {
                let reason = if self.qos2_in.remove(&r.packet_id) {
                    self.journal_push(Journal::Qos2Released { packet_id: r.packet_id });
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                out.packets.push(Packet::PubComp(PubResp {
                    packet_id: r.packet_id,
                    reason: self.v5_reason(reason),
                    properties: Properties::default(),
                }));
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s, out),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u, out);
                Ok(())
            }
            Packet::PingReq => {
                out.packets.push(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => Err(self.on_disconnect(d)),
            // AUTH without an authentication method in CONNECT (we refuse every method) and any
            // second CONNECT or server-only packet are protocol errors (MQTT 5 4.13).
            Packet::Auth(_)
            | Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => Err(Close::error(ReasonCode::ProtocolError)),
        }
    }

    /// After the runtime routed a QoS 1/2 publish: send PUBACK or PUBREC. `matched`: some
    /// subscriber or store took it (MQTT 5 otherwise says 0x10 No matching subscribers).
    pub fn publish_routed(&mut self, packet_id: PacketId, qos: QoS, matched: bool, out: &mut Outbox) {
        let reason =
            if matched { ReasonCode::Success } else { self.v5_reason(ReasonCode::NoMatchingSubscribers) };
        let resp = PubResp { packet_id, reason, properties: Properties::default() };
        out.packets.push(match qos {
            QoS::ExactlyOnce => Packet::PubRec(resp),
            _ => Packet::PubAck(resp),
        });
    }

    /// A QoS 1/2 publish could not be taken (its durable effects were refused): MQTT 5 gets
    /// PUBACK/PUBREC with `reason` (>= 0x80; a QoS 2 exchange ends there, so its packet id is
    /// released); MQTT 3.1.1 has no way to say so and the connection must close (`Err`).
    pub fn publish_refused(&mut self, packet_id: PacketId, qos: QoS, reason: ReasonCode, out: &mut Outbox) -> Result<(), Close> {
        if !self.protocol.is_v5() {
            return Err(Close { reason, send_disconnect: false, discard_will: false });
        }
        if qos == QoS::ExactlyOnce && self.qos2_in.remove(&packet_id) {
            self.journal_push(Journal::Qos2Released { packet_id });
        }
        let resp = PubResp { packet_id, reason, properties: Properties::default() };
        out.packets.push(match qos {
            QoS::ExactlyOnce => Packet::PubRec(resp),
            _ => Packet::PubAck(resp),
        });
        Ok(())
    }

    /// Offer a message to this session: sent now if online and the window allows, else queued
    /// (QoS 1/2, bounded by `max_queued_messages` and `max_queued_bytes`), else dropped and
    /// counted.
    pub fn deliver(&mut self, delivery: Delivery, now: Instant, out: &mut Outbox) -> DeliverOutcome {
        if delivery.message.is_expired(now) {
            self.stats.dropped_expired = self.stats.dropped_expired.saturating_add(1);
            return DeliverOutcome::Dropped(DropReason::Expired);
        }
        if delivery.qos == QoS::AtMostOnce {
            if !self.online {
                self.stats.dropped_qos0_offline = self.stats.dropped_qos0_offline.saturating_add(1);
                return DeliverOutcome::Dropped(DropReason::Qos0Offline);
            }
            return match self.send_publish(&delivery, None, now, out) {
                true => DeliverOutcome::Sent,
                false => DeliverOutcome::Dropped(DropReason::TooLarge),
            };
        }
        if self.online && self.queue.is_empty() && self.window_open() {
            let Some(publish) = self.fitting_publish(&delivery, now) else {
                return DeliverOutcome::Dropped(DropReason::TooLarge);
            };
            let msg_id = self.accept(&delivery);
            self.send_inflight(msg_id, delivery, publish, out);
            return DeliverOutcome::Sent;
        }
        let bytes = delivery.message.payload.len();
        if self.queue.len() >= self.limits.max_queued_messages
            || self.queued_bytes.saturating_add(bytes) > self.limits.max_queued_bytes
        {
            self.stats.dropped_queue_full = self.stats.dropped_queue_full.saturating_add(1);
            return DeliverOutcome::Dropped(DropReason::QueueFull);
        }
        let msg_id = self.accept(&delivery);
        self.queued_bytes += bytes;
        self.queue.push_back(Queued { msg_id, delivery });
        DeliverOutcome::Queued
    }

    /// Take the unacknowledged QoS 1 and the queued (never sent) QoS 1/2 messages that came
    /// through a shared subscription, so another member of the group can have them (the session
    /// is leaving). A QoS 2 message already sent stays: its delivery is completed with this
    /// client when it reconnects and never sent to another (MQTT-4.8.2-4, MQTT-4.8.2-5).
    pub fn take_shared_undelivered(&mut self) -> Vec<Delivery> {
        let mut taken = Vec::new();
        let mut gone = Vec::new();
        self.inflight_out.retain(|f| {
            let move_it = f.delivery.shared.is_some() && f.state == OutState::AwaitAck;
            if move_it {
                taken.push(f.delivery.clone());
                gone.push(f.msg_id);
            }
            !move_it
        });
        let queued_bytes = &mut self.queued_bytes;
        self.queue.retain(|q| {
            if q.delivery.shared.is_some() {
                *queued_bytes -= q.delivery.message.payload.len();
                taken.push(q.delivery.clone());
                gone.push(q.msg_id);
                false
            } else {
                true
            }
        });
        for msg_id in gone {
            self.journal_push(Journal::Completed { msg_id });
        }
        taken
    }

    fn window_open(&self) -> bool {
        let window = self.client_receive_maximum.min(self.limits.max_inflight_messages.max(1));
        self.inflight_out.len() < usize::from(window)
    }

    fn pump(&mut self, now: Instant, out: &mut Outbox) {
        while self.online && self.window_open() {
            let Some(Queued { msg_id, delivery }) = self.queue.pop_front() else { break };
            self.queued_bytes -= delivery.message.payload.len();
            if delivery.message.is_expired(now) {
                self.stats.dropped_expired = self.stats.dropped_expired.saturating_add(1);
                self.journal_push(Journal::Completed { msg_id });
                continue;
            }
            let Some(publish) = self.fitting_publish(&delivery, now) else {
                self.journal_push(Journal::Completed { msg_id });
                continue;
            };
            self.send_inflight(msg_id, delivery, publish, out);
        }
    }

    /// A QoS 1/2 message is now this session's to deliver: give it an id and journal it.
    fn accept(&mut self, delivery: &Delivery) -> u64 {
        let msg_id = self.next_msg_id;
        self.next_msg_id += 1;
        if self.is_persistent() && delivery.queue.is_none() {
            self.journal.push(Journal::Enqueued { msg_id, delivery: delivery.clone() });
        }
        msg_id
    }

    /// The PUBLISH for QoS 1/2 delivery `d` (its packet id set when it is sent), or `None` when it
    /// exceeds the client's Maximum Packet Size (MQTT 5 3.1.2.25: discarded as if delivered;
    /// counted). Built once: the size does not depend on the packet id's value.
    fn fitting_publish(&mut self, d: &Delivery, now: Instant) -> Option<Packet> {
        let packet = Packet::Publish(publish_packet(d, Some(PacketId(std::num::NonZeroU16::MIN)), now));
        if let Some(max) = self.client_maximum_packet_size {
            if encoded_len(&packet, self.protocol) > max.get() as usize {
                self.stats.dropped_too_large = self.stats.dropped_too_large.saturating_add(1);
                return None;
            }
        }
        Some(packet)
    }

    /// Send an accepted message as `publish` (from `fitting_publish`).
    fn send_inflight(&mut self, msg_id: u64, delivery: Delivery, mut publish: Packet, out: &mut Outbox) {
        let packet_id = self.allocate_packet_id();
        if let Packet::Publish(p) = &mut publish {
            p.packet_id = Some(packet_id);
        }
        out.packets.push(publish);
        let state = if delivery.qos == QoS::ExactlyOnce { OutState::AwaitRec } else { OutState::AwaitAck };
        self.journal_push(Journal::Sent { msg_id, packet_id });
        self.inflight_out.push_back(OutFlight { msg_id, packet_id, delivery, state });
    }

    /// Push a PUBLISH unless it exceeds the client's Maximum Packet Size (MQTT 5 3.1.2.25:
    /// discarded as if delivered).
    fn send_publish(&mut self, d: &Delivery, packet_id: Option<PacketId>, now: Instant, out: &mut Outbox) -> bool {
        let packet = Packet::Publish(publish_packet(d, packet_id, now));
        if let Some(max) = self.client_maximum_packet_size {
            if encoded_len(&packet, self.protocol) > max.get() as usize {
                self.stats.dropped_too_large = self.stats.dropped_too_large.saturating_add(1);
                return false;
            }
        }
        out.packets.push(packet);
        true
    }

    fn allocate_packet_id(&mut self) -> PacketId {
        // The window (<= 65535) is smaller than the id space, so a free id always exists.
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = id.next();
            if !self.inflight_out.iter().any(|f| f.packet_id == id) {
                return id;
            }
        }
    }

    /// The delivery with `packet_id` in state `expected` is finished; returns its queue tag when
    /// it came from a queue.
    fn on_ack(&mut self, packet_id: PacketId, expected: OutState) -> Option<crate::session::message::QueueTag> {
        let pos = self.inflight_out.iter().position(|f| f.packet_id == packet_id && f.state == expected)?;
        let f = self.inflight_out.remove(pos)?;
        if f.delivery.queue.is_some() {
            return f.delivery.queue;
        }
        self.journal_push(Journal::Completed { msg_id: f.msg_id });
        None
    }

    fn on_pubrec(&mut self, r: PubResp, out: &mut Outbox) {
        let pos = self
            .inflight_out
            .iter()
            .position(|f| f.packet_id == r.packet_id && f.state != OutState::AwaitAck);
        match pos {
            Some(pos) if r.reason.is_error() => {
                // The receiver refused the message: the exchange ends here (MQTT 5 4.3.3).
                if let Some(f) = self.inflight_out.remove(pos) {
                    match f.delivery.queue {
                        Some(tag) => out.events.push(Event::QueueAck { tag, accepted: false }),
                        None => self.journal_push(Journal::Completed { msg_id: f.msg_id }),
                    }
                }
            }
            Some(pos) => {
                let mut advanced = None;
                if let Some(f) = self.inflight_out.get_mut(pos) {
                    if f.state != OutState::AwaitComp {
                        advanced = Some((f.msg_id, f.delivery.queue.clone()));
                    }
                    f.state = OutState::AwaitComp;
                }
                match advanced {
                    // The receiver has the message: that is the queue's acknowledgement.
                    Some((_, Some(tag))) => out.events.push(Event::QueueAck { tag, accepted: true }),
                    Some((msg_id, None)) => self.journal_push(Journal::PubrecReceived { msg_id }),
                    None => {}
                }
                out.packets.push(Packet::PubRel(PubResp::success(r.packet_id)));
            }
            // PUBREL answers only a PUBREC below 0x80 (MQTT 5 4.3.3).
            None if r.reason.is_error() => {}
            None => out.packets.push(Packet::PubRel(PubResp {
                packet_id: r.packet_id,
                reason: self.v5_reason(ReasonCode::PacketIdentifierNotFound),
                properties: Properties::default(),
            })),
        }
    }

    fn on_publish(&mut self, mut p: Publish, now: Instant, out: &mut Outbox) -> Result<(), Close> {
        if let Some(alias) = p.properties.topic_alias {
            if alias == 0 || alias > self.limits.max_topic_aliases {
                return Err(Close::error(ReasonCode::TopicAliasInvalid));
            }
            if p.topic.is_empty() {
                match self.topic_aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return Err(Close::error(ReasonCode::ProtocolError)),
                }
            } else {
                self.topic_aliases.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(Close::error(ReasonCode::ProtocolError));
        }
        if check_topic_limits(p.topic.as_str(), &self.limits).is_err() {
            return Err(Close::error(ReasonCode::TopicNameInvalid));
        }
        let ack = match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) => None,
            (qos, Some(id)) => Some((id, qos)),
            (_, None) => return Err(Close::error(ReasonCode::ProtocolError)),
        };
        if let Some((id, QoS::ExactlyOnce)) = ack {
            if self.qos2_in.contains(&id) {
                // A retransmission of a QoS 2 message we already took: acknowledge, don't route
                // again (exactly once, MQTT 4.3.3).
                out.packets.push(Packet::PubRec(PubResp::success(id)));
                return Ok(());
            }
            if self.qos2_in.len() >= usize::from(self.limits.max_inflight_messages.max(1)) {
                return Err(Close::error(ReasonCode::ReceiveMaximumExceeded));
            }
            self.qos2_in.insert(id);
        }
        if p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            if let Some((id, qos)) = ack {
                let resp = PubResp {
                    packet_id: id,
                    reason: self.v5_reason(ReasonCode::PayloadFormatInvalid),
                    properties: Properties::default(),
                };
                if qos == QoS::ExactlyOnce {
                    self.qos2_in.remove(&id);
                }
                out.packets.push(match qos {
                    QoS::ExactlyOnce => Packet::PubRec(resp),
                    _ => Packet::PubAck(resp),
                });
                return Ok(());
            }
            // QoS 0 has no acknowledgement to carry 0x99: the connection closes with it
            // (MQTT 5 3.3.2.3.2), rather than dropping the message without a word.
            return Err(Close::error(ReasonCode::PayloadFormatInvalid));
        }
        if let Some((packet_id, QoS::ExactlyOnce)) = ack {
            self.journal_push(Journal::Qos2Received { packet_id });
        }
        let expires_at = p
            .properties
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s)));
        let message = Arc::new(Publication {
            topic: p.topic,
            properties: Publication::forwarded_properties(&p.properties),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            expires_at,
            publisher: Some(self.client_id.clone()),
        });
        out.events.push(Event::Publish { message, ack });
        Ok(())
    }

    fn on_subscribe(&mut self, s: Subscribe, out: &mut Outbox) -> Result<(), Close> {
        let v5 = self.protocol.is_v5();
        let id = s.properties.subscription_identifiers.first().copied();
        let group = s.properties.user_properties.iter().find(|(k, _)| k == "group").map(|(_, v)| v.clone());
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut added = Vec::new();
        for (text, options) in s.filters {
            let parsed = SubscriptionFilter::parse(&text)
                .ok()
                .filter(|f| check_topic_limits(f.filter().as_str(), &self.limits).is_ok());
            let Some(filter) = parsed else {
                reasons.push(if v5 { ReasonCode::TopicFilterInvalid } else { ReasonCode::UnspecifiedError });
                continue;
            };
            if filter.group().is_some() && options.no_local {
                // MQTT 5 3.8.3.1: No Local on a shared subscription is a Protocol Error.
                return Err(Close::error(ReasonCode::ProtocolError));
            }
            let existed = self.subscriptions.contains_key(&text);
            if !existed && self.subscriptions.len() >= self.limits.max_subscriptions_per_session {
                reasons.push(if v5 { ReasonCode::QuotaExceeded } else { ReasonCode::UnspecifiedError });
                continue;
            }
            let subscription = Subscription { filter, options, id, group: group.clone() };
            self.journal_push(Journal::Subscribe { filter: text.clone(), options, id, group: group.clone() });
            self.subscriptions.insert(text, subscription.clone());
            reasons.push(ReasonCode::granted(options.qos));
            added.push(Subscribed { subscription, existed, group: group.clone() });
        }
        let suback = SubAck { packet_id: s.packet_id, properties: Properties::default(), reasons };
        out.events.push(Event::Subscribe { added, suback });
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe, out: &mut Outbox) {
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut removed = Vec::new();
        for text in &u.filters {
            match self.subscriptions.remove(text.as_str()) {
                Some(s) => {
                    self.journal_push(Journal::Unsubscribe { filter: text.clone() });
                    reasons.push(ReasonCode::Success);
                    removed.push(s.filter);
                }
                None => reasons.push(ReasonCode::NoSubscriptionExisted),
            }
        }
        let reasons = if self.protocol.is_v5() { reasons } else { Vec::new() };
        out.packets.push(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: Properties::default(),
            reasons,
        }));
        if !removed.is_empty() {
            out.events.push(Event::Unsubscribe { removed });
        }
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Close {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.requested_expiry_zero && expiry != 0 {
                // MQTT 5 3.14.2.2.2: cannot turn a non-persistent session persistent on the way out.
                return Close::error(ReasonCode::ProtocolError);
            }
            self.session_expiry_secs = expiry.min(self.limits.max_session_expiry_secs);
        }
        Close {
            reason: d.reason,
            send_disconnect: false,
            discard_will: d.reason != ReasonCode::DisconnectWithWillMessage,
        }
    }

    /// Remove every subscription (the session is being discarded); returns them for the tables.
    pub fn take_subscriptions(&mut self) -> Vec<SubscriptionFilter> {
        std::mem::take(&mut self.subscriptions).into_values().map(|s| s.filter).collect()
    }

    /// 3.1.1 has no reason codes on these packets: they always read as success there.
    fn v5_reason(&self, reason: ReasonCode) -> ReasonCode {
        if self.protocol.is_v5() {
            reason
        } else {
            ReasonCode::Success
        }
    }
}

/// The PUBLISH a subscriber receives for `d`.
pub fn publish_packet(d: &Delivery, packet_id: Option<PacketId>, now: Instant) -> Publish {
    let m = &d.message;
    let mut properties = m.properties.clone();
    properties.message_expiry_interval = m.remaining_expiry_secs(now);
    properties.subscription_identifiers = d.subscription_ids.clone();
    Publish {
        dup: false,
        qos: d.qos,
        retain: d.retain,
        topic: m.topic.clone(),
        packet_id,
        properties,
        payload: m.payload.clone(),
    }
}

fn will_message(will: &Will, client_id: &Arc<str>, now: Instant) -> Message {
    Arc::new(Publication {
        topic: will.topic.clone(),
        payload: will.payload.clone(),
        qos: will.qos,
        retain: will.retain,
        properties: Publication::forwarded_properties(&will.properties),
        expires_at: will
            .properties
            .message_expiry_interval
            .map(|s| now + Duration::from_secs(u64::from(s))),
        publisher: Some(client_id.clone()),
    })
}
