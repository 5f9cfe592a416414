//! Durable queues in the broker: bindings (replicated on every shard), the queues a shard owns
//! (`shard_for(queue name)`), MQTT consumers (`$queue/<name>`, `$queue/<name>/<filter>`,
//! `$q/<filter>`) and publishers (`$queue/<name>` topics and publishes matching a binding).
//!
//! Where things live:
//! - every shard: the binding table (filter -> queue names), so a publish is sent straight to the
//!   owners of the queues it matches;
//! - the owner shard: the `Queue` engine, its consumers (by shard and session) and its log records;
//! - the consumer's home shard: which of its sessions consume which queue (to detach them when
//!   they go, and to check a delivery still has its consumer).
//!
//! A message for a queue that arrives at a shard that does not own it is a programmer error: it
//! is logged and answered as failed, never applied.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flux_core::mqtt::QoS;
use flux_core::queue::{
    ColdRun, ConsumerId, Dispatch, QueueIo, SpillLoc, KeySource, Offset, Overflow, Queue, QueueConfig, QueueJournal, QueueName, DEFAULT_GROUP,
};
use flux_core::session::message::QueueTag;
use flux_core::session::{Delivery, DeliverOutcome, Message, Outbox, Subscribed};
use flux_core::topic::{SubscriptionFilter, TopicFilter};
use flux_core::ShardId;
use flux_wal::{Record, StoredQueueConfig};

use super::{Broker, SessKey};
use crate::durable::{self, WallClock};
use crate::msg::{QueueAdminOp, ShardMsg};
use crate::signal::{Gather, GatherState};

/// What became of a message for a queue on its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Appended {
    Stored,
    /// Full (reject-publish): the publisher is told 0x97.
    Full,
    /// No such queue (deleted meanwhile): stored nowhere.
    NoQueue,
}

/// A queue declared in the config file (`[[queue]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: QueueName,
    pub config: QueueConfig,
    pub filters: Vec<TopicFilter>,
}

/// A queue this shard owns.
pub struct OwnedQueue {
    pub queue: Queue,
    pub filters: Vec<TopicFilter>,
    /// Consumer -> (its shard, its session there).
    pub consumers: std::collections::HashMap<ConsumerId, (ShardId, SessKey)>,
}

/// One queue subscription of a session on this shard.
#[derive(Clone, Debug)]
pub struct QueueConsumer {
    pub name: QueueName,
    pub consumer: ConsumerId,
    /// The subscription's filter text (`$queue/...` or `$q/...`).
    pub text: String,
    pub qos: QoS,
}

/// What a subscription filter asks of the queue engine, if it is a queue subscription.
pub struct QueueSubscription {
    pub name: QueueName,
    /// Bind the queue to this filter (created if new).
    pub bind: Option<TopicFilter>,
}

/// `$queue/<name>`, `$queue/<name>/<filter>` or `$q/<filter>`; `None` for any other filter, and
/// for a malformed queue subscription (refused by the caller).
pub fn parse_queue_subscription(text: &str) -> Option<Result<QueueSubscription, ()>> {
    if let Some(rest) = text.strip_prefix("$queue/") {
        let (name, filter) = match rest.split_once('/') {
            Some((n, f)) => (n, Some(f)),
            None => (rest, None),
        };
        let Ok(name) = QueueName::new(name) else { return Some(Err(())) };
        let bind = match filter.map(TopicFilter::new) {
            None => None,
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => return Some(Err(())),
        };
        return Some(Ok(QueueSubscription { name, bind }));
    }
    if let Some(f) = text.strip_prefix("$q/") {
        let Ok(filter) = TopicFilter::new(f) else { return Some(Err(())) };
        let Ok(name) = QueueName::for_filter(&filter) else { return Some(Err(())) };
        return Some(Ok(QueueSubscription { name, bind: Some(filter) }));
    }
    None
}

/// The queue subscription a session's filter is, if it is one (never a shared subscription).
pub fn queue_filter(f: &SubscriptionFilter) -> Option<Result<QueueSubscription, ()>> {
    match f {
        SubscriptionFilter::Plain(f) => parse_queue_subscription(f.as_str()),
        SubscriptionFilter::Shared { .. } => None,
    }
}

/// The queue a `$queue/<name>` topic publishes straight into.
pub fn queue_topic(topic: &str) -> Option<QueueName> {
    QueueName::new(topic.strip_prefix("$queue/")?).ok()
}

pub fn stored_config(c: &QueueConfig) -> StoredQueueConfig {
    let (dispatch, key_property, key_level) = match &c.dispatch {
        Dispatch::RoundRobin => (0, None, None),
        Dispatch::Random => (1, None, None),
        Dispatch::LeastInflight => (2, None, None),
        Dispatch::KeyAffine(KeySource::UserProperty(p)) => (3, Some(p.clone()), None),
        Dispatch::KeyAffine(KeySource::TopicLevel(n)) => (4, None, Some(*n as u32)),
    };
    StoredQueueConfig {
        max_messages: c.max_messages as u64,
        max_bytes: c.max_bytes as u64,
        message_ttl_ms: c.message_ttl.map(|d| d.as_millis() as u64),
        drop_head: c.overflow == Overflow::DropHead,
        dead_letter: c.dead_letter.as_ref().map(|n| n.as_str().to_owned()),
        max_deliveries: c.max_deliveries,
        dispatch,
        key_property,
        key_level,
        ack_timeout_ms: c.ack_timeout.map(|d| d.as_millis() as u64),
        default_prefetch: c.default_prefetch,
    }
}

pub fn config_from_stored(s: &StoredQueueConfig) -> QueueConfig {
    let dispatch = match (s.dispatch, &s.key_property, s.key_level) {
        (1, _, _) => Dispatch::Random,
        (2, _, _) => Dispatch::LeastInflight,
        (3, Some(p), _) => Dispatch::KeyAffine(KeySource::UserProperty(p.clone())),
        (4, _, Some(n)) => Dispatch::KeyAffine(KeySource::TopicLevel(n as usize)),
        _ => Dispatch::RoundRobin,
    };
    QueueConfig {
        max_messages: usize::try_from(s.max_messages).unwrap_or(usize::MAX),
        max_bytes: usize::try_from(s.max_bytes).unwrap_or(usize::MAX),
        message_ttl: s.message_ttl_ms.map(Duration::from_millis),
        overflow: if s.drop_head { Overflow::DropHead } else { Overflow::RejectPublish },
        dead_letter: s.dead_letter.as_deref().and_then(|n| QueueName::parse_any(n).ok()),
        max_deliveries: s.max_deliveries,
        dispatch,
        ack_timeout: s.ack_timeout_ms.map(Duration::from_millis),
        default_prefetch: s.default_prefetch,
    }
}

/// The record of one queue journal entry.
pub fn queue_record(name: &QueueName, entry: &QueueJournal, clock: &WallClock) -> Record {
    let name = name.as_str().to_owned();
    match entry {
        QueueJournal::Appended { offset, message, key, at } => Record::QueueAppend {
            name,
            offset: *offset,
            message: durable::stored_message(message, clock),
            key: key.as_deref().map(str::to_owned),
            at_ms: clock.to_ms(*at),
        },
        QueueJournal::Done { group, offset } => Record::QueueDone { name, group: group.to_string(), offset: *offset },
        QueueJournal::DoneMany { group, offsets } => {
            Record::QueueDoneMany { name, group: group.to_string(), offsets: offsets.clone() }
        }
        QueueJournal::DoneRanges { group, ranges } => Record::QueueDoneRanges {
            name,
            group: group.to_string(),
            starts: ranges.iter().map(|r| r.0).collect(),
            ends: ranges.iter().map(|r| r.1).collect(),
        },
        QueueJournal::Trimmed { below } => Record::QueueTrim { name, below: *below },
        QueueJournal::GroupCreated { group } => Record::QueueGroup { name, group: group.to_string() },
        QueueJournal::Committed { group, below } => {
            Record::QueueCommitted { name, group: group.to_string(), below: *below }
        }
        QueueJournal::Cold(c) => Record::QueueColdRun {
            name,
            first: c.first,
            end: c.end,
            bytes: c.bytes,
            first_at_ms: clock.to_ms(c.first_at),
            last_at_ms: clock.to_ms(c.last_at),
            file: c.loc.file,
            pos: c.loc.pos,
            len: c.loc.len,
        },
        QueueJournal::Seek { group, to } => Record::QueueSeek { name, group: group.to_string(), to: *to },
    }
}

/// The declaration record of a queue (config and bindings).
pub fn declare_record(q: &OwnedQueue) -> Record {
    Record::QueueDeclare {
        name: q.queue.name().as_str().to_owned(),
        config: stored_config(q.queue.config()),
        filters: q.filters.iter().map(|f| f.as_str().to_owned()).collect(),
    }
}

/// A queue as the replay of a log rebuilds it.
pub struct ReplayedQueue {
    pub queue: Queue,
    pub filters: Vec<TopicFilter>,
}

/// Apply a queue record to the replay's queues; false if `record` is not a queue record.
pub fn replay_queue_record(
    queues: &mut std::collections::HashMap<String, ReplayedQueue>,
    record: &Record,
    clock: &WallClock,
) -> bool {
    match record {
        Record::QueueDeclare { name, config, filters } => {
            let Ok(qn) = QueueName::parse_any(name) else { return true };
            let config = config_from_stored(config);
            let filters: Vec<TopicFilter> = filters.iter().filter_map(|f| TopicFilter::new(f).ok()).collect();
            match queues.get_mut(name) {
                Some(r) => {
                    r.queue.set_config(config);
                    r.filters = filters;
                }
                None => {
                    queues.insert(name.clone(), ReplayedQueue { queue: Queue::new(qn, config), filters });
                }
            }
        }
        Record::QueueDelete { name } => {
            queues.remove(name);
        }
        Record::QueueAppend { name, offset, message, key, at_ms } => {
            if let (Some(r), Some(m)) = (queues.get_mut(name), durable::message_from_stored(message, clock, None)) {
                r.queue.replay(QueueJournal::Appended {
                    offset: *offset,
                    message: m,
                    key: key.as_deref().map(Arc::from),
                    at: clock.to_instant(*at_ms),
                });
            }
        }
        Record::QueueDone { name, group, offset } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::Done { group: Arc::from(group.as_str()), offset: *offset });
            }
        }
        Record::QueueTrim { name, below } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::Trimmed { below: *below });
            }
        }
        Record::QueueGroup { name, group } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::GroupCreated { group: Arc::from(group.as_str()) });
            }
        }
        Record::QueueCommitted { name, group, below } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::Committed { group: Arc::from(group.as_str()), below: *below });
            }
        }
        Record::QueueColdRun { name, first, end, bytes, first_at_ms, last_at_ms, file, pos, len } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::Cold(ColdRun {
                    first: *first,
                    end: *end,
                    bytes: *bytes,
                    first_at: clock.to_instant(*first_at_ms),
                    last_at: clock.to_instant(*last_at_ms),
                    loc: SpillLoc { file: *file, pos: *pos, len: *len },
                }));
            }
        }
        Record::QueueDoneMany { name, group, offsets } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::DoneMany { group: Arc::from(group.as_str()), offsets: offsets.clone() });
            }
        }
        Record::QueueDoneRanges { name, group, starts, ends } => {
            if let Some(r) = queues.get_mut(name) {
                let ranges = starts.iter().copied().zip(ends.iter().copied()).filter(|(s, e)| s < e).collect();
                r.queue.replay(QueueJournal::DoneRanges { group: Arc::from(group.as_str()), ranges });
            }
        }
        Record::QueueSeek { name, group, to } => {
            if let Some(r) = queues.get_mut(name) {
                r.queue.replay(QueueJournal::Seek { group: Arc::from(group.as_str()), to: *to });
            }
        }
        _ => return false,
    }
    true
}

fn new_queue(name: QueueName, config: QueueConfig, budget: usize) -> Queue {
    let mut q = Queue::new(name, config);
    q.set_resident_budget(budget);
    q
}

impl Broker {
    /// A queue's memory budget: `queue_memory_bytes` once spill files are open, unbounded before
    /// (recovery) and without a log.
    fn queue_budget(&self) -> usize {
        if self.spill.borrow().is_some() {
            self.limits.queue_memory_bytes
        } else {
            usize::MAX
        }
    }

    /// Open this shard's spill files (after the restore: the replayed queues name the runs to
    /// keep) and give every queue its memory budget.
    pub fn open_spill(&self, dir: std::path::PathBuf) -> std::io::Result<()> {
        let live: Vec<SpillLoc> =
            self.state.borrow().owned_queues.values().flat_map(|q| q.queue.spill_locs()).collect();
        let store = crate::spill::SpillStore::open(dir, &live)?;
        *self.spill.borrow_mut() = Some(Rc::new(store));
        let names: Vec<QueueName> = {
            let mut st = self.state.borrow_mut();
            for q in st.owned_queues.values_mut() {
                q.queue.set_resident_budget(self.limits.queue_memory_bytes);
            }
            st.owned_queues.keys().cloned().collect()
        };
        let now = Instant::now();
        for name in names {
            self.pump_queue(&name, now);
        }
        Ok(())
    }

    /// Hand the queue's I/O requests to the spill task (references to files are taken now, in
    /// order, so a release never overtakes a read asked for before it).
    fn queue_io(&self, name: &QueueName, io: Vec<QueueIo>) {
        let Some(store) = self.spill.borrow().clone() else {
            // Not open (yet): nothing is spilled, and nothing waits for a read.
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return };
            for i in io {
                match i {
                    QueueIo::Spill { run, .. } => q.queue.spill_failed(run),
                    QueueIo::Load { run, .. } => q.queue.load_failed(run),
                    QueueIo::DeadLetters { .. } | QueueIo::Released { .. } => {}
                }
            }
            return;
        };
        let after = self.log.as_ref().map_or(flux_wal::Lsn(0), |l| l.wal().next_lsn());
        let mut jobs = self.spill_jobs.borrow_mut();
        for i in io {
            match &i {
                QueueIo::Released { loc } => {
                    store.release(loc.file, after);
                    continue;
                }
                QueueIo::Load { loc, .. } | QueueIo::DeadLetters { loc, .. } => store.retain(loc.file),
                QueueIo::Spill { .. } => {}
            }
            jobs.push((name.clone(), i));
        }
        drop(jobs);
        self.spill_signal.notify();
    }

    /// Carry out spill I/O for the life of the shard, and delete spill files no longer needed.
    pub async fn run_spills(self: Rc<Self>) {
        loop {
            futures_lite::future::or(self.spill_signal.wait(), glommio::timer::sleep(Duration::from_secs(1))).await;
            let Some(store) = self.spill.borrow().clone() else { continue };
            let jobs = std::mem::take(&mut *self.spill_jobs.borrow_mut());
            for (name, io) in jobs {
                let b = self.clone();
                let store = store.clone();
                glommio::spawn_local(async move { b.spill_job(&store, name, io).await }).detach();
            }
            if let Some(log) = &self.log {
                store.collect(log.wal().durable_lsn()).await;
            }
        }
    }

    async fn spill_job(&self, store: &crate::spill::SpillStore, name: QueueName, io: QueueIo) {
        let clock = self.clock;
        match io {
            QueueIo::Spill { run, messages } => {
                let written = match crate::spill::encode_run(&name, &messages, &clock) {
                    Ok(bytes) => store.write(bytes).await,
                    Err(e) => Err(std::io::Error::other(e)),
                };
                drop(messages);
                let found = {
                    let mut st = self.state.borrow_mut();
                    match (st.owned_queues.get_mut(&name), &written) {
                        (Some(q), Ok(loc)) => {
                            q.queue.spilled(run, *loc);
                            true
                        }
                        (Some(q), Err(_)) => {
                            q.queue.spill_failed(run);
                            true
                        }
                        (None, _) => false,
                    }
                };
                match written {
                    Err(e) => self.spill_error("spill write failed; the run stays in memory", &name, &e.to_string()),
                    Ok(loc) if !found => store.release(loc.file, flux_wal::Lsn(0)),
                    Ok(_) => {}
                }
            }
            QueueIo::Load { run, loc } => {
                let read = store.read(loc).await.map_err(|e| e.to_string()).and_then(|b| crate::spill::decode_run(&b, &clock));
                store.release(loc.file, flux_wal::Lsn(0));
                let result = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(&name) else { return };
                    match read {
                        Ok(messages) => q.queue.loaded(run, messages),
                        Err(e) => {
                            q.queue.load_failed(run);
                            Err(e)
                        }
                    }
                };
                if let Err(e) = result {
                    self.spill_error("spilled run cannot be read back; retried", &name, &e);
                }
            }
            QueueIo::DeadLetters { loc, from, below, target, reason } => {
                let read = store.read(loc).await.map_err(|e| e.to_string()).and_then(|b| crate::spill::decode_run(&b, &clock));
                store.release(loc.file, flux_wal::Lsn(0));
                match read {
                    Ok(messages) => {
                        let now = Instant::now();
                        for j in messages {
                            if let QueueJournal::Appended { offset, message, .. } = j {
                                if (from..below).contains(&offset) {
                                    let m = flux_core::queue::death_marked(&message, &name, reason);
                                    self.route_to_queues_named(&target, m, now);
                                }
                            }
                        }
                    }
                    Err(e) => self.spill_error("dead letters of a spilled run lost", &name, &e),
                }
            }
            QueueIo::Released { .. } => {}
        }
        self.pump_queue(&name, Instant::now());
    }

    fn spill_error(&self, what: &str, name: &QueueName, error: &str) {
        let n = self.stats.spill_errors.get() + 1;
        self.stats.spill_errors.set(n);
        if n.is_power_of_two() {
            tracing::error!(queue = %name, error, errors = n, "{what}");
        }
    }

    fn queue_owner(&self, name: &QueueName) -> ShardId {
        flux_core::shard_for(name.as_str().as_bytes(), self.shard_count)
    }

    /// A queue from the config file: every shard binds its filters; the owner creates it (or
    /// takes the file's settings for a queue recovered from the log).
    pub fn declare_configured_queue(&self, name: QueueName, config: QueueConfig, filters: Vec<TopicFilter>) {
        for f in &filters {
            self.apply_queue_bind(&name, f);
        }
        if self.queue_owner(&name) != self.me {
            return;
        }
        let mut st = self.state.borrow_mut();
        let budget = self.queue_budget();
        let owned = st.owned_queues.entry(name.clone()).or_insert_with(|| OwnedQueue {
            queue: new_queue(name.clone(), config.clone(), budget),
            filters: Vec::new(),
            consumers: Default::default(),
        });
        owned.queue.set_config(config);
        for f in filters {
            if !owned.filters.contains(&f) {
                owned.filters.push(f);
            }
        }
        let record = declare_record(owned);
        drop(st);
        self.append(record);
    }

    /// Install the queues replayed from this shard's log; returns the binding broadcasts to await
    /// before accepting clients.
    pub fn restore_queues(&self, queues: std::collections::HashMap<String, ReplayedQueue>) -> Vec<Gather> {
        let mut waits = Vec::new();
        for (_, r) in queues {
            let name = r.queue.name().clone();
            for f in &r.filters {
                waits.push(self.broadcast_queue_bind(&name, f));
            }
            let (runs, spilled) = r.queue.run_counts();
            tracing::info!(queue = %name, depth = r.queue.depth(), runs, spilled, "queue restored from the WAL");
            let mut queue = r.queue;
            queue.set_resident_budget(self.queue_budget());
            self.state.borrow_mut().owned_queues.insert(
                name,
                OwnedQueue { queue, filters: r.filters, consumers: Default::default() },
            );
        }
        waits
    }

    fn apply_queue_bind(&self, name: &QueueName, filter: &TopicFilter) {
        let mut st = self.state.borrow_mut();
        st.queue_routes.insert(filter, name.clone());
    }

    /// Bind `name` to `filter` on every shard; the gather completes once all applied it.
    fn broadcast_queue_bind(&self, name: &QueueName, filter: &TopicFilter) -> Gather {
        self.apply_queue_bind(name, filter);
        self.ask_others(|req| ShardMsg::QueueBind { name: name.clone(), filter: filter.clone(), req: Some(req) }).1
    }

    /// On the owner: make sure the queue exists (default settings) and is bound to `filter`.
    /// False when it does not exist and `max_queues` forbids creating it.
    fn ensure_owned_queue(&self, name: &QueueName, filter: Option<&TopicFilter>) -> bool {
        let mut st = self.state.borrow_mut();
        if !st.owned_queues.contains_key(name) && st.owned_queues.len() >= self.limits.max_queues {
            drop(st);
            let n = self.stats.refused_queues.get() + 1;
            self.stats.refused_queues.set(n);
            if n.is_power_of_two() {
                tracing::warn!(queue = %name, max_queues = self.limits.max_queues, refused = n,
                    "queue not created: this shard owns max_queues queues");
            }
            return false;
        }
        let mut changed = false;
        let budget = self.queue_budget();
        let owned = st.owned_queues.entry(name.clone()).or_insert_with(|| {
            changed = true;
            tracing::info!(queue = %name, "queue created");
            OwnedQueue { queue: new_queue(name.clone(), QueueConfig::default(), budget), filters: Vec::new(), consumers: Default::default() }
        });
        if let Some(f) = filter {
            if !owned.filters.contains(f) {
                owned.filters.push(f.clone());
                changed = true;
            }
        }
        if changed {
            let record = declare_record(owned);
            drop(st);
            self.append(record);
        }
        true
    }

    /// A session subscribed to a queue filter: bind (and create) as asked, then attach it as a
    /// consumer. Returns the gather of the binding broadcast (the SUBACK waits for it, so a
    /// publish after the SUBACK reaches the queue).
    pub(crate) fn queue_subscribe(&self, key: SessKey, s: &Subscribed, qs: QueueSubscription) -> Gather {
        let wait = match &qs.bind {
            Some(f) => self.broadcast_queue_bind(&qs.name, f),
            None => GatherState::new(0),
        };
        let owner = self.queue_owner(&qs.name);
        let text = match &s.subscription.filter {
            SubscriptionFilter::Plain(f) => f.as_str().to_owned(),
            SubscriptionFilter::Shared { filter, .. } => filter.as_str().to_owned(),
        };
        let consumer = {
            let mut st = self.state.borrow_mut();
            st.next_consumer += 1;
            ConsumerId((u64::from(self.me.0) << 48) | st.next_consumer)
        };
        // A re-subscription replaces the consumer.
        self.queue_detach_text(key, &text);
        let qos = if s.subscription.options.qos == QoS::ExactlyOnce { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        self.state.borrow_mut().queue_consumers.entry(key).or_default().push(QueueConsumer {
            name: qs.name.clone(),
            consumer,
            text,
            qos,
        });
        let group: Arc<str> = Arc::from(s.group.as_deref().unwrap_or(DEFAULT_GROUP));
        // 0: the queue's own `prefetch` setting applies.
        let prefetch = 0;
        if owner == self.me {
            self.ensure_owned_queue(&qs.name, qs.bind.as_ref());
            self.on_queue_attach(qs.name, consumer, group, self.me, key, prefetch, Instant::now());
        } else {
            // The owner creates the queue (if new) on the attach, or on the binding.
            self.mesh.send(owner, ShardMsg::QueueAttach { name: qs.name, consumer, group, session: key, prefetch });
        }
        wait
    }

    /// The session unsubscribed from a queue filter.
    pub(crate) fn queue_unsubscribe(&self, key: SessKey, text: &str) {
        self.queue_detach_text(key, text);
    }

    fn queue_detach_text(&self, key: SessKey, text: &str) {
        let gone: Vec<QueueConsumer> = {
            let mut st = self.state.borrow_mut();
            let Some(list) = st.queue_consumers.get_mut(&key) else { return };
            let (gone, keep): (Vec<_>, Vec<_>) = list.drain(..).partition(|c| c.text == text);
            *list = keep;
            gone
        };
        for c in gone {
            self.send_queue_detach(c.name, c.consumer);
        }
    }

    /// The session's connection is gone (or the session ended): its queue consumers leave; what
    /// they held is delivered again. A persistent session attaches again when it resumes.
    pub(crate) fn queue_session_gone(&self, key: SessKey) {
        let gone = self.state.borrow_mut().queue_consumers.remove(&key).unwrap_or_default();
        for c in gone {
            self.send_queue_detach(c.name, c.consumer);
        }
    }

    fn send_queue_detach(&self, name: QueueName, consumer: ConsumerId) {
        let owner = self.queue_owner(&name);
        if owner == self.me {
            self.on_queue_detach(&name, consumer, Instant::now());
        } else {
            self.mesh.send(owner, ShardMsg::QueueDetach { name, consumer });
        }
    }

    /// A session resumed (or was restored): attach its queue subscriptions again.
    pub(crate) fn queue_resume(&self, key: SessKey, subs: Vec<Subscribed>) -> Vec<Gather> {
        let mut waits = Vec::new();
        for s in subs {
            if let Some(Ok(qs)) = queue_filter(&s.subscription.filter) {
                waits.push(self.queue_subscribe(key, &s, qs));
            }
        }
        waits
    }

    /// The client answered a queue delivery.
    pub fn queue_ack(&self, tag: QueueTag, accepted: bool) {
        let owner = self.queue_owner(&tag.queue);
        if owner == self.me {
            self.on_queue_ack(&tag.queue, tag.consumer, tag.offset, accepted, Instant::now());
        } else {
            self.mesh.send(owner, ShardMsg::QueueAck { name: tag.queue, consumer: tag.consumer, offset: tag.offset, accepted });
        }
    }

    /// Route `message` to the queues bound to its topic (or, for a `$queue/<name>` topic, to
    /// that queue alone). With `confirm`, each remote owner answers once the append is durable;
    /// a local refusal (queue full) comes back as `Err`. Returns (matched, answers to expect).
    pub(crate) fn route_to_queues(&self, message: &Message, confirm: Option<u64>, now: Instant) -> Result<(bool, usize), flux_core::mqtt::ReasonCode> {
        let direct = queue_topic(message.topic.as_str());
        let create = direct.is_some();
        let names: Vec<QueueName> = match direct {
            Some(n) => vec![n],
            None => {
                let st = self.state.borrow();
                if st.queue_routes.is_empty() {
                    return Ok((false, 0));
                }
                let mut v = Vec::new();
                st.queue_routes.for_each_match(&message.topic, |_, n| {
                    if !v.contains(n) {
                        v.push(n.clone());
                    }
                });
                v
            }
        };
        let mut confirms = 0;
        let mut refused = None;
        for name in &names {
            let owner = self.queue_owner(name);
            if owner == self.me {
                if self.queue_append_local(name, message.clone(), now, create) == Appended::Full {
                    refused = Some(flux_core::mqtt::ReasonCode::QuotaExceeded);
                }
            } else {
                confirms += usize::from(confirm.is_some());
                self.mesh.send(owner, ShardMsg::QueueAppend { name: name.clone(), message: message.clone(), confirm, create });
            }
        }
        match refused {
            Some(r) => Err(r),
            None => Ok((!names.is_empty(), confirms)),
        }
    }

    /// On the owner: append (with `create`, making the queue on first use).
    fn queue_append_local(&self, name: &QueueName, message: Message, now: Instant, create: bool) -> Appended {
        if !self.state.borrow().owned_queues.contains_key(name) {
            if !create {
                return Appended::NoQueue;
            }
            if !self.ensure_owned_queue(name, None) {
                return Appended::Full;
            }
        }
        let ok = {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return Appended::NoQueue };
            q.queue.publish(message, now).is_ok()
        };
        self.pump_later(name, now);
        if ok {
            Appended::Stored
        } else {
            tracing::debug!(queue = %name, "queue full; publish refused");
            Appended::Full
        }
    }

    /// Write the queue's journal, hand out what its consumers have room for, and move its dead
    /// letters on.
    /// As [`pump_queue`](Self::pump_queue), but the dispatch waits for the pump task, so a burst
    /// of acknowledgements and appends costs one dispatch. The journal is written now: an
    /// append's record must be in the log before its confirmation is asked for.
    fn pump_later(&self, name: &QueueName, now: Instant) {
        if !self.pumps_running.get() {
            return self.pump_queue(name, now);
        }
        let journal = self.state.borrow_mut().owned_queues.get_mut(name).map(|q| q.queue.take_journal()).unwrap_or_default();
        if self.log.is_some() {
            for j in &journal {
                self.append(queue_record(name, j, &self.clock));
            }
        }
        if self.dirty_queues.borrow_mut().insert(name.clone()) {
            self.pump_signal.notify();
        }
    }

    /// The pump task: dispatches the queues changed since it last ran. Runs for the life of
    /// the shard.
    pub async fn run_pumps(self: Rc<Self>) {
        self.pumps_running.set(true);
        loop {
            self.pump_signal.wait().await;
            let names: Vec<QueueName> = self.dirty_queues.borrow_mut().drain().collect();
            let now = Instant::now();
            for name in names {
                self.pump_queue(&name, now);
            }
        }
    }

    fn pump_queue(&self, name: &QueueName, now: Instant) {
        let (journal, deliveries, dead) = {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return };
            let deliveries: Vec<_> = q
                .queue
                .dispatch(now)
                .into_iter()
                .filter_map(|d| q.consumers.get(&d.consumer).map(|&(shard, session)| (d, shard, session)))
                .collect();
            (q.queue.take_journal(), deliveries, q.queue.take_dead_letters())
        };
        if self.log.is_some() {
            for j in &journal {
                self.append(queue_record(name, j, &self.clock));
            }
        }
        // After the journal: a release is durable once these records are.
        let io = self.state.borrow_mut().owned_queues.get_mut(name).map(|q| q.queue.take_io()).unwrap_or_default();
        if !io.is_empty() {
            self.queue_io(name, io);
        }
        for (d, shard, session) in deliveries {
            if shard == self.me {
                self.queue_deliver(name.clone(), d.consumer, session, d.offset, d.message, now);
            } else {
                self.mesh.send(
                    shard,
                    ShardMsg::QueueDeliver { name: name.clone(), consumer: d.consumer, session, offset: d.offset, message: d.message },
                );
            }
        }
        for dl in dead {
            let _ = self.route_to_queues_named(&dl.target, dl.message, now);
        }
    }

    fn route_to_queues_named(&self, target: &QueueName, message: Message, now: Instant) -> bool {
        let owner = self.queue_owner(target);
        if owner == self.me {
            self.queue_append_local(target, message, now, true) == Appended::Stored
        } else {
            self.mesh.send(owner, ShardMsg::QueueAppend { name: target.clone(), message, confirm: None, create: true });
            true
        }
    }

    /// On the consumer's shard: deliver a queue message to its session.
    fn queue_deliver(&self, name: QueueName, consumer: ConsumerId, session: SessKey, offset: Offset, message: Message, now: Instant) {
        let qos = {
            let st = self.state.borrow();
            st.queue_consumers.get(&session).and_then(|l| l.iter().find(|c| c.consumer == consumer)).map(|c| c.qos)
        };
        // The consumer left meanwhile: its detach (already sent) releases the message.
        let Some(qos) = qos else { return };
        let Some(entry) = self.entry(session) else { return };
        let delivery = Delivery {
            message,
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
            queue: Some(QueueTag { queue: name.clone(), consumer, offset }),
        };
        let outcome = {
            let mut e = entry.borrow_mut();
            let mut out = Outbox::default();
            let outcome = e.session.deliver(delivery, now, &mut out);
            let journaled = self.write_journal(&mut e);
            self.send_to(&e, &out.packets, None, journaled);
            outcome
        };
        if let DeliverOutcome::Dropped(reason) = outcome {
            tracing::debug!(queue = %name, ?reason, "queue delivery not taken by the session; released");
            self.queue_ack(QueueTag { queue: name, consumer, offset }, false);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_queue_attach(&self, name: QueueName, consumer: ConsumerId, group: Arc<str>, shard: ShardId, session: SessKey, prefetch: u16, now: Instant) {
        if !self.ensure_owned_queue(&name, None) {
            return;
        }
        {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(&name) else { return };
            q.queue.attach(consumer, &group, prefetch);
            q.consumers.insert(consumer, (shard, session));
        }
        self.pump_queue(&name, now);
    }

    fn on_queue_detach(&self, name: &QueueName, consumer: ConsumerId, now: Instant) {
        {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return };
            q.queue.detach(consumer);
            q.consumers.remove(&consumer);
        }
        self.pump_later(name, now);
    }

    fn on_queue_ack(&self, name: &QueueName, consumer: ConsumerId, offset: Offset, accepted: bool, now: Instant) {
        {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return };
            if accepted {
                q.queue.ack(consumer, offset);
            } else {
                q.queue.reject(consumer, offset);
            }
        }
        self.pump_later(name, now);
    }

    /// Queue messages from other shards.
    pub(crate) fn on_queue_msg(&self, from: ShardId, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::QueueBind { name, filter, req } => {
                self.apply_queue_bind(&name, &filter);
                if self.queue_owner(&name) == self.me {
                    self.ensure_owned_queue(&name, Some(&filter));
                }
                if let Some(req) = req {
                    self.mesh.send(from, ShardMsg::Ack { req });
                }
            }
            ShardMsg::QueueAppend { name, message, confirm, create } => {
                let mark = self.mark();
                if self.queue_owner(&name) != self.me {
                    tracing::error!(queue = %name, "queue append sent to a shard that does not own the queue");
                    if let Some(req) = confirm {
                        self.mesh.send(from, ShardMsg::Failed { req, quota: false });
                    }
                    return;
                }
                let outcome = self.queue_append_local(&name, message, now, create);
                if let Some(req) = confirm {
                    match outcome {
                        Appended::Full => self.mesh.send(from, ShardMsg::Failed { req, quota: true }),
                        Appended::Stored | Appended::NoQueue => self.confirm(from, req, mark),
                    }
                }
            }
            ShardMsg::QueueAttach { name, consumer, group, session, prefetch } => {
                self.on_queue_attach(name, consumer, group, from, session, prefetch, now)
            }
            ShardMsg::QueueDetach { name, consumer } => self.on_queue_detach(&name, consumer, now),
            ShardMsg::QueueDeliver { name, consumer, session, offset, message } => {
                self.queue_deliver(name, consumer, session, offset, message, now)
            }
            ShardMsg::QueueAck { name, consumer, offset, accepted } => {
                self.on_queue_ack(&name, consumer, offset, accepted, now)
            }
            ShardMsg::QueueUnbind { name, filter } => {
                self.state.borrow_mut().queue_routes.remove(&filter, &name);
            }
            ShardMsg::AdminStats { req } => {
                self.mesh.send(from, ShardMsg::AdminStatsReply { req, stats: self.queue_stats() });
            }
            ShardMsg::AdminStatsReply { req, stats } => {
                self.state.borrow_mut().admin_stats.entry(req).or_default().extend(stats);
                self.reply(req, Vec::new());
            }
            ShardMsg::QueueAdmin { name, op: QueueAdminOp::Front { max }, req } => {
                let messages = self.queue_front_local(&name, max, now);
                self.mesh.send(from, ShardMsg::AdminMessages { req, messages });
            }
            ShardMsg::QueueAdmin { name, op, req } => {
                let result = self.queue_admin_local(&name, op, now);
                self.mesh.send(from, ShardMsg::AdminResult { req, result });
            }
            ShardMsg::AdminMessages { req, messages } => {
                self.state.borrow_mut().admin_messages.insert(req, messages);
                self.reply(req, Vec::new());
            }
            ShardMsg::AdminResult { req, result } => {
                self.state.borrow_mut().admin_results.insert(req, result);
                self.reply(req, Vec::new());
            }
            _ => {}
        }
    }

    /// On the owner: carry out an admin change of queue `name`.
    fn queue_admin_local(&self, name: &QueueName, op: QueueAdminOp, now: Instant) -> Result<u64, String> {
        if self.queue_owner(name) != self.me {
            return Err(format!("shard {} does not own queue {name}", self.me));
        }
        match op {
            QueueAdminOp::Declare { config, filters } => {
                if !self.ensure_owned_queue(name, None) {
                    return Err(format!("shard {} already owns max_queues ({}) queues", self.me, self.limits.max_queues));
                }
                let record = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(name) else { return Err("queue vanished".into()) };
                    q.queue.set_config(config);
                    for f in filters {
                        if !q.filters.contains(&f) {
                            q.filters.push(f);
                        }
                    }
                    declare_record(q)
                };
                self.append(record);
                self.pump_queue(name, now);
                Ok(0)
            }
            QueueAdminOp::Delete => {
                let Some(q) = self.state.borrow_mut().owned_queues.remove(name) else {
                    return Err(format!("no queue {name}"));
                };
                self.append(Record::QueueDelete { name: name.as_str().to_owned() });
                let released = q.queue.spill_locs().into_iter().map(|loc| QueueIo::Released { loc }).collect();
                self.queue_io(name, released);
                self.unbind_everywhere(name, &q.filters);
                tracing::info!(queue = %name, depth = q.queue.depth(), "queue deleted");
                Ok(q.queue.depth() as u64)
            }
            QueueAdminOp::Unbind { filters } => {
                let record = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(name) else { return Err(format!("no queue {name}")) };
                    q.filters.retain(|f| !filters.contains(f));
                    declare_record(q)
                };
                self.append(record);
                self.unbind_everywhere(name, &filters);
                Ok(filters.len() as u64)
            }
            QueueAdminOp::Seek { group, offset, time_ms } => {
                let to = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(name) else { return Err(format!("no queue {name}")) };
                    let to = match (offset, time_ms) {
                        (Some(o), _) => o,
                        (None, Some(ms)) => q.queue.offset_at(self.clock.to_instant(ms)),
                        (None, None) => return Err("seek needs an offset or a time".into()),
                    };
                    q.queue.seek(&group, to)
                };
                self.pump_queue(name, now);
                tracing::info!(queue = %name, group, offset = to, "consumer group seeked");
                Ok(to)
            }
            QueueAdminOp::Front { .. } => Err("front is answered with messages".into()),
            QueueAdminOp::RemoveBelow { below } => {
                let removed = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(name) else { return Err(format!("no queue {name}")) };
                    q.queue.remove_below(below)
                };
                self.pump_queue(name, now);
                Ok(removed as u64)
            }
            QueueAdminOp::Purge => {
                let removed = {
                    let mut st = self.state.borrow_mut();
                    let Some(q) = st.owned_queues.get_mut(name) else { return Err(format!("no queue {name}")) };
                    q.queue.purge()
                };
                self.pump_queue(name, now);
                tracing::info!(queue = %name, removed, "queue purged");
                Ok(removed as u64)
            }
        }
    }

    /// Remove bindings here and on every other shard (no acknowledgement: a publish that still
    /// reaches the owner of a deleted queue is answered as stored nowhere, one that reaches an
    /// unbound queue is still stored, harmlessly).
    fn unbind_everywhere(&self, name: &QueueName, filters: &[TopicFilter]) {
        for f in filters {
            self.state.borrow_mut().queue_routes.remove(f, name);
            for i in 0..self.shard_count {
                let shard = ShardId(i);
                if shard != self.me {
                    self.mesh.send(shard, ShardMsg::QueueUnbind { name: name.clone(), filter: f.clone() });
                }
            }
        }
    }

    /// Admin: stats of every queue on every shard.
    pub async fn admin_list(&self) -> Vec<QueueStatsView> {
        let mut all = self.queue_stats();
        if self.shard_count == 1 {
            return all;
        }
        let (req, g) = self.ask_others(|req| ShardMsg::AdminStats { req });
        g.done().await;
        all.extend(self.state.borrow_mut().admin_stats.remove(&req).unwrap_or_default());
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Admin: run `op` on the owner of `name` and wait for its answer.
    pub async fn admin_queue_op(&self, name: &QueueName, op: QueueAdminOp) -> Result<u64, String> {
        let owner = self.queue_owner(name);
        if let QueueAdminOp::Declare { filters, .. } = &op {
            // Every shard has the bindings before the answer: a publish after it is stored.
            for f in filters {
                self.broadcast_queue_bind(name, f).done().await;
            }
        }
        if owner == self.me {
            return self.queue_admin_local(name, op, Instant::now());
        }
        let (req, g) = self.ask(owner, |req| ShardMsg::QueueAdmin { name: name.clone(), op, req });
        g.done().await;
        self.state.borrow_mut().admin_results.remove(&req).unwrap_or_else(|| Err("no answer".into()))
    }

    /// On the owner: the oldest messages of `name` in memory (a spilled head is asked for).
    fn queue_front_local(&self, name: &QueueName, max: usize, now: Instant) -> Vec<(Offset, Message)> {
        let front = {
            let mut st = self.state.borrow_mut();
            let Some(q) = st.owned_queues.get_mut(name) else { return Vec::new() };
            q.queue.front(max)
        };
        self.pump_queue(name, now);
        front
    }

    /// Admin: the oldest messages of `name`, from its owner.
    async fn admin_front(&self, name: &QueueName, max: usize) -> Vec<(Offset, Message)> {
        let owner = self.queue_owner(name);
        if owner == self.me {
            return self.queue_front_local(name, max, Instant::now());
        }
        let (req, g) = self.ask(owner, |req| ShardMsg::QueueAdmin { name: name.clone(), op: QueueAdminOp::Front { max }, req });
        g.done().await;
        self.state.borrow_mut().admin_messages.remove(&req).unwrap_or_default()
    }

    /// Append `message` to queue `target` (created if missing) and wait until its owner has it
    /// durably. False if refused (full, or the owner's log failed).
    async fn append_durably(&self, target: &QueueName, message: Message) -> bool {
        let owner = self.queue_owner(target);
        if owner == self.me {
            let ok = self.queue_append_local(target, message, Instant::now(), true) == Appended::Stored;
            return ok && self.flush_log().await;
        }
        let (req, g) = self.ask(owner, |req| ShardMsg::QueueAppend { name: target.clone(), message, confirm: Some(req), create: true });
        g.done().await;
        !self.state.borrow_mut().failed_reqs.remove(&req)
    }

    async fn flush_log(&self) -> bool {
        match &self.log {
            Some(log) => log.flush().await,
            None => true,
        }
    }

    /// Admin: move up to `max` messages of (dead-letter) queue `from` to `to`, or each to the
    /// queue it was dead-lettered from (`x-death-queue`). Each is appended durably before it is
    /// removed from `from`: a crash in between leaves it in both (at least once). Returns how
    /// many moved.
    pub async fn admin_redrive(&self, from: &QueueName, to: Option<QueueName>, max: usize) -> Result<u64, String> {
        let mut moved = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while (moved as usize) < max && Instant::now() < deadline {
            let batch = self.admin_front(from, (max - moved as usize).min(512)).await;
            if batch.is_empty() {
                let empty = self.admin_list().await.iter().find(|s| s.name == from.as_str()).is_none_or(|s| s.depth == 0);
                if empty {
                    break;
                }
                // The head is on disk and being read back.
                glommio::timer::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let mut below = None;
            for (offset, m) in batch {
                let target = match &to {
                    Some(t) => t.clone(),
                    None => {
                        let origin = m.properties.user_properties.iter().find(|(k, _)| k == flux_core::queue::DEATH_QUEUE_PROPERTY);
                        match origin.and_then(|(_, v)| QueueName::parse_any(v).ok()) {
                            Some(t) => t,
                            None => return Err(format!("message at offset {offset} names no queue it came from; give --to")),
                        }
                    }
                };
                if !self.append_durably(&target, m).await {
                    break;
                }
                below = Some(offset + 1);
                moved += 1;
            }
            let Some(below) = below else { return Err(format!("queue refused the re-driven message ({moved} moved)")) };
            self.admin_queue_op(from, QueueAdminOp::RemoveBelow { below }).await?;
        }
        tracing::info!(queue = %from, moved, "dead letters re-driven");
        Ok(moved)
    }

    /// Ack timeouts and TTLs of the queues this shard owns.
    pub(crate) fn queues_tick(&self, now: Instant) {
        let names: Vec<QueueName> = self.state.borrow().owned_queues.keys().cloned().collect();
        for name in names {
            if let Some(q) = self.state.borrow_mut().owned_queues.get_mut(&name) {
                q.queue.tick(now);
            }
            self.pump_queue(&name, now);
        }
    }

    /// Checkpoint copies of the owned queues (declaration and state).
    pub(crate) fn queue_checkpoint_records(&self) -> (Vec<Record>, u64) {
        let st = self.state.borrow();
        let mut records = Vec::new();
        let mut bytes = 0u64;
        for q in st.owned_queues.values() {
            records.push(declare_record(q));
            for j in q.queue.snapshot() {
                if let QueueJournal::Appended { message, .. } = &j {
                    bytes += message.payload.len() as u64 + 64;
                }
                records.push(queue_record(q.queue.name(), &j, &self.clock));
            }
        }
        (records, bytes)
    }

    /// Stats of every queue this shard owns, for the admin endpoint and logs.
    pub fn queue_stats(&self) -> Vec<QueueStatsView> {
        let now = Instant::now();
        let st = self.state.borrow();
        st.owned_queues
            .values()
            .map(|q| QueueStatsView {
                name: q.queue.name().to_string(),
                depth: q.queue.depth(),
                bytes: q.queue.bytes(),
                consumers: q.queue.consumer_count(),
                groups: q
                    .queue
                    .group_lag()
                    .into_iter()
                    .map(|(g, c, lag, oldest)| {
                        let age = oldest.filter(|_| lag > 0).map(|t| now.saturating_duration_since(t).as_millis() as u64);
                        (g.to_string(), c, lag, age)
                    })
                    .collect(),
                stats: q.queue.stats.clone(),
                resident_bytes: q.queue.resident_bytes(),
                runs: q.queue.run_counts(),
            })
            .collect()
    }
}

/// What `queue_stats` reports per queue.
#[derive(Clone, Debug)]
pub struct QueueStatsView {
    pub name: String,
    pub depth: usize,
    pub bytes: usize,
    pub consumers: usize,
    /// (group, consumers, messages not yet done, age of the oldest of them in ms)
    pub groups: Vec<(String, usize, u64, Option<u64>)>,
    pub stats: flux_core::queue::QueueStats,
    /// Memory of the messages held in memory (estimate), and (runs, of which spilled to disk).
    pub resident_bytes: usize,
    pub runs: (usize, usize),
}
