//! The shard's durable state: its write-ahead log, how acknowledgements wait for it, and the
//! translation between broker state and log records.
//!
//! Lives on one shard (`!Send`): one [`ShardLog`] per shard, opened on its executor before the
//! shard accepts connections, shared by its tasks through `Rc`. Only the owner of a state writes
//! its records: the home shard of a session, the owner shard of a retained topic.
//!
//! *Architecture invariant:* nothing that an acknowledgement promises is acknowledged before the
//! records it depends on are durable. A caller takes a [`LogMark`] before doing work, asks
//! [`ShardLog::since`] afterwards, and sends the acknowledgement behind the resulting hold
//! ([`crate::outbound::Hold`]), or answers another shard's request only after the commit
//! ([`ShardLog::confirm_after`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use flux_core::mqtt::{
    decode_publish_properties, encode_publish_properties, subscription_options_from_byte, PacketId, QoS,
};
use flux_core::session::{Delivery, Journal, Message, PendingWill, Publication, RestoredSession};
use flux_core::topic::TopicName;
use flux_core::ShardId;
use flux_wal::{DmaStorage, Lsn, Record, StoredMessage, Wal, WalConfig, WalError};

use crate::signal::Signal;

/// Appended bytes awaiting commit beyond which `interval` mode makes acknowledgements wait
/// (a quarter of the log's default `max_pending_bytes`).
const PENDING_BACKPRESSURE_BYTES: usize = 8 << 20;

/// When an acknowledged write is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DurabilityMode {
    /// Acknowledged means fdatasync'd (group commit).
    Fsync,
    /// Acknowledgements do not wait; the log is synced at least every `interval`. A crash loses
    /// at most that window of acknowledged work.
    Interval(Duration),
}

/// How a shard's log is set up (from `[durability]` in fluxd.toml).
#[derive(Clone, Debug)]
pub struct DurabilityConfig {
    pub mode: DurabilityMode,
    /// Size of each segment file.
    pub segment_size_bytes: u64,
    /// A checkpoint (every live record rewritten, older segments deleted) starts once the log
    /// has grown by more than this many times the live data of the last checkpoint (and by
    /// at least two segments) since then.
    pub checkpoint_growth_factor: u64,
}

impl Default for DurabilityConfig {
    fn default() -> Self {
        DurabilityConfig {
            mode: DurabilityMode::Fsync,
            segment_size_bytes: flux_wal::DEFAULT_SEGMENT_SIZE_BYTES,
            checkpoint_growth_factor: 2,
        }
    }
}

/// The directory of shard `me`'s log under the data directory.
pub fn shard_log_dir(data_dir: &std::path::Path, me: ShardId) -> PathBuf {
    data_dir.join(format!("wal-shard-{}", me.0))
}

/// Wall-clock milliseconds for `Instant`s and back, fixed at start (records carry wall time so
/// deadlines count across restarts; the broker works in `Instant`s).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    base: Instant,
    base_ms: u64,
}

impl WallClock {
    pub fn now() -> WallClock {
        let base_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        WallClock { base: Instant::now(), base_ms }
    }

    pub fn to_ms(&self, at: Instant) -> u64 {
        if at >= self.base {
            self.base_ms.saturating_add(at.duration_since(self.base).as_millis() as u64)
        } else {
            self.base_ms.saturating_sub(self.base.duration_since(at).as_millis() as u64)
        }
    }

    pub fn to_instant(&self, ms: u64) -> Instant {
        if ms >= self.base_ms {
            // Checked: times come from the log and from the admin endpoint (a seek), not only
            // from this clock.
            let later = Duration::from_millis(ms - self.base_ms);
            self.base.checked_add(later).unwrap_or(self.base + Duration::from_secs(100 * 365 * 86_400))
        } else {
            self.base.checked_sub(Duration::from_millis(self.base_ms - ms)).unwrap_or(self.base)
        }
    }
}

/// Where the log was before some work; see [`ShardLog::since`].
#[derive(Clone, Copy, Debug)]
pub struct LogMark {
    next: Lsn,
    failures: u64,
}

/// What an acknowledgement of the work since a mark must wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Nothing was written (or the mode does not wait).
    Nothing,
    /// Records below this LSN must be durable first.
    Commit(Lsn),
    /// A write was refused: the work is not durable and must not be acknowledged as such.
    Failed,
}

/// One shard's write-ahead log and the bookkeeping around it. See the module docs.
pub struct ShardLog {
    wal: Wal<DmaStorage>,
    mode: DurabilityMode,
    clock: WallClock,
    /// Appends refused since open (poisoned log, backpressure, oversized record).
    failures: Cell<u64>,
    /// Answers to other shards owed once the log is durable up to the LSN.
    replies: RefCell<VecDeque<(Lsn, ShardId, u64)>>,
    replies_ready: Signal,
    /// Set by every append: the flusher commits records nobody waits for (a disconnect, an
    /// expiry) soon, and in the interval mode everything.
    dirty: Signal,
    /// Set by every append: the checkpoint loop and the spare-segment loop sleep on these, so
    /// an idle shard does not wake to check a log that has not grown (a `Signal` wakes one task).
    grew: Signal,
    grew_spare: Signal,
    /// Live bytes written by the last checkpoint, and the log's size right after it.
    checkpoint: Cell<(u64, u64)>,
    growth_factor: u64,
    segment_size_bytes: u64,
    checkpointing: Cell<bool>,
    low_space_warned: Cell<bool>,
}

/// Bytes available to this process on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `st` is a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u64 here, u32 on some): a cast serves all.
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl ShardLog {
    /// Open (recovering) the log of this shard in `dir`. Every record is handed to `on_record`
    /// in LSN order.
    pub async fn open(
        dir: PathBuf,
        config: &DurabilityConfig,
        clock: WallClock,
        mut on_record: impl FnMut(Record),
    ) -> Result<ShardLog, WalError> {
        let storage = DmaStorage::open(&dir, flux_wal::DmaStorageOptions::default()).await.map_err(|e| WalError::Io {
            op: "open",
            segment: dir.display().to_string(),
            source: e,
        })?;
        let wal_config = WalConfig { segment_size_bytes: config.segment_size_bytes, ..WalConfig::default() };
        let mut undecodable = 0u64;
        let (wal, report) = Wal::open(storage, wal_config, |_, archived| match archived.to_record() {
            Ok(r) => on_record(r),
            Err(_) => undecodable += 1,
        })
        .await?;
        if undecodable > 0 {
            tracing::error!(dir = %dir.display(), records = undecodable, "WAL records passed their checksum but could not be decoded; skipped");
        }
        if let Some(t) = &report.truncated {
            tracing::warn!(dir = %dir.display(), segment = t.segment_id, offset = t.offset, reason = %t.reason,
                "WAL torn tail truncated (a write in flight at the crash; it was never acknowledged)");
        }
        tracing::info!(dir = %dir.display(), records = report.records, segments = report.segments,
            bytes = report.frame_bytes, read_ms = report.read_time.as_millis() as u64, "WAL recovered");
        Ok(ShardLog {
            wal,
            mode: config.mode,
            clock,
            failures: Cell::new(0),
            replies: RefCell::new(VecDeque::new()),
            replies_ready: Signal::default(),
            dirty: Signal::default(),
            grew: Signal::default(),
            grew_spare: Signal::default(),
            // Nothing known to be live yet: a recovered log longer than two segments is
            // checkpointed right away (its live part may be tiny).
            checkpoint: Cell::new((0, 0)),
            growth_factor: config.checkpoint_growth_factor.max(1),
            segment_size_bytes: config.segment_size_bytes,
            checkpointing: Cell::new(false),
            low_space_warned: Cell::new(false),
        })
    }

    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    pub fn wal(&self) -> &Wal<DmaStorage> {
        &self.wal
    }

    pub fn mode(&self) -> DurabilityMode {
        self.mode
    }

    /// Buffer a record (made durable by the next commit). A refusal is counted and logged; the
    /// caller finds it through [`since`](ShardLog::since).
    pub fn append(&self, record: &Record) {
        self.notify_appended();
        if let Err(e) = self.wal.append(record) {
            let n = self.failures.get() + 1;
            self.failures.set(n);
            if n.is_power_of_two() {
                tracing::error!(error = %e, refused = n, "WAL append refused: durable work is being refused");
            }
        }
    }

    /// A checkpoint's record: not bounded by `max_pending_bytes` (it copies state held in memory
    /// anyway), and a refusal does not count against other work (the checkpoint fails alone).
    pub fn append_checkpoint(&self, record: &Record) -> bool {
        self.notify_appended();
        self.wal.append_unbounded(record).is_ok()
    }

    pub fn mark(&self) -> LogMark {
        LogMark { next: self.wal.next_lsn(), failures: self.failures.get() }
    }

    /// What acknowledging the work done since `mark` must wait for.
    pub fn since(&self, mark: LogMark) -> Pending {
        if self.failures.get() != mark.failures {
            return Pending::Failed;
        }
        let next = self.wal.next_lsn();
        if next == mark.next || !self.acks_wait() {
            return Pending::Nothing;
        }
        Pending::Commit(next)
    }

    /// Whether acknowledgements wait for the commit now: always with `fsync`; with `interval`
    /// only while the log is far behind (a quarter of its pending limit), so publishers are held
    /// back instead of having their publishes refused when a segment rollover stalls commits.
    fn acks_wait(&self) -> bool {
        match self.mode {
            DurabilityMode::Fsync => true,
            DurabilityMode::Interval(_) => self.wal.pending_bytes() > PENDING_BACKPRESSURE_BYTES,
        }
    }

    /// Everything appended so far (for acknowledgements of records appended earlier).
    pub fn all_appended(&self) -> Pending {
        if self.wal.poisoned().is_some() {
            return Pending::Failed;
        }
        let next = self.wal.next_lsn();
        if !self.acks_wait() || self.wal.durable_lsn() >= next {
            return Pending::Nothing;
        }
        Pending::Commit(next)
    }

    /// Wait until records below `target` are durable; false if the log failed.
    pub async fn commit_to(&self, target: Lsn) -> bool {
        self.wal.commit_to(target).await.is_ok()
    }

    /// Answer request `req` of shard `to` once the log is durable up to `target`.
    pub fn confirm_after(&self, target: Lsn, to: ShardId, req: u64) {
        self.replies.borrow_mut().push_back((target, to, req));
        self.replies_ready.notify();
    }

    /// For the shard's reply task: wait for owed answers, commit, and hand back each answer with
    /// whether its records are durable.
    pub async fn next_replies(&self) -> Vec<(ShardId, u64, bool)> {
        loop {
            let batch: Vec<(Lsn, ShardId, u64)> = self.replies.borrow_mut().drain(..).collect();
            if batch.is_empty() {
                self.replies_ready.wait().await;
                continue;
            }
            let target = batch.iter().map(|(l, _, _)| *l).max().unwrap_or_default();
            let ok = self.commit_to(target).await;
            return batch.into_iter().map(|(_, to, req)| (to, req, ok)).collect();
        }
    }

    /// The shard's flusher task: commits appended records that no acknowledgement waits for
    /// (fsync mode: as soon as the shard is idle; interval mode: every interval), so that state
    /// changes nobody waits on (a disconnect's expiry clock, a delayed will) reach the disk too.
    pub async fn run_flusher(self: std::rc::Rc<Self>) {
        loop {
            self.dirty.wait().await;
            match self.mode {
                DurabilityMode::Fsync => glommio::yield_if_needed().await,
                DurabilityMode::Interval(every) => glommio::timer::sleep(every).await,
            }
            if !self.flush().await {
                // Poisoned: nothing more will be durable; stop trying (appends are refused).
                return;
            }
        }
    }

    /// The shard's task that keeps the next WAL segment allocated and zero-filled ahead of its
    /// rollover, so a group commit that rolls over only renames a file instead of writing 64 MiB
    /// of zeros first (that once held every acknowledgement of the shard for 100 ms or more).
    pub async fn run_spare(self: std::rc::Rc<Self>) {
        let mut failures = 0u64;
        loop {
            // Only appends roll the log over (and take the spare). Rollovers come seconds apart
            // even at full speed; a rarer check costs fewer wake-ups.
            self.grew_spare.wait().await;
            glommio::timer::sleep(Duration::from_millis(100)).await;
            if self.wal.has_spare() || self.wal.poisoned().is_some() || self.wal.segment_ids().is_empty() {
                continue;
            }
            if let Err(e) = self.wal.prepare_spare().await {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "WAL spare segment not made; rollovers allocate inline");
                }
                glommio::timer::sleep(Duration::from_secs(1)).await;
            }
        }
    }

    /// Commit what is pending.
    pub async fn flush(&self) -> bool {
        if self.wal.durable_lsn() >= self.wal.next_lsn() {
            return true;
        }
        self.wal.commit().await.is_ok()
    }

    fn notify_appended(&self) {
        self.dirty.notify();
        self.grew.notify();
        self.grew_spare.notify();
    }

    /// Completes once something was appended since the last wait (at once if it already was).
    /// For the checkpoint loop, its only waiter.
    pub fn grown(&self) -> crate::signal::SignalWait<'_> {
        self.grew.wait()
    }

    /// Whether the log has grown enough since the last checkpoint to write a new one.
    pub fn checkpoint_due(&self) -> bool {
        if self.checkpointing.get() || self.wal.poisoned().is_some() {
            return false;
        }
        let (live, base) = self.checkpoint.get();
        let used = self.wal.disk_usage().used_bytes;
        let allowed = (live.saturating_mul(self.growth_factor)).max(2 * self.segment_size_bytes);
        if used.saturating_sub(base) <= allowed {
            return false;
        }
        // A checkpoint first needs room for a copy of the live state (and a segment or two to
        // write it in); on a disk without it, it would only fill the disk and poison the log.
        let needed = live.saturating_mul(2).saturating_add(2 * self.segment_size_bytes);
        match free_bytes(self.wal.storage().dir()) {
            Some(free) if free < needed => {
                if !self.low_space_warned.replace(true) {
                    tracing::warn!(free_bytes = free, needed_bytes = needed, "WAL checkpoint postponed: not enough free disk space");
                }
                false
            }
            _ => {
                self.low_space_warned.set(false);
                true
            }
        }
    }

    /// A checkpoint starts or ends. While it runs, its copy (bounded by the live state, which
    /// is in memory anyway) does not count against ordinary appends' pending limit: those are
    /// held back by their acknowledgements instead (fsync waits for commits; interval waits
    /// beyond 8 MiB behind).
    pub fn set_checkpointing(&self, on: bool) {
        self.checkpointing.set(on);
        self.wal.set_pending_allowance(if on { usize::MAX / 4 } else { 0 });
    }

    /// A checkpoint that rewrote `live_bytes` starting at `start` is committed: delete the
    /// segments before it.
    pub async fn finish_checkpoint(&self, start: Lsn, live_bytes: u64) {
        match self.wal.reclaim_before(start).await {
            Ok(r) => {
                let usage = self.wal.disk_usage();
                tracing::info!(removed_segments = r.removed_segments.len(), freed_bytes = r.freed_bytes,
                    live_bytes, segments = usage.segments, disk_bytes = usage.allocated_bytes, "WAL checkpoint done");
            }
            Err(e) => tracing::error!(error = %e, "WAL reclamation failed"),
        }
        self.checkpoint.set((live_bytes, self.wal.disk_usage().used_bytes));
    }
}

/// A message as stored for a session's delivery: the delivery's QoS and RETAIN flag, its
/// subscription identifiers folded into the stored properties.
pub fn stored_delivery(d: &Delivery, clock: &WallClock) -> StoredMessage {
    let mut properties = d.message.properties.clone();
    properties.subscription_identifiers = d.subscription_ids.clone();
    StoredMessage {
        topic: d.message.topic.as_str().to_owned(),
        qos: d.qos.as_u8(),
        retain: d.retain,
        payload: d.message.payload.to_vec(),
        properties: encode_publish_properties(&properties),
        expires_at_ms: d.message.expires_at.map(|at| clock.to_ms(at)),
    }
}

/// A message as stored on its own (retained message, will).
pub fn stored_message(m: &Message, clock: &WallClock) -> StoredMessage {
    StoredMessage {
        topic: m.topic.as_str().to_owned(),
        qos: m.qos.as_u8(),
        retain: m.retain,
        payload: m.payload.to_vec(),
        properties: encode_publish_properties(&m.properties),
        expires_at_ms: m.expires_at.map(|at| clock.to_ms(at)),
    }
}

/// The inverse of [`stored_message`]; `None` for a record that does not make a valid message.
pub fn message_from_stored(s: &StoredMessage, clock: &WallClock, publisher: Option<Arc<str>>) -> Option<Message> {
    let topic = TopicName::new(&s.topic).ok()?;
    let properties = decode_publish_properties(&s.properties).ok()?;
    Some(Arc::new(Publication {
        topic,
        payload: Bytes::from(s.payload.clone()),
        qos: QoS::from_u8(s.qos)?,
        retain: s.retain,
        properties,
        expires_at: s.expires_at_ms.map(|ms| clock.to_instant(ms)),
        publisher,
    }))
}

/// The inverse of [`stored_delivery`].
pub fn delivery_from_stored(s: &StoredMessage, clock: &WallClock) -> Option<Delivery> {
    let m = message_from_stored(s, clock, None)?;
    let mut publication = Arc::try_unwrap(m).ok()?;
    let subscription_ids = std::mem::take(&mut publication.properties.subscription_identifiers);
    let qos = publication.qos;
    let retain = publication.retain;
    Some(Delivery { message: Arc::new(publication), qos, retain, subscription_ids, shared: None, queue: None })
}

/// The records of one journal entry of session `client_id`.
pub fn journal_record(client_id: &str, entry: &Journal, clock: &WallClock) -> Record {
    let client_id = client_id.to_owned();
    match entry {
        Journal::Subscribe { filter, options, id, group } => Record::SessionSubscribe {
            client_id,
            filter: filter.clone(),
            options: flux_core::mqtt::subscription_options_byte(options),
            subscription_id: *id,
            group: group.clone(),
        },
        Journal::Unsubscribe { filter } => Record::SessionUnsubscribe { client_id, filter: filter.clone() },
        Journal::Enqueued { msg_id, delivery } => {
            Record::MessageEnqueued { client_id, msg_id: *msg_id, message: stored_delivery(delivery, clock) }
        }
        Journal::Sent { msg_id, packet_id } => Record::Outbound {
            client_id,
            msg_id: *msg_id,
            state: flux_wal::OutboundState::Sent { packet_id: packet_id.get() },
        },
        Journal::PubrecReceived { msg_id } => {
            Record::Outbound { client_id, msg_id: *msg_id, state: flux_wal::OutboundState::PubrecReceived }
        }
        Journal::Completed { msg_id } => {
            Record::Outbound { client_id, msg_id: *msg_id, state: flux_wal::OutboundState::Completed }
        }
        Journal::Qos2Received { packet_id } => Record::InboundQos2Received { client_id, packet_id: packet_id.get() },
        Journal::Qos2Released { packet_id } => Record::InboundQos2Released { client_id, packet_id: packet_id.get() },
    }
}

/// A persistent session as the replay rebuilds it.
#[derive(Default)]
pub struct LoggedSession {
    pub image: RestoredSession,
    /// Wall time of the last disconnect, if the session was offline (else it was connected at
    /// the crash: its clock starts at recovery).
    pub disconnected_at_ms: Option<u64>,
    /// A delayed will and when it is due.
    pub will: Option<(u64, StoredMessage)>,
}

/// The shard's durable state as the replay of its log rebuilds it.
#[derive(Default)]
pub struct Replayed {
    pub retained: HashMap<String, StoredMessage>,
    pub sessions: HashMap<String, LoggedSession>,
    /// Durable queues this shard owns.
    pub queues: HashMap<String, crate::broker::queues::ReplayedQueue>,
    /// Records that named a state the replay did not know (normal after a checkpoint deleted
    /// older segments; the checkpoint rewrote what was live).
    pub orphans: u64,
    pub records: u64,
}

impl Replayed {
    pub fn apply(&mut self, record: Record, clock: &WallClock) {
        self.records += 1;
        if crate::broker::queues::replay_queue_record(&mut self.queues, &record, clock) {
            return;
        }
        match record {
            Record::RetainedSet { message } => {
                self.retained.insert(message.topic.clone(), message);
            }
            Record::RetainedClear { topic } => {
                self.retained.remove(&topic);
            }
            Record::SessionCreate { client_id, protocol_level, session_expiry_secs } => {
                let image = RestoredSession {
                    client_id: client_id.clone(),
                    protocol_level,
                    session_expiry_secs,
                    ..RestoredSession::default()
                };
                self.sessions.insert(client_id, LoggedSession { image, disconnected_at_ms: None, will: None });
            }
            Record::SessionCheckpoint { client_id, protocol_level, session_expiry_secs } => {
                self.sessions.entry(client_id.clone()).or_insert_with(|| LoggedSession {
                    image: RestoredSession {
                        client_id,
                        protocol_level,
                        session_expiry_secs,
                        ..RestoredSession::default()
                    },
                    disconnected_at_ms: None,
                    will: None,
                });
            }
            Record::SessionDisconnected { client_id, at_ms, session_expiry_secs } => {
                if let Some(s) = self.session(&client_id) {
                    s.disconnected_at_ms = Some(at_ms);
                    s.image.session_expiry_secs = session_expiry_secs;
                }
            }
            Record::SessionResumed { client_id, protocol_level, session_expiry_secs } => {
                if let Some(s) = self.session(&client_id) {
                    s.disconnected_at_ms = None;
                    s.image.protocol_level = protocol_level;
                    s.image.session_expiry_secs = session_expiry_secs;
                }
            }
            Record::SessionExpire { client_id } => {
                self.sessions.remove(&client_id);
            }
            Record::SessionSubscribe { client_id, filter, options, subscription_id, group } => {
                let Some(options) = subscription_options_from_byte(options) else { return };
                self.journal(&client_id, Journal::Subscribe { filter, options, id: subscription_id, group });
            }
            Record::SessionUnsubscribe { client_id, filter } => {
                self.journal(&client_id, Journal::Unsubscribe { filter });
            }
            Record::MessageEnqueued { client_id, msg_id, message } => {
                if let Some(delivery) = delivery_from_stored(&message, clock) {
                    self.journal(&client_id, Journal::Enqueued { msg_id, delivery });
                }
            }
            Record::Outbound { client_id, msg_id, state } => {
                let entry = match state {
                    flux_wal::OutboundState::Sent { packet_id } => match PacketId::new(packet_id) {
                        Some(packet_id) => Journal::Sent { msg_id, packet_id },
                        None => return,
                    },
                    flux_wal::OutboundState::PubrecReceived => Journal::PubrecReceived { msg_id },
                    flux_wal::OutboundState::Completed => Journal::Completed { msg_id },
                };
                self.journal(&client_id, entry);
            }
            Record::InboundQos2Received { client_id, packet_id } => {
                if let Some(packet_id) = PacketId::new(packet_id) {
                    self.journal(&client_id, Journal::Qos2Received { packet_id });
                }
            }
            Record::InboundQos2Released { client_id, packet_id } => {
                if let Some(packet_id) = PacketId::new(packet_id) {
                    self.journal(&client_id, Journal::Qos2Released { packet_id });
                }
            }
            Record::WillDelayed { client_id, publish_at_ms, will } => {
                if let Some(s) = self.session(&client_id) {
                    s.will = Some((publish_at_ms, will));
                }
            }
            Record::WillDone { client_id } => {
                if let Some(s) = self.session(&client_id) {
                    s.will = None;
                }
            }
            Record::Checkpoint { .. } => {}
            Record::QueueDeclare { .. }
            | Record::QueueDelete { .. }
            | Record::QueueAppend { .. }
            | Record::QueueDone { .. }
            | Record::QueueTrim { .. }
            | Record::QueueGroup { .. }
            | Record::QueueCommitted { .. }
            | Record::QueueColdRun { .. }
            | Record::QueueSeek { .. }
            | Record::QueueDoneMany { .. }
            | Record::QueueDoneRanges { .. } => {}
        }
    }

    fn session(&mut self, client_id: &str) -> Option<&mut LoggedSession> {
        let found = self.sessions.get_mut(client_id);
        if found.is_none() {
            self.orphans += 1;
        }
        found
    }

    fn journal(&mut self, client_id: &str, entry: Journal) {
        if let Some(s) = self.session(client_id) {
            s.image.apply(entry);
        }
    }
}

/// The pending will of a restored session, as the session keeps it.
pub fn pending_will_from_stored(publish_at_ms: u64, will: &StoredMessage, client_id: &str, clock: &WallClock) -> Option<PendingWill> {
    let message = message_from_stored(will, clock, Some(Arc::from(client_id)))?;
    Some(PendingWill { message, publish_at: clock.to_instant(publish_at_ms) })
}
