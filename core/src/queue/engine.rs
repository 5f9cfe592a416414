//! [`Queue`]: the state machine of one durable queue. See the module docs of [`crate::queue`].
//!
//! # Memory: runs, resident and spilled
//! Messages are kept in *runs* of consecutive offsets (at most [`RUN_MESSAGES`] messages and
//! [`RUN_BYTES`] of payload each). A run is resident (its messages in memory) or spilled (only
//! its description in memory: offsets, bytes, times, and where the runtime stored it). When the
//! resident runs of a queue cost more than its budget ([`Queue::set_resident_budget`]) the
//! engine asks the runtime ([`Io::Spill`]) to store the runs furthest from any reader, newest
//! first, and drops their messages once told they are durable ([`Queue::spilled`]). A group that
//! reaches a spilled run asks for it back ([`Io::Load`], then [`Queue::loaded`]); the run after
//! the one being read is asked for ahead of time. A loaded run keeps its place on disk, so
//! evicting it again costs no write. A backlog of any length thus costs about 100 bytes of memory
//! per run (0.1 byte per message), not its messages.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::config::{Dispatch, KeySource, Overflow, QueueConfig, QueueName};
use super::Offset;
use crate::session::message::Publication;
use crate::session::Message;

/// The group every queue has, used by consumers that name none.
pub const DEFAULT_GROUP: &str = "default";

/// Messages in one run at most.
pub const RUN_MESSAGES: u64 = 1024;
/// Payload bytes in one run at most (a larger message has a run of its own).
pub const RUN_BYTES: usize = 256 << 10;
/// Acknowledgements journalled together at most (see [`Queue::take_journal`]).
pub const ACK_LOG_BATCH: usize = 1024;
/// Offsets in one `DoneMany` at most (a record stays well under the log's frame limits).
const DONE_MANY_MAX: usize = 4096;
/// Memory a queue's resident messages may cost before runs are spilled (the default budget).
pub const DEFAULT_RESIDENT_BYTES: usize = 8 << 20;
/// What a resident message costs beyond its payload and topic (message, entry, bookkeeping).
const ENTRY_OVERHEAD: usize = 192;
/// User properties added to a dead-lettered message: the queue it left, and why.
pub const DEATH_QUEUE_PROPERTY: &str = "x-death-queue";
pub const DEATH_REASON_PROPERTY: &str = "x-death-reason";

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

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::Overflow => "overflow",
        }
    }
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

/// Where the runtime stored a spilled run; the engine only keeps it and hands it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpillLoc {
    pub file: u64,
    pub pos: u64,
    pub len: u64,
}

/// A spilled run as checkpoints log it: offsets `first..end` (the stored run may hold earlier
/// ones too, which are ignored), their payload bytes, the append times of its first and last
/// message, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColdRun {
    pub first: Offset,
    pub end: Offset,
    pub bytes: u64,
    pub first_at: Instant,
    pub last_at: Instant,
    pub loc: SpillLoc,
}

/// A change to write to the owner shard's log; replayed with [`Queue::replay`].
#[derive(Clone, Debug)]
pub enum Journal {
    Appended { offset: Offset, message: Message, key: Option<Arc<str>>, at: Instant },
    /// `group` is done with `offset` (acknowledged, or dead-lettered).
    Done { group: Arc<str>, offset: Offset },
    /// `group` is done with each of `offsets` (a batch of acknowledgements out of order).
    DoneMany { group: Arc<str>, offsets: Vec<Offset> },
    /// `group` is done with every offset of each half-open range (checkpoints).
    DoneRanges { group: Arc<str>, ranges: Vec<(Offset, Offset)> },
    /// Every message below `below` left the queue early (expired, dropped by overflow, purged,
    /// moved by a re-drive).
    Trimmed { below: Offset },
    GroupCreated { group: Arc<str> },
    /// `group` is done with every offset below `below` (checkpoints).
    Committed { group: Arc<str>, below: Offset },
    /// A spilled run (checkpoints).
    Cold(ColdRun),
    /// `group` starts over at `to`: done with everything below, nothing at or above.
    Seek { group: Arc<str>, to: Offset },
}

/// I/O the engine needs from the runtime; see [`Queue::take_io`].
#[derive(Clone, Debug)]
pub enum Io {
    /// Store these messages (a run, offset order) durably, then call [`Queue::spilled`] with
    /// `run` and where they are (or [`Queue::spill_failed`]).
    Spill { run: u64, messages: Vec<Journal> },
    /// Read the run at `loc` and hand its messages to [`Queue::loaded`] (or call
    /// [`Queue::load_failed`]).
    Load { run: u64, loc: SpillLoc },
    /// The messages `from..below` stored at `loc` left the queue while spilled: read them and
    /// append each to `target` (with [`Queue::dead_lettered`] to mark it).
    DeadLetters { loc: SpillLoc, from: Offset, below: Offset, target: QueueName, reason: DeadReason },
    /// No run refers to `loc` any more (after the ones above that name it are done).
    Released { loc: SpillLoc },
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
    /// Runs written to disk, and read back.
    pub spilled_runs: u64,
    pub loaded_runs: u64,
}

struct Entry {
    offset: Offset,
    message: Message,
    at: Instant,
    key: Option<Arc<str>>,
}

fn entry_cost(m: &Message) -> usize {
    m.payload.len() + m.topic.as_str().len() + ENTRY_OVERHEAD
}

enum Body {
    /// In memory. `loc`: an unchanged copy is also on disk (it was loaded back, or spilled while
    /// it stayed in use). `spilling`: a copy is being written.
    Resident { entries: VecDeque<Entry>, loc: Option<SpillLoc>, spilling: bool },
    /// Only on disk; `loading`: a read is under way.
    Cold { loc: SpillLoc, loading: bool },
}

struct Run {
    /// Unique, and growing with the offsets (runs are made in offset order).
    id: u64,
    first: Offset,
    end: Offset,
    /// Payload bytes of `first..end` (for a spilled run cut at the front, an estimate).
    bytes: usize,
    /// Memory the messages cost while resident.
    cost: usize,
    first_at: Instant,
    last_at: Instant,
    body: Body,
}

impl Run {
    fn len(&self) -> u64 {
        self.end - self.first
    }
    fn resident(&self) -> bool {
        matches!(self.body, Body::Resident { .. })
    }
    fn loc(&self) -> Option<SpillLoc> {
        match &self.body {
            Body::Resident { loc, .. } => *loc,
            Body::Cold { loc, .. } => Some(*loc),
        }
    }
}
/// Offsets as half-open ranges: acknowledgements out of order are mostly runs of neighbours, so
/// a long stretch acknowledged past one held message costs one entry, not one per offset.
#[derive(Default)]
struct OffsetSet {
    ranges: BTreeMap<Offset, Offset>,
    count: u64,
}

impl OffsetSet {
    fn contains(&self, o: Offset) -> bool {
        self.ranges.range(..=o).next_back().is_some_and(|(_, &end)| end > o)
    }

    fn insert(&mut self, o: Offset) {
        if self.contains(o) {
            return;
        }
        self.count += 1;
        let before = self.ranges.range(..o).next_back().filter(|(_, &end)| end == o).map(|(&s, _)| s);
        let after = self.ranges.get(&(o + 1)).copied();
        match (before, after) {
            (Some(s), Some(e)) => {
                self.ranges.remove(&(o + 1));
                self.ranges.insert(s, e);
            }
            (Some(s), None) => {
                self.ranges.insert(s, o + 1);
            }
            (None, Some(e)) => {
                self.ranges.remove(&(o + 1));
                self.ranges.insert(o, e);
            }
            (None, None) => {
                self.ranges.insert(o, o + 1);
            }
        }
    }

    /// If a range starts at `at`, remove it and return its end.
    fn take_from(&mut self, at: Offset) -> Option<Offset> {
        let end = self.ranges.remove(&at)?;
        self.count -= end - at;
        Some(end)
    }

    /// Forget every offset below `below`.
    fn cut_below(&mut self, below: Offset) {
        while let Some((&s, &e)) = self.ranges.iter().next() {
            if s >= below {
                break;
            }
            self.ranges.remove(&s);
            if e > below {
                self.ranges.insert(below, e);
                self.count -= below - s;
                break;
            }
            self.count -= e - s;
        }
    }

    fn len(&self) -> u64 {
        self.count
    }

    fn clear(&mut self) {
        self.ranges.clear();
        self.count = 0;
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn ranges(&self) -> impl Iterator<Item = (Offset, Offset)> + '_ {
        self.ranges.iter().map(|(&s, &e)| (s, e))
    }
}

struct Pending {
    consumer: ConsumerId,
    deadline: Option<Instant>,
}

struct Group {
    name: Arc<str>,
    /// Every offset below is done for this group.
    committed: Offset,
    /// `committed` as last journalled.
    logged_committed: Offset,
    /// Lowest offset never handed to this group.
    next: Offset,
    /// Done offsets at or above `committed`.
    done: OffsetSet,
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
            logged_committed: start,
            next: start,
            done: OffsetSet::default(),
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
        if let Some(end) = self.done.take_from(self.committed) {
            self.committed = end;
        }
    }
}

struct Consumer {
    group: usize,
    prefetch: usize,
    inflight: usize,
}

/// Where an offset's message is.
enum Slot<'a> {
    Here(&'a Entry),
    /// In the spilled run at this index of `runs`.
    Spilled(usize),
    /// In no run (left the queue).
    Gone,
}

/// A copy of `m` marked as dead-lettered from `queue` (user properties `x-death-queue` and
/// `x-death-reason`, replacing earlier ones), as the dead-letter queue stores it.
pub fn death_marked(m: &Message, queue: &QueueName, reason: DeadReason) -> Message {
    let mut properties = m.properties.clone();
    properties.user_properties.retain(|(k, _)| k != DEATH_QUEUE_PROPERTY && k != DEATH_REASON_PROPERTY);
    properties.user_properties.push((DEATH_QUEUE_PROPERTY.to_owned(), queue.as_str().to_owned()));
    properties.user_properties.push((DEATH_REASON_PROPERTY.to_owned(), reason.as_str().to_owned()));
    Arc::new(Publication {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos,
        retain: m.retain,
        properties,
        expires_at: m.expires_at,
        publisher: m.publisher.clone(),
    })
}

/// One queue. See the module docs.
pub struct Queue {
    name: QueueName,
    config: QueueConfig,
    /// In offset order, not overlapping (gaps only after a replay that lacked some offsets).
    runs: VecDeque<Run>,
    next_run: u64,
    /// Lowest offset kept (the first run's `first`, or `next_offset` when empty).
    head: Offset,
    next_offset: Offset,
    /// Messages kept, and their payload bytes.
    depth: u64,
    bytes: usize,
    /// Memory of the resident runs, of those among them being written, and the budget.
    resident: usize,
    spilling: usize,
    budget: usize,
    run_messages: u64,
    /// Spilling and loading wait for the next `tick` after a failure.
    io_paused: bool,
    groups: Vec<Group>,
    consumers: HashMap<ConsumerId, Consumer>,
    journal: Vec<Journal>,
    dead: Vec<DeadLetter>,
    io: Vec<Io>,
    /// Acknowledgements not journalled yet (see [`Queue::take_journal`]): how many, the groups'
    /// offsets done out of order among them, and whether the next take writes them anyway.
    acks_unlogged: usize,
    unlogged_done: Vec<(usize, Offset)>,
    log_acks_now: bool,
    rng: u64,
    pub stats: QueueStats,
}

impl Queue {
    pub fn new(name: QueueName, config: QueueConfig) -> Queue {
        let seed = name.as_str().bytes().fold(0x9e37_79b9_7f4a_7c15u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let mut q = Queue {
            name,
            config,
            runs: VecDeque::new(),
            next_run: 0,
            head: 0,
            next_offset: 0,
            depth: 0,
            bytes: 0,
            resident: 0,
            spilling: 0,
            budget: DEFAULT_RESIDENT_BYTES,
            run_messages: RUN_MESSAGES,
            io_paused: false,
            groups: Vec::new(),
            consumers: HashMap::new(),
            journal: Vec::new(),
            dead: Vec::new(),
            io: Vec::new(),
            acks_unlogged: 0,
            unlogged_done: Vec::new(),
            log_acks_now: false,
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
    /// Memory the resident messages may cost before runs are spilled (see the module docs).
    pub fn set_resident_budget(&mut self, bytes: usize) {
        self.budget = bytes;
    }
    /// Messages per run at most ([`RUN_MESSAGES`] unless changed; smaller runs are for tests).
    pub fn set_run_messages(&mut self, n: u64) {
        self.run_messages = n.max(1);
    }
    /// Messages in the queue (not yet done by every group).
    pub fn depth(&self) -> usize {
        usize::try_from(self.depth).unwrap_or(usize::MAX)
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Estimated memory of the resident messages.
    pub fn resident_bytes(&self) -> usize {
        self.resident
    }
    /// Runs kept, and how many of them are spilled.
    pub fn run_counts(&self) -> (usize, usize) {
        (self.runs.len(), self.runs.iter().filter(|r| !r.resident()).count())
    }
    /// Where every run that has a copy on disk is (the runtime keeps those files).
    pub fn spill_locs(&self) -> Vec<SpillLoc> {
        self.runs.iter().filter_map(Run::loc).collect()
    }
    pub fn next_offset(&self) -> Offset {
        self.next_offset
    }
    /// Lowest offset kept.
    pub fn head(&self) -> Offset {
        self.head
    }
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Per group: (name, consumers, messages not yet done, when the oldest of them was appended).
    pub fn group_lag(&self) -> Vec<(Arc<str>, usize, u64, Option<Instant>)> {
        self.groups
            .iter()
            .map(|g| {
                let lag = self.next_offset.saturating_sub(g.committed).saturating_sub(g.done.len());
                let oldest = self.appended_at(g.committed.max(self.head));
                (g.name.clone(), g.consumers.len(), lag, oldest)
            })
            .collect()
    }

    /// When the message at `offset` was appended (for a spilled one, its run's first message).
    fn appended_at(&self, offset: Offset) -> Option<Instant> {
        let r = self.runs.get(self.run_index(offset)?)?;
        match self.slot(offset) {
            Slot::Here(e) => Some(e.at),
            _ => Some(r.first_at),
        }
    }

    /// The first offset appended at or after `at` (`next_offset` if none): where a seek by time
    /// starts. Within a spilled run, the run's first offset (at most [`RUN_MESSAGES`] earlier).
    pub fn offset_at(&self, at: Instant) -> Offset {
        for r in &self.runs {
            if r.last_at < at {
                continue;
            }
            return match &r.body {
                Body::Resident { entries, .. } => entries.iter().find(|e| e.at >= at).map_or(r.end, |e| e.offset),
                Body::Cold { .. } => r.first,
            };
        }
        self.next_offset
    }

    /// Unacknowledged messages of a consumer.
    pub fn inflight_of(&self, consumer: ConsumerId) -> usize {
        self.consumers.get(&consumer).map_or(0, |c| c.inflight)
    }

    fn run_index(&self, offset: Offset) -> Option<usize> {
        let i = self.runs.partition_point(|r| r.end <= offset);
        let r = self.runs.get(i)?;
        (r.first <= offset).then_some(i)
    }

    fn run_by_id(&self, id: u64) -> Option<usize> {
        self.runs.binary_search_by_key(&id, |r| r.id).ok()
    }

    fn slot(&self, offset: Offset) -> Slot<'_> {
        let Some(i) = self.run_index(offset) else { return Slot::Gone };
        let Some(r) = self.runs.get(i) else { return Slot::Gone };
        match &r.body {
            Body::Resident { entries, .. } => {
                match usize::try_from(offset - r.first).ok().and_then(|k| entries.get(k)) {
                    Some(e) => Slot::Here(e),
                    None => Slot::Gone,
                }
            }
            Body::Cold { .. } => Slot::Spilled(i),
        }
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
        while self.depth >= self.config.max_messages.max(1) as u64
            || (self.depth > 0 && self.bytes + size > self.config.max_bytes)
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
        let cost = entry_cost(&e.message);
        let size = e.message.payload.len();
        if self.runs.is_empty() {
            self.head = e.offset;
        }
        self.depth += 1;
        self.bytes += size;
        self.resident += cost;
        self.next_offset = e.offset + 1;
        if let Some(r) = self.runs.back_mut() {
            if r.end == e.offset && r.len() < self.run_messages && r.bytes + size <= RUN_BYTES {
                if let Body::Resident { entries, loc: None, spilling: false } = &mut r.body {
                    r.end += 1;
                    r.bytes += size;
                    r.cost += cost;
                    r.last_at = r.last_at.max(e.at);
                    entries.push_back(e);
                    return;
                }
            }
        }
        let id = self.next_run;
        self.next_run += 1;
        self.runs.push_back(Run {
            id,
            first: e.offset,
            end: e.offset + 1,
            bytes: size,
            cost,
            first_at: e.at,
            last_at: e.at,
            body: Body::Resident { entries: VecDeque::from([e]), loc: None, spilling: false },
        });
    }

    /// Remove every message below `below`. With `dead`, resident messages are returned and
    /// spilled ones asked for (when the queue dead-letters) to be dead-lettered with that
    /// reason; the second value counts the spilled ones.
    fn cut_below(&mut self, below: Offset, dead: Option<DeadReason>) -> (Vec<Message>, u64) {
        let mut removed = Vec::new();
        let mut cold = 0u64;
        let mut io = Vec::new();
        let target = dead.and(self.dead_letter_target());
        while let Some(r) = self.runs.front_mut() {
            if r.first >= below {
                break;
            }
            let n = below.min(r.end) - r.first;
            let whole = r.end <= below;
            let run_len = r.len().max(1);
            match &mut r.body {
                Body::Resident { entries, spilling, .. } => {
                    for _ in 0..n {
                        let Some(e) = entries.pop_front() else { break };
                        let c = entry_cost(&e.message);
                        r.cost = r.cost.saturating_sub(c);
                        r.bytes = r.bytes.saturating_sub(e.message.payload.len());
                        self.bytes = self.bytes.saturating_sub(e.message.payload.len());
                        self.resident = self.resident.saturating_sub(c);
                        if *spilling {
                            self.spilling = self.spilling.saturating_sub(c);
                        }
                        if dead.is_some() {
                            removed.push(e.message);
                        }
                    }
                }
                Body::Cold { loc, .. } => {
                    let cut = if whole { r.bytes } else { r.bytes / run_len as usize * n as usize };
                    r.bytes -= cut.min(r.bytes);
                    self.bytes = self.bytes.saturating_sub(cut);
                    cold += n;
                    if let (Some(reason), Some(target)) = (dead, &target) {
                        io.push(Io::DeadLetters { loc: *loc, from: r.first, below: r.first + n, target: target.clone(), reason });
                    }
                }
            }
            self.depth -= n;
            r.first += n;
            if !whole {
                break;
            }
            if let Some(r) = self.runs.pop_front() {
                if let Body::Resident { spilling: true, .. } = r.body {
                    self.spilling = self.spilling.saturating_sub(r.cost);
                }
                if r.resident() {
                    self.resident = self.resident.saturating_sub(r.cost);
                }
                if let Some(loc) = r.loc() {
                    io.push(Io::Released { loc });
                }
            }
        }
        self.head = self.runs.front().map_or(self.next_offset.max(below), |r| r.first);
        self.io.extend(io);
        (removed, cold)
    }

    fn dead_letter_target(&self) -> Option<QueueName> {
        self.config.dead_letter.clone().filter(|t| *t != self.name)
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
        match self.slot(offset) {
            Slot::Here(e) => {
                let message = e.message.clone();
                self.dead_letter(message, DeadReason::Rejected);
            }
            Slot::Spilled(i) => {
                // Dead-lettered from the stored copy (at most once, like the other dead letters).
                if let (Some(target), Some(loc)) = (self.dead_letter_target(), self.runs.get(i).and_then(Run::loc)) {
                    self.stats.dead_lettered += 1;
                    self.io.push(Io::DeadLetters { loc, from: offset, below: offset + 1, target, reason: DeadReason::Rejected });
                }
            }
            Slot::Gone => {}
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

    /// Group `gi` is done with `offset`; drop what every group is done with. Journalled in
    /// batches (see [`take_journal`](Self::take_journal)).
    fn finish(&mut self, gi: usize, offset: Offset) {
        let Some(g) = self.groups.get_mut(gi) else { return };
        g.mark_done(offset);
        if offset >= g.committed {
            self.unlogged_done.push((gi, offset));
        }
        self.acks_unlogged += 1;
        self.trim_done();
    }

    /// Journal the acknowledgements since the last time: per group its committed offset, and
    /// what it finished above it.
    fn log_acks(&mut self) {
        for g in &mut self.groups {
            if g.committed > g.logged_committed {
                self.journal.push(Journal::Committed { group: g.name.clone(), below: g.committed });
                g.logged_committed = g.committed;
            }
        }
        let mut per_group: Vec<Vec<Offset>> = vec![Vec::new(); self.groups.len()];
        for (gi, offset) in std::mem::take(&mut self.unlogged_done) {
            if let (Some(g), Some(list)) = (self.groups.get(gi), per_group.get_mut(gi)) {
                if offset >= g.committed && g.done.contains(offset) {
                    list.push(offset);
                }
            }
        }
        for (g, offsets) in self.groups.iter().zip(per_group) {
            match offsets.len() {
                0 => {}
                1 => self.journal.push(Journal::Done { group: g.name.clone(), offset: offsets[0] }),
                _ => {
                    for chunk in offsets.chunks(DONE_MANY_MAX) {
                        self.journal.push(Journal::DoneMany { group: g.name.clone(), offsets: chunk.to_vec() });
                    }
                }
            }
        }
        self.acks_unlogged = 0;
        self.log_acks_now = false;
    }

    fn trim_done(&mut self) {
        let low = self.groups.iter().map(|g| g.committed).min().unwrap_or(self.next_offset);
        if low > self.head {
            self.cut_below(low, None);
        }
    }

    /// Messages below `below` leave early (expiry, overflow): dead-lettered, and every group is
    /// done with them.
    fn trim_early(&mut self, below: Offset, reason: DeadReason) {
        let (removed, cold) = self.cut_below(below, Some(reason));
        for m in removed {
            self.dead_letter(m, reason);
        }
        if cold > 0 {
            if reason == DeadReason::Expired {
                self.stats.expired += cold;
            }
            if self.dead_letter_target().is_some() {
                self.stats.dead_lettered += cold;
            }
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
            g.done.cut_below(below);
            g.attempts.retain(|o, _| *o >= below);
            g.committed = g.committed.max(below);
            g.next = g.next.max(below);
            if let Some(end) = g.done.take_from(g.committed) {
                g.committed = end;
            }
        }
    }

    fn dead_letter(&mut self, message: Message, reason: DeadReason) {
        match reason {
            DeadReason::Expired => self.stats.expired += 1,
            DeadReason::Rejected | DeadReason::Overflow => {}
        }
        if let Some(target) = self.dead_letter_target() {
            self.stats.dead_lettered += 1;
            let message = death_marked(&message, &self.name, reason);
            self.dead.push(DeadLetter { target, message, reason });
        }
    }

    /// Ack timeouts (the message goes to another consumer, or is dead-lettered after
    /// `max_deliveries`) and message TTL. Call a few times a second. Spilled messages expire
    /// with their run's newest one.
    pub fn tick(&mut self, now: Instant) {
        self.io_paused = false;
        self.log_acks_now = true;
        if let Some(ttl) = self.config.message_ttl {
            let expired = |at: Instant| now.saturating_duration_since(at) >= ttl;
            let mut below = self.head;
            for r in &self.runs {
                match &r.body {
                    Body::Resident { entries, .. } => {
                        let n = entries.iter().take_while(|e| expired(e.at)).count() as u64;
                        below = r.first + n;
                        if n < r.len() {
                            break;
                        }
                    }
                    Body::Cold { .. } if expired(r.last_at) => below = r.end,
                    Body::Cold { .. } => break,
                }
            }
            if below > self.head {
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
            self.read_ahead(gi);
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
            let skip = offset < self.head || offset < g.committed || g.done.contains(offset);
            let slot = if skip { Slot::Gone } else { self.slot(offset) };
            let (message, key) = match slot {
                Slot::Here(e) => (e.message.clone(), e.key.clone()),
                Slot::Spilled(i) => {
                    self.request_load(i);
                    break;
                }
                Slot::Gone => {
                    // Left the queue early meanwhile, already done (replayed after a restart),
                    // or never kept.
                    let head = self.head;
                    if let Some(g) = self.groups.get_mut(gi) {
                        g.available.remove(&offset);
                        if from_available.is_none() {
                            g.next = (offset + 1).max(head);
                        }
                    }
                    continue;
                }
            };
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

    /// A reading group's next run is asked for before the group gets there.
    fn read_ahead(&mut self, gi: usize) {
        let Some(g) = self.groups.get(gi) else { return };
        if g.consumers.is_empty() || g.next >= self.next_offset {
            return;
        }
        let Some(i) = self.run_index(g.next.max(self.head)) else { return };
        self.request_load(i);
        self.request_load(i + 1);
    }

    fn request_load(&mut self, i: usize) {
        if self.io_paused {
            return;
        }
        if let Some(r) = self.runs.get_mut(i) {
            if let Body::Cold { loc, loading: false } = r.body {
                r.body = Body::Cold { loc, loading: true };
                self.io.push(Io::Load { run: r.id, loc });
            }
        }
    }

    /// The runs a reader is at or about to reach (not spilled while so).
    fn hot_runs(&self) -> Vec<u64> {
        let mut hot = Vec::new();
        for g in &self.groups {
            if g.consumers.is_empty() {
                continue;
            }
            let at = [Some(g.next.max(self.head)), g.available.first().copied()];
            for o in at.into_iter().flatten() {
                if let Some(i) = self.run_index(o) {
                    hot.extend(self.runs.range(i..(i + 2).min(self.runs.len())).map(|r| r.id));
                }
            }
        }
        hot
    }

    /// Over budget: spill the resident runs furthest from any reader, newest first (never the
    /// run still taking appends). A run with an unchanged copy on disk just drops its messages.
    fn plan_spills(&mut self) {
        if self.io_paused || self.resident.saturating_sub(self.spilling) <= self.budget || self.runs.len() < 2 {
            return;
        }
        let hot = self.hot_runs();
        let mut i = self.runs.len() - 1;
        let mut scanned = 0;
        while i > 0 && scanned < 256 && self.resident.saturating_sub(self.spilling) > self.budget {
            i -= 1;
            scanned += 1;
            let Some(r) = self.runs.get_mut(i) else { break };
            if hot.contains(&r.id) {
                continue;
            }
            match &mut r.body {
                Body::Resident { loc: Some(loc), spilling: false, .. } => {
                    let loc = *loc;
                    self.resident = self.resident.saturating_sub(r.cost);
                    r.body = Body::Cold { loc, loading: false };
                }
                Body::Resident { entries, loc: None, spilling } if !*spilling => {
                    *spilling = true;
                    self.spilling += r.cost;
                    let messages = entries
                        .iter()
                        .map(|e| Journal::Appended { offset: e.offset, message: e.message.clone(), key: e.key.clone(), at: e.at })
                        .collect();
                    self.io.push(Io::Spill { run: r.id, messages });
                }
                _ => {}
            }
        }
    }

    /// The I/O to do for this queue now: spills (when over budget), loads, dead letters of
    /// spilled messages, released places. Call after every change (with the journal).
    pub fn take_io(&mut self) -> Vec<Io> {
        self.plan_spills();
        std::mem::take(&mut self.io)
    }

    /// Run `run` is stored durably at `loc`: its messages may leave memory.
    pub fn spilled(&mut self, run: u64, loc: SpillLoc) {
        let Some(r) = self.run_by_id(run).and_then(|i| self.runs.get_mut(i)) else {
            // Gone while written.
            self.io.push(Io::Released { loc });
            return;
        };
        if let Body::Resident { loc: l @ None, spilling: s @ true, .. } = &mut r.body {
            *l = Some(loc);
            *s = false;
            self.spilling = self.spilling.saturating_sub(r.cost);
            self.stats.spilled_runs += 1;
        } else {
            self.io.push(Io::Released { loc });
        }
    }

    /// Writing run `run` failed: it stays in memory; spilling waits for the next `tick`.
    pub fn spill_failed(&mut self, run: u64) {
        self.io_paused = true;
        let Some(r) = self.run_by_id(run).and_then(|i| self.runs.get_mut(i)) else { return };
        if let Body::Resident { spilling: s @ true, .. } = &mut r.body {
            *s = false;
            self.spilling = self.spilling.saturating_sub(r.cost);
        }
    }

    /// Run `run` was read back: `messages` are what it stored (`Journal::Appended`, offset
    /// order). Err (the run stays spilled; loading waits for the next `tick`) if they are not
    /// the run's messages.
    pub fn loaded(&mut self, run: u64, messages: Vec<Journal>) -> Result<(), String> {
        let Some(i) = self.run_by_id(run) else { return Ok(()) };
        let Some(r) = self.runs.get_mut(i) else { return Ok(()) };
        let Body::Cold { loc, loading: true } = r.body else { return Ok(()) };
        let mut entries = VecDeque::new();
        let (mut cost, mut bytes) = (0, 0);
        for j in messages {
            if let Journal::Appended { offset, message, key, at } = j {
                if offset >= r.first && offset == r.first + entries.len() as u64 && offset < r.end {
                    cost += entry_cost(&message);
                    bytes += message.payload.len();
                    entries.push_back(Entry { offset, message, at, key });
                }
            }
        }
        if entries.len() as u64 != r.len() {
            r.body = Body::Cold { loc, loading: false };
            self.io_paused = true;
            return Err(format!(
                "spilled run at {loc:?} holds {} of offsets {}..{}",
                entries.len(),
                r.first,
                r.end
            ));
        }
        self.bytes = self.bytes.saturating_sub(r.bytes) + bytes;
        r.bytes = bytes;
        r.cost = cost;
        r.body = Body::Resident { entries, loc: Some(loc), spilling: false };
        self.resident += cost;
        self.stats.loaded_runs += 1;
        Ok(())
    }

    /// Reading run `run` failed; loading waits for the next `tick`.
    pub fn load_failed(&mut self, run: u64) {
        self.io_paused = true;
        let Some(r) = self.run_by_id(run).and_then(|i| self.runs.get_mut(i)) else { return };
        if let Body::Cold { loc, loading: true } = r.body {
            r.body = Body::Cold { loc, loading: false };
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
        // Candidates: consumers with room; a redelivery avoids its last consumer when another
        // has room. No allocation: this runs once per delivered message.
        let with_room = g.consumers.iter().filter(|c| has_room(c, consumers)).count();
        if with_room == 0 {
            return None;
        }
        let avoid = avoid.filter(|a| with_room > 1 && has_room(a, consumers));
        let eligible = |c: &ConsumerId| has_room(c, consumers) && Some(*c) != avoid;
        match self.config.dispatch {
            Dispatch::LeastInflight => {
                g.consumers.iter().copied().filter(eligible).min_by_key(|c| consumers.get(c).map_or(0, |x| x.inflight))
            }
            Dispatch::Random => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let count = with_room - usize::from(avoid.is_some());
                let k = (self.rng % count.max(1) as u64) as usize;
                g.consumers.iter().copied().filter(eligible).nth(k)
            }
            Dispatch::RoundRobin | Dispatch::KeyAffine(_) => {
                // The next eligible consumer after the cursor.
                for step in 0..n {
                    let i = (g.cursor + step) % n;
                    let c = g.consumers[i];
                    if eligible(&c) {
                        g.cursor = (i + 1) % n;
                        return Some(c);
                    }
                }
                None
            }
        }
    }

    /// Remove every message (none is dead-lettered); what consumers hold is forgotten (a late
    /// ack is ignored). Returns how many were removed.
    pub fn purge(&mut self) -> usize {
        let removed = self.depth();
        self.remove_below(self.next_offset);
        removed
    }

    /// The oldest messages kept, at most `max`, while they are in memory (a spilled run stops
    /// the list, and is asked for): what a re-drive moves elsewhere before
    /// [`remove_below`](Self::remove_below).
    pub fn front(&mut self, max: usize) -> Vec<(Offset, Message)> {
        let mut out = Vec::new();
        for i in 0..self.runs.len() {
            let Some(r) = self.runs.get(i) else { break };
            match &r.body {
                Body::Resident { entries, .. } => {
                    out.extend(entries.iter().take(max - out.len()).map(|e| (e.offset, e.message.clone())));
                }
                Body::Cold { .. } => {
                    self.request_load(i);
                    break;
                }
            }
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// Remove every message below `below` for every group, without dead-lettering (purge,
    /// re-drive). Returns how many were removed.
    pub fn remove_below(&mut self, below: Offset) -> usize {
        let before = self.depth;
        let below = below.min(self.next_offset);
        self.cut_below(below, None);
        self.journal.push(Journal::Trimmed { below });
        self.forget_below(below);
        (before - self.depth) as usize
    }

    /// Group `group` starts over at `to` (clamped to the messages kept): messages from there on
    /// are delivered to it again, those before are skipped. What its consumers hold is
    /// forgotten (their acknowledgements are ignored). Returns where it starts.
    pub fn seek(&mut self, group: &str, to: Offset) -> Offset {
        if self.acks_unlogged > 0 {
            self.log_acks();
        }
        let gi = self.group_index(group);
        let to = to.clamp(self.head, self.next_offset);
        self.apply_seek(gi, to);
        if let Some(g) = self.groups.get(gi) {
            self.journal.push(Journal::Seek { group: g.name.clone(), to });
        }
        self.trim_done();
        to
    }

    fn apply_seek(&mut self, gi: usize, to: Offset) {
        let Some(g) = self.groups.get_mut(gi) else { return };
        g.committed = to;
        g.logged_committed = to;
        g.next = to;
        g.done.clear();
        g.available.clear();
        g.attempts.clear();
        g.keys.clear();
        for (_, p) in std::mem::take(&mut g.pending) {
            if let Some(c) = self.consumers.get_mut(&p.consumer) {
                c.inflight = c.inflight.saturating_sub(1);
            }
        }
    }

    /// The changes to write to the log since the last call. Acknowledgements are written in
    /// batches: every [`ACK_LOG_BATCH`] of them (one record per group: its committed offset and
    /// what it finished above it), at each `tick`, and before a run whose place
    /// on disk is released (so the release is never durable before the acknowledgements that
    /// allowed it). A crash loses at most the batch since: those messages are delivered again
    /// (at least once), and the log carries one record per batch instead of one per message.
    pub fn take_journal(&mut self) -> Vec<Journal> {
        let releases = self.io.iter().any(|i| matches!(i, Io::Released { .. }));
        if self.acks_unlogged > 0 && (self.log_acks_now || releases || self.acks_unlogged >= ACK_LOG_BATCH) {
            self.log_acks();
        }
        std::mem::take(&mut self.journal)
    }

    /// Journal every acknowledgement at the next [`take_journal`](Self::take_journal).
    pub fn log_acks_soon(&mut self) {
        self.log_acks_now = true;
    }

    /// Messages for dead-letter queues since the last call.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.dead)
    }

    /// The first offset replay adds (a run, or a message) when the queue is empty: groups start
    /// there.
    fn replay_start(&mut self, offset: Offset) {
        if self.runs.is_empty() {
            self.head = offset;
            for g in &mut self.groups {
                g.committed = g.committed.max(offset);
                g.next = g.next.max(offset);
            }
        }
    }

    /// Replay: `group` is done with `offsets`.
    fn replay_done(&mut self, group: &str, offsets: impl IntoIterator<Item = Offset>) {
        let gi = self.group_index(group);
        if let Some(g) = self.groups.get_mut(gi) {
            for o in offsets {
                g.mark_done(o);
            }
            g.next = g.next.max(g.committed);
        }
        self.trim_done();
    }

    /// Apply a logged change (recovery). Consumers and what they held are not logged: after a
    /// restart every message not done is delivered again.
    pub fn replay(&mut self, entry: Journal) {
        match entry {
            Journal::Appended { offset, message, key, at } => {
                if offset >= self.next_offset {
                    self.replay_start(offset);
                    self.push_entry(Entry { offset, message, at, key });
                }
            }
            Journal::Cold(c) => {
                if c.end > self.next_offset && c.first < c.end {
                    let first = c.first.max(self.next_offset);
                    let total = c.end - c.first;
                    let bytes = usize::try_from(c.bytes / total * (c.end - first)).unwrap_or(usize::MAX);
                    self.replay_start(first);
                    let id = self.next_run;
                    self.next_run += 1;
                    self.runs.push_back(Run {
                        id,
                        first,
                        end: c.end,
                        bytes,
                        cost: 0,
                        first_at: c.first_at,
                        last_at: c.last_at,
                        body: Body::Cold { loc: c.loc, loading: false },
                    });
                    self.depth += c.end - first;
                    self.bytes += bytes;
                    self.next_offset = c.end;
                }
            }
            Journal::Done { group, offset } => self.replay_done(&group, std::iter::once(offset)),
            Journal::DoneMany { group, offsets } => self.replay_done(&group, offsets),
            Journal::DoneRanges { group, ranges } => {
                self.replay_done(&group, ranges.into_iter().flat_map(|(start, end)| start..end))
            }
            Journal::Trimmed { below } => {
                self.cut_below(below, None);
                self.next_offset = self.next_offset.max(below);
                self.head = self.runs.front().map_or(self.next_offset, |r| r.first);
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
                        g.done.cut_below(below);
                        g.attempts.retain(|o, _| *o >= below);
                        g.available = g.available.split_off(&below);
                        if let Some(end) = g.done.take_from(g.committed) {
                            g.committed = end;
                        }
                    }
                    g.next = g.next.max(g.committed);
                }
                self.trim_done();
            }
            Journal::Seek { group, to } => {
                let gi = self.group_index(&group);
                let to = to.max(self.head);
                self.apply_seek(gi, to);
                self.trim_done();
            }
        }
        self.journal.clear();
        self.unlogged_done.clear();
        self.acks_unlogged = 0;
        for g in &mut self.groups {
            g.logged_committed = g.committed;
        }
    }

    /// The whole state as journal entries (messages kept or where they are spilled, groups,
    /// what each group is done with): replayed onto a new queue they rebuild this one. For the
    /// log's checkpoints.
    pub fn snapshot(&self) -> Vec<Journal> {
        let mut out = Vec::new();
        for g in &self.groups {
            out.push(Journal::GroupCreated { group: g.name.clone() });
        }
        if self.head > 0 {
            out.push(Journal::Trimmed { below: self.head });
        }
        for r in &self.runs {
            let cold = |loc: SpillLoc| {
                Journal::Cold(ColdRun {
                    first: r.first,
                    end: r.end,
                    bytes: r.bytes as u64,
                    first_at: r.first_at,
                    last_at: r.last_at,
                    loc,
                })
            };
            match &r.body {
                Body::Cold { loc, .. } | Body::Resident { loc: Some(loc), .. } => out.push(cold(*loc)),
                Body::Resident { entries, loc: None, .. } => {
                    out.extend(entries.iter().map(|e| Journal::Appended {
                        offset: e.offset,
                        message: e.message.clone(),
                        key: e.key.clone(),
                        at: e.at,
                    }));
                }
            }
        }
        for g in &self.groups {
            // A seek may have moved a group back: the copy sets where it is.
            out.push(Journal::Seek { group: g.name.clone(), to: g.committed });
            if !g.done.is_empty() {
                let ranges: Vec<(Offset, Offset)> = g.done.ranges().collect();
                for chunk in ranges.chunks(DONE_MANY_MAX) {
                    out.push(Journal::DoneRanges { group: g.name.clone(), ranges: chunk.to_vec() });
                }
            }
        }
        out
    }
}
