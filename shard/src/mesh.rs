//! The cross-shard ring mesh: one bounded SPSC ring (glommio `shared_channel`) for every ordered
//! pair of shards, with per-hop batching and a never-blocking send.
//!
//! Where it lives: [`build_mesh`] runs once on the main thread and yields one [`MeshEndpoints`] per
//! shard (a `Send` value). Each shard moves its endpoints into its own executor and calls
//! [`MeshEndpoints::connect`] there, which gives a [`Mesh`] (the outbound side, `!Send`, shared
//! inside the shard by cloning, which is an `Rc` clone) and an [`Inbound`] (the inbound rings, handed
//! to [`Inbound::spawn_drains`] once). Only the shard that connected them may use them.
//!
//! Sending: [`Mesh::send`] appends to a per-destination pending buffer and never awaits. The first
//! message into an empty buffer schedules one flush task, which runs when the current task yields
//! and moves each destination's whole buffer into its ring as ONE slot (ring element `Vec<T>`).
//! If the ring is full the batch goes to a per-destination FIFO overflow queue, retried by a timer
//! task with `try_send` (never `send().await`: the peer may be blocked on us). Everything queued
//! later for that destination goes behind the overflow, so per-sender order holds end to end.
//!
//! Backpressure: a send never fails or blocks; callers bound what is in flight by checking
//! [`Mesh::congested`] before reading more input and parking on [`Mesh::wait_uncongested`].
//! Congestion counts *messages*, not ring slots: each ordered pair of shards shares one atomic
//! credit counter (added by the sender when a batch enters the ring, subtracted by the receiver's
//! drain task once the batch is handled), and a destination is congested while that count plus
//! its local overflow exceeds the threshold. In-flight messages per destination then stay within
//! the threshold plus what one read burst produces. (Counting ring slots alone would allow
//! `ring_capacity` x 1024 merged messages in flight: a flood measured 100+ MB of RSS that way.)
//!
//! A message for the wrong shard (`to == me` or out of range) is a programmer error: it is
//! dropped, counted in [`MeshStats::misrouted_msgs`] and logged; never a panic.
//! A ring whose receiving shard has gone away drops what is sent to it (counted, logged once).
//!
//! glommio trap: a task spawned into the current task queue is polled once *inside*
//! `spawn_local`; the flush task therefore yields before flushing.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use flux_core::ShardId;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{GlommioError, ResourceType, TaskQueueHandle};

/// Messages one destination's overflow may hold before the mesh reports congestion. Cost: one
/// queued message per unit, per destination, only while the ring to that destination is full.
pub const DEFAULT_CONGESTION_THRESHOLD_MSGS: usize = 4096;

/// While a destination is backed up, newly flushed messages are merged into the last overflow
/// batch up to this many messages, so one ring slot carries a bounded batch.
const MAX_MERGED_BATCH_MSGS: usize = 1024;

/// Retry timing for a full ring: starts short and backs off while the ring makes no progress.
const RETRY_MIN: Duration = Duration::from_micros(20);
const RETRY_MAX: Duration = Duration::from_millis(1);

/// Shape of a mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Batches (slots) each ring holds; 0 is raised to 1. Cost: one `Vec` header (24 bytes) per
    /// slot per ordered pair of shards, plus the batches in flight.
    pub ring_capacity: usize,
    /// See [`DEFAULT_CONGESTION_THRESHOLD_MSGS`]. Congestion means some destination has more than
    /// this many messages in flight: handed to its ring but not yet handled by its drain task,
    /// plus those waiting in the local overflow.
    pub congestion_threshold_msgs: usize,
}

impl MeshConfig {
    pub fn new(ring_capacity: usize) -> MeshConfig {
        MeshConfig {
            ring_capacity,
            congestion_threshold_msgs: DEFAULT_CONGESTION_THRESHOLD_MSGS,
        }
    }
}

/// Builds the full mesh for `shard_count` shards with rings of `ring_capacity` batches. Call it
/// once on the main thread; element `i` belongs to shard `i`.
pub fn build_mesh<T: Send + 'static>(
    shard_count: u16,
    ring_capacity: usize,
) -> Vec<MeshEndpoints<T>> {
    build_mesh_with(shard_count, MeshConfig::new(ring_capacity))
}

/// [`build_mesh`] with an explicit congestion threshold.
pub fn build_mesh_with<T: Send + 'static>(
    shard_count: u16,
    config: MeshConfig,
) -> Vec<MeshEndpoints<T>> {
    let n = usize::from(shard_count);
    let capacity = config.ring_capacity.max(1);
    let mut endpoints: Vec<MeshEndpoints<T>> = (0..shard_count)
        .map(|i| MeshEndpoints {
            me: ShardId(i),
            shard_count,
            config,
            senders: (0..n).map(|_| None).collect(),
            receivers: (0..n).map(|_| None).collect(),
            send_credits: (0..n).map(|_| None).collect(),
            recv_credits: (0..n).map(|_| None).collect(),
        })
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            let (tx, rx) = shared_channel::new_bounded::<Vec<T>>(capacity);
            endpoints[from].senders[to] = Some(tx);
            endpoints[to].receivers[from] = Some(rx);
            let in_flight = Arc::new(AtomicUsize::new(0));
            endpoints[from].send_credits[to] = Some(in_flight.clone());
            endpoints[to].recv_credits[from] = Some(in_flight);
        }
    }
    endpoints
}

/// One shard's unconnected ring halves. `Send`: built on the main thread, moved into the shard's
/// executor, connected there.
pub struct MeshEndpoints<T: Send + 'static> {
    me: ShardId,
    shard_count: u16,
    config: MeshConfig,
    /// Index = destination shard.
    senders: Vec<Option<SharedSender<Vec<T>>>>,
    /// Index = source shard.
    receivers: Vec<Option<SharedReceiver<Vec<T>>>>,
    /// Messages in the ring towards each destination, not yet handled there (index = destination).
    /// The sender adds when a batch enters the ring, the receiver's drain task subtracts after
    /// handling it: a ring's real bound is in messages, not in batches (a slot can hold a merged
    /// batch of up to 1024 messages).
    send_credits: Vec<Option<Arc<AtomicUsize>>>,
    /// The same counters seen from the receiving side (index = source).
    recv_credits: Vec<Option<Arc<AtomicUsize>>>,
}

impl<T: Send + 'static> std::fmt::Debug for MeshEndpoints<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshEndpoints")
            .field("me", &self.me)
            .field("shard_count", &self.shard_count)
            .finish()
    }
}

impl<T: Send + 'static> MeshEndpoints<T> {
    pub fn me(&self) -> ShardId {
        self.me
    }

    /// Connects every half concurrently (each connect waits for its peer shard to connect the
    /// other half; connecting one by one in a fixed order deadlocks). Must run on the shard's own
    /// executor, and every other shard must connect its endpoints too, or this waits forever
    /// (a peer that dropped its endpoints unblocks it; that ring is then closed).
    /// Flush and retry tasks run in the task queue current at each `send`.
    pub async fn connect(self) -> (Mesh<T>, Inbound<T>) {
        self.connect_in(None).await
    }

    /// [`MeshEndpoints::connect`], with flush and retry tasks spawned into `tq`.
    pub async fn connect_in(self, tq: Option<TaskQueueHandle>) -> (Mesh<T>, Inbound<T>) {
        let MeshEndpoints {
            me,
            shard_count,
            config,
            senders,
            receivers,
            send_credits,
            recv_credits,
        } = self;
        // Start every connect first (spawned tasks make progress concurrently), then collect.
        let tx_tasks: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(|s| (i, spawn_in(tq, s.connect()))))
            .collect();
        let rx_tasks: Vec<_> = receivers
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.map(|r| (i, spawn_in(tq, r.connect()))))
            .collect();

        let mut peers = Vec::with_capacity(tx_tasks.len());
        for (t, credit) in tx_tasks.into_iter().zip(send_credits) {
            match (t, credit) {
                (Some((_, task)), Some(in_flight)) => peers.push(Some(Peer::new(task.await, in_flight))),
                _ => peers.push(None),
            }
        }
        let mut inbound_rings = Vec::new();
        for (i, task) in rx_tasks.into_iter().flatten() {
            let credit = recv_credits.get(i).cloned().flatten().unwrap_or_default();
            // `i` < shard_count <= u16::MAX, so the cast is lossless.
            inbound_rings.push((ShardId(i as u16), task.await, credit));
        }
        let received: Rc<Vec<InCounters>> = Rc::new(
            (0..usize::from(shard_count))
                .map(|_| InCounters::default())
                .collect(),
        );
        tracing::debug!(shard = %me, peers = inbound_rings.len(), "ring mesh connected");
        let inner = Rc::new(Inner {
            me,
            shard_count,
            threshold_msgs: config.congestion_threshold_msgs,
            tq,
            peers,
            dirty: RefCell::new(Vec::new()),
            flush_scheduled: Cell::new(false),
            congested_peers: Cell::new(0),
            congestion_waiters: RefCell::new(Vec::new()),
            idle_waiters: RefCell::new(Vec::new()),
            misrouted_msgs: Cell::new(0),
            received: received.clone(),
        });
        (
            Mesh { inner },
            Inbound {
                me,
                rings: inbound_rings,
                received,
            },
        )
    }
}

/// Messages queued for one destination before [`Mesh::send`] flushes them itself instead of
/// waiting for the sending task to yield.
const MAX_PENDING_BATCH_MSGS: usize = 256;

/// Spawns a detached-to-be task. Note: glommio polls a task spawned into the *current* task queue
/// once right away, before `spawn_local` returns.
fn spawn_in<F>(tq: Option<TaskQueueHandle>, fut: F) -> glommio::Task<F::Output>
where
    F: Future + 'static,
    F::Output: 'static,
{
    match tq {
        Some(tq) => match glommio::spawn_local_into(fut, tq) {
            Ok(task) => task,
            // Only fails for a task queue handle that does not exist: a programmer error, but the
            // future is gone, so there is nothing to fall back to except panicking or losing work.
            Err(e) => panic!("mesh: cannot spawn into task queue {tq:?}: {e}"),
        },
        None => glommio::spawn_local(fut),
    }
}

/// Outbound state for one destination.
struct Peer<T: Send + 'static> {
    ring: ConnectedSender<Vec<T>>,
    /// Messages in the ring, not yet handled by the receiver (shared with its drain task).
    in_flight: Arc<AtomicUsize>,
    /// Messages queued since the last flush.
    pending: RefCell<Vec<T>>,
    /// Batches that found the ring full, oldest first.
    overflow: RefCell<VecDeque<Vec<T>>>,
    overflow_msgs: Cell<usize>,
    retry_scheduled: Cell<bool>,
    congested: Cell<bool>,
    closed: Cell<bool>,
    batches_sent: Cell<u64>,
    messages_sent: Cell<u64>,
    overflow_high_water_msgs: Cell<usize>,
    dropped_msgs: Cell<u64>,
}

impl<T: Send + 'static> Peer<T> {
    fn new(ring: ConnectedSender<Vec<T>>, in_flight: Arc<AtomicUsize>) -> Peer<T> {
        Peer {
            ring,
            in_flight,
            pending: RefCell::new(Vec::new()),
            overflow: RefCell::new(VecDeque::new()),
            overflow_msgs: Cell::new(0),
            retry_scheduled: Cell::new(false),
            congested: Cell::new(false),
            closed: Cell::new(false),
            batches_sent: Cell::new(0),
            messages_sent: Cell::new(0),
            overflow_high_water_msgs: Cell::new(0),
            dropped_msgs: Cell::new(0),
        }
    }

    fn idle(&self) -> bool {
        self.pending.borrow().is_empty() && self.overflow_msgs.get() == 0
    }
}

#[derive(Default)]
struct InCounters {
    batches: Cell<u64>,
    messages: Cell<u64>,
}

struct Inner<T: Send + 'static> {
    me: ShardId,
    shard_count: u16,
    threshold_msgs: usize,
    tq: Option<TaskQueueHandle>,
    /// Index = destination; `None` for `me`.
    peers: Vec<Option<Peer<T>>>,
    /// Destinations with a non-empty pending buffer.
    dirty: RefCell<Vec<u16>>,
    flush_scheduled: Cell<bool>,
    congested_peers: Cell<usize>,
    congestion_waiters: RefCell<Vec<Waker>>,
    idle_waiters: RefCell<Vec<Waker>>,
    misrouted_msgs: Cell<u64>,
    received: Rc<Vec<InCounters>>,
}

/// The outbound side of the mesh on one shard. `!Send`; clone it (an `Rc` clone) to share it
/// between the tasks of the shard.
pub struct Mesh<T: Send + 'static> {
    inner: Rc<Inner<T>>,
}

impl<T: Send + 'static> Clone for Mesh<T> {
    fn clone(&self) -> Self {
        Mesh {
            inner: self.inner.clone(),
        }
    }
}

/// Counters of one (this shard, peer) pair, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStats {
    pub peer: ShardId,
    /// Batches (ring slots) and messages handed to the ring towards `peer`.
    pub batches_sent: u64,
    pub messages_sent: u64,
    /// Messages waiting in the overflow towards `peer` now, and the most there ever were.
    pub overflow_msgs: usize,
    pub overflow_high_water_msgs: usize,
    /// Messages dropped because `peer`'s executor is gone.
    pub dropped_msgs: u64,
    /// Batches and messages received from `peer` by the drain task.
    pub batches_received: u64,
    pub messages_received: u64,
}

/// A snapshot of a shard's mesh counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshStats {
    pub me: ShardId,
    pub peers: Vec<PeerStats>,
    /// Messages sent to `me` or to a shard that does not exist (programmer errors), dropped.
    pub misrouted_msgs: u64,
}

impl<T: Send + 'static> Mesh<T> {
    pub fn me(&self) -> ShardId {
        self.inner.me
    }

    pub fn shard_count(&self) -> u16 {
        self.inner.shard_count
    }

    /// Queues `msg` for shard `to` (`to != me`). Never blocks, never awaits. Everything queued
    /// for one destination before the current task yields travels as one ring slot.
    pub fn send(&self, to: ShardId, msg: T) {
        let inner = &self.inner;
        let Some(peer) = inner.peers.get(to.index()).and_then(Option::as_ref) else {
            inner.misrouted_msgs.set(inner.misrouted_msgs.get() + 1);
            // Not a panic: the destination may come from a computation over peer input.
            tracing::error!(shard = %inner.me, to = %to, "mesh: message for no peer shard dropped");
            return;
        };
        if peer.closed.get() {
            peer.dropped_msgs.set(peer.dropped_msgs.get() + 1);
            return;
        }
        let (was_empty, full) = {
            let mut pending = peer.pending.borrow_mut();
            let was_empty = pending.is_empty();
            pending.push(msg);
            (was_empty, pending.len() >= MAX_PENDING_BATCH_MSGS)
        };
        if full {
            // A task that keeps producing without yielding (a reader whose socket always has
            // data) would otherwise grow this batch without bound and unseen by congestion:
            // hand it to the ring (or overflow) now, where it counts.
            flush_peer(inner, to.0);
            return;
        }
        if was_empty {
            inner.dirty.borrow_mut().push(to.0);
            if !inner.flush_scheduled.replace(true) {
                let inner = inner.clone();
                // glommio polls a task spawned into the current queue right away, inside this
                // call; yield first so the flush runs after the sending task yields.
                spawn_in(self.inner.tq, async move {
                    futures_lite::future::yield_now().await;
                    flush_dirty(&inner);
                })
                .detach();
            }
        }
    }

    /// Sends a clone of `msg` to every other shard.
    pub fn broadcast(&self, msg: T)
    where
        T: Clone,
    {
        for to in 0..self.inner.shard_count {
            if to != self.inner.me.0 {
                self.send(ShardId(to), msg.clone());
            }
        }
    }

    /// True while some destination's ring is full and its overflow holds more than the
    /// congestion threshold. Connection drivers stop reading sockets while this holds.
    pub fn congested(&self) -> bool {
        self.inner.congested_peers.get() > 0
    }

    /// Resolves once [`Mesh::congested`] is false.
    pub async fn wait_uncongested(&self) {
        std::future::poll_fn(|cx| {
            if !self.congested() {
                Poll::Ready(())
            } else {
                self.inner
                    .congestion_waiters
                    .borrow_mut()
                    .push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// True when nothing is waiting to enter a ring (no pending batch, no overflow).
    pub fn is_flushed(&self) -> bool {
        self.inner.peers.iter().flatten().all(Peer::idle)
    }

    /// Resolves once every message queued so far has entered its ring (or been dropped because
    /// its destination is gone). For shutdown and tests: it says nothing about the receiver.
    pub async fn flushed(&self) {
        std::future::poll_fn(|cx| {
            if self.is_flushed() {
                Poll::Ready(())
            } else {
                self.inner
                    .idle_waiters
                    .borrow_mut()
                    .push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MeshStats {
        let inner = &self.inner;
        let peers = (0..inner.shard_count)
            .filter(|&i| i != inner.me.0)
            .map(|i| {
                let idx = usize::from(i);
                let mut s = PeerStats {
                    peer: ShardId(i),
                    batches_sent: 0,
                    messages_sent: 0,
                    overflow_msgs: 0,
                    overflow_high_water_msgs: 0,
                    dropped_msgs: 0,
                    batches_received: 0,
                    messages_received: 0,
                };
                if let Some(p) = inner.peers.get(idx).and_then(Option::as_ref) {
                    s.batches_sent = p.batches_sent.get();
                    s.messages_sent = p.messages_sent.get();
                    s.overflow_msgs = p.overflow_msgs.get();
                    s.overflow_high_water_msgs = p.overflow_high_water_msgs.get();
                    s.dropped_msgs = p.dropped_msgs.get();
                }
                if let Some(c) = inner.received.get(idx) {
                    s.batches_received = c.batches.get();
                    s.messages_received = c.messages.get();
                }
                s
            })
            .collect();
        MeshStats {
            me: inner.me,
            peers,
            misrouted_msgs: inner.misrouted_msgs.get(),
        }
    }
}

/// The flush task: moves every dirty destination's pending buffer into its ring or overflow.
fn flush_dirty<T: Send + 'static>(inner: &Rc<Inner<T>>) {
    inner.flush_scheduled.set(false);
    let dirty = std::mem::take(&mut *inner.dirty.borrow_mut());
    for to in dirty {
        flush_peer(inner, to);
    }
    wake_idle_if_flushed(inner);
}

fn flush_peer<T: Send + 'static>(inner: &Rc<Inner<T>>, to: u16) {
    let Some(peer) = inner.peers.get(usize::from(to)).and_then(Option::as_ref) else {
        return;
    };
    let batch = std::mem::take(&mut *peer.pending.borrow_mut());
    if batch.is_empty() {
        return;
    }
    if peer.overflow_msgs.get() == 0 {
        if let Some(batch) = try_push(inner, peer, to, batch) {
            add_overflow(peer, batch);
        }
    } else {
        add_overflow(peer, batch);
    }
    after_overflow_change(inner, peer);
    if (peer.overflow_msgs.get() > 0 || peer.congested.get()) && !peer.retry_scheduled.replace(true) {
        let inner2 = inner.clone();
        spawn_in(inner.tq, retry_overflow(inner2, to)).detach();
    }
}

/// Tries to put `batch` into the ring; gives it back when the ring is full. A closed ring drops
/// the batch (counted).
fn try_push<T: Send + 'static>(
    inner: &Inner<T>,
    peer: &Peer<T>,
    to: u16,
    batch: Vec<T>,
) -> Option<Vec<T>> {
    let n = batch.len() as u64;
    match peer.ring.try_send(batch) {
        Ok(()) => {
            peer.in_flight.fetch_add(n as usize, Ordering::Relaxed);
            peer.batches_sent.set(peer.batches_sent.get() + 1);
            peer.messages_sent.set(peer.messages_sent.get() + n);
            None
        }
        Err(GlommioError::WouldBlock(ResourceType::Channel(batch))) => Some(batch),
        Err(e) => {
            // Closed: the receiving executor is gone (shutdown or crash). Nothing can be delivered.
            if !peer.closed.replace(true) {
                tracing::warn!(shard = %inner.me, to, error = %e, "mesh: ring closed, dropping messages for that shard");
            }
            peer.dropped_msgs.set(peer.dropped_msgs.get() + n);
            None
        }
    }
}

fn add_overflow<T: Send + 'static>(peer: &Peer<T>, mut batch: Vec<T>) {
    let n = batch.len();
    {
        let mut overflow = peer.overflow.borrow_mut();
        match overflow.back_mut() {
            Some(back) if back.len() + n <= MAX_MERGED_BATCH_MSGS => back.append(&mut batch),
            _ => overflow.push_back(batch),
        }
    }
    let now = peer.overflow_msgs.get() + n;
    peer.overflow_msgs.set(now);
    if now > peer.overflow_high_water_msgs.get() {
        peer.overflow_high_water_msgs.set(now);
    }
}

/// Pushes overflow batches into the ring, oldest first, until it is full. Returns whether any
/// batch moved.
fn drain_overflow<T: Send + 'static>(inner: &Inner<T>, peer: &Peer<T>, to: u16) -> bool {
    let mut progressed = false;
    loop {
        let Some(batch) = peer.overflow.borrow_mut().pop_front() else {
            break;
        };
        let n = batch.len();
        match try_push(inner, peer, to, batch) {
            None => {
                progressed = true;
                peer.overflow_msgs
                    .set(peer.overflow_msgs.get().saturating_sub(n));
            }
            Some(batch) => {
                peer.overflow.borrow_mut().push_front(batch);
                break;
            }
        }
    }
    if peer.closed.get() {
        // Whatever is left can never be delivered.
        let left: usize = peer.overflow.borrow_mut().drain(..).map(|b| b.len()).sum();
        peer.dropped_msgs.set(peer.dropped_msgs.get() + left as u64);
        peer.overflow_msgs.set(0);
    }
    progressed
}

async fn retry_overflow<T: Send + 'static>(inner: Rc<Inner<T>>, to: u16) {
    let mut backoff = RETRY_MIN;
    loop {
        let Some(peer) = inner.peers.get(usize::from(to)).and_then(Option::as_ref) else {
            return;
        };
        let progressed = drain_overflow(&inner, peer, to);
        after_overflow_change(&inner, peer);
        // Keep watching while congested even with an empty overflow: congestion ends when the
        // receiver has handled enough of what is in the ring.
        if peer.overflow_msgs.get() == 0 && !peer.congested.get() {
            peer.retry_scheduled.set(false);
            wake_idle_if_flushed(&inner);
            return;
        }
        backoff = if progressed {
            RETRY_MIN
        } else {
            (backoff * 2).min(RETRY_MAX)
        };
        glommio::timer::sleep(backoff).await;
    }
}

/// Updates the congestion state of `peer` and wakes waiters when the shard stops being congested.
fn after_overflow_change<T: Send + 'static>(inner: &Inner<T>, peer: &Peer<T>) {
    let in_flight = peer.in_flight.load(Ordering::Relaxed);
    let now = peer.overflow_msgs.get().saturating_add(in_flight) > inner.threshold_msgs;
    if now == peer.congested.replace(now) {
        return;
    }
    if now {
        inner.congested_peers.set(inner.congested_peers.get() + 1);
    } else {
        let left = inner.congested_peers.get().saturating_sub(1);
        inner.congested_peers.set(left);
        if left == 0 {
            let waiters = std::mem::take(&mut *inner.congestion_waiters.borrow_mut());
            waiters.into_iter().for_each(Waker::wake);
        }
    }
}

fn wake_idle_if_flushed<T: Send + 'static>(inner: &Inner<T>) {
    if inner.idle_waiters.borrow().is_empty() {
        return;
    }
    if inner.peers.iter().flatten().all(Peer::idle) {
        let waiters = std::mem::take(&mut *inner.idle_waiters.borrow_mut());
        waiters.into_iter().for_each(Waker::wake);
    }
}

/// The inbound rings of one shard, before their drain tasks start.
pub struct Inbound<T: Send + 'static> {
    me: ShardId,
    rings: Vec<(ShardId, ConnectedReceiver<Vec<T>>, Arc<AtomicUsize>)>,
    received: Rc<Vec<InCounters>>,
}

impl<T: Send + 'static> Inbound<T> {
    /// Spawns one always-running drain task per inbound ring (into `tq`, or the current task
    /// queue), calling `handler(from, batch)` for every batch, in ring order. The handler runs
    /// synchronously inside the drain task: it must not panic (that takes the shard down) and
    /// should hand long work to other tasks. A drain task ends when its sending shard is gone.
    pub fn spawn_drains(
        self,
        tq: Option<TaskQueueHandle>,
        handler: impl Fn(ShardId, Vec<T>) + 'static,
    ) {
        let handler = Rc::new(handler);
        let me = self.me;
        for (from, ring, in_flight) in self.rings {
            let handler = handler.clone();
            let received = self.received.clone();
            spawn_in(tq, async move {
                while let Some(batch) = ring.recv().await {
                    if let Some(c) = received.get(from.index()) {
                        c.batches.set(c.batches.get() + 1);
                        c.messages.set(c.messages.get() + batch.len() as u64);
                    }
                    let n = batch.len();
                    handler(from, batch);
                    // Handled: give the sender its credit back.
                    in_flight.fetch_sub(n, Ordering::Relaxed);
                    glommio::yield_if_needed().await;
                }
                tracing::debug!(shard = %me, from = %from, "mesh: inbound ring closed");
            })
            .detach();
        }
    }
}
