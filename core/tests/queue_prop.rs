//! State-machine test of the queue engine against a simple model.
//!
//! Random publishes, consumers joining and leaving two groups, acks, rejects, nacks with and
//! without requeue, ack timeouts, and crashes (the queue is rebuilt from its journal, as the
//! owner shard's log would do; consumers are gone). Checked as it runs:
//! - a consumer never holds more than its prefetch;
//! - a message delivered to a group is one that was published and not yet done in that group,
//!   and it is held by one consumer of the group at a time;
//! - first deliveries in a group come in offset order (FIFO);
//! - a message is dead-lettered exactly when it was released `max_deliveries` times, and is
//!   never delivered to that group again;
//! - the queue never holds more than `max_messages`; a reject-publish queue refuses beyond it.
//!
//! At the end one consumer per group drains the queue: every published message that was not
//! dead-lettered nor refused is acknowledged in every group (at least once; exactly once when no
//! crash happened).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_core::mqtt::{Properties, QoS};
use flux_core::queue::{ConsumerId, Overflow, Queue, QueueConfig, QueueIo, QueueJournal, QueueName, SpillLoc, DEFAULT_GROUP};
use flux_core::session::Publication;
use flux_core::topic::TopicName;
use proptest::prelude::*;

const GROUPS: [&str; 2] = [DEFAULT_GROUP, "audit"];
const MAX_DELIVERIES: u32 = 3;

#[derive(Clone, Debug)]
enum Op {
    Publish,
    Attach { consumer: u64, group: usize, prefetch: u16 },
    Detach(u64),
    Ack(usize),
    Reject(usize),
    Nack(usize, bool),
    Dispatch,
    Tick(u64),
    Crash,
    /// Carry out this many of the I/O requests the queue made (spill, load, dead letters, release).
    Io(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Publish),
        2 => (0u64..4, 0usize..2, 1u16..4).prop_map(|(consumer, group, prefetch)| Op::Attach { consumer, group, prefetch }),
        1 => (0u64..4).prop_map(Op::Detach),
        6 => (0usize..64).prop_map(Op::Ack),
        2 => (0usize..64).prop_map(Op::Reject),
        1 => (0usize..64, any::<bool>()).prop_map(|(i, r)| Op::Nack(i, r)),
        6 => Just(Op::Dispatch),
        1 => (0u64..3).prop_map(Op::Tick),
        1 => Just(Op::Crash),
        4 => (1usize..6).prop_map(Op::Io),
    ]
}

fn message(seq: u64) -> Arc<Publication> {
    Arc::new(Publication {
        topic: TopicName::new("q/t").expect("topic"),
        payload: Bytes::copy_from_slice(&seq.to_be_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: None,
    })
}

fn seq_of(m: &Publication) -> u64 {
    u64::from_be_bytes(m.payload[..].try_into().expect("8 bytes"))
}

struct Model {
    q: Queue,
    config: QueueConfig,
    now: Instant,
    journal: Vec<flux_core::queue::QueueJournal>,
    published: BTreeSet<u64>,
    refused: BTreeSet<u64>,
    next_seq: u64,
    /// consumer -> (group, prefetch)
    consumers: HashMap<u64, (usize, u16)>,
    /// (group, seq) -> consumer holding it
    held: BTreeMap<(usize, u64), u64>,
    /// (group, seq) -> when its ack timeout runs out
    deadline: HashMap<(usize, u64), Instant>,
    /// (group, seq) -> deliveries so far
    deliveries: HashMap<(usize, u64), u32>,
    /// per group: done (acked or dead-lettered)
    done: [BTreeSet<u64>; 2],
    acked_twice: u64,
    dead: BTreeSet<(usize, u64)>,
    last_first: [Option<u64>; 2],
    crashed: bool,
    /// Per group: done before the last crash (may be delivered again once).
    done_at_crash: [BTreeSet<u64>; 2],
    /// Spill mode: runs of 3 messages, no memory budget; `disk` plays the runtime's spill files.
    spill: bool,
    disk: HashMap<SpillLoc, Vec<QueueJournal>>,
    io: std::collections::VecDeque<QueueIo>,
    next_loc: u64,
}

impl Model {
    fn queue(config: &QueueConfig, spill: bool) -> Queue {
        let mut q = Queue::new(QueueName::new("orders").expect("name"), config.clone());
        if spill {
            q.set_run_messages(3);
            q.set_resident_budget(0);
        }
        q
    }

    fn new(config: QueueConfig, spill: bool) -> Model {
        let mut q = Model::queue(&config, spill);
        q.attach(ConsumerId(99), GROUPS[1], 1);
        q.detach(ConsumerId(99)); // the audit group exists from the start
        let journal = q.take_journal();
        Model {
            q,
            config,
            now: Instant::now(),
            journal,
            published: BTreeSet::new(),
            refused: BTreeSet::new(),
            next_seq: 0,
            consumers: HashMap::new(),
            held: BTreeMap::new(),
            deadline: HashMap::new(),
            deliveries: HashMap::new(),
            done: [BTreeSet::new(), BTreeSet::new()],
            acked_twice: 0,
            dead: BTreeSet::new(),
            last_first: [None, None],
            crashed: false,
            done_at_crash: [BTreeSet::new(), BTreeSet::new()],
            spill,
            disk: HashMap::new(),
            io: Default::default(),
            next_loc: 0,
        }
    }

    /// Do the queue's I/O requests, oldest first, as the runtime would.
    fn do_io(&mut self, n: usize) {
        for _ in 0..n {
            let Some(io) = self.io.pop_front() else { return };
            match io {
                QueueIo::Spill { run, messages } => {
                    assert!(!messages.is_empty(), "empty spill");
                    let loc = SpillLoc { file: 0, pos: self.next_loc, len: messages.len() as u64 };
                    self.next_loc += 1;
                    self.disk.insert(loc, messages);
                    self.q.spilled(run, loc);
                }
                QueueIo::Load { run, loc } => {
                    let stored = self.disk.get(&loc).expect("load of a run released or never written").clone();
                    self.q.loaded(run, stored).expect("a stored run loads");
                }
                QueueIo::DeadLetters { loc, from, below, .. } => {
                    let stored = self.disk.get(&loc).expect("dead letters of a released run");
                    let offsets: Vec<u64> = stored
                        .iter()
                        .filter_map(|j| match j {
                            QueueJournal::Appended { offset, .. } => Some(*offset),
                            _ => None,
                        })
                        .collect();
                    assert!((from..below).all(|o| offsets.contains(&o)), "dead letters {from}..{below} not in the run");
                }
                QueueIo::Released { loc } => {
                    assert!(self.disk.remove(&loc).is_some(), "released twice: {loc:?}");
                }
            }
            self.io.extend(self.q.take_io());
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Publish => {
                let seq = self.next_seq;
                self.next_seq += 1;
                match self.q.publish(message(seq), self.now) {
                    Ok(_) => {
                        self.published.insert(seq);
                        assert!(self.q.depth() <= self.config.max_messages, "accepted beyond the limit");
                    }
                    Err(_) => {
                        // At the limit (or above it after a crash brought back messages whose
                        // acknowledgements were not journalled yet).
                        assert!(self.q.depth() >= self.config.max_messages, "refused below the limit");
                        self.refused.insert(seq);
                    }
                }
            }
            Op::Attach { consumer, group, prefetch } => {
                self.release_all(consumer);
                self.q.attach(ConsumerId(consumer), GROUPS[group], prefetch);
                self.consumers.insert(consumer, (group, prefetch));
            }
            Op::Detach(consumer) => {
                self.release_all(consumer);
                self.q.detach(ConsumerId(consumer));
                self.consumers.remove(&consumer);
            }
            Op::Ack(i) => {
                if let Some((g, seq, c)) = self.pick(i) {
                    assert!(self.q.ack(ConsumerId(c), self.offset_of(seq)), "ack of a held message refused");
                    self.held.remove(&(g, seq));
                    if !self.done[g].insert(seq) {
                        self.acked_twice += 1;
                    }
                }
            }
            Op::Reject(i) => self.release(i, true),
            Op::Nack(i, requeue) => self.release(i, requeue),
            Op::Dispatch => self.dispatch(),
            Op::Tick(secs) => {
                self.now += Duration::from_secs(secs);
                let now = self.now;
                let timed_out: Vec<(usize, u64)> =
                    self.held.keys().copied().filter(|k| self.deadline.get(k).is_some_and(|d| *d <= now)).collect();
                self.q.tick(self.now);
                for (g, seq) in timed_out {
                    self.held.remove(&(g, seq));
                    self.released(g, seq, true);
                }
            }
            Op::Io(n) => self.do_io(n),
            Op::Crash => {
                self.journal.extend(self.q.take_journal());
                let mut q = Model::queue(&self.config, self.spill);
                for e in self.journal.clone() {
                    q.replay(e);
                }
                // The checkpoint form (spilled runs by reference) rebuilds the same queue.
                let mut from_snapshot = Model::queue(&self.config, self.spill);
                for e in self.q.snapshot() {
                    from_snapshot.replay(e);
                }
                // The snapshot knows every acknowledgement; the journal may lack the last batch.
                assert!(from_snapshot.depth() <= q.depth());
                for (a, b) in from_snapshot.group_lag().iter().zip(q.group_lag().iter()) {
                    assert!(a.2 <= b.2, "snapshot lag {} above the journal's {}", a.2, b.2);
                }
                // Requests in flight die with the process; written runs stay on disk.
                self.io.clear();
                self.q = if self.spill { from_snapshot } else { q };
                self.held.clear();
                self.consumers.clear();
                // Delivery counts are not logged: they start again after a restart.
                self.deliveries.clear();
                self.last_first = [None, None];
                self.crashed = true;
                self.done_at_crash = self.done.clone();
            }
        }
        self.journal.extend(self.q.take_journal());
        for d in self.q.take_dead_letters() {
            let _ = d;
        }
        self.io.extend(self.q.take_io());
        for (&c, &(_, prefetch)) in &self.consumers {
            assert!(self.q.inflight_of(ConsumerId(c)) <= usize::from(prefetch), "prefetch exceeded");
        }
    }

    /// Offsets equal sequence numbers of accepted publishes only when nothing was refused; map.
    fn offset_of(&self, seq: u64) -> u64 {
        self.published.range(..seq).count() as u64
    }

    fn pick(&self, i: usize) -> Option<(usize, u64, u64)> {
        if self.held.is_empty() {
            return None;
        }
        let (&(g, seq), &c) = self.held.iter().nth(i % self.held.len())?;
        Some((g, seq, c))
    }

    fn release(&mut self, i: usize, requeue: bool) {
        if let Some((g, seq, c)) = self.pick(i) {
            assert!(self.q.nack(ConsumerId(c), self.offset_of(seq), requeue));
            self.held.remove(&(g, seq));
            self.released(g, seq, requeue);
        }
    }

    fn released(&mut self, g: usize, seq: u64, requeue: bool) {
        let n = self.deliveries.get(&(g, seq)).copied().unwrap_or(0);
        if !requeue || n >= MAX_DELIVERIES {
            self.dead.insert((g, seq));
            self.done[g].insert(seq);
        }
    }

    fn release_all(&mut self, consumer: u64) {
        // Held by a departing consumer: available again, no delivery counted beyond the first.
        self.held.retain(|_, c| *c != consumer);
    }

    fn dispatch(&mut self) {
        for d in self.q.dispatch(self.now) {
            let seq = seq_of(&d.message);
            let c = d.consumer.0;
            let (g, _) = *self.consumers.get(&c).expect("delivered to an attached consumer");
            assert!(self.published.contains(&seq), "delivered {seq}, never published");
            // Acknowledgements are journalled in batches: after a crash, what was done before it
            // may come again (at least once); what was done since may not.
            let again = self.done_at_crash[g].contains(&seq);
            assert!(again || !self.done[g].contains(&seq), "delivered {seq} to group {g} after it was done");
            assert!(again || !self.dead.contains(&(g, seq)), "dead-lettered {seq} delivered again");
            if again {
                self.done[g].remove(&seq);
                self.dead.remove(&(g, seq));
                self.done_at_crash[g].remove(&seq);
            }
            assert!(self.held.insert((g, seq), c).is_none(), "{seq} held twice in group {g}");
            self.deadline.insert((g, seq), self.now + Duration::from_secs(2));
            let n = self.deliveries.entry((g, seq)).or_insert(0);
            *n += 1;
            if d.attempt == 1 && !self.crashed {
                if let Some(last) = self.last_first[g] {
                    assert!(seq > last, "group {g}: first delivery of {seq} after {last}: not FIFO");
                }
                self.last_first[g] = Some(seq);
            }
        }
    }

    fn drain(&mut self) {
        for (g, group) in GROUPS.iter().enumerate() {
            let c = 100 + g as u64;
            let held: Vec<u64> = self.consumers.keys().copied().collect();
            for h in held {
                self.step(&Op::Detach(h));
            }
            self.q.attach(ConsumerId(c), group, 8);
            self.consumers.insert(c, (g, 8));
            for _ in 0..(self.next_seq * 4 + 10) {
                self.io.extend(self.q.take_io());
                self.do_io(usize::MAX);
                self.dispatch();
                self.io.extend(self.q.take_io());
                if self.held.is_empty() && !self.io.is_empty() {
                    continue;
                }
                if self.held.is_empty() {
                    break;
                }
                while let Some((g2, seq, c2)) = self.pick(0) {
                    assert!(self.q.ack(ConsumerId(c2), self.offset_of(seq)));
                    self.held.remove(&(g2, seq));
                    if !self.done[g2].insert(seq) {
                        self.acked_twice += 1;
                    }
                }
            }
            self.q.detach(ConsumerId(c));
            self.consumers.remove(&c);
            for &seq in &self.published {
                assert!(self.done[g].contains(&seq), "group {g}: message {seq} lost");
            }
        }
        if !self.crashed {
            assert_eq!(self.acked_twice, 0, "acknowledged twice");
        }
        assert_eq!(self.q.depth(), 0, "everything done yet still queued");
        self.io.extend(self.q.take_io());
        self.do_io(usize::MAX);
        if !self.crashed {
            assert!(self.disk.is_empty(), "spilled runs never released: {:?}", self.disk.keys().collect::<Vec<_>>());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn queue_against_model_at_least_once_fifo_dead_letters(
        ops in proptest::collection::vec(op(), 0..150),
        max_messages in 1usize..40,
        spill in any::<bool>(),
    ) {
        let config = QueueConfig {
            max_messages,
            overflow: Overflow::RejectPublish,
            max_deliveries: MAX_DELIVERIES,
            ack_timeout: Some(Duration::from_secs(2)),
            dead_letter: Some(QueueName::new("orders.dlq").expect("name")),
            ..QueueConfig::default()
        };
        let mut m = Model::new(config, spill);
        for op in &ops {
            m.step(op);
        }
        m.drain();
    }
}

fn keyed(seq: u64, key: &str) -> Arc<Publication> {
    Arc::new(Publication {
        topic: TopicName::new(&format!("dev/{key}/t")).expect("topic"),
        payload: Bytes::copy_from_slice(&seq.to_be_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at: None,
        publisher: None,
    })
}

#[test]
fn key_affine_keeps_each_key_on_one_consumer_in_order_and_rebalances() {
    use flux_core::queue::{Dispatch, KeySource};
    let config = QueueConfig { dispatch: Dispatch::KeyAffine(KeySource::TopicLevel(1)), ..QueueConfig::default() };
    let mut q = Queue::new(QueueName::new("k").expect("name"), config);
    let now = Instant::now();
    q.attach(ConsumerId(1), DEFAULT_GROUP, 100);
    q.attach(ConsumerId(2), DEFAULT_GROUP, 100);
    let keys = ["a", "b", "c", "d"];
    for seq in 0..40u64 {
        q.publish(keyed(seq, keys[(seq % 4) as usize]), now).expect("room");
    }
    let mut owner: HashMap<String, u64> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut per_consumer: HashMap<u64, usize> = HashMap::new();
    for d in q.dispatch(now) {
        let key = d.message.topic.as_str().split('/').nth(1).expect("level").to_owned();
        let seq = seq_of(&d.message);
        assert_eq!(*owner.entry(key.clone()).or_insert(d.consumer.0), d.consumer.0, "key {key} on two consumers");
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(seq > prev, "key {key}: {seq} after {prev}");
        }
        *per_consumer.entry(d.consumer.0).or_default() += 1;
    }
    assert_eq!(per_consumer.values().sum::<usize>(), 40);
    assert_eq!(per_consumer.len(), 2, "keys spread over both consumers: {per_consumer:?}");
    // Consumer 1 leaves without acknowledging: its keys move to consumer 2, in order.
    q.detach(ConsumerId(1));
    let moved: Vec<u64> = q.dispatch(now).iter().map(|d| {
        assert_eq!(d.consumer, ConsumerId(2));
        seq_of(&d.message)
    }).collect();
    assert_eq!(moved.len(), per_consumer[&1]);
    assert!(moved.windows(2).all(|w| w[0] < w[1]), "redelivered out of order: {moved:?}");
}

/// A backlog far beyond the memory budget: resident memory stays within the budget (plus the
/// run taking appends and the runs a reader is at), everything comes back in order, and every
/// stored run is released once consumed.
#[test]
fn backlog_beyond_the_budget_spills_and_comes_back_in_order() {
    let budget = 256 << 10;
    let mut q = Queue::new(QueueName::new("big").expect("name"), QueueConfig::default());
    q.set_resident_budget(budget);
    let now = Instant::now();
    let mut disk: HashMap<SpillLoc, Vec<QueueJournal>> = HashMap::new();
    let mut next = 0u64;
    let mut max_resident = 0usize;
    let mut run_io = |q: &mut Queue, disk: &mut HashMap<SpillLoc, Vec<QueueJournal>>| loop {
        let io = q.take_io();
        if io.is_empty() {
            break;
        }
        for i in io {
            match i {
                QueueIo::Spill { run, messages } => {
                    let loc = SpillLoc { file: 0, pos: next, len: 0 };
                    next += 1;
                    disk.insert(loc, messages);
                    q.spilled(run, loc);
                }
                QueueIo::Load { run, loc } => q.loaded(run, disk[&loc].clone()).expect("loads"),
                QueueIo::Released { loc } => assert!(disk.remove(&loc).is_some()),
                QueueIo::DeadLetters { .. } => panic!("nothing is dead-lettered here"),
            }
        }
    };
    let total = 50_000u64;
    for seq in 0..total {
        q.publish(message(seq), now).expect("room");
        run_io(&mut q, &mut disk);
        max_resident = max_resident.max(q.resident_bytes());
    }
    let (runs, cold) = q.run_counts();
    assert!(cold + 2 >= runs, "{cold} of {runs} runs spilled");
    assert!(max_resident <= budget + 2 * 1024 * 300, "resident grew to {max_resident}");
    q.attach(ConsumerId(1), DEFAULT_GROUP, 500);
    let mut expect = 0u64;
    for _ in 0..100_000 {
        run_io(&mut q, &mut disk);
        let ds = q.dispatch(now);
        if ds.is_empty() && q.depth() == 0 {
            break;
        }
        for d in ds {
            assert_eq!(seq_of(&d.message), expect, "out of order");
            expect += 1;
            assert!(q.ack(ConsumerId(1), d.offset));
        }
        max_resident = max_resident.max(q.resident_bytes());
    }
    run_io(&mut q, &mut disk);
    assert_eq!(expect, total, "not everything came back");
    assert!(max_resident <= budget + 4 * 1024 * 300, "resident grew to {max_resident} while draining");
    assert!(disk.is_empty(), "{} runs never released", disk.len());
    assert!(q.stats.spilled_runs > 0 && q.stats.loaded_runs > 0);
}

/// One message held while 100,000 after it are acknowledged: the group's record of what it did
/// out of order is one range (in memory and in a checkpoint), and replays to the same lag.
#[test]
fn acks_past_a_held_message_are_kept_as_a_range() {
    let mut q = Queue::new(QueueName::new("held").expect("name"), QueueConfig { default_prefetch: 1, ..QueueConfig::default() });
    let now = Instant::now();
    for seq in 0..100_001u64 {
        q.publish(message(seq), now).expect("room");
    }
    q.attach(ConsumerId(1), DEFAULT_GROUP, 1);
    let held = q.dispatch(now);
    assert_eq!(held.len(), 1);
    q.attach(ConsumerId(2), DEFAULT_GROUP, 1000);
    let mut acked = 0;
    while acked < 100_000 {
        let ds = q.dispatch(now);
        assert!(!ds.is_empty(), "stalled after {acked}");
        for d in ds {
            assert_eq!(d.consumer, ConsumerId(2));
            assert!(q.ack(d.consumer, d.offset));
            acked += 1;
        }
    }
    let snapshot = q.snapshot();
    let ranges: Vec<_> = snapshot
        .iter()
        .filter_map(|j| match j {
            QueueJournal::DoneRanges { ranges, .. } => Some(ranges.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ranges, vec![vec![(1, 100_001)]]);
    let mut r = Queue::new(QueueName::new("held").expect("name"), QueueConfig::default());
    for j in snapshot {
        r.replay(j);
    }
    assert_eq!(r.group_lag()[0].2, 1, "only the held message is left");
    assert_eq!(q.group_lag()[0].2, 1);
    assert!(q.ack(ConsumerId(1), held[0].offset));
    assert_eq!(q.depth(), 0, "acking the held message finishes the queue");
}
