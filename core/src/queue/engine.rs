//! [`Queue`]: the state machine of one durable queue. See the module docs of [`crate::queue`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::config::{Dispatch, KeySource, Overflow, QueueConfig, QueueName};
use super::Offset;
use crate::session::Message;

/// The group every queue has, used by consumers that name none.
pub const DEFAULT_GROUP: &str = "default";

/// A consumer of a queue, named by the runtime (unique on the owner shard).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// One message handed to one consumer by [`Queue::dispatch`].
#[derive(Clone, Debug)]
pub struct Delivered {
    pub consumer: ConsumerId,
    pub offset: Offset,
    pub message: Message,
    /// 1 for the first delivery to this group, more for redeliveries.
    pub attempt: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// Rejected (or nacked without requeue, or timed out) `max_deliveries` times.
    Rejected,
    /// Older than the queue's message TTL.
    Expired,
    /// Dropped from the head of a full `drop-head` queue.
    Overflow,
}

/// A message leaving the queue for its dead-letter queue; the runtime appends it there.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub target: QueueName,
    pub message: Message,
    pub reason: DeadReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The queue is at `max_messages` or `max_bytes` and its overflow policy is reject-publish.
    #[error("queue is full")]
    Full,
}

/// A change to write to the owner shard's log; replayed with [`Queue::replay`].
#[derive(Clone, Debug)]
pub enum Journal {
    Appended { offset: Offset, message: Message, key: Option<Arc<str>>, at: Instant },
    /// `group` is done with `offset` (acknowledged, or dead-lettered).
    Done { group: Arc<str>, offset: Offset },
    /// Every message below `below` left the queue early (expired or dropped by overflow).
    Trimmed { below: Offset },
    GroupCreated { group: Arc<str> },
    /// `group` is done with every offset below `below` (checkpoints).
    Committed { group: Arc<str>, below: Offset },
}

/// Counters and gauges, for stats and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub published: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    pub dropped_overflow: u64,
    pub expired: u64,
    pub rejected_full: u64,
}

struct Entry {
    offset: Offset,
    message: Message,
    at: Instant,
    key: Option<Arc<str>>,
}

struct Pending {
    consumer: ConsumerId,
    deadline: Option<Instant>,
}

struct Group {
    name: Arc<str>,
    /// Every offset below is done for this group.
    committed: Offset,
    /// Lowest offset never handed to this group.
    next: Offset,
    /// Done offsets at or above `committed`.
    done: BTreeSet<Offset>,
    /// Delivered and not yet acknowledged.
    pending: BTreeMap<Offset, Pending>,
    /// Available again (rejected, timed out, released by a departed consumer, or deferred by
    /// key-affine dispatch), delivered before `next`.
    available: BTreeSet<Offset>,
    /// Deliveries so far and the consumer of the last one, per offset not yet done.
    attempts: HashMap<Offset, (u32, ConsumerId)>,
    consumers: Vec<ConsumerId>,
    cursor: usize,
    keys: HashMap<Arc<str>, ConsumerId>,
}

impl Group {
    fn new(name: Arc<str>, start: Offset) -> Group {
        Group {
            name,
            committed: start,
            next: start,
            done: BTreeSet::new(),
            pending: BTreeMap::new(),
            available: BTreeSet::new(),
            attempts: HashMap::new(),
            consumers: Vec::new(),
            cursor: 0,
            keys: HashMap::new(),
        }
    }

    fn mark_done(&mut self, offset: Offset) {
        self.attempts.remove(&offset);
        self.available.remove(&offset);
        if offset >= self.committed {
            self.done.insert(offset);
        }
        while self.done.remove(&self.committed) {
            self.committed += 1;
        }
    }
}

struct Consumer {
    group: usize,
    prefetch: usize,
    inflight: usize,
}

/// One queue. See the module docs.
pub struct Queue {
    name: QueueName,
    config: QueueConfig,
    entries: VecDeque<Entry>,
    /// Offset of `entries[0]` (or `next_offset` when empty).
    head: Offset,
    next_offset: Offset,
    bytes: usize,
    groups: Vec<Group>,
    consumers: HashMap<ConsumerId, Consumer>,
    journal: Vec<Journal>,
    dead: Vec<DeadLetter>,
    rng: u64,
    pub stats: QueueStats,
}

impl Queue {
    pub fn new(name: QueueName, config: QueueConfig) -> Queue {
        let seed = name.as_str().bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut q = Queue {
            name,
            config,
            entries: VecDeque::new(),
            head: 0,
            next_offset: 0,
            bytes: 0,
            groups: Vec::new(),
            consumers: HashMap::new(),
            journal: Vec::new(),
            dead: Vec::new(),
            rng: seed | 1,
            stats: QueueStats::default(),
        };
        q.group_index(DEFAULT_GROUP);
        q.journal.clear();
        q
    }

    pub fn name(&self) -> &QueueName {
        &self.name
    }
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }
    pub fn set_config(&mut self, config: QueueConfig) {
        self.config = config;
    }
    /// Messages in the queue (not yet done by every group).
    pub fn depth(&self) -> usize {
        self.entries.len()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Per group: (name, consumers, messages not yet done, when the oldest of them was appended).
    pub fn group_lag(&self) -> Vec<(Arc<str>, usize, u64, Option<Instant>)> {
        self.groups
            .iter()
            .map(|g| {
                let lag = self.next_offset.saturating_sub(g.committed).saturating_sub(g.done.len() as u64);
                let oldest = self.entry(g.committed.max(self.head)).map(|e| e.at);
                (g.name.clone(), g.consumers.len(), lag, oldest)
            })
            .collect()
    }

    /// Unacknowledged messages of a consumer.
    pub fn inflight_of(&self, consumer: ConsumerId) -> usize {
        self.consumers.get(&consumer).map_or(0, |c| c.inflight)
    }

    fn entry(&self, offset: Offset) -> Option<&Entry> {
        let i = usize::try_from(offset.checked_sub(self.head)?).ok()?;
        self.entries.get(i)
    }

    fn group_index(&mut self, name: &str) -> usize {
        if let Some(i) = self.groups.iter().position(|g| &*g.name == name) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        self.journal.push(Journal::GroupCreated { group: name.clone() });
        // A new group reads the whole queue as it is now.
        self.groups.push(Group::new(name, self.head));
        self.groups.len() - 1
    }

    /// Append a message. A full queue refuses it (reject-publish) or drops its oldest message
    /// (drop-head).
    pub fn publish(&mut self, message: Message, now: Instant) -> Result<Offset, PublishError> {
        let size = message.payload.len();
        while self.entries.len() >= self.config.max_messages.max(1)
            || (!self.entries.is_empty() && self.bytes + size > self.config.max_bytes)
        {
            match self.config.overflow {
                Overflow::RejectPublish => {
                    self.stats.rejected_full += 1;
                    return Err(PublishError::Full);
                }
                Overflow::DropHead => {
                    let below = self.head + 1;
                    self.stats.dropped_overflow += 1;
                    self.trim_early(below, DeadReason::Overflow);
                }
            }
        }
        if size > self.config.max_bytes && self.config.overflow == Overflow::RejectPublish {
            self.stats.rejected_full += 1;
            return Err(PublishError::Full);
        }
        let key = self.key_of(&message);
        let offset = self.next_offset;
        self.journal.push(Journal::Appended { offset, message: message.clone(), key: key.clone(), at: now });
        self.push_entry(Entry { offset, message, at: now, key });
        self.stats.published += 1;
        Ok(offset)
    }

    fn push_entry(&mut self, e: Entry) {
        if self.entries.is_empty() {
            self.head = e.offset;
        }
        self.bytes += e.message.payload.len();
        self.next_offset = e.offset + 1;
        self.entries.push_back(e);
    }

    fn key_of(&self, m: &Message) -> Option<Arc<str>> {
        match &self.config.dispatch {
            Dispatch::KeyAffine(KeySource::UserProperty(name)) => {
                m.properties.user_properties.iter().find(|(k, _)| k == name).map(|(_, v)| Arc::from(v.as_str()))
            }
            Dispatch::KeyAffine(KeySource::TopicLevel(n)) => m.topic.as_str().split('/').nth(*n).map(Arc::from),
            _ => None,
        }
    }

    /// A consumer joins `group` (created if new, reading from the oldest message kept) with room
    /// for `prefetch` unacknowledged messages (0: the queue's default).
    pub fn attach(&mut self, consumer: ConsumerId, group: &str, prefetch: u16) {
        self.detach(consumer);
        let g = self.group_index(group);
        let prefetch = if prefetch == 0 { self.config.default_prefetch } else { prefetch };
        self.consumers.insert(consumer, Consumer { group: g, prefetch: usize::from(prefetch.max(1)), inflight: 0 });
        if let Some(grp) = self.groups.get_mut(g) {
            grp.consumers.push(consumer);
        }
    }

    /// A consumer leaves (disconnect, unsubscribe): what it held unacknowledged is delivered
    /// again to the group's other consumers; its keys are reassigned.
    pub fn detach(&mut self, consumer: ConsumerId) {
        let Some(c) = self.consumers.remove(&consumer) else { return };
        let Some(g) = self.groups.get_mut(c.group) else { return };
        g.consumers.retain(|x| *x != consumer);
        g.keys.retain(|_, x| *x != consumer);
        let held: Vec<Offset> = g.pending.iter().filter(|(_, p)| p.consumer == consumer).map(|(o, _)| *o).collect();
        for o in held {
            g.pending.remove(&o);
            g.available.insert(o);
        }
    }

    /// The consumer acknowledged `offset`. False if it did not hold it (a late or duplicate ack).
    pub fn ack(&mut self, consumer: ConsumerId, offset: Offset) -> bool {
        let Some(gi) = self.take_pending(consumer, offset) else { return false };
        self.stats.acked += 1;
        self.finish(gi, offset);
        true
    }

    /// The consumer refused `offset`: it is delivered to another consumer of the group, or, after
    /// `max_deliveries`, dead-lettered.
    pub fn reject(&mut self, consumer: ConsumerId, offset: Offset) -> bool {
        self.nack(consumer, offset, true)
    }

    /// Negative acknowledgement: with `requeue`, delivered again (until `max_deliveries`);
    /// without, dead-lettered (or dropped when the queue has no dead-letter queue).
    pub fn nack(&mut self, consumer: ConsumerId, offset: Offset, requeue: bool) -> bool {
        let Some(gi) = self.take_pending(consumer, offset) else { return false };
        self.release(gi, offset, requeue);
        true
    }

    fn release(&mut self, gi: usize, offset: Offset, requeue: bool) {
        let Some(g) = self.groups.get_mut(gi) else { return };
        let attempts = g.attempts.get(&offset).map_or(0, |a| a.0);
        if requeue && attempts < self.config.max_deliveries.max(1) {
            g.available.insert(offset);
            return;
        }
        if let Some(e) = self.entry(offset) {
            let message = e.message.clone();
            self.dead_letter(message, DeadReason::Rejected);
        }
        self.finish(gi, offset);
    }

    fn take_pending(&mut self, consumer: ConsumerId, offset: Offset) -> Option<usize> {
        let gi = self.consumers.get(&consumer)?.group;
        let g = self.groups.get_mut(gi)?;
        if g.pending.get(&offset).map(|p| p.consumer) != Some(consumer) {
            return None;
        }
        g.pending.remove(&offset);
        if let Some(c) = self.consumers.get_mut(&consumer) {
            c.inflight = c.inflight.saturating_sub(1);
        }
        Some(gi)
    }

    /// Group `gi` is done with `offset`; journal it and drop what every group is done with.
    fn finish(&mut self, gi: usize, offset: Offset) {
        let Some(g) = self.groups.get_mut(gi) else { return };
        g.mark_done(offset);
        self.journal.push(Journal::Done { group: g.name.clone(), offset });
        self.trim_done();
    }

    fn trim_done(&mut self) {
        let low = self.groups.iter().map(|g| g.committed).min().unwrap_or(self.next_offset);
        while self.entries.front().is_some_and(|e| e.offset < low) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.message.payload.len();
            }
            self.head += 1;
        }
        if self.entries.is_empty() {
            self.head = self.next_offset;
        }
    }

    /// Messages below `below` leave early (expiry, overflow): dead-lettered, and every group is
    /// done with them.
    fn trim_early(&mut self, below: Offset, reason: DeadReason) {
        let mut removed = Vec::new();
        while self.entries.front().is_some_and(|e| e.offset < below) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.message.payload.len();
                removed.push(e.message);
            }
            self.head += 1;
        }
        if self.entries.is_empty() {
            self.head = self.next_offset.max(below);
        }
        for m in removed {
            self.dead_letter(m, reason);
        }
        self.journal.push(Journal::Trimmed { below });
        self.forget_below(below);
    }

    fn forget_below(&mut self, below: Offset) {
        for g in &mut self.groups {
            let gone: Vec<(Offset, ConsumerId)> =
                g.pending.range(..below).map(|(o, p)| (*o, p.consumer)).collect();
            for (o, c) in gone {
                g.pending.remove(&o);
                if let Some(c) = self.consumers.get_mut(&c) {
                    c.inflight = c.inflight.saturating_sub(1);
                }
            }
            g.available = g.available.split_off(&below);
            g.done = g.done.split_off(&below);
            g.attempts.retain(|o, _| *o >= below);
            g.committed = g.committed.max(below);
            g.next = g.next.max(below);
            while g.done.remove(&g.committed) {
                g.committed += 1;
            }
        }
    }

    fn dead_letter(&mut self, message: Message, reason: DeadReason) {
        match reason {
            DeadReason::Expired => self.stats.expired += 1,
            DeadReason::Rejected | DeadReason::Overflow => {}
        }
        if let Some(target) = self.config.dead_letter.clone().filter(|t| *t != self.name) {
            self.stats.dead_lettered += 1;
            self.dead.push(DeadLetter { target, message, reason });
        }
    }

    /// Ack timeouts (the message goes to another consumer, or is dead-lettered after
    /// `max_deliveries`) and message TTL. Call a few times a second.
    pub fn tick(&mut self, now: Instant) {
        if let Some(ttl) = self.config.message_ttl {
            let expired_below = self.entries.iter().take_while(|e| now.saturating_duration_since(e.at) >= ttl).count();
            if expired_below > 0 {
                let below = self.head + expired_below as u64;
                self.trim_early(below, DeadReason::Expired);
            }
        }
        for gi in 0..self.groups.len() {
            let late: Vec<(Offset, ConsumerId)> = match self.groups.get(gi) {
                Some(g) => g
                    .pending
                    .iter()
                    .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
                    .map(|(o, p)| (*o, p.consumer))
                    .collect(),
                None => continue,
            };
            for (offset, consumer) in late {
                if self.take_pending(consumer, offset).is_some() {
                    self.release(gi, offset, true);
                }
            }
        }
    }

    /// Hand out what the consumers have room for, per group, by the queue's dispatch strategy.
    /// Redeliveries come first, lowest offset first; then new messages in offset order.
    pub fn dispatch(&mut self, now: Instant) -> Vec<Delivered> {
        let mut out = Vec::new();
        for gi in 0..self.groups.len() {
            self.dispatch_group(gi, now, &mut out);
        }
        self.stats.delivered += out.len() as u64;
        out
    }

    fn dispatch_group(&mut self, gi: usize, now: Instant, out: &mut Vec<Delivered>) {
        // Offsets deferred in this call (key-affine: their consumer is full).
        let mut deferred = Vec::new();
        // A bound on the work of one call, whatever the backlog.
        for _ in 0..4096 {
            let Some(g) = self.groups.get(gi) else { return };
            if g.consumers.is_empty() {
                break;
            }
            let from_available = g.available.iter().find(|o| !deferred.contains(*o)).copied();
            let offset = match from_available {
                Some(o) => o,
                None if g.next < self.next_offset => g.next,
                None => break,
            };
            if offset < self.head || offset < g.committed || g.done.contains(&offset) {
                // Left the queue early meanwhile, or already done (replayed after a restart).
                let head = self.head;
                if let Some(g) = self.groups.get_mut(gi) {
                    g.available.remove(&offset);
                    if from_available.is_none() {
                        g.next = (offset + 1).max(head);
                    }
                }
                continue;
            }
            let Some(e) = self.entry(offset) else { break };
            let (message, key) = (e.message.clone(), e.key.clone());
            let last = g.attempts.get(&offset).map(|a| a.1);
            let Some(consumer) = self.pick(gi, key.as_ref(), last) else {
                if key.is_some() {
                    // Its key's consumer is full; other keys may go on.
                    if from_available.is_none() {
                        if let Some(g) = self.groups.get_mut(gi) {
                            g.available.insert(offset);
                            g.next += 1;
                        }
                    }
                    deferred.push(offset);
                    if deferred.len() >= 256 {
                        break;
                    }
                    continue;
                }
                break;
            };
            let deadline = self.config.ack_timeout.map(|t| now + t);
            let Some(g) = self.groups.get_mut(gi) else { return };
            if from_available.is_some() {
                g.available.remove(&offset);
            } else {
                g.next += 1;
            }
            let attempt = {
                let a = g.attempts.entry(offset).or_insert((0, consumer));
                a.0 += 1;
                a.1 = consumer;
                a.0
            };
            g.pending.insert(offset, Pending { consumer, deadline });
            if let Some(c) = self.consumers.get_mut(&consumer) {
                c.inflight += 1;
            }
            if attempt > 1 {
                self.stats.redelivered += 1;
            }
            out.push(Delivered { consumer, offset, message, attempt });
        }
    }

    /// The consumer of group `gi` for the next message, among those with room.
    fn pick(&mut self, gi: usize, key: Option<&Arc<str>>, avoid: Option<ConsumerId>) -> Option<ConsumerId> {
        let has_room = |c: &ConsumerId, consumers: &HashMap<ConsumerId, Consumer>| {
            consumers.get(c).is_some_and(|c| c.inflight < c.prefetch)
        };
        let consumers = &self.consumers;
        let g = self.groups.get_mut(gi)?;
        let n = g.consumers.len();
        if n == 0 {
            return None;
        }
        if let (Dispatch::KeyAffine(_), Some(key)) = (&self.config.dispatch, key) {
            if let Some(c) = g.keys.get(key) {
                return has_room(c, consumers).then_some(*c);
            }
            // A new key goes to the least loaded consumer and stays there while it lives.
            let c = *g.consumers.iter().min_by_key(|c| consumers.get(c).map_or(usize::MAX, |x| x.inflight))?;
            g.keys.insert(key.clone(), c);
            return has_room(&c, consumers).then_some(c);
        }
        let with_room: Vec<ConsumerId> = g.consumers.iter().copied().filter(|c| has_room(c, consumers)).collect();
        if with_room.is_empty() {
            return None;
        }
        // A redelivery goes elsewhere when another consumer has room.
        let choices: Vec<ConsumerId> = match avoid {
            Some(a) if with_room.len() > 1 => with_room.iter().copied().filter(|c| *c != a).collect(),
            _ => with_room,
        };
        let chosen = match self.config.dispatch {
            Dispatch::LeastInflight => choices.iter().copied().min_by_key(|c| consumers.get(c).map_or(0, |x| x.inflight)),
            Dispatch::Random => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                choices.get((self.rng % choices.len() as u64) as usize).copied()
            }
            Dispatch::RoundRobin | Dispatch::KeyAffine(_) => {
                // The next consumer after the cursor that is among the choices.
                let mut pick = None;
                for step in 0..n {
                    let c = g.consumers[(g.cursor + step) % n];
                    if choices.contains(&c) {
                        g.cursor = (g.cursor + step + 1) % n;
                        pick = Some(c);
                        break;
                    }
                }
                pick
            }
        };
        chosen
    }

    /// Remove every message (none is dead-lettered); what consumers hold is forgotten (a late
    /// ack is ignored). Returns how many were removed.
    pub fn purge(&mut self) -> usize {
        let removed = self.entries.len();
        self.entries.clear();
        self.bytes = 0;
        self.head = self.next_offset;
        let below = self.next_offset;
        self.journal.push(Journal::Trimmed { below });
        self.forget_below(below);
        removed
    }

    /// The changes to write to the log since the last call.
    pub fn take_journal(&mut self) -> Vec<Journal> {
        std::mem::take(&mut self.journal)
    }

    /// Messages for dead-letter queues since the last call.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead)
    }

    /// Apply a logged change (recovery). Consumers and what they held are not logged: after a
    /// restart every message not done is delivered again.
    pub fn replay(&mut self, entry: Journal) {
        match entry {
            Journal::Appended { offset, message, key, at } => {
                if offset >= self.next_offset {
                    if self.entries.is_empty() {
                        self.head = offset;
                        for g in &mut self.groups {
                            g.committed = g.committed.max(offset);
                            g.next = g.next.max(offset);
                        }
                    }
                    self.push_entry(Entry { offset, message, at, key });
                }
            }
            Journal::Done { group, offset } => {
                let gi = self.group_index(&group);
                if let Some(g) = self.groups.get_mut(gi) {
                    g.mark_done(offset);
                    g.next = g.next.max(g.committed);
                }
                self.trim_done();
            }
            Journal::Trimmed { below } => {
                while self.entries.front().is_some_and(|e| e.offset < below) {
                    if let Some(e) = self.entries.pop_front() {
                        self.bytes -= e.message.payload.len();
                    }
                    self.head += 1;
                }
                if self.entries.is_empty() {
                    self.head = self.next_offset.max(below);
                    self.next_offset = self.next_offset.max(below);
                }
                self.forget_below(below);
            }
            Journal::GroupCreated { group } => {
                self.group_index(&group);
            }
            Journal::Committed { group, below } => {
                let gi = self.group_index(&group);
                if let Some(g) = self.groups.get_mut(gi) {
                    if below > g.committed {
                        g.committed = below;
                        g.done = g.done.split_off(&below);
                        g.attempts.retain(|o, _| *o >= below);
                        g.available = g.available.split_off(&below);
                        while g.done.remove(&g.committed) {
                            g.committed += 1;
                        }
                    }
                    g.next = g.next.max(g.committed);
                }
                self.trim_done();
            }
        }
        self.journal.clear();
    }

    /// The whole state as journal entries (messages kept, groups, what each group is done with):
    /// replayed onto a new queue they rebuild this one. For the log's checkpoints.
    pub fn snapshot(&self) -> Vec<Journal> {
        let mut out = Vec::new();
        for g in &self.groups {
            out.push(Journal::GroupCreated { group: g.name.clone() });
        }
        if self.head > 0 {
            out.push(Journal::Trimmed { below: self.head });
        }
        for e in &self.entries {
            out.push(Journal::Appended { offset: e.offset, message: e.message.clone(), key: e.key.clone(), at: e.at });
        }
        for g in &self.groups {
            out.push(Journal::Committed { group: g.name.clone(), below: g.committed });
            for &o in &g.done {
                out.push(Journal::Done { group: g.name.clone(), offset: o });
            }
        }
        out
    }
}
