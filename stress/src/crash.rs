//! `crash`: load, `kill -9`, restart, verify that nothing acknowledged was lost.
//!
//! One fluxd runs on a data directory that outlives it. Against it:
//! - S **persistent subscribers** (3.1.1 clean_session=0, or MQTT 5 with a Session Expiry
//!   Interval) subscribe at QoS 1 to `<base>/p/+` once, in the first incarnation, and from then on
//!   only reconnect: after every restart CONNACK must say *session present*, and the subscription
//!   must still deliver (they do not subscribe again unless the session was lost, which is counted).
//!   They record every (publisher, sequence) received, then PUBACK it.
//! - K **offline subscribers** do the same, but after subscribing in the first incarnation they
//!   disconnect and come back only at the end: everything acknowledged meanwhile has to survive
//!   every kill in their queues (the online subscribers mostly receive a message before the kill
//!   could lose it; these cannot).
//! - P **publishers** send QoS 1 messages numbered 0, 1, 2, ... (the `load` stamp) to
//!   `<base>/p/<i>`, closed loop with `--inflight` unacknowledged at most, and record every
//!   sequence number whose PUBACK arrived. A publish unacknowledged when the broker dies is not
//!   resent (its fate is free: delivered or not).
//! - One **retained publisher** keeps replacing the retained message of `<base>/retained` the same
//!   way (QoS 1, retain).
//!
//! Each cycle lets the load run for a random time, `kill -9`s fluxd, restarts it on the same data
//! directory (a new port each time, read from its log), reads the retained message back with a
//! fresh client (it must be the last acknowledged value or a later one that was sent), and
//! reconnects everyone. After the last cycle the publishers stop and wait for their outstanding
//! acknowledgements, the subscribers drain, and the verdict is drawn ([`crate::ledger`]): every
//! acknowledged message received by every persistent subscriber at least once (duplicates are
//! counted, and allowed at QoS 1). Any loss, lost session, retained regression or never-sent
//! message makes the command fail. The loop is bounded by `--cycles` and `--duration-secs`, the
//! final drain by `--drain-secs`.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use flux_core::mqtt::{Packet, PacketId, ProtocolVersion, PubResp, Publish, QoS};
use flux_core::topic::TopicName;
use serde::Serialize;

use crate::brokers::{BrokerPaths, BrokerSettings, Durability, FluxdOptions, RunningBroker};
use crate::client::{self, ConnectOptions};
use crate::ledger::{verdict, PubLedger, Receipts, RetainedCheck, Rng, Verdict};
use crate::load::{placed_client_id, Stamp, PERSISTENT_SESSION_EXPIRY_SECS, STAMP_BYTES};

/// Keep alive of every crash-mode connection.
const KEEP_ALIVE_SECS: u16 = 60;
/// Socket read timeout: how often client threads look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// Connect/CONNACK/SUBACK timeout (fluxd may still be replaying its WAL after a restart).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopping publishers wait for their outstanding acknowledgements.
const ACK_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct CrashSpec {
    pub cycles: usize,
    /// Bound on the load-and-kill loop (the final drain is bounded separately).
    pub duration: Duration,
    pub publishers: usize,
    /// Persistent subscribers connected throughout.
    pub subscribers: usize,
    /// Persistent subscribers that subscribe, leave, and return only for the final drain.
    pub offline_subscribers: usize,
    pub inflight: u16,
    pub payload_bytes: usize,
    pub mqtt_v5: bool,
    /// Load time before each kill is uniform in [min_run, max_run].
    pub min_run: Duration,
    pub max_run: Duration,
    pub drain: Duration,
    pub durability: Durability,
    pub flush_interval_ms: Option<u32>,
    pub segment_size_bytes: Option<u64>,
    pub seed: Option<u64>,
    /// Fixed data directory (default: a new one under $TMPDIR, removed after a clean pass).
    pub data_dir: Option<PathBuf>,
    pub keep: bool,
    pub paths: BrokerPaths,
    pub settings: BrokerSettings,
    pub progress: bool,
}

impl CrashSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cycles == 0 || self.cycles > 1000 {
            bail!("--cycles must be 1..=1000");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            bail!("--duration-secs must be in (0, 3600]");
        }
        if self.publishers == 0 || self.publishers > 256 {
            bail!("--publishers must be 1..=256");
        }
        if self.subscribers + self.offline_subscribers == 0
            || self.subscribers + self.offline_subscribers > 64
        {
            bail!("--subscribers plus --offline-subscribers must be 1..=64");
        }
        if self.inflight == 0 {
            bail!("--inflight must be > 0");
        }
        if self.payload_bytes < STAMP_BYTES {
            bail!("--payload-bytes must hold the {STAMP_BYTES}-byte stamp");
        }
        if self.min_run > self.max_run || self.max_run.is_zero() {
            bail!("need 0 <= --min-run-ms <= --max-run-ms, and --max-run-ms > 0");
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
}

/// One incarnation of fluxd.
#[derive(Debug, Serialize)]
pub struct CycleReport {
    pub cycle: usize,
    pub addr: String,
    pub pid: u32,
    /// Spawn to "mqtt listener bound".
    pub start_ms: f64,
    /// Spawn to every client connected again.
    pub reconnect_ms: f64,
    /// The retained message read back right after the start (before anything new is published).
    pub retained: RetainedCheck,
    /// Persistent subscribers whose CONNACK said session present (expected: all, after the first).
    pub sessions_present: usize,
    /// Persistent subscribers that connected to this incarnation (the offline ones only come to
    /// the last two).
    pub sessions_checked: usize,
    /// Load time before the kill (None: the last incarnation, stopped cleanly).
    pub ran_ms: Option<u64>,
    /// Acknowledged publishes (all publishers, retained one included), total at the end of it.
    pub acked_total: u64,
    pub sent_total: u64,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SubscriberReport {
    pub client_id: String,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Receptions in all.
    pub receptions: u64,
}

#[derive(Debug, Serialize)]
pub struct PublisherReport {
    pub client_id: String,
    pub sent: u64,
    pub acked: u64,
    pub refused: u64,
    pub unexpected_acks: u64,
}

#[derive(Debug, Serialize)]
pub struct CrashReport {
    pub ok: bool,
    pub failures: Vec<String>,
    pub seed: u64,
    pub durability: Durability,
    pub mqtt_v5: bool,
    pub cycles_requested: usize,
    /// kill -9s done.
    pub kills: usize,
    pub elapsed_secs: f64,
    pub publishers: usize,
    pub subscribers: usize,
    pub offline_subscribers: usize,
    pub inflight: u16,
    pub sent: u64,
    pub acked: u64,
    /// Acknowledged messages not received by some subscriber (summed over subscribers).
    pub lost: u64,
    pub duplicates: u64,
    pub unacked_received: u64,
    pub phantom: u64,
    pub sessions_lost: usize,
    pub retained_checks: usize,
    pub retained_failures: usize,
    pub retained_final: RetainedCheck,
    pub retained_sent: u64,
    pub retained_acked: u64,
    pub per_subscriber: Vec<SubscriberReport>,
    pub per_publisher: Vec<PublisherReport>,
    pub cycles: Vec<CycleReport>,
    /// WARN/ERROR lines from the fluxd logs (first 40), with the incarnation.
    pub broker_warnings: Vec<String>,
    pub broker_warning_count: usize,
    pub data_dir: String,
    pub kept_files: bool,
}

// ---------------------------------------------------------------------------------------------
// Client threads. Each lives for one incarnation of the broker: it ends when its socket does
// (kill -9) or when told to stop, and hands its state back.

fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    })
}

struct PubJob {
    addr: SocketAddr,
    client_id: String,
    version: ProtocolVersion,
    topic: TopicName,
    retain: bool,
    index: u32,
    inflight: usize,
    payload_bytes: usize,
    stop: Arc<AtomicBool>,
    /// Shared progress counter (acknowledged publishes, all publishers).
    acked: Arc<AtomicU64>,
}

/// Publishes until the connection dies or `stop` (then waits for the outstanding
/// acknowledgements, bounded, and disconnects). Errors are connection failures.
fn publisher_epoch(job: &PubJob, ledger: &mut PubLedger) -> Option<String> {
    let (mut reader, mut writer, connack) = match client::connect(&ConnectOptions::clean(
        job.addr,
        &job.client_id,
        job.version,
        KEEP_ALIVE_SECS,
        CONNECT_TIMEOUT,
    )) {
        Ok(c) => c,
        Err(e) => return Some(format!("{}: {e:#}", job.client_id)),
    };
    let inflight = job
        .inflight
        .min(usize::from(
            connack.properties.receive_maximum.unwrap_or(u16::MAX),
        ))
        .max(1);
    if reader.stream().set_read_timeout(Some(POLL)).is_err() {
        return Some("set_read_timeout".into());
    }
    let padding = vec![0u8; job.payload_bytes];
    let mut outstanding: HashMap<u16, u64> = HashMap::new();
    let mut packet_id = PacketId::new(1).expect("1 is a valid packet id");
    let mut stopping_since: Option<Instant> = None;
    loop {
        if stopping_since.is_none() && job.stop.load(Ordering::Acquire) {
            stopping_since = Some(Instant::now());
        }
        match stopping_since {
            None => {
                while outstanding.len() < inflight {
                    // Never reuse a packet id that is still outstanding.
                    if outstanding.contains_key(&packet_id.get()) {
                        break;
                    }
                    let seq = ledger.take_seq();
                    let payload = Stamp {
                        intended_ns: 0,
                        seq,
                        publisher: job.index,
                    }
                    .payload(job.payload_bytes, &padding);
                    writer.push(&Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: job.retain,
                        topic: job.topic.clone(),
                        packet_id: Some(packet_id),
                        properties: Default::default(),
                        payload,
                    }));
                    outstanding.insert(packet_id.get(), seq);
                    packet_id = packet_id.next();
                }
                if writer.flush().is_err() {
                    // The broker is gone; PUBACKs it sent before dying may still be buffered.
                    drain_acks(&mut reader, &mut outstanding, ledger, job);
                    return None;
                }
            }
            Some(since) => {
                if outstanding.is_empty() || since.elapsed() > ACK_GRACE {
                    writer.disconnect();
                    return None;
                }
            }
        }
        match reader.recv() {
            Ok(Some(packet)) => on_ack(packet, &mut outstanding, ledger, job),
            Ok(None) => return None,
            Err(e) if is_timeout(&e) => {}
            Err(_) => return None,
        }
    }
}

/// Records a PUBACK: the publish it answers is acknowledged (or refused, by its reason code).
fn on_ack(
    packet: Packet,
    outstanding: &mut HashMap<u16, u64>,
    ledger: &mut PubLedger,
    job: &PubJob,
) {
    if let Packet::PubAck(r) = packet {
        match outstanding.remove(&r.packet_id.get()) {
            Some(seq) if !r.reason.is_error() => {
                ledger.ack(seq);
                job.acked.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => ledger.refused += 1,
            None => ledger.unexpected_acks += 1,
        }
    }
}

/// After a failed write: reads what the dead connection still holds (bounded).
fn drain_acks(
    reader: &mut client::Reader,
    outstanding: &mut HashMap<u16, u64>,
    ledger: &mut PubLedger,
    job: &PubJob,
) {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match reader.recv() {
            Ok(Some(packet)) => on_ack(packet, outstanding, ledger, job),
            Ok(None) => return,
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

struct SubJob {
    addr: SocketAddr,
    client_id: String,
    version: ProtocolVersion,
    filter: String,
    /// First incarnation: no session yet, subscribe.
    first: bool,
    stop: Arc<AtomicBool>,
    receipts: Arc<Mutex<Receipts>>,
    /// Set once connected (and subscribed when needed).
    ready: Arc<AtomicBool>,
}

struct SubEpoch {
    session_present: Option<bool>,
    error: Option<String>,
}

/// Connects the persistent session, checks session present, receives and acknowledges until the
/// connection dies or `stop` (then a normal DISCONNECT, which keeps the session).
fn subscriber_epoch(job: &SubJob) -> SubEpoch {
    let mut out = SubEpoch {
        session_present: None,
        error: None,
    };
    let opts = ConnectOptions::clean(
        job.addr,
        &job.client_id,
        job.version,
        KEEP_ALIVE_SECS,
        CONNECT_TIMEOUT,
    )
    .persistent(PERSISTENT_SESSION_EXPIRY_SECS);
    let (mut reader, mut writer, connack) = match client::connect(&opts) {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("{}: {e:#}", job.client_id));
            return out;
        }
    };
    out.session_present = Some(connack.session_present);
    if job.first || !connack.session_present {
        // First time, or the session is gone (counted by the caller): subscribe (again), so the
        // rest of the run still measures something.
        if let Err(e) = client::subscribe(
            &mut reader,
            &mut writer,
            &job.filter,
            QoS::AtLeastOnce,
            CONNECT_TIMEOUT,
        ) {
            out.error = Some(format!("{}: {e:#}", job.client_id));
            return out;
        }
    }
    if reader.stream().set_read_timeout(Some(POLL)).is_err() {
        out.error = Some("set_read_timeout".into());
        return out;
    }
    job.ready.store(true, Ordering::Release);
    let mut batch: Vec<(usize, u64)> = Vec::with_capacity(256);
    loop {
        loop {
            match reader.try_decode() {
                Ok(Some(Packet::Publish(p))) => {
                    match Stamp::read(&p.payload) {
                        Some(s) => batch.push((s.publisher as usize, s.seq)),
                        None => batch.push((usize::MAX, 0)),
                    }
                    if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                        writer.push(&Packet::PubAck(PubResp::success(id)));
                    }
                }
                Ok(Some(Packet::PubRel(r))) => {
                    writer.push(&Packet::PubComp(PubResp::success(r.packet_id)))
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(format!("{}: {e:#}", job.client_id));
                    return out;
                }
            }
        }
        // Record before acknowledging: what the broker may forget must already be counted here.
        if !batch.is_empty() {
            if let Ok(mut r) = job.receipts.lock() {
                for &(p, s) in &batch {
                    r.record(p, s);
                }
            }
            batch.clear();
        }
        if writer.flush().is_err() {
            return out;
        }
        if job.stop.load(Ordering::Acquire) {
            writer.disconnect();
            return out;
        }
        match reader.fill() {
            Ok(true) => {}
            Ok(false) => return out,
            Err(e) if is_timeout(&e) => {}
            Err(_) => return out,
        }
    }
}

/// The retained message of `topic`, read with a fresh clean session: Ok(None) when there is none
/// (nothing arrives within `wait` after the SUBACK). The bool is true for an unreadable payload.
fn read_retained(
    addr: SocketAddr,
    client_id: &str,
    version: ProtocolVersion,
    topic: &str,
    wait: Duration,
) -> anyhow::Result<(Option<u64>, bool)> {
    let (mut reader, mut writer, _) = client::connect(&ConnectOptions::clean(
        addr,
        client_id,
        version,
        KEEP_ALIVE_SECS,
        CONNECT_TIMEOUT,
    ))?;
    client::subscribe(
        &mut reader,
        &mut writer,
        topic,
        QoS::AtLeastOnce,
        CONNECT_TIMEOUT,
    )?;
    reader.stream().set_read_timeout(Some(POLL))?;
    let deadline = Instant::now() + wait;
    let result = loop {
        if Instant::now() >= deadline {
            break (None, false);
        }
        match reader.recv() {
            Ok(Some(Packet::Publish(p))) if p.retain => {
                if let Some(id) = p.packet_id {
                    writer.push(&Packet::PubAck(PubResp::success(id)));
                }
                break match Stamp::read(&p.payload) {
                    Some(s) => (Some(s.seq), false),
                    None => (None, true),
                };
            }
            Ok(Some(_)) => {}
            Ok(None) => bail!("connection closed while waiting for the retained message"),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    };
    writer.disconnect();
    Ok(result)
}

// ---------------------------------------------------------------------------------------------

/// Everything that survives from one incarnation to the next.
struct State {
    ledgers: Vec<PubLedger>, // publishers 0..P, then the retained publisher at P
    receipts: Vec<Arc<Mutex<Receipts>>>,
    pub_ids: Vec<String>,
    sub_ids: Vec<String>,
    retained_id: String,
    check_id: String,
    filter: String,
    topics: Vec<TopicName>, // per publisher, then the retained topic
    retained_topic: String,
}

struct Epoch {
    /// Publishers stop (and collect their outstanding acknowledgements).
    pub_stop: Arc<AtomicBool>,
    /// Subscribers disconnect.
    sub_stop: Arc<AtomicBool>,
    subs: Vec<JoinHandle<SubEpoch>>,
    pubs: Vec<JoinHandle<(PubLedger, Option<String>)>>,
}

/// One "connected (and subscribed)" flag per subscriber thread.
type Readies = Vec<Arc<AtomicBool>>;

fn spawn_subscribers(
    spec: &CrashSpec,
    st: &State,
    addr: SocketAddr,
    first: bool,
    stop: &Arc<AtomicBool>,
    which: std::ops::Range<usize>,
) -> anyhow::Result<(Vec<JoinHandle<SubEpoch>>, Readies)> {
    let mut subs = Vec::new();
    let mut readies = Vec::new();
    for (j, id) in st
        .sub_ids
        .iter()
        .enumerate()
        .skip(which.start)
        .take(which.len())
    {
        let ready = Arc::new(AtomicBool::new(false));
        readies.push(ready.clone());
        let job = SubJob {
            addr,
            client_id: id.clone(),
            version: spec.version(),
            filter: st.filter.clone(),
            first,
            stop: stop.clone(),
            receipts: st.receipts[j].clone(),
            ready,
        };
        subs.push(
            thread::Builder::new()
                .name(format!("csub{j}"))
                .spawn(move || subscriber_epoch(&job))?,
        );
    }
    Ok((subs, readies))
}

/// Waits until every subscriber is connected (and, the first time, subscribed). False if one
/// gave up or the wait timed out.
fn wait_ready(subs: &[JoinHandle<SubEpoch>], readies: &[Arc<AtomicBool>]) -> bool {
    let deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1);
    while !readies.iter().all(|r| r.load(Ordering::Acquire)) {
        if subs.iter().any(|h| h.is_finished()) || Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

fn start_epoch(
    spec: &CrashSpec,
    st: &mut State,
    addr: SocketAddr,
    first: bool,
    acked: &Arc<AtomicU64>,
) -> anyhow::Result<(Epoch, Vec<String>)> {
    let pub_stop = Arc::new(AtomicBool::new(false));
    let sub_stop = Arc::new(AtomicBool::new(false));
    let mut errors = Vec::new();
    // Publishers start once every subscriber is in (first incarnation: subscribed), so nothing
    // is published before the subscriptions exist.
    let online = 0..spec.subscribers;
    let (subs, readies) = spawn_subscribers(spec, st, addr, first, &sub_stop, online)?;
    if !wait_ready(&subs, &readies) {
        errors.push("a subscriber did not get ready".into());
    }
    if first && spec.offline_subscribers > 0 {
        // The offline sessions subscribe now and leave before anything is published.
        let stop = Arc::new(AtomicBool::new(false));
        let offline = spec.subscribers..spec.subscribers + spec.offline_subscribers;
        let (parked, readies) = spawn_subscribers(spec, st, addr, true, &stop, offline)?;
        if !wait_ready(&parked, &readies) {
            errors.push("an offline subscriber did not get ready".into());
        }
        let present = join_subscribers(parked, &stop, &mut errors);
        if present.iter().any(|p| p.is_none()) {
            errors.push("an offline subscriber could not connect".into());
        }
    }
    let mut pubs = Vec::new();
    let p = spec.publishers;
    for i in 0..=p {
        let job = PubJob {
            addr,
            client_id: if i < p {
                st.pub_ids[i].clone()
            } else {
                st.retained_id.clone()
            },
            version: spec.version(),
            topic: st.topics[i].clone(),
            retain: i == p,
            index: i as u32,
            inflight: usize::from(spec.inflight),
            payload_bytes: spec.payload_bytes,
            stop: pub_stop.clone(),
            acked: acked.clone(),
        };
        let mut ledger = std::mem::take(&mut st.ledgers[i]);
        pubs.push(
            thread::Builder::new()
                .name(format!("cpub{i}"))
                .spawn(move || {
                    let e = publisher_epoch(&job, &mut ledger);
                    (ledger, e)
                })?,
        );
    }
    Ok((
        Epoch {
            pub_stop,
            sub_stop,
            subs,
            pubs,
        },
        errors,
    ))
}

/// Stops the publishers and takes their ledgers back (after a kill they have already ended).
fn join_publishers(st: &mut State, epoch: &mut Epoch, errors: &mut Vec<String>) {
    epoch.pub_stop.store(true, Ordering::Release);
    for (i, h) in epoch.pubs.drain(..).enumerate() {
        match h.join() {
            Ok((ledger, e)) => {
                st.ledgers[i] = ledger;
                errors.extend(e);
            }
            Err(_) => errors.push(format!("publisher {i} panicked (its ledger is lost)")),
        }
    }
}

/// Stops the subscribers; their session-present flags (None: never connected).
fn join_subscribers(
    subs: Vec<JoinHandle<SubEpoch>>,
    stop: &AtomicBool,
    errors: &mut Vec<String>,
) -> Vec<Option<bool>> {
    stop.store(true, Ordering::Release);
    subs.into_iter()
        .map(|h| match h.join() {
            Ok(o) => {
                errors.extend(o.error);
                o.session_present
            }
            Err(_) => {
                errors.push("subscriber panicked".into());
                None
            }
        })
        .collect()
}

fn total_sent(st: &State) -> u64 {
    st.ledgers.iter().map(|l| l.next_seq).sum()
}

fn total_acked(st: &State) -> u64 {
    st.ledgers.iter().map(|l| l.acked.len()).sum()
}

fn all_covered(st: &State, p: usize) -> bool {
    st.receipts
        .iter()
        .all(|r| r.lock().is_ok_and(|r| r.covers(&st.ledgers[..p])))
}

fn warnings_of(log: &Path, incarnation: usize, into: &mut Vec<String>, count: &mut usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
    {
        // RLIMIT_MEMLOCK lowering is an environment note, not a finding.
        if line.contains("RLIMIT_MEMLOCK") {
            continue;
        }
        *count += 1;
        if into.len() < 40 {
            into.push(format!("[fluxd {incarnation}] {line}"));
        }
    }
}

fn start_broker(
    spec: &CrashSpec,
    settings: &BrokerSettings,
    data_dir: &Path,
    log: &Path,
) -> anyhow::Result<RunningBroker> {
    RunningBroker::start_fluxd(
        &spec.paths,
        settings,
        &FluxdOptions {
            durability: Some(spec.durability),
            flush_interval_ms: spec.flush_interval_ms,
            segment_size_bytes: spec.segment_size_bytes,
            // The offline subscribers' queues hold the whole run.
            max_queued_bytes: Some(4 << 30),
            data_dir: Some(data_dir.to_path_buf()),
            log_file: Some(log.to_path_buf()),
            extra_config: None,
        },
    )
}

/// Reads the retained message back and judges it against the retained publisher's ledger;
/// failures are recorded.
fn check_retained(
    spec: &CrashSpec,
    st: &State,
    addr: SocketAddr,
    incarnation: usize,
    failures: &mut Vec<String>,
) -> RetainedCheck {
    let p = spec.publishers;
    match read_retained(
        addr,
        &format!("{}{incarnation}", st.check_id),
        spec.version(),
        &st.retained_topic,
        Duration::from_millis(500),
    ) {
        Ok((value, malformed)) => {
            let c = RetainedCheck::judge(value, malformed, &st.ledgers[p]);
            if !c.ok() {
                failures.push(format!(
                    "fluxd {incarnation}: retained message after the restart: {c:?}"
                ));
            }
            c
        }
        Err(e) => {
            failures.push(format!(
                "fluxd {incarnation}: reading the retained message: {e:#}"
            ));
            RetainedCheck::Phantom { value: None }
        }
    }
}

pub fn run(spec: &CrashSpec) -> anyhow::Result<CrashReport> {
    spec.validate()?;
    let started = Instant::now();
    let seed = spec.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32)
    });
    let mut rng = Rng::new(seed);
    let work = std::env::temp_dir().join(format!("flux-stress-crash-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let data_dir = spec.data_dir.clone().unwrap_or_else(|| work.join("data"));
    let tag = format!("cr{}", std::process::id());
    let shards = spec.settings.shards.max(1);
    let p = spec.publishers;
    let mut topics = Vec::new();
    for i in 0..p {
        topics.push(
            TopicName::new(&format!("stress/{tag}/p/{i}")).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
    }
    let retained_topic = format!("stress/{tag}/retained");
    topics.push(TopicName::new(&retained_topic).map_err(|e| anyhow::anyhow!("{e:?}"))?);
    // Subscribers on alternating shards, publishers offset by one: both same-shard and
    // cross-shard paths (remote durability confirmations) are exercised.
    let mut st = State {
        ledgers: vec![PubLedger::default(); p + 1],
        receipts: (0..spec.subscribers + spec.offline_subscribers)
            .map(|_| Arc::new(Mutex::new(Receipts::new(p))))
            .collect(),
        pub_ids: (0..p)
            .map(|i| placed_client_id(&format!("{tag}-pub{i}"), (i + 1) as u16 % shards, shards))
            .collect(),
        sub_ids: (0..spec.subscribers + spec.offline_subscribers)
            .map(|j| placed_client_id(&format!("{tag}-sub{j}"), j as u16 % shards, shards))
            .collect(),
        retained_id: format!("{tag}-retained"),
        check_id: format!("{tag}-check"),
        filter: format!("stress/{tag}/p/+"),
        topics,
        retained_topic,
    };
    let mut settings = spec.settings.clone();
    // Subscribers keep up, but never let a queue limit pass for a durability loss.
    settings.broker_queued = settings.broker_queued.max(10_000_000);
    settings.broker_inflight = settings.broker_inflight.max(spec.inflight);
    let acked_counter = Arc::new(AtomicU64::new(0));

    let mut cycles: Vec<CycleReport> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut retained_failures = 0;
    let mut sessions_lost = 0;
    let mut kills = 0;
    let mut warnings = Vec::new();
    let mut warning_count = 0;
    let mut incarnation = 0usize;
    let mut clean_stop = false;
    loop {
        let last = kills >= spec.cycles
            || started.elapsed() + spec.max_run + Duration::from_secs(5) > spec.duration;
        let log = work.join(format!("fluxd-{incarnation}.log"));
        let t0 = Instant::now();
        let mut broker = match start_broker(spec, &settings, &data_dir, &log) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("fluxd {incarnation} did not start: {e:#}"));
                break;
            }
        };
        let mut cycle = CycleReport {
            cycle: incarnation,
            addr: broker.addr.to_string(),
            pid: broker.pid(),
            start_ms: t0.elapsed().as_secs_f64() * 1e3,
            reconnect_ms: 0.0,
            retained: RetainedCheck::NoneYet,
            sessions_present: 0,
            sessions_checked: 0,
            ran_ms: None,
            acked_total: 0,
            sent_total: 0,
            errors: Vec::new(),
        };
        // The retained message as recovered, before the retained publisher resumes.
        if incarnation > 0 {
            cycle.retained = check_retained(spec, &st, broker.addr, incarnation, &mut failures);
            if !cycle.retained.ok() {
                retained_failures += 1;
            }
        }
        let (mut epoch, errs) =
            match start_epoch(spec, &mut st, broker.addr, incarnation == 0, &acked_counter) {
                Ok(x) => x,
                Err(e) => {
                    failures.push(format!("fluxd {incarnation}: starting clients: {e:#}"));
                    break;
                }
            };
        cycle.reconnect_ms = t0.elapsed().as_secs_f64() * 1e3;
        cycle.errors.extend(errs);
        let run_ms = rng.range(
            spec.min_run.as_millis() as u64,
            spec.max_run.as_millis() as u64,
        );
        cycle.ran_ms = Some(run_ms);
        thread::sleep(Duration::from_millis(run_ms));
        let mut errors = Vec::new();
        let died_early = !broker.alive();
        if died_early {
            failures.push(format!(
                "fluxd {incarnation} (pid {}) ended on its own: {}; last log lines:\n{}",
                broker.pid(),
                broker.exit_description().unwrap_or_default(),
                broker.log_tail()
            ));
        }
        if last && !died_early {
            // Final incarnation: stop publishing, let the publishers collect their outstanding
            // acknowledgements, bring the offline subscribers back, let everyone drain.
            join_publishers(&mut st, &mut epoch, &mut errors);
            let until = Instant::now() + spec.drain;
            if spec.offline_subscribers > 0 {
                let offline = spec.subscribers..spec.subscribers + spec.offline_subscribers;
                match spawn_subscribers(spec, &st, broker.addr, false, &epoch.sub_stop, offline) {
                    Ok((subs, _)) => epoch.subs.extend(subs),
                    Err(e) => errors.push(format!("offline subscribers: {e:#}")),
                }
            }
            while !all_covered(&st, p) && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            // Let the acknowledgements of the last deliveries reach the broker.
            thread::sleep(Duration::from_millis(100));
            let present = join_subscribers(
                std::mem::take(&mut epoch.subs),
                &epoch.sub_stop,
                &mut errors,
            );
            count_sessions(
                incarnation,
                &present,
                &mut cycle,
                &mut sessions_lost,
                &mut failures,
            );
            if !all_covered(&st, p) {
                errors.push(format!(
                    "drain: not every acknowledged message arrived within {:?}",
                    spec.drain
                ));
            }
            broker.stop(); // SIGTERM: the clean shutdown path
            clean_stop = true;
        } else {
            if let Err(e) = broker.kill9() {
                failures.push(format!("kill -9 of fluxd {incarnation}: {e:#}"));
            }
            kills += 1;
            join_publishers(&mut st, &mut epoch, &mut errors);
            let present = join_subscribers(
                std::mem::take(&mut epoch.subs),
                &epoch.sub_stop,
                &mut errors,
            );
            count_sessions(
                incarnation,
                &present,
                &mut cycle,
                &mut sessions_lost,
                &mut failures,
            );
        }
        cycle.errors.extend(errors);
        cycle.acked_total = total_acked(&st);
        cycle.sent_total = total_sent(&st);
        if spec.progress {
            eprintln!(
                "fluxd {incarnation}: up in {:.0} ms, clients in {:.0} ms, sessions present {}/{}, retained {:?}; {} after {run_ms} ms; sent {} acked {}{}",
                cycle.start_ms,
                cycle.reconnect_ms,
                cycle.sessions_present,
                cycle.sessions_checked,
                cycle.retained,
                if clean_stop { "stopped (SIGTERM)" } else { "killed (SIGKILL)" },
                cycle.sent_total,
                cycle.acked_total,
                if cycle.errors.is_empty() { String::new() } else { format!("; {} client errors", cycle.errors.len()) }
            );
        }
        drop(broker); // removes its temporary config directory; the data directory stays
        warnings_of(&log, incarnation, &mut warnings, &mut warning_count);
        cycles.push(cycle);
        incarnation += 1;
        if clean_stop || died_early {
            break;
        }
    }

    // After the clean stop: once more up, the retained message and the sessions must be there,
    // and nothing acknowledged may be redelivered as new (duplicates only).
    let mut retained_final = RetainedCheck::NoneYet;
    if clean_stop {
        let log = work.join(format!("fluxd-{incarnation}.log"));
        match start_broker(spec, &settings, &data_dir, &log) {
            Ok(mut broker) => {
                retained_final = check_retained(spec, &st, broker.addr, incarnation, &mut failures);
                if !retained_final.ok() {
                    retained_failures += 1;
                }
                let stop = Arc::new(AtomicBool::new(false));
                let mut errors = Vec::new();
                let all = 0..st.sub_ids.len();
                match spawn_subscribers(spec, &st, broker.addr, false, &stop, all) {
                    Ok((subs, readies)) => {
                        let _ = wait_ready(&subs, &readies);
                        thread::sleep(Duration::from_millis(300));
                        let present = join_subscribers(subs, &stop, &mut errors);
                        let mut cycle = CycleReport {
                            cycle: incarnation,
                            addr: broker.addr.to_string(),
                            pid: broker.pid(),
                            start_ms: 0.0,
                            reconnect_ms: 0.0,
                            retained: retained_final.clone(),
                            sessions_present: 0,
                            sessions_checked: 0,
                            ran_ms: None,
                            acked_total: total_acked(&st),
                            sent_total: total_sent(&st),
                            errors: Vec::new(),
                        };
                        count_sessions(
                            incarnation,
                            &present,
                            &mut cycle,
                            &mut sessions_lost,
                            &mut failures,
                        );
                        cycle.errors = errors;
                        if spec.progress {
                            eprintln!(
                                "fluxd {incarnation} (after the clean stop): sessions present {}/{}, retained {:?}",
                                cycle.sessions_present, cycle.sessions_checked, cycle.retained
                            );
                        }
                        cycles.push(cycle);
                    }
                    Err(e) => failures.push(format!("final check: {e:#}")),
                }
                broker.stop();
                warnings_of(&log, incarnation, &mut warnings, &mut warning_count);
            }
            Err(e) => failures.push(format!(
                "fluxd {incarnation} did not start after the clean stop: {e:#}"
            )),
        }
    }

    // Verdict.
    let mut per_subscriber = Vec::new();
    let (mut lost, mut duplicates, mut unacked_received, mut phantom) = (0, 0, 0, 0);
    for (j, r) in st.receipts.iter().enumerate() {
        let r = r
            .lock()
            .map_err(|_| anyhow::anyhow!("receipts lock poisoned"))?;
        let v = verdict(&st.ledgers[..p], &r);
        lost += v.lost;
        duplicates += v.duplicates;
        unacked_received += v.unacked_received;
        phantom += v.phantom;
        if v.lost > 0 {
            failures.push(format!(
                "{}: {} acknowledged messages never received (e.g. (publisher, seq) {:?})",
                st.sub_ids[j], v.lost, v.lost_examples
            ));
        }
        if v.phantom > 0 {
            failures.push(format!(
                "{}: {} messages that were never sent",
                st.sub_ids[j], v.phantom
            ));
        }
        per_subscriber.push(SubscriberReport {
            client_id: st.sub_ids[j].clone(),
            receptions: r.total,
            verdict: v,
        });
    }
    let retained_ledger = &st.ledgers[p];
    let acked: u64 = st.ledgers[..p].iter().map(|l| l.acked.len()).sum();
    if acked == 0 {
        failures.push("no publish was acknowledged: nothing was tested".into());
    }
    let ok = failures.is_empty();
    let kept = !ok || spec.keep;
    if !kept {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(CrashReport {
        ok,
        failures,
        seed,
        durability: spec.durability,
        mqtt_v5: spec.mqtt_v5,
        cycles_requested: spec.cycles,
        kills,
        elapsed_secs: started.elapsed().as_secs_f64(),
        publishers: p,
        subscribers: spec.subscribers,
        offline_subscribers: spec.offline_subscribers,
        inflight: spec.inflight,
        sent: st.ledgers[..p].iter().map(|l| l.next_seq).sum(),
        acked,
        lost,
        duplicates,
        unacked_received,
        phantom,
        sessions_lost,
        retained_checks: cycles.iter().filter(|c| c.cycle > 0).count(),
        retained_failures,
        retained_final,
        retained_sent: retained_ledger.next_seq,
        retained_acked: retained_ledger.acked.len(),
        per_subscriber,
        per_publisher: (0..=p)
            .map(|i| PublisherReport {
                client_id: if i < p {
                    st.pub_ids[i].clone()
                } else {
                    st.retained_id.clone()
                },
                sent: st.ledgers[i].next_seq,
                acked: st.ledgers[i].acked.len(),
                refused: st.ledgers[i].refused,
                unexpected_acks: st.ledgers[i].unexpected_acks,
            })
            .collect(),
        cycles,
        broker_warnings: warnings,
        broker_warning_count: warning_count,
        data_dir: data_dir.display().to_string(),
        kept_files: kept,
    })
}

fn count_sessions(
    incarnation: usize,
    present: &[Option<bool>],
    cycle: &mut CycleReport,
    sessions_lost: &mut usize,
    failures: &mut Vec<String>,
) {
    cycle.sessions_present = present.iter().filter(|p| **p == Some(true)).count();
    cycle.sessions_checked = present.len();
    if incarnation > 0 {
        let lost = present.iter().filter(|p| **p == Some(false)).count();
        if lost > 0 {
            *sessions_lost += lost;
            failures.push(format!(
                "fluxd {incarnation}: {lost} persistent session(s) not present after the restart"
            ));
        }
    }
    let unconnected = present.iter().filter(|p| p.is_none()).count();
    if unconnected > 0 {
        failures.push(format!(
            "fluxd {incarnation}: {unconnected} subscriber(s) could not connect"
        ));
    }
}
