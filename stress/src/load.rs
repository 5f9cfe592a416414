//! Publish/subscribe load: N publisher threads, M subscriber threads, one scenario.
//!
//! Every message carries, in its first 20 payload bytes, the time it was *meant* to be sent
//! (nanoseconds since the run's epoch), its sequence number and its publisher's index. Latency is
//! receive time minus intended send time, so a stalled broker (or a stalled load generator) shows
//! up as latency instead of as fewer samples: no coordinated omission.
//!
//! Modes:
//! - **fixed** (open loop): each publisher sends at `rate / N` per second on a fixed schedule,
//!   whatever the broker does; late sends are sent as soon as possible with their original stamp.
//! - **max** (closed loop): each publisher sends as fast as it can while at most `window` of its
//!   messages are undelivered (counted end to end at the subscribers), the stamp is the actual send
//!   time.
//!
//! Every run is bounded twice: by a message count and by a send duration, then by a drain timeout
//! for messages still in flight. Figures are taken over the *measured window*, which starts after
//! the warm-up (by intended send time) and ends at the last delivery.
//!
//! At QoS 1/2 each publisher also times its acknowledgements: from the `write` that carries a
//! PUBLISH to the read of its PUBACK (PUBCOMP at QoS 2), the figure a durable broker's disk sync
//! shows up in (`flux-stress durable`). With `persistent_subscribers` the subscribers keep their
//! sessions (clean_session=0 / Session Expiry Interval > 0), so fluxd stores every message in a
//! durable queue before acknowledging it.
//!
//! The `queue` scenario (fluxd durable queues): publishers on topics bound to one queue,
//! subscribers competing consumers of it (`$queue/<name>`). There every message is accounted for
//! ([`crate::ledger`]): which publishes were acknowledged (PUBACK, by packet id), which reached
//! any consumer and how often, so `ledger.lost` is the count of acknowledged messages no consumer
//! got. With `backlog` the consumers attach only once every publish is acknowledged (the queue
//! holds the whole run), and the drain is timed.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use flux_core::mqtt::{Packet, PacketId, ProtocolVersion, PubResp, Publish, QoS};
use flux_core::topic::TopicName;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{self, ConnectOptions, Reader, Writer};
use crate::ledger::{self, AtomicSeqSet, Insert, PubLedger, Receipts, SeqSet, Verdict};
use crate::stats::{self, new_histogram, Percentiles};

/// Bytes of the stamp at the start of every payload: intended send time, sequence, publisher.
pub const STAMP_BYTES: usize = 20;
/// Keep alive asked for by load connections: longer than any bounded run, so QoS 0 subscribers
/// (which never send anything) are not timed out.
pub const LOAD_KEEP_ALIVE_SECS: u16 = 900;
/// Longest send phase accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(900);
/// A publisher in max mode flushes once this much is buffered.
const FLUSH_BYTES: usize = 16 * 1024;
/// Closed loop: a window that makes no progress for this long is taken as lost messages (QoS 0
/// may be dropped by a broker) and reopened, so a run never hangs on a loss.
const WINDOW_STALL: Duration = Duration::from_millis(200);
/// Backlog: pause between the last acknowledgement and reading the broker's RSS (commits and a
/// checkpoint in progress settle).
const BACKLOG_SETTLE: Duration = Duration::from_millis(500);
/// Tracked messages: the drain ends once every acknowledged message may have been delivered and
/// nothing arrived for this long (what was never acknowledged may never come).
const DRAIN_QUIET: Duration = Duration::from_secs(2);
/// Session Expiry Interval asked for by persistent subscribers in MQTT 5.
pub const PERSISTENT_SESSION_EXPIRY_SECS: u32 = 3600;

/// The stamp at the start of a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Intended send time, ns since the run's epoch.
    pub intended_ns: u64,
    pub seq: u64,
    pub publisher: u32,
}

impl Stamp {
    /// Writes the stamp and pads the payload to `payload_bytes` with `padding` (at least
    /// `payload_bytes` long).
    pub fn payload(self, payload_bytes: usize, padding: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(payload_bytes.max(STAMP_BYTES));
        b.put_u64_le(self.intended_ns);
        b.put_u64_le(self.seq);
        b.put_u32_le(self.publisher);
        if payload_bytes > STAMP_BYTES {
            b.extend_from_slice(&padding[STAMP_BYTES..payload_bytes]);
        }
        b.freeze()
    }

    /// The stamp of a payload, if it is long enough to hold one.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let s = payload.get(..STAMP_BYTES)?;
        Some(Stamp {
            intended_ns: u64::from_le_bytes(s[0..8].try_into().ok()?),
            seq: u64::from_le_bytes(s[8..16].try_into().ok()?),
            publisher: u32::from_le_bytes(s[16..20].try_into().ok()?),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// N publishers, N subscribers, publisher i -> subscriber i on its own topic.
    P2p,
    /// N publishers (default 1) -> one topic -> M subscribers (default 50).
    Fanout,
    /// N publishers (default 50) on N topics -> M subscribers (default 1) of a `+` filter.
    Fanin,
    /// N publishers (default 1) -> one topic -> `$share/stress/...` group of M subscribers.
    Shared,
    /// N publishers (default 16) on N topics bound to one fluxd durable queue -> M competing
    /// consumers (default 4) of `$queue/<name>` ([`LoadSpec::queue_filter`]).
    Queue,
}

impl Scenario {
    pub fn default_counts(self) -> (usize, usize) {
        match self {
            Scenario::P2p => (1, 1),
            Scenario::Fanout => (1, 50),
            Scenario::Fanin => (50, 1),
            Scenario::Shared => (1, 4),
            Scenario::Queue => (16, 4),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::P2p => "p2p",
            Scenario::Fanout => "fanout",
            Scenario::Fanin => "fanin",
            Scenario::Shared => "shared",
            Scenario::Queue => "queue",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Client ids as generated; fluxd's FNV-1a hash decides their shards.
    Any,
    /// Client ids chosen so that connection k (publishers first, then subscribers) has its home on
    /// shard k mod shards: 1->1 then always crosses shards.
    Spread,
    /// Every client id homes on shard 0: no cross-shard hop.
    Same,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Mode {
    Fixed { rate_per_sec: f64 },
    Max { window: usize },
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadSpec {
    pub scenario: Scenario,
    pub publishers: usize,
    pub subscribers: usize,
    #[serde(serialize_with = "ser_qos")]
    pub qos: QoS,
    pub payload_bytes: usize,
    pub mqtt_v5: bool,
    pub mode: Mode,
    /// Total across publishers.
    pub messages: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    /// Most unacknowledged QoS 1/2 publishes per publisher (also capped by the server's Receive
    /// Maximum in MQTT 5).
    pub inflight: u16,
    pub placement: Placement,
    /// Shard count used for [`Placement`] (fluxd's `--shards`).
    pub flux_shards: u16,
    pub topic_base: String,
    pub client_prefix: String,
    /// Run publisher and subscriber threads under SCHED_FIFO (priority 1), so the load
    /// generator's own scheduling delays stay out of the latency figures on a busy machine.
    pub client_rt: bool,
    /// Subscribers keep their sessions (3.1.1 clean_session=0, MQTT 5 Session Expiry Interval
    /// [`PERSISTENT_SESSION_EXPIRY_SECS`]): a durable broker then stores every QoS 1/2 message
    /// before acknowledging it.
    pub persistent_subscribers: bool,
    /// Scenario queue: the filter consumers subscribe to, `$queue/<name>` (the queue bound in
    /// the broker's config) or `$queue/<name>/<filter>` (binding it on subscribe).
    pub queue_filter: String,
    /// Scenario queue: consumers attach only after the send phase, once every publish is
    /// acknowledged (or the drain bound passed): the whole run waits in the queue, and the
    /// drain is timed ([`BacklogFigures`]). No end-to-end window then.
    pub backlog: bool,
    #[serde(skip)]
    pub progress: bool,
    pub label: String,
}

fn ser_qos<S: serde::Serializer>(q: &QoS, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(q.as_u8())
}

impl LoadSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.publishers == 0 || self.subscribers == 0 {
            bail!("need at least one publisher and one subscriber");
        }
        if self.scenario == Scenario::Queue {
            if !self.queue_filter.starts_with("$queue/") && !self.queue_filter.starts_with("$q/") {
                bail!(
                    "the queue scenario needs a $queue/<name>[/<filter>] or $q/<filter> to consume"
                );
            }
            if self.qos == QoS::AtMostOnce {
                bail!("the queue scenario is QoS 1 or 2 (a queue stores what it acknowledges)");
            }
        } else if self.backlog {
            bail!("backlog is for the queue scenario");
        }
        if self.scenario == Scenario::P2p && self.publishers != self.subscribers {
            bail!("p2p pairs publisher i with subscriber i: publishers must equal subscribers");
        }
        if self.payload_bytes < STAMP_BYTES {
            bail!("payload must hold the {STAMP_BYTES}-byte stamp");
        }
        if self.messages == 0 || self.duration.is_zero() || self.duration > MAX_DURATION {
            bail!(
                "messages must be > 0 and duration in (0, {}s]",
                MAX_DURATION.as_secs()
            );
        }
        if self.drain > Duration::from_secs(300) {
            bail!("drain must be at most 300 s");
        }
        match self.mode {
            Mode::Fixed { rate_per_sec }
                if !(rate_per_sec > 0.0 && rate_per_sec <= 10_000_000.0) =>
            {
                bail!("rate must be in (0, 1e7]")
            }
            Mode::Max { window: 0 } => bail!("window must be > 0"),
            _ => {}
        }
        if self.qos != QoS::AtMostOnce && self.inflight == 0 {
            bail!("inflight must be > 0 for QoS 1/2");
        }
        Ok(())
    }

    fn version(&self) -> ProtocolVersion {
        if self.mqtt_v5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        }
    }

    /// Deliveries each publish should produce.
    fn fanout_factor(&self) -> u64 {
        match self.scenario {
            Scenario::P2p | Scenario::Shared | Scenario::Queue => 1,
            Scenario::Fanout | Scenario::Fanin => self.subscribers as u64,
        }
    }

    /// Every message is accounted for by sequence number (acknowledged, delivered, how often).
    fn tracks_messages(&self) -> bool {
        self.scenario == Scenario::Queue
    }

    fn publish_topic(&self, publisher: usize) -> String {
        let b = &self.topic_base;
        match self.scenario {
            Scenario::P2p => format!("{b}/p2p/{publisher}"),
            Scenario::Fanout => format!("{b}/fanout"),
            Scenario::Fanin => format!("{b}/fanin/{publisher}"),
            Scenario::Shared => format!("{b}/shared"),
            Scenario::Queue => format!("{b}/queue/{publisher}"),
        }
    }

    fn subscribe_filter(&self, subscriber: usize) -> String {
        let b = &self.topic_base;
        match self.scenario {
            Scenario::P2p => format!("{b}/p2p/{subscriber}"),
            Scenario::Fanout => format!("{b}/fanout"),
            Scenario::Fanin => format!("{b}/fanin/+"),
            Scenario::Shared => format!("$share/stress/{b}/shared"),
            Scenario::Queue => self.queue_filter.clone(),
        }
    }

    /// Client id of connection `k` (publishers 0..N, then subscribers), honouring the placement.
    fn client_id(&self, role: &str, index: usize, k: usize) -> (String, u16) {
        let shards = self.flux_shards.max(1);
        let base = format!("{}-{role}{index}", self.client_prefix);
        let want = match self.placement {
            Placement::Any => None,
            Placement::Spread => Some((k % usize::from(shards)) as u16),
            Placement::Same => Some(0),
        };
        let Some(want) = want else {
            let shard = flux_core::shard_for(base.as_bytes(), shards).0;
            return (base, shard);
        };
        (placed_client_id(&base, want, shards), want)
    }
}

/// `base-N` for the first N whose fluxd home shard (FNV-1a of the id) is `want` of `shards`.
pub fn placed_client_id(base: &str, want: u16, shards: u16) -> String {
    let shards = shards.max(1);
    let want = want % shards;
    // A suffix search: each try lands on the wanted shard with probability 1/shards.
    for n in 0u32.. {
        let id = format!("{base}-{n}");
        if flux_core::shard_for(id.as_bytes(), shards).0 == want {
            return id;
        }
    }
    unreachable!("u32 suffixes cover every shard")
}

/// Where the load goes, and the broker process to watch (CPU, RSS) when known.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct LoadResult {
    pub label: String,
    pub scenario: String,
    pub mode: String,
    pub qos: u8,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    pub offered_rate_per_sec: Option<f64>,
    pub window: Option<usize>,
    /// "count" or "time": which bound ended the send phase ("error": a publisher ended on one).
    pub stopped_by: String,
    pub sent: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Deliveries whose sequence number was not above the last one seen from that publisher by
    /// that subscriber (duplicates, or reordering).
    pub dup_or_reorder: u64,
    pub measured_deliveries: u64,
    pub measured_secs: f64,
    pub delivered_per_sec: f64,
    /// Receive time minus intended send time, measured window only.
    pub latency: Percentiles,
    /// Actual minus intended send time: the load generator's own lateness (fixed mode).
    pub send_lag: Percentiles,
    pub broker_cpu_us: Option<f64>,
    pub broker_cpu_us_per_msg: Option<f64>,
    /// The machine's steal time over the same window, % of all CPU time (`/proc/stat`): how much
    /// a shared host took away while this ran. Latency figures of runs with high steal are noise.
    #[serde(default)]
    pub steal_percent: Option<f64>,
    pub broker_rss_bytes: Option<u64>,
    /// fluxd home shard of each publisher / subscriber (by client id hash).
    pub publisher_shards: Vec<u16>,
    pub subscriber_shards: Vec<u16>,
    /// Subscribers held persistent sessions.
    #[serde(default)]
    pub persistent_subscribers: bool,
    /// QoS 1/2: PUBACKs (PUBCOMPs) received that accept their publish (reason code below 0x80;
    /// the others are `refused`), whole run; the figures below count and time these alone.
    #[serde(default)]
    pub acked: u64,
    /// QoS 1/2: acknowledgements of publishes written in the measured window (from the warm-up on).
    #[serde(default)]
    pub measured_acks: u64,
    /// measured_acks / (last such acknowledgement - start of the measured window).
    #[serde(default)]
    pub acked_per_sec: f64,
    /// QoS 1/2: from the write of a PUBLISH to the read of its PUBACK (PUBCOMP), measured window.
    #[serde(default)]
    pub ack_latency: Percentiles,
    /// QoS 1/2: acknowledgements with a failure reason code (>= 0x80, MQTT 5), whole run.
    #[serde(default)]
    pub refused: u64,
    /// Scenario queue: each acknowledged publish against the deliveries to all consumers taken
    /// together (`lost`: acknowledged, delivered to no consumer; `duplicates`: deliveries of a
    /// message already delivered, to the same or another consumer).
    #[serde(default)]
    pub ledger: Option<Verdict>,
    /// Scenario queue with `backlog`: the fill (no consumer) and the drain.
    #[serde(default)]
    pub backlog: Option<BacklogFigures>,
    /// What went wrong in the clients (a connection the broker closed, a consumer that could not
    /// attach, ...), first 20.
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The two phases of a backlog run: publishing into a queue nobody consumes, then draining it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct BacklogFigures {
    /// Publishes acknowledged before the consumers attached.
    pub acked_before_attach: u64,
    /// From the common start to the last of those acknowledgements, seconds.
    pub fill_secs: f64,
    pub fill_acked_per_sec: f64,
    /// Broker RSS with every publisher connected, before the first publish.
    pub rss_before_fill_bytes: Option<u64>,
    /// Broker RSS once the publishes were acknowledged, before any consumer connected.
    pub rss_after_fill_bytes: Option<u64>,
    /// (after - before) / acknowledged publishes.
    pub rss_bytes_per_message: Option<f64>,
    /// Broker CPU from before the first publish to the attach, per acknowledged publish.
    pub fill_cpu_us_per_msg: Option<f64>,
    /// Connecting and subscribing the consumers, seconds.
    pub attach_secs: f64,
    /// Distinct messages delivered from the attach on.
    pub drained: u64,
    /// From the attach (start of the first consumer's CONNECT) to the last delivery, seconds.
    pub drain_secs: f64,
    pub drain_per_sec: f64,
    /// From the attach to the first delivery, milliseconds.
    pub first_delivery_ms: Option<f64>,
    /// Broker CPU from the attach to the end of the drain, per distinct message drained.
    pub drain_cpu_us_per_msg: Option<f64>,
}

/// Counters shared by all threads of one run.
struct Shared {
    epoch: Instant,
    /// Intended send time (ns since epoch) from which messages are measured.
    measure_from_ns: u64,
    sent: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
    measured_delivered: AtomicU64,
    last_delivery_ns: AtomicU64,
    /// Publisher threads, for unparking when their window or inflight frees up.
    publisher_threads: Vec<OnceLock<Thread>>,
    waiting: Vec<AtomicBool>,
    /// Stop sending (time bound hit elsewhere or an error).
    stop: AtomicBool,
    /// QoS 1/2 acknowledgements received, all publishers (the drain waits for them too).
    acked: AtomicU64,
    /// Messages tracked ([`LoadSpec::tracks_messages`]): per publisher, the sequence numbers
    /// delivered to any subscriber.
    received: Option<Vec<AtomicSeqSet>>,
    /// Tracked: deliveries of a message not delivered before / already delivered / with a
    /// stamp naming no message that could have been sent.
    distinct_delivered: AtomicU64,
    duplicate_deliveries: AtomicU64,
    malformed_deliveries: AtomicU64,
    /// Earliest delivery (ns since epoch; u64::MAX: none yet).
    first_delivery_ns: AtomicU64,
    /// Per publisher: its ack reader ended (the connection is closed).
    ack_reader_done: Vec<AtomicBool>,
    /// Acknowledgements with a failure reason code, all publishers.
    refused: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn wake_publisher(&self, i: usize) {
        if let Some(w) = self.waiting.get(i) {
            if w.swap(false, Ordering::AcqRel) {
                if let Some(t) = self.publisher_threads.get(i).and_then(|t| t.get()) {
                    t.unpark();
                }
            }
        }
    }

    fn total_sent(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    fn total_delivered(&self) -> u64 {
        self.delivered
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .sum()
    }

    /// Deliveries the drain counts: distinct messages when they are tracked (a duplicate does not
    /// stand in for a message still missing), every delivery otherwise.
    fn drain_delivered(&self) -> u64 {
        if self.received.is_some() {
            self.distinct_delivered.load(Ordering::Acquire)
        } else {
            self.total_delivered()
        }
    }

    fn new(spec: &LoadSpec, epoch: Instant, start_ns: u64) -> Shared {
        let n = spec.publishers;
        // Publisher i sends at most messages / n + 1 (the remainder goes to the first ones).
        let per_publisher = spec.messages / n as u64 + 1;
        Shared {
            epoch,
            measure_from_ns: start_ns + spec.warmup.as_nanos() as u64,
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            delivered: (0..n).map(|_| AtomicU64::new(0)).collect(),
            measured_delivered: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            publisher_threads: (0..n).map(|_| OnceLock::new()).collect(),
            waiting: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            received: spec.tracks_messages().then(|| {
                (0..n)
                    .map(|_| AtomicSeqSet::with_capacity(per_publisher))
                    .collect()
            }),
            distinct_delivered: AtomicU64::new(0),
            duplicate_deliveries: AtomicU64::new(0),
            malformed_deliveries: AtomicU64::new(0),
            first_delivery_ns: AtomicU64::new(u64::MAX),
            ack_reader_done: (0..n).map(|_| AtomicBool::new(false)).collect(),
            refused: AtomicU64::new(0),
        }
    }

    /// Acknowledgements may still come: some publisher's connection is open.
    fn acks_may_come(&self) -> bool {
        self.ack_reader_done
            .iter()
            .any(|d| !d.load(Ordering::Acquire))
    }
}

struct SubOutcome {
    latency: Histogram<u64>,
    dup_or_reorder: u64,
    error: Option<String>,
}

struct PubOutcome {
    send_lag: Histogram<u64>,
    stopped_by_time: bool,
    error: Option<String>,
}

/// Send time (ns since the epoch, 0 = none) of each packet id of one publisher: written just
/// before the `write` that carries the PUBLISH, read by the ack reader when its PUBACK/PUBCOMP
/// arrives. Indexed by the packet id itself, so out-of-order acknowledgements are timed right.
struct AckClock {
    sent_ns: Box<[AtomicU64]>,
    /// Tracked messages: sequence number + 1 (0 = none) of the publish each packet id carries.
    seq: Option<Box<[AtomicU64]>>,
}

impl AckClock {
    fn new(track_seq: bool) -> AckClock {
        let slots = || (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect();
        AckClock {
            sent_ns: slots(),
            seq: track_seq.then(slots),
        }
    }

    /// Packet id `id` now carries the publish with sequence number `seq` (set before its write).
    fn set_seq(&self, id: u16, seq: u64) {
        if let Some(s) = &self.seq {
            s[usize::from(id)].store(seq + 1, Ordering::Release);
        }
    }

    /// The sequence number `id` carried, forgetting it; None when not tracked or not outstanding.
    fn take_seq(&self, id: u16) -> Option<u64> {
        let s = self.seq.as_ref()?[usize::from(id)].swap(0, Ordering::AcqRel);
        s.checked_sub(1)
    }

    fn stamp(&self, ids: &[u16], now_ns: u64) {
        for &id in ids {
            self.sent_ns[usize::from(id)].store(now_ns, Ordering::Release);
        }
    }

    /// The send time of `id`, forgetting it (a second acknowledgement is not timed twice).
    fn take(&self, id: u16) -> Option<u64> {
        let t = self.sent_ns[usize::from(id)].swap(0, Ordering::AcqRel);
        (t != 0).then_some(t)
    }
}

/// What one ack reader saw.
struct AckOutcome {
    latency: Histogram<u64>,
    acked: u64,
    measured: u64,
    last_measured_ns: u64,
    /// Acknowledgements with a failure reason code.
    refused: u64,
    /// Tracked messages: which sequence numbers were acknowledged (`next_seq` is filled in from
    /// the publisher's count at the end).
    ledger: Option<PubLedger>,
}

impl AckOutcome {
    fn new(track: bool) -> AckOutcome {
        AckOutcome {
            latency: new_histogram(),
            acked: 0,
            measured: 0,
            last_measured_ns: 0,
            refused: 0,
            ledger: track.then(PubLedger::default),
        }
    }

    /// Which publish an acknowledgement answered (by its packet id's sequence number) and
    /// whether it was accepted.
    fn account(&mut self, seq: Option<u64>, accepted: bool) {
        if !accepted {
            self.refused += 1;
        }
        if let Some(l) = self.ledger.as_mut() {
            match seq {
                Some(seq) if accepted => l.ack(seq),
                Some(_) => l.refused += 1,
                None => l.unexpected_acks += 1,
            }
        }
    }

    /// One acknowledgement at `now_ns` of a publish written at `sent_ns`; it is measured if it
    /// was written from `measure_from_ns` on.
    fn record(&mut self, sent_ns: Option<u64>, now_ns: u64, measure_from_ns: u64) {
        self.acked += 1;
        if let Some(sent) = sent_ns.filter(|&t| t >= measure_from_ns) {
            self.measured += 1;
            self.last_measured_ns = self.last_measured_ns.max(now_ns);
            let _ = self.latency.record(now_ns.saturating_sub(sent).max(1));
        }
    }
}

/// A subscriber's connection: both halves, and the PUBLISH packets that arrived before its SUBACK.
type Connected = (Reader, Writer, Vec<Packet>);
/// Connected subscribers and their home shards.
type Subscribers = (Vec<Connected>, Vec<u16>);

/// Subscribers' connections, each SUBACKed before the next connects, and their home shards.
fn connect_subscribers(
    spec: &LoadSpec,
    target: Target,
    timeout: Duration,
) -> anyhow::Result<Subscribers> {
    let n = spec.publishers;
    let mut subscribers = Vec::with_capacity(spec.subscribers);
    let mut shards = Vec::with_capacity(spec.subscribers);
    for j in 0..spec.subscribers {
        let (id, shard) = spec.client_id("sub", j, n + j);
        let mut opts = ConnectOptions::clean(
            target.addr,
            &id,
            spec.version(),
            LOAD_KEEP_ALIVE_SECS,
            timeout,
        );
        if spec.persistent_subscribers {
            opts = opts.persistent(PERSISTENT_SESSION_EXPIRY_SECS);
        }
        let (mut reader, mut writer, _) = client::connect(&opts)?;
        let filter = spec.subscribe_filter(j);
        // A queue with a backlog may deliver before the SUBACK; elsewhere nothing publishes
        // before every subscriber is ready, so anything first is an error.
        let early = if spec.scenario == Scenario::Queue {
            client::subscribe_keeping_publishes(
                &mut reader,
                &mut writer,
                &filter,
                spec.qos,
                timeout,
            )
        } else {
            client::subscribe(&mut reader, &mut writer, &filter, spec.qos, timeout).map(|()| vec![])
        }
        .with_context(|| format!("subscriber {id}"))?;
        subscribers.push((reader, writer, early));
        shards.push(shard);
    }
    Ok((subscribers, shards))
}

/// One thread per subscriber; returns the streams that close them and their handles.
fn spawn_subscribers(
    subscribers: Vec<Connected>,
    shared: &Arc<Shared>,
    spec: &LoadSpec,
) -> anyhow::Result<(Vec<TcpStream>, Vec<JoinHandle<SubOutcome>>)> {
    let mut closers = Vec::with_capacity(subscribers.len());
    let mut threads = Vec::with_capacity(subscribers.len());
    for (j, (reader, writer, early)) in subscribers.into_iter().enumerate() {
        closers.push(reader.stream().try_clone()?);
        let shared = shared.clone();
        let publishers = spec.publishers;
        let rt = spec.client_rt;
        threads.push(
            thread::Builder::new()
                .name(format!("sub{j}"))
                .spawn(move || subscriber_main(reader, writer, early, &shared, publishers, rt))?,
        );
    }
    Ok((closers, threads))
}

fn cpu_us_between(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_nanos() as f64 / 1000.0),
        _ => None,
    }
}

/// Waits (bounded by `until`) while `pending` holds, polling every 5 ms.
fn wait_while(until: Instant, mut pending: impl FnMut() -> bool) {
    while pending() && Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs one load against `target`. Connects everything first, then publishes, drains, and
/// disconnects. Errors only for setup failures; losses and slow brokers are results.
pub fn run(spec: &LoadSpec, target: Target) -> anyhow::Result<LoadResult> {
    spec.validate()?;
    let version = spec.version();
    let timeout = Duration::from_secs(10);
    let n = spec.publishers;
    let m = spec.subscribers;
    let track = spec.tracks_messages();

    // Subscribers first, each SUBACKed before any publisher connects (backlog: after publishing).
    let (subscribers, mut subscriber_shards) = if spec.backlog {
        (Vec::new(), Vec::new())
    } else {
        connect_subscribers(spec, target, timeout)?
    };
    let mut publishers = Vec::with_capacity(n);
    let mut publisher_shards = Vec::with_capacity(n);
    for i in 0..n {
        let (id, shard) = spec.client_id("pub", i, i);
        let (reader, writer, connack) = client::connect(&ConnectOptions::clean(
            target.addr,
            &id,
            version,
            LOAD_KEEP_ALIVE_SECS,
            timeout,
        ))?;
        let server_receive_max = connack.properties.receive_maximum.unwrap_or(u16::MAX);
        let inflight = spec.inflight.min(server_receive_max).max(1);
        publishers.push((reader, writer, inflight));
        publisher_shards.push(shard);
    }
    let rss_before = target.pid.and_then(stats::process_rss_bytes);
    let cpu_before = target.pid.and_then(stats::process_cpu);

    // Publishing starts at the same instant for everyone, a little after the threads exist.
    let epoch = Instant::now();
    let start_ns = Duration::from_millis(50).as_nanos() as u64;
    let shared = Arc::new(Shared::new(spec, epoch, start_ns));

    let (mut sub_closers, mut sub_threads) = spawn_subscribers(subscribers, &shared, spec)?;

    let per_pub = spec.messages / n as u64;
    let extra = spec.messages % n as u64;
    let mut pub_writers: Vec<Arc<Mutex<Writer>>> = Vec::with_capacity(n);
    let mut pub_threads: Vec<JoinHandle<PubOutcome>> = Vec::with_capacity(n);
    let mut ack_threads: Vec<JoinHandle<AckOutcome>> = Vec::new();
    for (i, (reader, writer, inflight)) in publishers.into_iter().enumerate() {
        let writer = Arc::new(Mutex::new(writer));
        pub_writers.push(writer.clone());
        let outstanding = Arc::new(AtomicU32::new(0));
        let clock = (spec.qos != QoS::AtMostOnce).then(|| Arc::new(AckClock::new(track)));
        if let Some(clock) = &clock {
            let (shared, writer, outstanding, clock) = (
                shared.clone(),
                writer.clone(),
                outstanding.clone(),
                clock.clone(),
            );
            let rt = spec.client_rt;
            ack_threads.push(
                thread::Builder::new()
                    .name(format!("ack{i}"))
                    .spawn(move || {
                        ack_reader_main(reader, &writer, &outstanding, &clock, &shared, i, rt)
                    })?,
            );
        } else {
            drop(reader);
        }
        let job = PubJob {
            index: i,
            count: per_pub + u64::from((i as u64) < extra),
            topic: TopicName::new(&spec.publish_topic(i)).map_err(|e| anyhow::anyhow!("{e:?}"))?,
            qos: spec.qos,
            payload_bytes: spec.payload_bytes,
            mode: spec.mode,
            // Backlog: nobody consumes during the send phase, so no end-to-end window.
            window: match spec.mode {
                Mode::Max { window } if !spec.backlog => Some(window as u64 * spec.fanout_factor()),
                _ => None,
            },
            publishers: n,
            start_ns,
            deadline_ns: start_ns + spec.duration.as_nanos() as u64,
            inflight_cap: u32::from(inflight),
            fanout: spec.fanout_factor(),
            client_rt: spec.client_rt,
        };
        let shared2 = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("pub{i}"))
            .spawn(move || {
                publisher_main(job, &writer, &outstanding, clock.as_deref(), &shared2)
            })?;
        let _ = shared.publisher_threads[i].set(handle.thread().clone());
        pub_threads.push(handle);
    }
    // A publisher may have parked before its Thread was registered; wake everyone once.
    for i in 0..n {
        shared.waiting[i].store(true, Ordering::Release);
        shared.wake_publisher(i);
    }

    // CPU at the start of the measured window.
    let sleep_until = |ns: u64| {
        let now = shared.now_ns();
        if ns > now {
            thread::sleep(Duration::from_nanos(ns - now));
        }
    };
    sleep_until(shared.measure_from_ns);
    let cpu_start = target.pid.and_then(stats::process_cpu);
    let machine_start = stats::machine_cpu_ticks();

    // Send phase, with progress. Publishers stop themselves on count or time; the extra second
    // here is a backstop against a publisher stuck in a write.
    let hard_stop = Instant::now() + spec.duration + Duration::from_secs(1);
    let mut last_report = Instant::now();
    let mut last_delivered = shared.total_delivered();
    let mut last_acked = shared.acked.load(Ordering::Relaxed);
    while pub_threads.iter().any(|t| !t.is_finished()) {
        if Instant::now() >= hard_stop {
            shared.stop.store(true, Ordering::Release);
        }
        thread::sleep(Duration::from_millis(50));
        if spec.progress && last_report.elapsed() >= Duration::from_secs(2) {
            let d = shared.total_delivered();
            let a = shared.acked.load(Ordering::Relaxed);
            let secs = last_report.elapsed().as_secs_f64();
            eprintln!(
                "  [{}] t={:.1}s sent={} acked={} ({:.0}/s) delivered={} ({:.0}/s)",
                spec.label,
                epoch.elapsed().as_secs_f64(),
                shared.total_sent(),
                a,
                (a - last_acked) as f64 / secs,
                d,
                (d - last_delivered) as f64 / secs
            );
            last_delivered = d;
            last_acked = a;
            last_report = Instant::now();
        }
    }
    let mut send_lag = new_histogram();
    let mut stopped_by_time = false;
    let mut errors = Vec::new();
    for t in pub_threads {
        match t.join() {
            Ok(o) => {
                let _ = send_lag.add(&o.send_lag);
                stopped_by_time |= o.stopped_by_time;
                errors.extend(o.error);
            }
            Err(_) => errors.push("publisher thread panicked".into()),
        }
    }
    // (A refused SCHED_FIFO is a note, not a failure.)
    let publisher_failed = errors.iter().any(|e: &String| !e.starts_with("SCHED_FIFO"));

    let expected_acks = if spec.qos == QoS::AtMostOnce {
        0
    } else {
        shared.total_sent()
    };
    // Backlog: every acknowledgement in (bounded), then the consumers attach to the full queue.
    let mut backlog = None;
    let mut drain_from = None;
    if spec.backlog {
        wait_while(Instant::now() + spec.drain, || {
            shared.acked.load(Ordering::Acquire) < expected_acks && shared.acks_may_come()
        });
        // Let the broker settle (commits, checkpoint) before reading its memory.
        thread::sleep(BACKLOG_SETTLE);
        let filled_ns = shared.now_ns();
        let cpu_filled = target.pid.and_then(stats::process_cpu);
        let rss_filled = target.pid.and_then(stats::process_rss_bytes);
        let acked = shared.acked.load(Ordering::Acquire) - shared.refused.load(Ordering::Acquire);
        let attach = Instant::now();
        let attach_ns = shared.now_ns();
        let delivered_at_attach = shared.drain_delivered();
        match connect_subscribers(spec, target, timeout)
            .and_then(|(subs, shards)| Ok((spawn_subscribers(subs, &shared, spec)?, shards)))
        {
            Ok(((closers, threads), shards)) => {
                sub_closers = closers;
                sub_threads = threads;
                subscriber_shards = shards;
            }
            Err(e) => errors.push(format!("attaching the consumers: {e:#}")),
        }
        let fill_secs = filled_ns.saturating_sub(start_ns) as f64 / 1e9;
        backlog = Some(BacklogFigures {
            acked_before_attach: acked,
            fill_secs,
            fill_acked_per_sec: if fill_secs > 0.0 {
                acked as f64 / fill_secs
            } else {
                0.0
            },
            rss_before_fill_bytes: rss_before,
            rss_after_fill_bytes: rss_filled,
            rss_bytes_per_message: match (rss_before, rss_filled) {
                (Some(a), Some(b)) if acked > 0 => Some((b as f64 - a as f64) / acked as f64),
                _ => None,
            },
            fill_cpu_us_per_msg: cpu_us_between(cpu_before, cpu_filled)
                .filter(|_| acked > 0)
                .map(|c| c / acked as f64),
            attach_secs: attach.elapsed().as_secs_f64(),
            ..BacklogFigures::default()
        });
        drain_from = Some((attach_ns, cpu_filled, delivered_at_attach));
    }

    // Drain: wait for what is in flight (deliveries, and acknowledgements at QoS 1/2), bounded.
    let expected = shared.total_sent() * spec.fanout_factor();
    // Tracked messages: publishes never acknowledged (refused, or on a connection the broker
    // closed) may never arrive; once every acknowledged one could have and deliveries stop for
    // DRAIN_QUIET, the wait is over.
    let mut progress = (shared.drain_delivered(), Instant::now());
    wait_while(Instant::now() + spec.drain, || {
        let delivered = shared.drain_delivered();
        let acked = shared.acked.load(Ordering::Acquire);
        let acks_pending = acked < expected_acks && shared.acks_may_come();
        if delivered != progress.0 {
            progress = (delivered, Instant::now());
        }
        let accepted = acked - shared.refused.load(Ordering::Acquire).min(acked);
        let quiet =
            track && !acks_pending && delivered >= accepted && progress.1.elapsed() >= DRAIN_QUIET;
        (delivered < expected || acks_pending) && !quiet
    });
    let cpu_end = target.pid.and_then(stats::process_cpu);
    let machine_end = stats::machine_cpu_ticks();
    let rss = target.pid.and_then(stats::process_rss_bytes);
    if let (Some(b), Some((attach_ns, cpu_attach, delivered_at_attach))) =
        (backlog.as_mut(), drain_from)
    {
        b.drained = shared.drain_delivered() - delivered_at_attach;
        let last = shared.last_delivery_ns.load(Ordering::Relaxed);
        b.drain_secs = last.saturating_sub(attach_ns) as f64 / 1e9;
        if b.drain_secs > 0.0 {
            b.drain_per_sec = b.drained as f64 / b.drain_secs;
        }
        let first = shared.first_delivery_ns.load(Ordering::Relaxed);
        b.first_delivery_ms =
            (first != u64::MAX).then(|| first.saturating_sub(attach_ns) as f64 / 1e6);
        b.drain_cpu_us_per_msg = cpu_us_between(cpu_attach, cpu_end)
            .filter(|_| b.drained > 0)
            .map(|c| c / b.drained as f64);
    }

    // Disconnect everyone; closing the sockets ends the reading threads.
    for w in &pub_writers {
        if let Ok(mut w) = w.lock() {
            w.disconnect();
        }
    }
    let mut acks = AckOutcome::new(false);
    let mut ledgers = Vec::with_capacity(n);
    for (i, t) in ack_threads.into_iter().enumerate() {
        match t.join() {
            Ok(o) => {
                let _ = acks.latency.add(&o.latency);
                acks.acked += o.acked;
                acks.measured += o.measured;
                acks.last_measured_ns = acks.last_measured_ns.max(o.last_measured_ns);
                acks.refused += o.refused;
                if let Some(mut l) = o.ledger {
                    l.next_seq = shared.sent[i].load(Ordering::Acquire);
                    ledgers.push(l);
                }
            }
            Err(_) => errors.push("ack reader thread panicked".into()),
        }
    }
    for s in &sub_closers {
        use std::io::Write;
        let mut s = s;
        let _ = s.write_all(&[0xE0, 0x00]);
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let mut latency = new_histogram();
    let mut dup_or_reorder = 0;
    for t in sub_threads {
        match t.join() {
            Ok(o) => {
                let _ = latency.add(&o.latency);
                dup_or_reorder += o.dup_or_reorder;
                errors.extend(o.error);
            }
            Err(_) => errors.push("subscriber thread panicked".into()),
        }
    }
    let delivered = shared.total_delivered();
    let ledger = match &shared.received {
        Some(sets) if ledgers.len() == n => {
            let receipts = Receipts {
                per_publisher: sets
                    .iter()
                    .map(AtomicSeqSet::snapshot)
                    .collect::<Vec<SeqSet>>(),
                duplicates: shared.duplicate_deliveries.load(Ordering::Acquire),
                total: delivered,
                malformed: shared.malformed_deliveries.load(Ordering::Acquire),
            };
            Some(ledger::verdict(&ledgers, &receipts))
        }
        Some(_) => {
            errors.push("an ack reader is missing: no per-message verdict".into());
            None
        }
        None => None,
    };
    for e in &errors {
        eprintln!("  [{}] warning: {e}", spec.label);
    }
    let measured = shared.measured_delivered.load(Ordering::Relaxed);
    let last = shared.last_delivery_ns.load(Ordering::Relaxed);
    let measured_secs = last.saturating_sub(shared.measure_from_ns) as f64 / 1e9;
    let cpu_us = cpu_us_between(cpu_start, cpu_end);
    Ok(LoadResult {
        label: spec.label.clone(),
        scenario: spec.scenario.name().into(),
        mode: match spec.mode {
            Mode::Fixed { .. } => "fixed".into(),
            Mode::Max { .. } => "max".into(),
        },
        qos: spec.qos.as_u8(),
        payload_bytes: spec.payload_bytes,
        publishers: n,
        subscribers: m,
        offered_rate_per_sec: match spec.mode {
            Mode::Fixed { rate_per_sec } => Some(rate_per_sec),
            Mode::Max { .. } => None,
        },
        window: match spec.mode {
            Mode::Max { window } => Some(window),
            Mode::Fixed { .. } => None,
        },
        stopped_by: if publisher_failed {
            "error"
        } else if stopped_by_time {
            "time"
        } else {
            "count"
        }
        .into(),
        sent: shared.total_sent(),
        expected_deliveries: expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        dup_or_reorder,
        measured_deliveries: measured,
        measured_secs,
        delivered_per_sec: if measured_secs > 0.0 {
            measured as f64 / measured_secs
        } else {
            0.0
        },
        latency: Percentiles::of(&latency),
        send_lag: Percentiles::of(&send_lag),
        broker_cpu_us: cpu_us,
        steal_percent: stats::steal_percent(machine_start, machine_end),
        broker_cpu_us_per_msg: cpu_us.filter(|_| measured > 0).map(|c| c / measured as f64),
        broker_rss_bytes: rss,
        publisher_shards,
        subscriber_shards,
        persistent_subscribers: spec.persistent_subscribers,
        acked: acks.acked,
        measured_acks: acks.measured,
        acked_per_sec: {
            let secs = acks.last_measured_ns.saturating_sub(shared.measure_from_ns) as f64 / 1e9;
            if secs > 0.0 {
                acks.measured as f64 / secs
            } else {
                0.0
            }
        },
        ack_latency: Percentiles::of(&acks.latency),
        refused: acks.refused,
        ledger,
        backlog,
        warnings: errors.into_iter().take(20).collect(),
    })
}

struct PubJob {
    index: usize,
    count: u64,
    topic: TopicName,
    qos: QoS,
    payload_bytes: usize,
    mode: Mode,
    /// Closed loop: most undelivered deliveries of this publisher's messages (None: no bound).
    window: Option<u64>,
    publishers: usize,
    start_ns: u64,
    deadline_ns: u64,
    inflight_cap: u32,
    fanout: u64,
    client_rt: bool,
}

/// SCHED_FIFO priority 1 for the calling thread (best effort: needs root or CAP_SYS_NICE; a
/// failure is reported once per thread and the run goes on at normal priority). The threads
/// block in `read`/`sleep` between messages, so they never starve the broker.
fn set_realtime(enabled: bool) -> Option<String> {
    if !enabled {
        return None;
    }
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pthread_setschedparam on the calling thread with a valid sched_param.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    (rc != 0).then(|| format!("SCHED_FIFO refused (error {rc}); running at normal priority"))
}

fn set_fine_timer_slack() {
    // 1 µs timer slack for this thread: `sleep` then wakes within microseconds, not the default
    // 50 µs. Best effort.
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong, 0, 0, 0);
    }
}

fn publisher_main(
    job: PubJob,
    writer: &Mutex<Writer>,
    outstanding: &AtomicU32,
    clock: Option<&AckClock>,
    shared: &Shared,
) -> PubOutcome {
    let mut stamps = Unwritten {
        clock,
        ids: Vec::new(),
    };
    set_fine_timer_slack();
    let mut send_lag = new_histogram();
    let mut out = PubOutcome {
        send_lag: new_histogram(),
        stopped_by_time: false,
        error: set_realtime(job.client_rt),
    };
    let i = job.index;
    // Spread the publishers' schedules over one period so they do not all fire together.
    let (period_ns, offset_ns) = match job.mode {
        Mode::Fixed { rate_per_sec } => {
            let per_pub = rate_per_sec / job.publishers as f64;
            let period = 1e9 / per_pub;
            (period, period * i as f64 / job.publishers as f64)
        }
        Mode::Max { .. } => (0.0, 0.0),
    };
    let window = job.window;
    let mut packet_id = PacketId::new(1).expect("1 is a valid packet id");
    let mut padding = BytesMut::with_capacity(job.payload_bytes);
    padding.resize(job.payload_bytes, 0);
    let padding = padding.freeze();

    // Wait for the common start.
    let now = shared.now_ns();
    if job.start_ns > now {
        thread::sleep(Duration::from_nanos(job.start_ns - now));
    }
    let mut sent = 0u64;
    let mut window_base = 0u64; // deliveries written off as lost after a stall
    let mut stall_since: Option<Instant> = None;
    let mut guard: Option<std::sync::MutexGuard<'_, Writer>> = None;
    while sent < job.count {
        if shared.stop.load(Ordering::Acquire) {
            out.stopped_by_time = true;
            break;
        }
        let intended = match job.mode {
            Mode::Fixed { .. } => {
                let t = job.start_ns + (offset_ns + period_ns * sent as f64) as u64;
                let now = shared.now_ns();
                if t > now {
                    // Flush anything buffered before sleeping.
                    drop(guard.take());
                    thread::sleep(Duration::from_nanos(t - now));
                }
                t
            }
            Mode::Max { .. } => shared.now_ns(),
        };
        if intended >= job.deadline_ns {
            out.stopped_by_time = true;
            break;
        }
        // Closed loop: wait while the end-to-end window is full.
        if let Some(window) = window {
            loop {
                let delivered = shared.delivered[i].load(Ordering::Acquire) + window_base;
                if sent * job.fanout < delivered + window {
                    stall_since = None;
                    break;
                }
                if let Some(mut w) = guard.take() {
                    if let Err(e) = stamps.flush(&mut w, shared) {
                        out.error = Some(e);
                        return finish(out, send_lag);
                    }
                }
                let since = *stall_since.get_or_insert_with(Instant::now);
                if since.elapsed() > WINDOW_STALL {
                    window_base = (sent * job.fanout).saturating_sub(delivered - window_base);
                    stall_since = None;
                    continue;
                }
                if shared.now_ns() >= job.deadline_ns || shared.stop.load(Ordering::Acquire) {
                    break;
                }
                shared.waiting[i].store(true, Ordering::Release);
                thread::park_timeout(Duration::from_millis(1));
            }
        }
        // QoS 1/2: wait for an inflight slot.
        if job.qos != QoS::AtMostOnce {
            while outstanding.load(Ordering::Acquire) >= job.inflight_cap {
                if let Some(mut w) = guard.take() {
                    if let Err(e) = stamps.flush(&mut w, shared) {
                        out.error = Some(e);
                        return finish(out, send_lag);
                    }
                }
                if shared.stop.load(Ordering::Acquire) {
                    break;
                }
                if shared.ack_reader_done[i].load(Ordering::Acquire) {
                    // Nothing will free a slot: the broker closed the connection (MQTT 3.1.1
                    // answers a refused publish so).
                    out.error = Some(format!(
                        "publisher {i}: the broker closed the connection with {} publishes unacknowledged",
                        outstanding.load(Ordering::Acquire)
                    ));
                    return finish(out, send_lag);
                }
                shared.waiting[i].store(true, Ordering::Release);
                thread::park_timeout(Duration::from_millis(1));
            }
        }
        let now = shared.now_ns();
        if now >= job.deadline_ns {
            out.stopped_by_time = true;
            break;
        }
        let _ = send_lag.record(now.saturating_sub(intended).max(1));
        let payload = Stamp {
            intended_ns: intended,
            seq: sent,
            publisher: i as u32,
        }
        .payload(job.payload_bytes, &padding);
        let pid = if job.qos == QoS::AtMostOnce {
            None
        } else {
            outstanding.fetch_add(1, Ordering::AcqRel);
            let id = packet_id;
            packet_id = packet_id.next();
            Some(id)
        };
        let publish = Packet::Publish(Publish {
            dup: false,
            qos: job.qos,
            retain: false,
            topic: job.topic.clone(),
            packet_id: pid,
            properties: Default::default(),
            payload,
        });
        let mut w = match guard.take() {
            Some(w) => w,
            None => match writer.lock() {
                Ok(w) => w,
                Err(_) => {
                    out.error = Some("writer lock poisoned".into());
                    break;
                }
            },
        };
        w.push(&publish);
        if let Some(id) = pid {
            stamps.ids.push(id.get());
            if let Some(clock) = clock {
                clock.set_seq(id.get(), sent);
            }
        }
        sent += 1;
        shared.sent[i].store(sent, Ordering::Release);
        // Fixed rate: every message goes out at once. Max rate: batch up to FLUSH_BYTES.
        if matches!(job.mode, Mode::Fixed { .. }) || w.buffered_bytes() >= FLUSH_BYTES {
            if let Err(e) = stamps.flush(&mut w, shared) {
                out.error = Some(e);
                break;
            }
        } else {
            guard = Some(w);
        }
    }
    if let Some(mut w) = guard.take() {
        if let Err(e) = stamps.flush(&mut w, shared) {
            out.error = Some(e);
        }
    }
    finish(out, send_lag)
}

/// Packet ids pushed into a publisher's write buffer and not yet written: their send time is
/// taken at the write.
struct Unwritten<'a> {
    clock: Option<&'a AckClock>,
    ids: Vec<u16>,
}

impl Unwritten<'_> {
    fn flush(&mut self, w: &mut Writer, shared: &Shared) -> Result<(), String> {
        if let Some(clock) = self.clock {
            clock.stamp(&self.ids, shared.now_ns());
        }
        self.ids.clear();
        w.flush().map_err(|e| format!("publish write failed: {e}"))
    }
}

fn finish(mut out: PubOutcome, send_lag: Histogram<u64>) -> PubOutcome {
    out.send_lag = send_lag;
    out
}

/// A PUBACK/PUBCOMP acknowledges unless its reason code is an error (0x80 and up, by wire value:
/// `ReasonCode as u8` is the variant's ordinal, never 0x80).
fn ack_accepted(reason: flux_core::mqtt::ReasonCode) -> bool {
    !reason.is_error()
}

/// Reads a publisher's acknowledgements: PUBACK/PUBCOMP free an inflight slot, PUBREC is
/// answered with PUBREL. Marks the publisher's connection closed when it ends.
fn ack_reader_main(
    reader: Reader,
    writer: &Mutex<Writer>,
    outstanding: &AtomicU32,
    clock: &AckClock,
    shared: &Shared,
    index: usize,
    client_rt: bool,
) -> AckOutcome {
    let out = ack_reader_loop(reader, writer, outstanding, clock, shared, index, client_rt);
    shared.ack_reader_done[index].store(true, Ordering::Release);
    shared.waiting[index].store(true, Ordering::Release);
    shared.wake_publisher(index);
    out
}

fn ack_reader_loop(
    mut reader: Reader,
    writer: &Mutex<Writer>,
    outstanding: &AtomicU32,
    clock: &AckClock,
    shared: &Shared,
    index: usize,
    client_rt: bool,
) -> AckOutcome {
    let _ = set_realtime(client_rt);
    let mut out = AckOutcome::new(clock.seq.is_some());
    loop {
        let packet = match reader.recv() {
            Ok(Some(p)) => p,
            Ok(None) | Err(_) => return out,
        };
        match packet {
            Packet::PubAck(r) | Packet::PubComp(r) => {
                let now = shared.now_ns();
                let id = r.packet_id.get();
                let sent = clock.take(id);
                let accepted = ack_accepted(r.reason);
                if accepted {
                    out.record(sent, now, shared.measure_from_ns);
                } else {
                    shared.refused.fetch_add(1, Ordering::AcqRel);
                }
                out.account(clock.take_seq(id), accepted);
                shared.acked.fetch_add(1, Ordering::AcqRel);
                outstanding.fetch_sub(1, Ordering::AcqRel);
                shared.wake_publisher(index);
            }
            Packet::PubRec(r) => {
                if let Ok(mut w) = writer.lock() {
                    w.push(&Packet::PubRel(PubResp::success(r.packet_id)));
                    if w.flush().is_err() {
                        return out;
                    }
                }
            }
            _ => {}
        }
    }
}

/// `early`: PUBLISH packets that arrived before the SUBACK (handled first, timed now).
fn subscriber_main(
    mut reader: Reader,
    mut writer: Writer,
    early: Vec<Packet>,
    shared: &Shared,
    publishers: usize,
    client_rt: bool,
) -> SubOutcome {
    let mut out = SubOutcome {
        latency: new_histogram(),
        dup_or_reorder: 0,
        error: set_realtime(client_rt),
    };
    let mut next_seq = vec![0u64; publishers];
    let mut on_packet = |packet: Packet, writer: &mut Writer, out: &mut SubOutcome| match packet {
        Packet::Publish(p) => {
            let now = shared.now_ns();
            on_delivery(&p.payload, now, shared, &mut next_seq, out);
            match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => writer.push(&Packet::PubAck(PubResp::success(id))),
                (QoS::ExactlyOnce, Some(id)) => writer.push(&Packet::PubRec(PubResp::success(id))),
                _ => {}
            }
        }
        Packet::PubRel(r) => writer.push(&Packet::PubComp(PubResp::success(r.packet_id))),
        _ => {}
    };
    for p in early {
        on_packet(p, &mut writer, &mut out);
    }
    loop {
        loop {
            let packet = match reader.try_decode() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(format!("subscriber: {e}"));
                    return out;
                }
            };
            on_packet(packet, &mut writer, &mut out);
        }
        if writer.flush().is_err() {
            return out;
        }
        match reader.fill() {
            Ok(true) => {}
            Ok(false) | Err(_) => return out,
        }
    }
}

fn on_delivery(
    payload: &Bytes,
    now: u64,
    shared: &Shared,
    next_seq: &mut [u64],
    out: &mut SubOutcome,
) {
    let Some(Stamp {
        intended_ns: intended,
        seq,
        publisher,
    }) = Stamp::read(payload)
    else {
        shared.malformed_deliveries.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let publisher = publisher as usize;
    if let Some(sets) = &shared.received {
        let found = sets
            .get(publisher)
            .map_or(Insert::OutOfRange, |s| s.insert(seq));
        let counter = match found {
            Insert::New => &shared.distinct_delivered,
            Insert::Duplicate => &shared.duplicate_deliveries,
            Insert::OutOfRange => &shared.malformed_deliveries,
        };
        counter.fetch_add(1, Ordering::AcqRel);
    }
    let Some(counter) = shared.delivered.get(publisher) else {
        return;
    };
    counter.fetch_add(1, Ordering::AcqRel);
    shared.wake_publisher(publisher);
    shared.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
    shared.first_delivery_ns.fetch_min(now, Ordering::Relaxed);
    if let Some(next) = next_seq.get_mut(publisher) {
        if seq < *next {
            out.dup_or_reorder += 1;
        }
        *next = (*next).max(seq + 1);
    }
    if intended >= shared.measure_from_ns {
        shared.measured_delivered.fetch_add(1, Ordering::Relaxed);
        let _ = out.latency.record(now.saturating_sub(intended).max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scenario: Scenario) -> LoadSpec {
        let (publishers, subscribers) = scenario.default_counts();
        LoadSpec {
            scenario,
            publishers,
            subscribers,
            qos: QoS::AtMostOnce,
            payload_bytes: 64,
            mqtt_v5: false,
            mode: Mode::Fixed {
                rate_per_sec: 1000.0,
            },
            messages: 10,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            drain: Duration::from_secs(1),
            inflight: 10,
            placement: Placement::Spread,
            flux_shards: 2,
            topic_base: "t".into(),
            client_prefix: "c".into(),
            client_rt: false,
            persistent_subscribers: false,
            queue_filter: "$queue/q".into(),
            backlog: false,
            progress: false,
            label: String::new(),
        }
    }

    #[test]
    fn stamp_round_trips_and_pads() {
        let st = Stamp {
            intended_ns: 123_456_789,
            seq: 42,
            publisher: 7,
        };
        let pad = vec![0xAAu8; 64];
        let p = st.payload(64, &pad);
        assert_eq!(p.len(), 64);
        assert_eq!(p[STAMP_BYTES], 0xAA);
        assert_eq!(Stamp::read(&p), Some(st));
        assert_eq!(st.payload(STAMP_BYTES, &pad).len(), STAMP_BYTES);
        assert_eq!(Stamp::read(&p[..STAMP_BYTES - 1]), None);
    }

    #[test]
    fn ack_clock_times_out_of_order_acks_once_and_skips_warmup() {
        let clock = AckClock::new(false);
        clock.stamp(&[1, 2], 500); // warm-up writes
        clock.stamp(&[3, 65535], 2_000);
        let mut out = AckOutcome::new(false);
        out.record(clock.take(65535), 2_700, 1_000);
        out.record(clock.take(1), 2_800, 1_000);
        out.record(clock.take(3), 3_000, 1_000);
        out.record(clock.take(3), 3_100, 1_000); // a second ack for 3: counted, not timed
        assert_eq!(out.acked, 4);
        assert_eq!(out.measured, 2);
        assert_eq!(out.last_measured_ns, 3_000);
        assert_eq!(out.latency.len(), 2);
        assert_eq!(out.latency.max(), out.latency.highest_equivalent(1_000));
        assert_eq!(clock.take(2), Some(500));
        assert_eq!(clock.take(2), None);
        assert_eq!(
            clock.take_seq(2),
            None,
            "sequence numbers only when tracked"
        );
    }

    #[test]
    fn tracked_acks_name_their_publish_and_refusals_are_not_acknowledgements() {
        let clock = AckClock::new(true);
        clock.set_seq(1, 0);
        clock.set_seq(2, 1);
        clock.set_seq(65535, 70_000); // packet ids wrap; sequence numbers do not
        let mut out = AckOutcome::new(true);
        out.account(clock.take_seq(2), true);
        out.account(clock.take_seq(65535), true);
        out.account(clock.take_seq(1), false); // PUBACK 0x97
        out.account(clock.take_seq(1), true); // nothing outstanding under id 1 any more
        let l = out.ledger.as_ref().unwrap();
        assert_eq!(l.acked.iter().collect::<Vec<_>>(), vec![1, 70_000]);
        assert_eq!((l.refused, l.unexpected_acks, out.refused), (1, 1, 1));
        use flux_core::mqtt::ReasonCode;
        assert!(ack_accepted(ReasonCode::Success));
        assert!(ack_accepted(ReasonCode::NoMatchingSubscribers)); // 0x10: taken, nobody there
        assert!(!ack_accepted(ReasonCode::UnspecifiedError)); // 0x80
        assert!(!ack_accepted(ReasonCode::QuotaExceeded)); // 0x97
                                                           // Untracked: refusals are still counted.
        let mut plain = AckOutcome::new(false);
        plain.account(None, false);
        assert!(plain.ledger.is_none());
        assert_eq!(plain.refused, 1);
    }

    #[test]
    fn spread_placement_alternates_shards_and_same_uses_shard_0() {
        let s = spec(Scenario::Fanout);
        for k in 0..6 {
            let (id, shard) = s.client_id("sub", k, k);
            assert_eq!(shard, (k % 2) as u16);
            assert_eq!(flux_core::shard_for(id.as_bytes(), 2).0, shard);
        }
        let same = LoadSpec {
            placement: Placement::Same,
            ..spec(Scenario::P2p)
        };
        for k in 0..6 {
            assert_eq!(same.client_id("pub", k, k).1, 0);
        }
    }

    #[test]
    fn expected_deliveries_follow_the_scenario() {
        assert_eq!(spec(Scenario::P2p).fanout_factor(), 1);
        assert_eq!(spec(Scenario::Fanout).fanout_factor(), 50);
        assert_eq!(spec(Scenario::Fanin).fanout_factor(), 1);
        assert_eq!(spec(Scenario::Shared).fanout_factor(), 1);
        assert_eq!(spec(Scenario::Fanin).subscribe_filter(0), "t/fanin/+");
        assert_eq!(
            spec(Scenario::Shared).subscribe_filter(3),
            "$share/stress/t/shared"
        );
    }

    #[test]
    fn unbounded_or_inconsistent_specs_are_refused() {
        assert!(spec(Scenario::P2p).validate().is_ok());
        let no_time = LoadSpec {
            duration: Duration::ZERO,
            ..spec(Scenario::P2p)
        };
        assert!(no_time.validate().is_err());
        let too_long = LoadSpec {
            duration: MAX_DURATION + Duration::from_secs(1),
            ..spec(Scenario::P2p)
        };
        assert!(too_long.validate().is_err());
        let no_count = LoadSpec {
            messages: 0,
            ..spec(Scenario::P2p)
        };
        assert!(no_count.validate().is_err());
        let small = LoadSpec {
            payload_bytes: STAMP_BYTES - 1,
            ..spec(Scenario::P2p)
        };
        assert!(small.validate().is_err());
        let unpaired = LoadSpec {
            subscribers: 2,
            ..spec(Scenario::P2p)
        };
        assert!(unpaired.validate().is_err());
    }

    #[test]
    fn stamp_is_read_back_and_warmup_messages_are_not_measured() {
        let two = LoadSpec {
            publishers: 2,
            subscribers: 2,
            ..spec(Scenario::P2p)
        };
        let shared = Shared::new(&two, Instant::now(), 1_000);
        assert_eq!(shared.measure_from_ns, 1_000);
        assert!(shared.received.is_none());
        let mut out = sub_outcome();
        let mut next = vec![0u64; 2];
        on_delivery(&stamp(500, 0, 1), 2_000, &shared, &mut next, &mut out); // warm-up
        on_delivery(&stamp(1_500, 1, 1), 4_000, &shared, &mut next, &mut out);
        on_delivery(&stamp(1_500, 1, 1), 4_000, &shared, &mut next, &mut out); // duplicate
        assert_eq!(shared.delivered[1].load(Ordering::Relaxed), 3);
        assert_eq!(shared.measured_delivered.load(Ordering::Relaxed), 2);
        assert_eq!(out.latency.len(), 2);
        assert_eq!(out.dup_or_reorder, 1);
        assert_eq!(shared.last_delivery_ns.load(Ordering::Relaxed), 4_000);
        assert_eq!(shared.first_delivery_ns.load(Ordering::Relaxed), 2_000);
        assert_eq!(
            shared.drain_delivered(),
            3,
            "untracked: every delivery counts"
        );
    }

    fn stamp(intended: u64, seq: u64, publisher: u32) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u64_le(intended);
        b.put_u64_le(seq);
        b.put_u32_le(publisher);
        b.freeze()
    }

    fn sub_outcome() -> SubOutcome {
        SubOutcome {
            latency: new_histogram(),
            dup_or_reorder: 0,
            error: None,
        }
    }

    #[test]
    fn queue_scenario_topics_and_bounds() {
        let q = spec(Scenario::Queue);
        assert_eq!((q.publishers, q.subscribers), (16, 4));
        assert_eq!(q.publish_topic(3), "t/queue/3");
        assert_eq!(q.subscribe_filter(2), "$queue/q");
        assert_eq!(
            q.fanout_factor(),
            1,
            "competing consumers: one delivery each"
        );
        assert!(q.tracks_messages() && !spec(Scenario::Shared).tracks_messages());
        let qos1 = LoadSpec {
            qos: QoS::AtLeastOnce,
            ..spec(Scenario::Queue)
        };
        assert!(qos1.validate().is_ok());
        assert!(q.validate().is_err(), "a queue run at QoS 0");
        let plain = LoadSpec {
            queue_filter: "bench/#".into(),
            ..qos1.clone()
        };
        assert!(plain.validate().is_err(), "not a queue filter");
        let backlog_p2p = LoadSpec {
            backlog: true,
            ..spec(Scenario::P2p)
        };
        assert!(backlog_p2p.validate().is_err());
        assert!(LoadSpec {
            backlog: true,
            ..qos1
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn competing_consumers_share_one_record_of_what_was_delivered() {
        let q = LoadSpec {
            publishers: 2,
            messages: 10, // 5 per publisher: room for sequence numbers 0..6
            ..spec(Scenario::Queue)
        };
        let shared = Shared::new(&q, Instant::now(), 0);
        let (mut a, mut b) = (sub_outcome(), sub_outcome());
        let (mut next_a, mut next_b) = (vec![0u64; 2], vec![0u64; 2]);
        on_delivery(&stamp(1, 0, 0), 10, &shared, &mut next_a, &mut a);
        on_delivery(&stamp(1, 1, 0), 10, &shared, &mut next_b, &mut b);
        on_delivery(&stamp(1, 0, 1), 10, &shared, &mut next_a, &mut a);
        // Redelivered to the other consumer: a duplicate, though new to that consumer.
        on_delivery(&stamp(1, 0, 0), 20, &shared, &mut next_b, &mut b);
        on_delivery(&stamp(1, 1_000, 1), 20, &shared, &mut next_b, &mut b); // never sent
        on_delivery(
            &Bytes::from_static(b"short"),
            20,
            &shared,
            &mut next_b,
            &mut b,
        );
        assert_eq!(shared.drain_delivered(), 3);
        assert_eq!(shared.duplicate_deliveries.load(Ordering::Relaxed), 1);
        assert_eq!(shared.malformed_deliveries.load(Ordering::Relaxed), 2);
        assert_eq!(
            shared.total_delivered(),
            5,
            "the closed-loop window counts every delivery with a stamp"
        );
        let mut acked = PubLedger {
            next_seq: 2,
            ..PubLedger::default()
        };
        acked.ack(0);
        acked.ack(1);
        let mut other = PubLedger {
            next_seq: 2,
            ..PubLedger::default()
        };
        other.ack(0);
        other.ack(1); // acknowledged, never delivered
        let sets = shared.received.as_ref().unwrap();
        let receipts = Receipts {
            per_publisher: sets.iter().map(AtomicSeqSet::snapshot).collect(),
            duplicates: shared.duplicate_deliveries.load(Ordering::Relaxed),
            total: shared.total_delivered(),
            malformed: shared.malformed_deliveries.load(Ordering::Relaxed),
        };
        let v = ledger::verdict(&[acked, other], &receipts);
        assert_eq!((v.lost, v.duplicates, v.received), (1, 1, 3));
        assert_eq!(v.lost_examples, vec![(1, 1)]);
    }
}
