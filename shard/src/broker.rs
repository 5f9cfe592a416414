//! One shard's broker: its sessions, its subscriber table, its replica of the route table, the
//! retained messages it owns, and the requests it is waiting on.
//!
//! Lives on one shard (`!Send`); every method runs on that shard's executor. Other shards reach
//! it only through [`ShardMsg`]s, which the mesh drain tasks feed to [`Broker::on_shard_msgs`].
//!
//! *Architecture invariant:* no `RefCell` borrow is held across an `.await`, and no borrow of
//! `state` is held while calling code that may borrow it again (delivery, routing).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use flux_core::mqtt::{Packet, PacketId, QoS, ReasonCode, RetainHandling, SubAck};
use flux_core::session::{
    DeliverOutcome, Delivery, DropReason, Message, Negotiated, Outbox, Session, Subscribed,
};
use flux_core::topic::{SubscriptionFilter, SubscriptionTrie, TopicFilter, TopicTree};
use flux_core::{Limits, ShardId};
use flux_wal::Record;

use crate::durable::{self, LogMark, Pending, ShardLog, WallClock};
use crate::handover::SocketHandover;
use crate::mesh::Mesh;
use crate::msg::{RouteKey, ShardMsg};
use crate::outbound::{AckSlot, Hold, Outbound};
use crate::routes::RouteTable;
use crate::signal::{Gather, GatherState};

/// Identifies one session incarnation on this shard (never reused).
pub type SessKey = u64;

mod persist;
pub mod queues;

/// A session and, while a client is attached, its connection.
pub struct SessionEntry {
    pub session: Session,
    pub conn: Option<Rc<Outbound>>,
    /// Which connection is attached: a reader that ends after a takeover must not detach the
    /// connection that replaced it.
    pub conn_id: u64,
    /// The shard's log holds a live `SessionCreate` for this session (it is persistent and
    /// everything it journals is written).
    pub logged: bool,
}

/// Counters for logs and metrics.
#[derive(Default)]
pub struct BrokerStats {
    pub published: Cell<u64>,
    pub delivered: Cell<u64>,
    pub dropped_queue_full: Cell<u64>,
    pub dropped_slow_consumer: Cell<u64>,
    pub dropped_shared_no_member: Cell<u64>,
    /// Queues not created because the shard owns `max_queues`.
    pub refused_queues: Cell<u64>,
    /// Spill files that could not be written or read.
    pub spill_errors: Cell<u64>,
}

struct RouteRef {
    members: u32,
    ready: Gather,
}

#[derive(Default)]
struct State {
    by_client_id: HashMap<Arc<str>, SessKey>,
    entries: HashMap<SessKey, Rc<RefCell<SessionEntry>>>,
    next_key: SessKey,
    next_conn_id: u64,
    local: SubscriptionTrie<SessKey>,
    shared_local: HashMap<(Arc<str>, TopicFilter), SharedMembers>,
    routes: RouteTable,
    route_refs: HashMap<RouteKey, RouteRef>,
    /// Retained messages of the topics this shard owns, indexed for filter lookups.
    retained: TopicTree<Message>,
    pending: HashMap<u64, Gather>,
    /// Acknowledgements of this shard's clients' publishes waiting for other shards' answers.
    pending_acks: HashMap<u64, PendingPubAck>,
    next_req: u64,
    /// (when, session): a will may be due or the session may expire then.
    deadlines: BTreeSet<(Instant, SessKey)>,
    /// Queue bindings (replicated on every shard): filter -> queue names.
    queue_routes: SubscriptionTrie<flux_core::queue::QueueName>,
    /// The queues this shard owns.
    owned_queues: HashMap<flux_core::queue::QueueName, queues::OwnedQueue>,
    /// Queue consumers among this shard's sessions.
    queue_consumers: HashMap<SessKey, Vec<queues::QueueConsumer>>,
    next_consumer: u64,
    /// Persistent sessions per subscribed filter (the inner filter of a shared subscription):
    /// this shard's `RouteKey::Durable` entries.
    durable_local: HashMap<TopicFilter, std::collections::HashSet<SessKey>>,
    /// Answers to this shard's admin requests, by request id.
    admin_stats: HashMap<u64, Vec<queues::QueueStatsView>>,
    admin_results: HashMap<u64, Result<u64, String>>,
    admin_messages: HashMap<u64, Vec<(flux_core::queue::Offset, Message)>>,
    /// Requests answered with `Failed` (not publishes: those have their own table).
    failed_reqs: std::collections::HashSet<u64>,
}

/// A PUBACK/PUBREC whose reason code waits for the other shards that took the publish.
struct PendingPubAck {
    remaining: usize,
    /// Set when a shard refused: the reason code the publisher gets.
    refused: Option<ReasonCode>,
    key: SessKey,
    conn_id: u64,
    packet_id: PacketId,
    qos: QoS,
    matched: bool,
    slot: Rc<AckSlot>,
}

#[derive(Default)]
struct SharedMembers {
    members: Vec<SessKey>,
    cursor: usize,
}

pub struct Broker {
    me: ShardId,
    shard_count: u16,
    /// Shared with every session of this shard.
    limits: Arc<Limits>,
    mesh: Mesh<ShardMsg>,
    connections: Arc<AtomicUsize>,
    on_handover: Box<dyn Fn(SocketHandover)>,
    /// This shard's write-ahead log; `None`: nothing is durable (tests of the runtime alone).
    log: Option<Rc<ShardLog>>,
    clock: WallClock,
    state: RefCell<State>,
    pub stats: BrokerStats,
    /// Spill files of the queues this shard owns (set once restored; `None` without a log).
    spill: RefCell<Option<Rc<crate::spill::SpillStore>>>,
    /// Spill I/O to start (queue, request), and the signal of the task that starts it.
    spill_jobs: RefCell<Vec<(flux_core::queue::QueueName, flux_core::queue::QueueIo)>>,
    spill_signal: crate::signal::Signal,
    /// Queues whose dispatch waits for the pump task (one dispatch per burst of acks and
    /// appends, not per message), that task's signal, and whether it runs.
    dirty_queues: RefCell<std::collections::HashSet<flux_core::queue::QueueName>>,
    pump_signal: crate::signal::Signal,
    pumps_running: Cell<bool>,
}

/// A slot under `max_connections`; released on drop.
pub struct ConnectionPermit {
    count: Arc<AtomicUsize>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The result of opening a session for a new connection.
pub struct Opened {
    pub key: SessKey,
    pub conn_id: u64,
    pub session_present: bool,
}

impl Broker {
    pub fn new(
        mesh: Mesh<ShardMsg>,
        limits: Limits,
        connections: Arc<AtomicUsize>,
        on_handover: Box<dyn Fn(SocketHandover)>,
        log: Option<Rc<ShardLog>>,
    ) -> Broker {
        let clock = log.as_ref().map_or_else(WallClock::now, |l| *l.clock());
        Broker {
            me: mesh.me(),
            shard_count: mesh.shard_count(),
            limits: Arc::new(limits),
            mesh,
            connections,
            on_handover,
            log,
            clock,
            state: RefCell::new(State::default()),
            stats: BrokerStats::default(),
            spill: RefCell::new(None),
            spill_jobs: RefCell::new(Vec::new()),
            spill_signal: crate::signal::Signal::default(),
            dirty_queues: RefCell::new(Default::default()),
            pump_signal: crate::signal::Signal::default(),
            pumps_running: Cell::new(false),
        }
    }

    pub fn me(&self) -> ShardId {
        self.me
    }
    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    pub fn mesh(&self) -> &Mesh<ShardMsg> {
        &self.mesh
    }

    /// Take a connection slot, or `None` when `max_connections` are open (across all shards).
    pub fn try_acquire_connection(&self) -> Option<ConnectionPermit> {
        let prev = self.connections.fetch_add(1, Ordering::Relaxed);
        let permit = ConnectionPermit { count: self.connections.clone() };
        (prev < self.limits.max_connections).then_some(permit)
    }

    /// A client id the server assigns (MQTT 5 empty client id) that hashes to this shard, so the
    /// connection needs no handover.
    pub fn assign_client_id(&self) -> String {
        let mut st = self.state.borrow_mut();
        loop {
            st.next_req += 1;
            let id = format!("flux-{}-{:x}", self.me.0, st.next_req.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            if flux_core::shard_for(id.as_bytes(), self.shard_count) == self.me {
                return id;
            }
        }
    }

    /// The client id of session `key`, shared with the session (no copy).
    pub fn session_client_id(&self, key: SessKey) -> Option<Arc<str>> {
        let st = self.state.borrow();
        st.entries.get(&key).map(|e| e.borrow().session.client_id().clone())
    }

    /// Attach a connection to its session (taking over a connected one, discarding it on clean
    /// start, or resuming it). Sends CONNACK and any retransmissions through `conn`; for a
    /// persistent session they wait until the session's records are durable.
    pub fn open_session(&self, negotiated: &Negotiated, conn: Rc<Outbound>, now: Instant) -> Opened {
        let mark = self.mark();
        let client_id: Arc<str> = Arc::from(negotiated.client_id.as_str());
        let mut wills = Vec::new();
        let mut handoff = Vec::new();
        let mut discarded: Option<(SessKey, Vec<SubscriptionFilter>, bool)> = None;
        let mut out = Outbox::default();
        let existing = {
            let st = self.state.borrow();
            st.by_client_id.get(&client_id).and_then(|k| st.entries.get(k).map(|e| (*k, e.clone())))
        };
        let conn_id = {
            let mut st = self.state.borrow_mut();
            st.next_conn_id += 1;
            st.next_conn_id
        };
        let mut resumed = None;
        let existing_key = existing.as_ref().map(|(k, _)| *k);
        if let Some((key, entry)) = existing {
            let mut e = entry.borrow_mut();
            // Expired but not yet reaped by housekeeping (it runs once a second): not resumable.
            let mut ended = e.session.is_expired(now);
            if let Some(old) = e.conn.take() {
                tracing::info!(client_id = %client_id, "session taken over by a new connection");
                old.close(Some(ReasonCode::SessionTakenOver));
                let (will, session_ended) = e.session.detach(now, true);
                wills.extend(will);
                handoff = e.session.take_shared_undelivered();
                // A session with expiry 0 ends with its connection, even when the new CONNECT
                // asks to resume (MQTT 5 3.1.2.11.2).
                ended = session_ended;
            }
            if negotiated.clean_start || ended {
                let had_will = e.session.pending_will().is_some();
                wills.extend(e.session.take_pending_will(now));
                if had_will && e.logged {
                    self.append(Record::WillDone { client_id: client_id.to_string() });
                }
                discarded = Some((key, e.session.take_subscriptions(), e.logged));
            } else {
                let had_will = e.session.pending_will().is_some();
                e.session.attach(negotiated, now, &mut out);
                e.conn = Some(conn.clone());
                e.conn_id = conn_id;
                if e.logged && had_will {
                    self.append(Record::WillDone { client_id: client_id.to_string() });
                }
                if e.logged && !e.session.is_persistent() {
                    // Resumed with expiry 0: it ends with this connection; nothing to keep.
                    self.append(Record::SessionExpire { client_id: client_id.to_string() });
                    e.logged = false;
                } else if e.logged {
                    self.append(Record::SessionResumed {
                        client_id: client_id.to_string(),
                        protocol_level: protocol_level(&e.session),
                        session_expiry_secs: e.session.session_expiry_secs(),
                    });
                }
                self.write_journal(&mut e);
                resumed = Some(key);
            }
        }
        if let Some((key, subs, logged)) = discarded {
            if logged {
                self.append(Record::SessionExpire { client_id: client_id.to_string() });
            }
            self.remove_subscriptions(key, &subs);
            let mut st = self.state.borrow_mut();
            st.entries.remove(&key);
            st.by_client_id.remove(&client_id);
        }
        let (key, session_present) = match resumed {
            Some(key) => (key, true),
            None => {
                let mut session = Session::with_client_id(client_id.clone(), negotiated, &self.limits);
                session.attach(negotiated, now, &mut out);
                let logged = self.log.is_some() && session.is_persistent();
                let mut entry = SessionEntry { session, conn: Some(conn.clone()), conn_id, logged };
                if logged {
                    self.append(Record::SessionCreate {
                        client_id: client_id.to_string(),
                        protocol_level: protocol_level(&entry.session),
                        session_expiry_secs: entry.session.session_expiry_secs(),
                    });
                }
                self.write_journal(&mut entry);
                let mut st = self.state.borrow_mut();
                st.next_key += 1;
                let key = st.next_key;
                st.entries.insert(key, Rc::new(RefCell::new(entry)));
                st.by_client_id.insert(client_id.clone(), key);
                (key, false)
            }
        };
        let connack = negotiated.connack(session_present, &self.limits);
        match self.hold_since(mark) {
            Ok(hold) => {
                conn.send_after(hold, [&Packet::ConnAck(connack)]);
                conn.send(&out.packets);
            }
            Err(()) => {
                tracing::error!(client_id = %client_id, "session state cannot be written to the log; connection refused");
                let mut refusal = flux_core::session::connack_refusal(ReasonCode::UnspecifiedError);
                if !negotiated.protocol.is_v5() {
                    refusal = flux_core::session::connack_refusal(ReasonCode::ServerUnavailable);
                }
                conn.send([&Packet::ConnAck(refusal)]);
                conn.close(None);
            }
        }
        for will in wills {
            self.publish(will, now);
        }
        for d in handoff {
            self.redispatch_shared(d, Some(key), now);
        }
        if let Some(old) = existing_key {
            // Taken over or discarded: the previous connection's queue consumers leave.
            self.queue_session_gone(old);
        }
        if session_present {
            self.reattach_queue_consumers(key);
        }
        Opened { key, conn_id, session_present }
    }

    /// Attach the queue subscriptions of a session again (resumed, or restored after a restart
    /// when its client connects).
    fn reattach_queue_consumers(&self, key: SessKey) {
        let Some(entry) = self.entry(key) else { return };
        let subs: Vec<Subscribed> = entry
            .borrow()
            .session
            .subscriptions()
            .filter(|s| queues::queue_filter(&s.filter).is_some())
            .map(|s| Subscribed { subscription: s.clone(), existed: true, group: s.group.clone() })
            .collect();
        if !subs.is_empty() {
            self.queue_resume(key, subs);
        }
    }

    /// Run one packet from the client through its session; packets go straight out (for a
    /// persistent session, after its records are durable), events are returned for the caller
    /// (which may need to await for subscribes).
    pub fn handle_packet(
        &self,
        key: SessKey,
        packet: Packet,
        now: Instant,
    ) -> Result<Vec<flux_core::session::Event>, flux_core::session::Close> {
        let Some(entry) = self.entry(key) else { return Ok(Vec::new()) };
        let mut out = Outbox::default();
        let mut e = entry.borrow_mut();
        let result = e.session.handle(packet, now, &mut out);
        let journaled = self.write_journal(&mut e);
        self.send_to(&e, &out.packets, None, journaled);
        result.map(|()| out.events)
    }

    /// Route a publish from a client of this shard and acknowledge it. The acknowledgement goes
    /// out (in order with everything else sent to the client) only once every durable effect is
    /// committed: this shard's log (retained store, queues of persistent sessions here) and the
    /// confirmations of the other shards that took it. A publish whose durable effects were
    /// refused gets MQTT 5 PUBACK/PUBREC 0x80; an MQTT 3.1.1 publisher is disconnected.
    pub fn publish_from(&self, key: SessKey, conn_id: u64, message: Message, ack: Option<(PacketId, QoS)>, now: Instant) {
        let mark = self.mark();
        let req = ack.map(|_| self.next_req());
        let mut remote = 0usize;
        if message.retain {
            remote += usize::from(self.retain(message.clone(), req));
        }
        let (matched, routed_remote, refused) = self.route(&message, req, now);
        remote += routed_remote;
        let matched = matched || message.retain;
        let (Some((packet_id, qos)), Some(req)) = (ack, req) else { return };
        let Some(entry) = self.entry(key) else { return };
        let mut e = entry.borrow_mut();
        if e.conn_id != conn_id {
            // Taken over meanwhile: the client re-sends the PUBLISH when it resumes.
            return;
        }
        let mut out = Outbox::default();
        let local = self.pending_since(mark);
        let refusal = match (local, refused) {
            (Pending::Failed, _) => Some(ReasonCode::UnspecifiedError),
            (_, r) => r,
        };
        if let Some(reason) = refusal {
            tracing::warn!(client_id = %e.session.client_id(), topic = %message.topic, ?reason, "publish refused: its durable effects could not be written");
            if e.session.publish_refused(packet_id, qos, reason, &mut out).is_err() {
                if let Some(c) = &e.conn {
                    c.close(None);
                }
                return;
            }
            let journaled = self.write_journal(&mut e);
            self.send_to(&e, &out.packets, None, journaled);
            return;
        }
        let local_hold = match (&self.log, local) {
            (Some(log), Pending::Commit(lsn)) => Some(Hold::Commit(log.clone(), lsn)),
            _ => None,
        };
        if let (Some(c), Some(h)) = (&e.conn, local_hold) {
            c.send_after(Some(h), std::iter::empty());
        }
        if remote > 0 {
            // The reason code depends on the other shards' answers: a slot in the stream that
            // `finish_pending_ack` fills.
            let slot = Rc::new(AckSlot::default());
            if let Some(c) = &e.conn {
                c.send_after(Some(Hold::Slot(slot.clone())), std::iter::empty());
            }
            let pending = PendingPubAck { remaining: remote, refused: None, key, conn_id, packet_id, qos, matched, slot };
            self.state.borrow_mut().pending_acks.insert(req, pending);
            return;
        }
        e.session.publish_routed(packet_id, qos, matched, &mut out);
        self.send_to(&e, &out.packets, None, false);
    }

    /// One other shard answered for a pending acknowledgement (`refused`: with that reason
    /// code); after the last, decide it.
    fn answer_pending_ack(&self, req: u64, refused: Option<ReasonCode>) -> bool {
        let done = {
            let mut st = self.state.borrow_mut();
            let Some(p) = st.pending_acks.get_mut(&req) else { return false };
            p.refused = p.refused.or(refused);
            p.remaining = p.remaining.saturating_sub(1);
            if p.remaining > 0 {
                return true;
            }
            st.pending_acks.remove(&req)
        };
        if let Some(p) = done {
            self.finish_pending_ack(p);
        }
        true
    }

    fn finish_pending_ack(&self, p: PendingPubAck) {
        let Some(entry) = self.entry(p.key) else {
            p.slot.fill(None);
            return;
        };
        let mut e = entry.borrow_mut();
        if e.conn_id != p.conn_id || e.conn.is_none() {
            // Taken over meanwhile: the client re-sends the PUBLISH when it resumes.
            p.slot.fill(None);
            return;
        }
        let mut out = Outbox::default();
        if let Some(reason) = p.refused {
            tracing::warn!(client_id = %e.session.client_id(), ?reason, "publish refused: another shard could not store it");
            if e.session.publish_refused(p.packet_id, p.qos, reason, &mut out).is_err() {
                p.slot.fill(None);
                if let Some(c) = &e.conn {
                    c.close(None);
                }
                return;
            }
            self.write_journal(&mut e);
        } else {
            e.session.publish_routed(p.packet_id, p.qos, p.matched, &mut out);
        }
        p.slot.fill(out.packets.pop());
    }

    /// Route `message` to every shard with a matching subscriber (one hop per shard, batched by
    /// the mesh), to one member of each matching shared group, and to the retained store.
    /// Returns whether anything took it.
    pub fn publish(&self, message: Message, now: Instant) -> bool {
        if message.retain {
            self.retain(message.clone(), None);
        }
        self.route(&message, None, now).0
    }

    /// Deliver to live subscribers only (the retained store is the caller's business). With
    /// `confirm`, every other shard that takes the message answers request `confirm` once what it
    /// stored is durable. Returns whether anything took it, and how many answers to expect.
    fn route(&self, message: &Message, confirm: Option<u64>, now: Instant) -> (bool, usize, Option<ReasonCode>) {
        self.stats.published.set(self.stats.published.get() + 1);
        let (queued, queue_confirms, refused) = match self.route_to_queues(message, confirm, now) {
            Ok((m, c)) => (m, c, None),
            Err(reason) => (true, 0, Some(reason)),
        };
        if queues::queue_topic(message.topic.as_str()).is_some() {
            // `$queue/<name>`: straight into that queue, not to subscribers.
            return (queued, queue_confirms, refused);
        }
        let mut dest = vec![false; usize::from(self.shard_count)];
        // Shards that must confirm: only those with persistent subscribers of the topic (the
        // others never write anything for it, and their answer would only cost a round trip).
        let mut durable = if confirm.is_some() { vec![false; usize::from(self.shard_count)] } else { Vec::new() };
        let mut groups = Vec::new();
        let mut picks = Vec::new();
        {
            let mut st = self.state.borrow_mut();
            st.routes.plain_destinations(&message.topic, &mut dest);
            if confirm.is_some() {
                st.routes.durable_destinations(&message.topic, &mut durable);
            }
            st.routes.shared_groups(&message.topic, &mut groups);
            for (group, filter) in groups {
                if let Some(shard) = st.routes.pick_shared(&group, &filter, None) {
                    picks.push((shard, group, filter));
                }
            }
        }
        let mut matched = !picks.is_empty() || queued;
        let mut confirms = queue_confirms;
        for (i, wanted) in dest.iter().enumerate() {
            if !wanted {
                continue;
            }
            matched = true;
            let shard = ShardId(i as u16);
            if shard == self.me {
                self.deliver_local(message, now);
            } else {
                let confirm = confirm.filter(|_| durable.get(i).copied().unwrap_or(true));
                confirms += usize::from(confirm.is_some());
                self.mesh.send(shard, ShardMsg::Publish { message: message.clone(), confirm });
            }
        }
        // A shared group's pick may be re-routed to another member shard: confirm whenever any
        // shard has persistent subscribers of the topic.
        let any_durable = durable.iter().any(|d| *d);
        let confirm = confirm.filter(|_| any_durable);
        for (shard, group, filter) in picks {
            if shard == self.me {
                // Re-routed elsewhere only when no member is left here; then that shard confirms.
                if let Some(req) = confirm {
                    if self.deliver_shared(message.clone(), group, filter, 0, None, Some((self.me, req)), now) {
                        confirms += 1;
                    }
                } else {
                    self.deliver_shared(message.clone(), group, filter, 0, None, None, now);
                }
            } else {
                confirms += usize::from(confirm.is_some());
                let confirm = confirm.map(|req| (self.me, req));
                self.mesh.send(shard, ShardMsg::PublishShared { message: message.clone(), group, filter, hops: 0, confirm });
            }
        }
        (matched, confirms, refused)
    }

    /// Send `message` to the retained store of its topic's owner shard. With `confirm`, the
    /// owner answers that request once the change is durable; returns whether an answer is due.
    fn retain(&self, message: Message, confirm: Option<u64>) -> bool {
        let owner = flux_core::shard_for(message.topic.as_str().as_bytes(), self.shard_count);
        if owner == self.me {
            self.apply_retain(message);
            return false;
        }
        self.mesh.send(owner, ShardMsg::RetainSet { message, req: confirm });
        confirm.is_some()
    }

    /// Set or clear a retained message this shard owns, and log the change.
    fn apply_retain(&self, message: Message) {
        if self.log.is_some() {
            let record = if message.payload.is_empty() {
                Record::RetainedClear { topic: message.topic.as_str().to_owned() }
            } else {
                Record::RetainedSet { message: durable::stored_message(&message, &self.clock) }
            };
            self.append(record);
        }
        let mut st = self.state.borrow_mut();
        if message.payload.is_empty() {
            st.retained.remove(&message.topic);
        } else {
            let topic = message.topic.clone();
            st.retained.insert(&topic, message);
        }
    }

    /// Deliver to this shard's plain subscribers of the message's topic.
    fn deliver_local(&self, message: &Message, now: Instant) {
        let mut hits: Vec<(SessKey, TopicFilter)> = Vec::new();
        self.state.borrow().local.for_each_match(&message.topic, |f, k| hits.push((*k, f.clone())));
        hits.sort_unstable_by_key(|(k, _)| *k);
        let mut i = 0;
        while i < hits.len() {
            let key = hits[i].0;
            let end = hits[i..].iter().position(|(k, _)| *k != key).map_or(hits.len(), |p| i + p);
            if let Some(entry) = self.entry(key) {
                let delivery = {
                    let e = entry.borrow();
                    merge_delivery(&e.session, message, hits[i..end].iter().map(|(_, f)| f.as_str()))
                };
                if let Some(d) = delivery {
                    self.deliver_to(&entry, d, now);
                }
            }
            i = end;
        }
    }

    /// Deliver to one local member of a shared group (round-robin, online members first); if
    /// none is left here, send it back to another shard of the group, which then answers
    /// `confirm`. Returns whether it was sent on (with `confirm`).
    #[allow(clippy::too_many_arguments)]
    fn deliver_shared(
        &self,
        message: Message,
        group: Arc<str>,
        filter: TopicFilter,
        hops: u8,
        exclude: Option<SessKey>,
        confirm: Option<(ShardId, u64)>,
        now: Instant,
    ) -> bool {
        let candidate = {
            let mut st = self.state.borrow_mut();
            let State { shared_local, entries, .. } = &mut *st;
            shared_local.get_mut(&(group.clone(), filter.clone())).and_then(|m| {
                let n = m.members.len();
                let mut offline = None;
                for step in 0..n {
                    let k = m.members[(m.cursor + step) % n];
                    if Some(k) == exclude {
                        continue;
                    }
                    let online = entries.get(&k).is_some_and(|e| e.borrow().conn.is_some());
                    if online {
                        m.cursor = (m.cursor + step + 1) % n;
                        return Some(k);
                    }
                    offline.get_or_insert(k);
                }
                offline
            })
        };
        let text = format!("$share/{group}/{filter}");
        if let Some(entry) = candidate.and_then(|k| self.entry(k)) {
            let delivery = {
                let e = entry.borrow();
                merge_delivery(&e.session, &message, std::iter::once(text.as_str()))
            };
            if let Some(mut d) = delivery {
                d.shared = Some((group, filter));
                self.deliver_to(&entry, d, now);
            }
            return false;
        }
        let next = if usize::from(hops) < usize::from(self.shard_count) {
            self.state.borrow_mut().routes.pick_shared(&group, &filter, Some(self.me))
        } else {
            None
        };
        match next {
            Some(shard) => {
                self.mesh.send(shard, ShardMsg::PublishShared { message, group, filter, hops: hops + 1, confirm });
                confirm.is_some()
            }
            None => {
                self.stats.dropped_shared_no_member.set(self.stats.dropped_shared_no_member.get() + 1);
                tracing::debug!(%group, %filter, "shared subscription group has no member left; message dropped");
                false
            }
        }
    }

    fn redispatch_shared(&self, d: Delivery, exclude: Option<SessKey>, now: Instant) {
        if let Some((group, filter)) = d.shared {
            self.deliver_shared(d.message, group, filter, 0, exclude, None, now);
        }
    }

    fn deliver_to(&self, entry: &Rc<RefCell<SessionEntry>>, delivery: Delivery, now: Instant) {
        let mut e = entry.borrow_mut();
        if delivery.qos == QoS::AtMostOnce {
            if let Some(c) = &e.conn {
                if c.buffered_bytes() > self.limits.max_outbound_buffer_bytes {
                    self.stats.dropped_slow_consumer.set(self.stats.dropped_slow_consumer.get() + 1);
                    return;
                }
            }
        }
        let mut out = Outbox::default();
        match e.session.deliver(delivery, now, &mut out) {
            DeliverOutcome::Sent | DeliverOutcome::Queued => {
                self.stats.delivered.set(self.stats.delivered.get() + 1);
            }
            DeliverOutcome::Dropped(DropReason::QueueFull) => {
                let n = self.stats.dropped_queue_full.get() + 1;
                self.stats.dropped_queue_full.set(n);
                let per_session = e.session.stats.dropped_queue_full;
                if per_session.is_power_of_two() {
                    tracing::warn!(client_id = %e.session.client_id(), dropped = per_session,
                        max_queued_messages = self.limits.max_queued_messages,
                        max_queued_bytes = self.limits.max_queued_bytes,
                        "session queue full; QoS 1/2 message dropped");
                }
            }
            DeliverOutcome::Dropped(_) => {}
        }
        let journaled = self.write_journal(&mut e);
        self.send_to(&e, &out.packets, None, journaled);
    }

    /// Add a session's new subscriptions to the tables, wait until every shard's route table has
    /// them (so nothing published after the SUBACK can miss them) and gather the retained
    /// messages each subscription asks for; then send the SUBACK and those retained messages in
    /// one step, so a message published after the client saw its SUBACK cannot overtake them.
    pub async fn subscribe(&self, key: SessKey, conn_id: u64, added: Vec<Subscribed>, suback: SubAck, now: Instant) {
        let mut waits = Vec::new();
        let mut refused_queue = Vec::new();
        for (i, s) in added.iter().enumerate() {
            match queues::queue_filter(&s.subscription.filter) {
                Some(Ok(qs)) => waits.push(self.queue_subscribe(key, s, qs)),
                Some(Err(())) => refused_queue.push(i),
                None if s.existed => {}
                None => waits.extend(self.add_subscription(key, &s.subscription.filter)),
            }
        }
        let mut suback = suback;
        if !refused_queue.is_empty() {
            // A `$queue/` or `$q/` filter whose queue name or bound filter is invalid.
            let mut j = 0;
            for r in suback.reasons.iter_mut() {
                if r.is_error() {
                    continue;
                }
                if refused_queue.contains(&j) {
                    *r = ReasonCode::TopicFilterInvalid;
                }
                j += 1;
            }
        }
        for w in waits {
            w.done().await;
        }
        let mut retained = Vec::new();
        for s in &added {
            let sub = &s.subscription;
            let wanted = match sub.options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !s.existed,
                RetainHandling::DoNotSend => false,
            };
            // Retained messages are not sent for shared subscriptions (MQTT 5 4.8.2) nor for
            // queue consumers (a queue holds what was published while it existed).
            if wanted && sub.filter.group().is_none() && queues::queue_filter(&sub.filter).is_none() {
                for m in self.retained_matching(sub.filter.filter()).await {
                    retained.push(Delivery {
                        qos: m.qos.min(sub.options.qos),
                        retain: true,
                        subscription_ids: sub.id.into_iter().collect(),
                        shared: None,
                        queue: None,
                        message: m,
                    });
                }
            }
        }
        // From here on nothing awaits: SUBACK and retained messages leave together.
        let Some(entry) = self.entry(key) else { return };
        let conn = {
            let e = entry.borrow();
            // A SUBACK belongs to the connection that subscribed, not to one that took over since.
            e.conn.clone().filter(|_| e.conn_id == conn_id)
        };
        if let Some(c) = &conn {
            // The subscriptions were journalled when the SUBSCRIBE was handled.
            let logged = entry.borrow().logged;
            match self.log.as_ref().filter(|_| logged).map(|l| Hold::from_pending(l, l.all_appended())) {
                None => c.send([&Packet::SubAck(suback)]),
                Some(Ok(hold)) => c.send_after(hold, [&Packet::SubAck(suback)]),
                Some(Err(())) => c.fail_held(),
            }
        }
        let now = now.max(Instant::now());
        for d in retained {
            if !d.message.is_expired(now) {
                self.deliver_to(&entry, d, now);
            }
        }
    }

    pub fn unsubscribe(&self, key: SessKey, removed: &[SubscriptionFilter]) {
        for f in removed {
            if let (Some(_), SubscriptionFilter::Plain(t)) = (queues::queue_filter(f), f) {
                self.queue_unsubscribe(key, t.as_str());
            }
        }
        self.remove_subscriptions(key, removed);
    }

    /// Add a subscription to the tables; the gathers complete once every shard's route table
    /// has what it needs of it.
    fn add_subscription(&self, key: SessKey, filter: &SubscriptionFilter) -> Vec<Gather> {
        let mut waits = Vec::new();
        let logged = self.entry(key).is_some_and(|e| e.borrow().logged);
        if logged {
            let f = filter.filter().clone();
            let n = {
                let mut st = self.state.borrow_mut();
                let set = st.durable_local.entry(f.clone()).or_default();
                set.insert(key);
                set.len() as u32
            };
            waits.push(self.update_route(RouteKey::Durable(f), n));
        }
        let (route_key, members) = {
            let mut st = self.state.borrow_mut();
            match filter {
                SubscriptionFilter::Plain(f) => {
                    st.local.insert(f, key);
                    (RouteKey::Plain(f.clone()), st.local.count(f) as u32)
                }
                SubscriptionFilter::Shared { group, filter: f } => {
                    let m = st.shared_local.entry((group.clone(), f.clone())).or_default();
                    if !m.members.contains(&key) {
                        m.members.push(key);
                    }
                    let n = m.members.len() as u32;
                    (RouteKey::Shared { group: group.clone(), filter: f.clone() }, n)
                }
            }
        };
        waits.push(self.update_route(route_key, members));
        waits
    }

    fn remove_subscriptions(&self, key: SessKey, filters: &[SubscriptionFilter]) {
        for filter in filters.iter().filter(|f| queues::queue_filter(f).is_none()) {
            let durable = {
                let mut st = self.state.borrow_mut();
                let f = filter.filter();
                let left = st.durable_local.get_mut(f).and_then(|set| set.remove(&key).then_some(set.len() as u32));
                if left == Some(0) {
                    st.durable_local.remove(f);
                }
                left.map(|n| (f.clone(), n))
            };
            if let Some((f, n)) = durable {
                self.update_route(RouteKey::Durable(f), n);
            }
            let (route_key, members) = {
                let mut st = self.state.borrow_mut();
                match filter {
                    SubscriptionFilter::Plain(f) => {
                        st.local.remove(f, &key);
                        (RouteKey::Plain(f.clone()), st.local.count(f) as u32)
                    }
                    SubscriptionFilter::Shared { group, filter: f } => {
                        let k = (group.clone(), f.clone());
                        let n = match st.shared_local.get_mut(&k) {
                            Some(m) => {
                                m.members.retain(|x| *x != key);
                                m.members.len() as u32
                            }
                            None => 0,
                        };
                        if n == 0 {
                            st.shared_local.remove(&k);
                        }
                        (RouteKey::Shared { group: group.clone(), filter: f.clone() }, n)
                    }
                }
            };
            self.update_route(route_key, members);
        }
    }

    /// Record this shard's member count for `key` and tell the other shards when it matters:
    /// plain filters on 0 <-> 1 transitions, shared groups on every change (the count weighs the
    /// group's round-robin). A transition from 0 is acknowledged by every shard; the returned
    /// gather completes then.
    fn update_route(&self, key: RouteKey, members: u32) -> Gather {
        let mut st = self.state.borrow_mut();
        let previous = st.route_refs.get(&key).map_or(0, |r| r.members);
        let shared = matches!(key, RouteKey::Shared { .. });
        let changed = if shared { previous != members } else { (previous == 0) != (members == 0) };
        if !changed {
            if let Some(r) = st.route_refs.get_mut(&key) {
                r.members = members;
                return r.ready.clone();
            }
            return GatherState::new(0);
        }
        st.routes.set(&key, self.me, members);
        let others = usize::from(self.shard_count) - 1;
        let (ready, req) = if previous == 0 && others > 0 {
            st.next_req += 1;
            let req = st.next_req;
            let g = GatherState::new(others);
            st.pending.insert(req, g.clone());
            (g, Some(req))
        } else {
            let g = st.route_refs.get(&key).map_or_else(|| GatherState::new(0), |r| r.ready.clone());
            (g, None)
        };
        if members == 0 {
            st.route_refs.remove(&key);
        } else {
            st.route_refs.insert(key.clone(), RouteRef { members, ready: ready.clone() });
        }
        drop(st);
        for i in 0..self.shard_count {
            let shard = ShardId(i);
            if shard != self.me {
                self.mesh.send(shard, ShardMsg::RouteUpdate { key: key.clone(), shard: self.me, members, req });
            }
        }
        ready
    }

    /// Scatter-gather the retained messages matching `filter` from every shard.
    async fn retained_matching(&self, filter: &TopicFilter) -> Vec<Message> {
        let mut local = self.local_retained(filter);
        if self.shard_count == 1 {
            return local;
        }
        let me = self.me;
        let (_, gather) = self.ask_others(|req| ShardMsg::RetainQuery { filter: filter.clone(), reply_to: me, req });
        gather.done().await;
        local.extend(gather.take_messages());
        local
    }

    fn local_retained(&self, filter: &TopicFilter) -> Vec<Message> {
        // The tree walks only the branches the filter can match.
        let mut found = Vec::new();
        self.state.borrow().retained.for_each_match(filter, |_, m| found.push(m.clone()));
        found
    }

    /// The connection of session `key` ended. `publish_will`: abnormal close or DISCONNECT 0x04.
    pub fn connection_closed(&self, key: SessKey, conn_id: u64, publish_will: bool, now: Instant) {
        let Some(entry) = self.entry(key) else { return };
        let (will, ended, handoff, subs, deadlines, client_id) = {
            let mut e = entry.borrow_mut();
            if e.conn_id != conn_id || e.conn.is_none() {
                return;
            }
            let conn = e.conn.take();
            let mark = self.mark();
            let (will, ended) = e.session.detach(now, publish_will);
            let handoff = e.session.take_shared_undelivered();
            self.write_journal(&mut e);
            // The socket is shut only once the disconnect's records are durable: a client that
            // saw its connection close can count on the expiry clock having started.
            let _close_after = CloseAfter { broker: self, conn, mark };
            if e.logged {
                let client_id = e.session.client_id().to_string();
                if ended {
                    self.append(Record::SessionExpire { client_id });
                    e.logged = false;
                } else {
                    self.append(Record::SessionDisconnected {
                        client_id: client_id.clone(),
                        at_ms: self.clock.to_ms(now),
                        session_expiry_secs: e.session.session_expiry_secs(),
                    });
                    if let Some(w) = e.session.pending_will() {
                        self.append(Record::WillDelayed {
                            client_id,
                            publish_at_ms: self.clock.to_ms(w.publish_at),
                            will: durable::stored_message(&w.message, &self.clock),
                        });
                    }
                }
            }
            let subs = if ended { e.session.take_subscriptions() } else { Vec::new() };
            let deadlines: Vec<Instant> =
                e.session.expires_at().into_iter().chain(e.session.pending_will().map(|w| w.publish_at)).collect();
            (will, ended, handoff, subs, deadlines, e.session.client_id().clone())
        };
        if ended {
            self.remove_subscriptions(key, &subs);
            let mut st = self.state.borrow_mut();
            st.entries.remove(&key);
            st.by_client_id.remove(&client_id);
        } else {
            let mut st = self.state.borrow_mut();
            for d in deadlines {
                st.deadlines.insert((d, key));
            }
        }
        if let Some(w) = will {
            self.publish(w, now);
        }
        for d in handoff {
            self.redispatch_shared(d, Some(key), now);
        }
        self.queue_session_gone(key);
    }

    /// Close connections silent past 1.5 x keep alive, publish delayed wills that are due and
    /// end expired sessions. Called a few times a second.
    pub fn housekeeping(&self, now: Instant) {
        self.queues_tick(now);
        let silent: Vec<(Rc<Outbound>, Arc<str>)> = self
            .state
            .borrow()
            .entries
            .values()
            .filter_map(|e| {
                let e = e.borrow();
                let conn = e.conn.as_ref()?;
                conn.keep_alive_expired(now).then(|| (conn.clone(), e.session.client_id().clone()))
            })
            .collect();
        for (conn, client_id) in silent {
            tracing::info!(client_id = %client_id, "keep alive timeout; closing connection");
            conn.close(Some(ReasonCode::KeepAliveTimeout));
        }
        loop {
            let due = {
                let mut st = self.state.borrow_mut();
                match st.deadlines.first() {
                    Some(&(at, key)) if at <= now => {
                        st.deadlines.pop_first();
                        key
                    }
                    _ => break,
                }
            };
            let Some(entry) = self.entry(due) else { continue };
            let (will, expired) = {
                let mut e = entry.borrow_mut();
                let will = e.session.take_due_will(now);
                let expired = e.session.is_expired(now);
                if e.logged {
                    let client_id = e.session.client_id().to_string();
                    if expired {
                        self.append(Record::SessionExpire { client_id });
                        e.logged = false;
                    } else if will.is_some() {
                        self.append(Record::WillDone { client_id });
                    }
                }
                (will, expired)
            };
            if let Some(w) = will {
                self.publish(w, now);
            }
            if expired {
                let (subs, client_id) = {
                    let mut e = entry.borrow_mut();
                    (e.session.take_subscriptions(), e.session.client_id().clone())
                };
                self.remove_subscriptions(due, &subs);
                let mut st = self.state.borrow_mut();
                st.entries.remove(&due);
                st.by_client_id.remove(&client_id);
                tracing::debug!(client_id = %client_id, "session expired");
            }
        }
    }

    /// Tell every connected client the server is going away (MQTT 5: DISCONNECT 0x8B).
    pub fn shutdown(&self) {
        let conns: Vec<Rc<Outbound>> =
            self.state.borrow().entries.values().filter_map(|e| e.borrow().conn.clone()).collect();
        for c in conns {
            c.close(Some(ReasonCode::ServerShuttingDown));
        }
    }

    pub fn connected_sessions(&self) -> usize {
        self.state.borrow().entries.values().filter(|e| e.borrow().conn.is_some()).count()
    }

    /// Everything other shards sent us, in order per sender.
    pub fn on_shard_msgs(&self, from: ShardId, batch: Vec<ShardMsg>) {
        let now = Instant::now();
        for msg in batch {
            match msg {
                ShardMsg::Publish { message, confirm } => {
                    let mark = self.mark();
                    self.deliver_local(&message, now);
                    if let Some(req) = confirm {
                        self.confirm(from, req, mark);
                    }
                }
                ShardMsg::PublishShared { message, group, filter, hops, confirm } => {
                    let mark = self.mark();
                    let sent_on = self.deliver_shared(message, group, filter, hops, None, confirm, now);
                    if let (Some((to, req)), false) = (confirm, sent_on) {
                        self.confirm(to, req, mark);
                    }
                }
                ShardMsg::RouteUpdate { key, shard, members, req } => {
                    self.state.borrow_mut().routes.set(&key, shard, members);
                    if let Some(req) = req {
                        self.mesh.send(from, ShardMsg::Ack { req });
                    }
                }
                ShardMsg::Ack { req } => {
                    if !self.answer_pending_ack(req, None) {
                        self.reply(req, Vec::new());
                    }
                }
                ShardMsg::Failed { req, quota } => {
                    let reason = if quota { ReasonCode::QuotaExceeded } else { ReasonCode::UnspecifiedError };
                    // Publishes are confirmed with Failed; anything else records it and is answered.
                    if !self.answer_pending_ack(req, Some(reason)) {
                        self.state.borrow_mut().failed_reqs.insert(req);
                        self.reply(req, Vec::new());
                    }
                }
                ShardMsg::RetainSet { message, req } => {
                    let mark = self.mark();
                    self.apply_retain(message);
                    if let Some(req) = req {
                        self.confirm(from, req, mark);
                    }
                }
                ShardMsg::RetainQuery { filter, reply_to, req } => {
                    let messages = self.local_retained(&filter);
                    self.mesh.send(reply_to, ShardMsg::RetainReply { req, messages });
                }
                ShardMsg::RetainReply { req, messages } => self.reply(req, messages),
                ShardMsg::Handover(h) => (self.on_handover)(h),
                m @ (ShardMsg::QueueBind { .. }
                | ShardMsg::QueueAppend { .. }
                | ShardMsg::QueueAttach { .. }
                | ShardMsg::QueueDetach { .. }
                | ShardMsg::QueueDeliver { .. }
                | ShardMsg::QueueAck { .. }
                | ShardMsg::QueueUnbind { .. }
                | ShardMsg::AdminStats { .. }
                | ShardMsg::AdminStatsReply { .. }
                | ShardMsg::QueueAdmin { .. }
                | ShardMsg::AdminResult { .. }
                | ShardMsg::AdminMessages { .. }) => self.on_queue_msg(from, m, now),
            }
        }
    }

    fn reply(&self, req: u64, messages: Vec<Message>) {
        let gather = self.state.borrow().pending.get(&req).cloned();
        if let Some(g) = gather {
            if g.reply(messages) {
                self.state.borrow_mut().pending.remove(&req);
            }
        }
    }

    fn entry(&self, key: SessKey) -> Option<Rc<RefCell<SessionEntry>>> {
        self.state.borrow().entries.get(&key).cloned()
    }

    fn next_req(&self) -> u64 {
        let mut st = self.state.borrow_mut();
        st.next_req += 1;
        st.next_req
    }

    /// Send `make(req)` to shard `to`; the gather completes with its answer (`Ack`, `Failed`
    /// or an admin reply naming `req`).
    pub(crate) fn ask(&self, to: ShardId, make: impl FnOnce(u64) -> ShardMsg) -> (u64, Gather) {
        let g = GatherState::new(1);
        let req = self.next_req();
        self.state.borrow_mut().pending.insert(req, g.clone());
        self.mesh.send(to, make(req));
        (req, g)
    }

    /// Send `make(req)` to every other shard; the gather completes once all answered (at once
    /// with a single shard).
    pub(crate) fn ask_others(&self, make: impl Fn(u64) -> ShardMsg) -> (u64, Gather) {
        let others = usize::from(self.shard_count) - 1;
        let req = self.next_req();
        if others == 0 {
            return (req, GatherState::new(0));
        }
        let g = GatherState::new(others);
        self.state.borrow_mut().pending.insert(req, g.clone());
        for i in 0..self.shard_count {
            let shard = ShardId(i);
            if shard != self.me {
                self.mesh.send(shard, make(req));
            }
        }
        (req, g)
    }

    /// Buffer a record in this shard's log (no-op without a log).
    fn append(&self, record: Record) {
        if let Some(log) = &self.log {
            log.append(&record);
        }
    }

    fn mark(&self) -> Option<LogMark> {
        self.log.as_ref().map(|l| l.mark())
    }

    /// Write what a persistent session journalled (a session not logged journals nothing that
    /// needs keeping: its entries are dropped).
    /// Returns whether anything was written.
    fn write_journal(&self, e: &mut SessionEntry) -> bool {
        if !e.session.has_journal() {
            return false;
        }
        let journal = e.session.take_journal();
        let (Some(log), true) = (&self.log, e.logged) else { return false };
        let client_id = e.session.client_id();
        for entry in &journal {
            log.append(&durable::journal_record(client_id, entry, &self.clock));
        }
        true
    }

    /// What an acknowledgement of the work since `mark` must wait for here.
    fn pending_since(&self, mark: Option<LogMark>) -> Pending {
        match (&self.log, mark) {
            (Some(log), Some(mark)) => log.since(mark),
            _ => Pending::Nothing,
        }
    }

    fn hold_since(&self, mark: Option<LogMark>) -> Result<Option<Hold>, ()> {
        match (&self.log, mark) {
            (Some(log), Some(mark)) => Hold::from_pending(log, log.since(mark)),
            _ => Ok(None),
        }
    }

    /// Send `packets` to the session's connection (if attached), behind `extra` and, when the
    /// session just `journaled` records, behind their commit: everything sent to the client
    /// later (this step's packets, and any acknowledgement after them) then waits for them. If
    /// its records were refused the connection closes instead (what the packets acknowledge is
    /// not durable).
    fn send_to(&self, e: &SessionEntry, packets: &[Packet], extra: Option<Hold>, journaled: bool) {
        let Some(c) = &e.conn else { return };
        let hold = match (&self.log, journaled) {
            (Some(log), true) => Hold::from_pending(log, log.all_appended()),
            _ => Ok(None),
        };
        match hold {
            Ok(hold) => {
                if hold.is_some() {
                    c.send_after(hold, std::iter::empty());
                }
                if extra.is_some() || !packets.is_empty() {
                    c.send_after(extra, packets);
                }
            }
            Err(()) => {
                tracing::error!(client_id = %e.session.client_id(), "session state cannot be written to the log; closing connection");
                c.fail_held();
            }
        }
    }

    /// Answer request `req` of shard `to` once the work since `mark` is durable.
    fn confirm(&self, to: ShardId, req: u64, mark: Option<LogMark>) {
        match (&self.log, mark) {
            (Some(log), Some(mark)) => match log.since(mark) {
                Pending::Nothing => self.mesh.send(to, ShardMsg::Ack { req }),
                Pending::Commit(lsn) => log.confirm_after(lsn, to, req),
                Pending::Failed => self.mesh.send(to, ShardMsg::Failed { req, quota: false }),
            },
            _ => self.mesh.send(to, ShardMsg::Ack { req }),
        }
    }

    /// The shard's task that answers other shards' requests once this shard's log has
    /// committed what they asked for. Runs for the life of the shard.
    pub async fn run_confirmations(self: Rc<Self>) {
        let Some(log) = self.log.clone() else { return };
        loop {
            for (to, req, ok) in log.next_replies().await {
                self.mesh.send(to, if ok { ShardMsg::Ack { req } } else { ShardMsg::Failed { req, quota: false } });
            }
        }
    }
}

/// On drop, holds the closing connection's last bytes and socket shutdown behind the records
/// appended since `mark`.
struct CloseAfter<'a> {
    broker: &'a Broker,
    conn: Option<Rc<Outbound>>,
    mark: Option<LogMark>,
}

impl Drop for CloseAfter<'_> {
    fn drop(&mut self) {
        if let (Some(c), Ok(Some(hold))) = (&self.conn, self.broker.hold_since(self.mark)) {
            c.hold_close(hold);
        }
    }
}

fn protocol_level(s: &Session) -> u8 {
    if s.protocol().is_v5() {
        5
    } else {
        4
    }
}

/// The delivery of `message` to `session` over its matching subscriptions (by filter text):
/// the highest granted QoS, retain-as-published if any says so, every subscription identifier;
/// `None` when No Local excludes it.
fn merge_delivery<'a>(session: &Session, message: &Message, filters: impl Iterator<Item = &'a str>) -> Option<Delivery> {
    let mut qos = None::<QoS>;
    let mut retain = false;
    let mut ids = Vec::new();
    for text in filters {
        let Some(sub) = session.subscription(text) else { continue };
        if sub.options.no_local && message.publisher.as_deref() == Some(&**session.client_id()) {
            continue;
        }
        let q = message.qos.min(sub.options.qos);
        qos = Some(qos.map_or(q, |p| p.max(q)));
        retain |= sub.options.retain_as_published && message.retain;
        ids.extend(sub.id);
    }
    qos.map(|qos| Delivery { message: message.clone(), qos, retain, subscription_ids: ids, shared: None, queue: None })
}
