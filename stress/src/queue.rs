//! `queue`: throughput and latency of one fluxd durable queue, at several consumer counts.
//!
//! Each case is one [`crate::load::run`] of the `queue` scenario against a freshly started fluxd
//! on a fresh data directory: P publishers (QoS 1, at most `--inflight` unacknowledged and
//! `--window` undelivered each) on topics `bench/<tag>/queue/<i>`, all bound to one queue
//! declared in the generated fluxd.toml (`[[queue]] name = "bench"`, `bind = ["bench/#"]`), and C
//! competing consumers of `$queue/bench` (clean sessions, every delivery acknowledged at once).
//! With fluxd's default durability (`fsync`) each PUBACK waits for the append to be fdatasync'd.
//!
//! Figures per case: acknowledged publishes per second and confirm latency (write of the PUBLISH
//! to read of its PUBACK), consumed messages per second and end-to-end latency (write of the
//! PUBLISH to its delivery to a consumer), all over the measured window (after the warm-up);
//! broker CPU per message and RSS; the per-message verdict ([`crate::ledger`]): every
//! acknowledged publish must have reached a consumer at least once (`lost`, the failure), with
//! duplicates counted apart. The queue's own counters are read from fluxd's admin endpoint
//! (`GET /queues/bench`, on a port of its own) at the end of each case. Cases are interleaved:
//! every round runs every consumer count, the first one rotating. Summary figures are medians
//! over rounds.
//!
//! `--backlog N`: each case first publishes N messages with no consumer attached, reads fluxd's
//! RSS before and after (memory per queued message), then attaches the consumers and times the
//! drain.

use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flux_core::mqtt::QoS;
use serde::Serialize;

use crate::brokers::{
    parse_bound_addr, BrokerKind, BrokerPaths, BrokerSettings, Durability, FluxdOptions,
    RunningBroker,
};
use crate::compare::{machine, utc_now, Machine};
use crate::durable::{broker_warnings, cell, disk_preflight, filesystem_of, fluxd_version, sync_probe, SyncProbe};
use crate::load::{self, LoadResult, LoadSpec, Mode, Placement, Scenario, Target};
use crate::stats::median;

/// Topic prefix every case publishes under (the queue's binding is `<prefix>/#`).
const TOPIC_PREFIX: &str = "bench";
/// write+fdatasync rounds of the disk probe before each case.
const CASE_PROBE_SYNCS: usize = 32;

#[derive(Clone, Debug)]
pub struct QueueSpec {
    pub publishers: usize,
    pub consumer_counts: Vec<usize>,
    pub rounds: usize,
    pub inflight: u16,
    pub window: usize,
    pub payload_bytes: usize,
    pub mqtt_v5: bool,
    pub placement: Placement,
    /// Send phase per case (live cases).
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    /// Message bound per live case (all publishers).
    pub messages: u64,
    /// Backlog cases instead of live ones: this many messages first, then the drain.
    pub backlog: Option<u64>,
    /// Backlog: bound on the fill and, separately, on the drain.
    pub backlog_bound: Duration,
    pub durability: Durability,
    pub flush_interval_ms: Option<u32>,
    pub segment_size_bytes: Option<u64>,
    pub queue_name: String,
    /// `[[queue]] prefetch`.
    pub prefetch: u16,
    pub max_messages: u64,
    pub max_bytes: u64,
    pub probe_syncs: usize,
    pub paths: BrokerPaths,
    pub settings: BrokerSettings,
    pub progress: bool,
    pub keep_logs: Option<PathBuf>,
    pub command_line: String,
}

impl QueueSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.publishers == 0 || self.publishers > 1000 {
            bail!("--publishers must be 1..=1000");
        }
        if self.consumer_counts.is_empty()
            || self.consumer_counts.iter().any(|&c| c == 0 || c > 256)
        {
            bail!("--consumers needs one or more counts in 1..=256");
        }
        if self.rounds == 0 || self.rounds > 20 {
            bail!("--rounds must be 1..=20");
        }
        if self.inflight == 0 || self.window == 0 {
            bail!("--inflight and --window must be > 0");
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(300) {
            bail!("--duration-secs must be in (0, 300]");
        }
        if self.warmup >= self.duration {
            bail!("--warmup-secs must be shorter than --duration-secs");
        }
        if self.messages == 0 {
            bail!("--messages must be > 0");
        }
        if let Some(n) = self.backlog {
            if n == 0 || n > self.max_messages {
                bail!(
                    "--backlog must be in 1..=--queue-max-messages ({})",
                    self.max_messages
                );
            }
            if self.backlog_bound.is_zero() || self.backlog_bound > Duration::from_secs(300) {
                bail!("--backlog-secs must be in (0, 300]");
            }
        }
        if self.prefetch == 0 {
            bail!("--prefetch must be > 0");
        }
        flux_core::queue::QueueName::new(&self.queue_name)
            .map_err(|e| anyhow::anyhow!("--queue-name: {e}"))?;
        Ok(())
    }

    /// Cases in run order, (round, consumers): every count each round, the first one rotating
    /// from round to round.
    pub fn schedule(&self) -> Vec<(usize, usize)> {
        let k = self.consumer_counts.len();
        (1..=self.rounds)
            .flat_map(|round| {
                (0..k).map(move |j| (round, self.consumer_counts[(j + round - 1) % k]))
            })
            .collect()
    }

    /// Unacknowledged deliveries fluxd allows each consumer: the queue's prefetch, which fluxd
    /// caps by `max_inflight_messages`.
    pub fn effective_prefetch(&self) -> u16 {
        self.prefetch.min(self.settings.broker_inflight)
    }

    fn load_spec(&self, round: usize, consumers: usize) -> LoadSpec {
        let tag = format!("q{}r{round}c{consumers}", std::process::id());
        let (messages, duration, drain, window) = match self.backlog {
            Some(n) => (n, self.backlog_bound, self.backlog_bound, self.window),
            None => (self.messages, self.duration, self.drain, self.window),
        };
        LoadSpec {
            scenario: Scenario::Queue,
            publishers: self.publishers,
            subscribers: consumers,
            qos: QoS::AtLeastOnce,
            payload_bytes: self.payload_bytes,
            mqtt_v5: self.mqtt_v5,
            mode: Mode::Max { window },
            messages,
            duration,
            warmup: self.warmup,
            drain,
            inflight: self.inflight,
            placement: self.placement,
            flux_shards: self.settings.shards,
            topic_base: format!("{TOPIC_PREFIX}/{tag}"),
            client_prefix: tag,
            client_rt: false,
            persistent_subscribers: false,
            queue_filter: format!("$queue/{}", self.queue_name),
            backlog: self.backlog.is_some(),
            progress: self.progress,
            label: format!(
                "{}{consumers}c r{round}",
                if self.backlog.is_some() {
                    "backlog "
                } else {
                    ""
                }
            ),
        }
    }
}

/// The fluxd.toml tables a case adds: the admin endpoint on a port of its own (so two fluxd never
/// contend for the default one) and the queue, bound to every topic the publishers use.
pub fn queue_config(
    name: &str,
    bind: &str,
    prefetch: u16,
    max_messages: u64,
    max_bytes: u64,
) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[queue]]\nname = {}\nbind = [{}]\nmax_messages = {max_messages}\n\
         max_bytes = {max_bytes}\nprefetch = {prefetch}\n",
        toml_string(name),
        toml_string(bind)
    )
}

/// A TOML basic string (the names used here hold no control characters; quotes and backslashes
/// are escaped).
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The status and JSON body of an HTTP/1.1 answer read to its end (`Connection: close`).
pub fn parse_http_json(raw: &str) -> anyhow::Result<(u16, serde_json::Value)> {
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("no end of headers in the answer")?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let value = serde_json::from_str(body.trim()).context("answer body is not JSON")?;
    Ok((status, value))
}

/// `GET /queues/<name>` on fluxd's admin endpoint.
pub fn admin_queue_stats(admin: SocketAddr, name: &str) -> anyhow::Result<serde_json::Value> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&admin, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let path: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    write!(
        s,
        "GET /queues/{path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (status, value) = parse_http_json(&raw)?;
    if status != 200 {
        bail!("admin endpoint answered {status}: {value}");
    }
    Ok(value)
}

/// The admin endpoint's address, from fluxd's log (it binds after the MQTT listener).
fn admin_addr(log: &Path, wait: Duration) -> Option<SocketAddr> {
    let until = Instant::now() + wait;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(a) = parse_bound_addr(&text, "admin listener bound") {
            return Some(a);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub round: usize,
    pub consumers: usize,
    pub result: Option<LoadResult>,
    pub broker_died: bool,
    pub error: Option<String>,
    /// `GET /queues/<name>` after the drain (depth, published, delivered, redelivered, acked,
    /// rejected_full, ...).
    pub queue_stats: Option<serde_json::Value>,
    /// fluxd shard owning the queue (FNV-1a of its name).
    pub queue_owner_shard: u16,
    /// 4 KiB write + fdatasync just before the case (32 rounds), median µs: how busy the disk
    /// was (other work on the machine moves the fsync figures).
    pub disk_sync_p50_us: Option<f64>,
    /// WARN/ERROR lines fluxd logged (RLIMIT_MEMLOCK notes left out), first 10.
    pub broker_warnings: Vec<String>,
    pub broker_warning_count: usize,
}

fn run_case(spec: &QueueSpec, k: usize, round: usize, consumers: usize) -> CaseResult {
    let mut out = CaseResult {
        round,
        consumers,
        result: None,
        broker_died: false,
        error: None,
        queue_stats: None,
        queue_owner_shard: flux_core::shard_for(
            spec.queue_name.as_bytes(),
            spec.settings.shards.max(1),
        )
        .0,
        disk_sync_p50_us: (spec.probe_syncs > 0)
            .then(|| sync_probe(&std::env::temp_dir(), CASE_PROBE_SYNCS).ok())
            .flatten()
            .map(|p| p.latency.p50_us),
        broker_warnings: Vec::new(),
        broker_warning_count: 0,
    };
    let options = FluxdOptions {
        durability: Some(spec.durability),
        flush_interval_ms: spec.flush_interval_ms,
        segment_size_bytes: spec.segment_size_bytes,
        log_file: spec.keep_logs.as_ref().map(|d| {
            d.join(format!(
                "case-{}-{consumers}c-r{round}{}.log",
                k + 1,
                if spec.backlog.is_some() {
                    "-backlog"
                } else {
                    ""
                }
            ))
        }),
        extra_config: Some(queue_config(
            &spec.queue_name,
            &format!("{TOPIC_PREFIX}/#"),
            spec.prefetch,
            spec.max_messages,
            spec.max_bytes,
        )),
        ..FluxdOptions::default()
    };
    let mut broker = match RunningBroker::start_fluxd(&spec.paths, &spec.settings, &options) {
        Ok(b) => b,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    let admin = admin_addr(broker.log_path(), Duration::from_secs(3));
    let target = Target {
        addr: broker.addr,
        pid: Some(broker.pid()),
    };
    match load::run(&spec.load_spec(round, consumers), target) {
        Ok(r) => out.result = Some(r),
        Err(e) => out.error = Some(format!("{e:#}")),
    }
    if let Some(how) = broker.exit_description() {
        out.broker_died = true;
        let tail = broker.log_tail();
        out.error.get_or_insert_with(|| {
            format!(
                "fluxd (pid {}) ended during the case: {how}; last log lines:\n{tail}",
                broker.pid()
            )
        });
    } else {
        match admin.map(|a| admin_queue_stats(a, &spec.queue_name)) {
            Some(Ok(v)) => out.queue_stats = Some(v),
            Some(Err(e)) => eprintln!("  warning: queue stats: {e:#}"),
            None => eprintln!("  warning: fluxd logged no admin listener address"),
        }
    }
    let log = std::fs::read_to_string(broker.log_path()).unwrap_or_default();
    (out.broker_warnings, out.broker_warning_count) = broker_warnings(&log);
    broker.stop();
    out
}

/// A case passed: it ran as specified (fluxd stayed up, refused no publish, closed no client
/// connection), something was acknowledged and consumed in the measured window, and no
/// acknowledged message was lost (nor a phantom one received).
pub fn case_ok(c: &CaseResult) -> bool {
    c.error.is_none()
        && !c.broker_died
        && c.result.as_ref().is_some_and(|r| {
            r.measured_acks > 0
                && r.refused == 0
                && r.warnings.is_empty()
                && r.ledger
                    .as_ref()
                    .is_some_and(|v| v.lost == 0 && v.phantom == 0 && v.received > 0)
        })
}

/// Acknowledged messages no consumer received, in a case (a case with no verdict counts 0 here
/// and fails by [`case_ok`]).
fn lost_of(c: &CaseResult) -> u64 {
    c.result
        .as_ref()
        .and_then(|r| r.ledger.as_ref())
        .map_or(0, |v| v.lost)
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub consumers: usize,
    pub rounds_ok: usize,
    /// Medians over rounds.
    pub acked_per_sec: f64,
    pub acked_per_sec_range: (f64, f64),
    pub consumed_per_sec: f64,
    pub confirm_p50_us: f64,
    pub confirm_p99_us: f64,
    /// Largest over rounds.
    pub confirm_max_us: f64,
    pub e2e_p50_us: f64,
    pub e2e_p99_us: f64,
    pub broker_cpu_us_per_msg: f64,
    /// Largest over rounds.
    pub broker_rss_bytes: u64,
    /// Summed over rounds.
    pub lost: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Delivered although never acknowledged to its publisher (refused, or in flight on a
    /// connection fluxd closed).
    pub unacked_delivered: u64,
    pub redelivered: u64,
    pub broker_warnings: usize,
    /// Backlog cases: medians over rounds.
    pub backlog: Option<BacklogSummary>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct BacklogSummary {
    pub messages: f64,
    pub fill_acked_per_sec: f64,
    pub rss_before_fill_bytes: f64,
    pub rss_after_fill_bytes: f64,
    pub rss_bytes_per_message: f64,
    pub drain_per_sec: f64,
    pub drain_secs: f64,
    pub first_delivery_ms: f64,
    pub rss_after_drain_bytes: f64,
    pub fill_cpu_us_per_msg: f64,
    pub drain_cpu_us_per_msg: f64,
}

fn stat_u64(c: &CaseResult, key: &str) -> u64 {
    c.queue_stats
        .as_ref()
        .and_then(|v| v.get(key))
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

pub fn summarize(consumer_counts: &[usize], cases: &[CaseResult]) -> Vec<Summary> {
    consumer_counts
        .iter()
        .filter_map(|&c| {
            let mine: Vec<&CaseResult> = cases.iter().filter(|x| x.consumers == c).collect();
            let results: Vec<&LoadResult> = mine.iter().filter_map(|x| x.result.as_ref()).collect();
            if results.is_empty() {
                return None;
            }
            let f = |get: &dyn Fn(&LoadResult) -> f64| {
                results.iter().map(|r| get(r)).collect::<Vec<f64>>()
            };
            let rates = f(&|r| r.acked_per_sec);
            let backlogs: Vec<&load::BacklogFigures> =
                results.iter().filter_map(|r| r.backlog.as_ref()).collect();
            let b = |get: &dyn Fn(&load::BacklogFigures) -> Option<f64>| {
                median(
                    &backlogs
                        .iter()
                        .map(|x| get(x).unwrap_or(f64::NAN))
                        .collect::<Vec<_>>(),
                )
            };
            let backlog = (!backlogs.is_empty()).then(|| BacklogSummary {
                messages: b(&|x| Some(x.acked_before_attach as f64)),
                fill_acked_per_sec: b(&|x| Some(x.fill_acked_per_sec)),
                rss_before_fill_bytes: b(&|x| x.rss_before_fill_bytes.map(|v| v as f64)),
                rss_after_fill_bytes: b(&|x| x.rss_after_fill_bytes.map(|v| v as f64)),
                rss_bytes_per_message: b(&|x| x.rss_bytes_per_message),
                drain_per_sec: b(&|x| Some(x.drain_per_sec)),
                drain_secs: b(&|x| Some(x.drain_secs)),
                first_delivery_ms: b(&|x| x.first_delivery_ms),
                rss_after_drain_bytes: median(&f(&|r| {
                    r.broker_rss_bytes.map_or(f64::NAN, |v| v as f64)
                })),
                fill_cpu_us_per_msg: b(&|x| x.fill_cpu_us_per_msg),
                drain_cpu_us_per_msg: b(&|x| x.drain_cpu_us_per_msg),
            });
            let ledger_sum = |get: &dyn Fn(&crate::ledger::Verdict) -> u64| -> u64 {
                results
                    .iter()
                    .filter_map(|r| r.ledger.as_ref())
                    .map(get)
                    .sum()
            };
            Some(Summary {
                consumers: c,
                rounds_ok: mine.iter().filter(|x| case_ok(x)).count(),
                acked_per_sec: median(&rates),
                acked_per_sec_range: (
                    rates.iter().copied().fold(f64::INFINITY, f64::min),
                    rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ),
                // Backlog: the drain rate (over the fill and the drain it would mean nothing).
                consumed_per_sec: match &backlog {
                    Some(b) => b.drain_per_sec,
                    None => median(&f(&|r| r.delivered_per_sec)),
                },
                confirm_p50_us: median(&f(&|r| r.ack_latency.p50_us)),
                confirm_p99_us: median(&f(&|r| r.ack_latency.p99_us)),
                confirm_max_us: f(&|r| r.ack_latency.max_us).into_iter().fold(0.0, f64::max),
                e2e_p50_us: median(&f(&|r| r.latency.p50_us)),
                e2e_p99_us: median(&f(&|r| r.latency.p99_us)),
                broker_cpu_us_per_msg: median(&f(&|r| r.broker_cpu_us_per_msg.unwrap_or(f64::NAN))),
                broker_rss_bytes: results
                    .iter()
                    .filter_map(|r| r.broker_rss_bytes)
                    .max()
                    .unwrap_or(0),
                lost: mine.iter().map(|x| lost_of(x)).sum(),
                duplicates: ledger_sum(&|v| v.duplicates),
                refused: results.iter().map(|r| r.refused).sum(),
                unacked_delivered: ledger_sum(&|v| v.unacked_received),
                redelivered: mine.iter().map(|x| stat_u64(x, "redelivered")).sum(),
                broker_warnings: mine.iter().map(|x| x.broker_warning_count).sum(),
                backlog,
            })
        })
        .collect()
}

fn mib(bytes: f64) -> String {
    cell(bytes / (1024.0 * 1024.0), 1)
}

/// Markdown table, one row per consumer count (plus the backlog table when there is one).
pub fn render_table(rows: &[Summary], rounds: usize) -> String {
    let mut t = String::from(
        "| consumers | acked msg/s | consumed msg/s | confirm p50 µs | confirm p99 µs | confirm max µs | e2e p50 µs | e2e p99 µs | CPU µs/msg | RSS MiB | lost | dup | refused | unacked delivered | redelivered | fluxd warnings | rounds ok |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let range = if r.acked_per_sec_range.0 < r.acked_per_sec_range.1 {
            format!(
                " ({}–{})",
                cell(r.acked_per_sec_range.0, 0),
                cell(r.acked_per_sec_range.1, 0)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            t,
            "| {} | {}{range} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{rounds} |",
            r.consumers,
            cell(r.acked_per_sec, 0),
            cell(r.consumed_per_sec, 0),
            cell(r.confirm_p50_us, 0),
            cell(r.confirm_p99_us, 0),
            cell(r.confirm_max_us, 0),
            cell(r.e2e_p50_us, 0),
            cell(r.e2e_p99_us, 0),
            cell(r.broker_cpu_us_per_msg, 2),
            mib(r.broker_rss_bytes as f64),
            r.lost,
            r.duplicates,
            r.refused,
            r.unacked_delivered,
            r.redelivered,
            r.broker_warnings,
            r.rounds_ok,
        );
    }
    let backlogs: Vec<(usize, &BacklogSummary)> = rows
        .iter()
        .filter_map(|r| r.backlog.as_ref().map(|b| (r.consumers, b)))
        .collect();
    if !backlogs.is_empty() {
        t.push_str(
            "\n| consumers | backlog msgs | fill acked msg/s | RSS before MiB | RSS filled MiB | bytes/queued msg | drain msg/s | drain s | first delivery ms | RSS drained MiB | fill CPU µs/msg | drain CPU µs/msg |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (c, b) in backlogs {
            let _ = writeln!(
                t,
                "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(b.messages, 0),
                cell(b.fill_acked_per_sec, 0),
                mib(b.rss_before_fill_bytes),
                mib(b.rss_after_fill_bytes),
                cell(b.rss_bytes_per_message, 0),
                cell(b.drain_per_sec, 0),
                cell(b.drain_secs, 1),
                cell(b.first_delivery_ms, 1),
                mib(b.rss_after_drain_bytes),
                cell(b.fill_cpu_us_per_msg, 2),
                cell(b.drain_cpu_us_per_msg, 2),
            );
        }
    }
    t
}

#[derive(Serialize)]
struct Report<'a> {
    date_utc: String,
    machine: Machine,
    command_line: &'a str,
    fluxd_bin: String,
    fluxd_version: String,
    data_dir_parent: String,
    data_dir_filesystem: String,
    sync_probe: Option<SyncProbe>,
    durability: Durability,
    rounds: usize,
    publishers: usize,
    consumer_counts: &'a [usize],
    inflight: u16,
    window: usize,
    payload_bytes: usize,
    mqtt_v5: bool,
    placement: Placement,
    duration_secs: f64,
    warmup_secs: f64,
    messages_per_case: u64,
    backlog: Option<u64>,
    queue_name: &'a str,
    queue_config: String,
    prefetch: u16,
    effective_prefetch: u16,
    flush_interval_ms: Option<u32>,
    segment_size_bytes: Option<u64>,
    settings: &'a BrokerSettings,
    cases: &'a [CaseResult],
    summary: &'a [Summary],
    table: &'a str,
    ok: bool,
}

fn describe(c: &CaseResult) -> String {
    let Some(r) = &c.result else {
        return c.error.clone().unwrap_or_else(|| "no result".into());
    };
    let v = r.ledger.clone().unwrap_or_default();
    let mut s = format!(
        "{:.0} acked/s, confirm p50 {:.0} p99 {:.0} µs; {:.0} consumed/s, e2e p50 {:.0} p99 {:.0} µs; acked {} of {} sent, consumed {} distinct (lost {}, dup {}, refused {}, delivered though unacked {}), stopped by {}",
        r.acked_per_sec,
        r.ack_latency.p50_us,
        r.ack_latency.p99_us,
        r.delivered_per_sec,
        r.latency.p50_us,
        r.latency.p99_us,
        r.acked,
        r.sent,
        v.received,
        v.lost,
        v.duplicates,
        r.refused,
        v.unacked_received,
        r.stopped_by
    );
    if !r.warnings.is_empty() {
        let _ = write!(
            s,
            "; {} client warnings, first: {}",
            r.warnings.len(),
            r.warnings[0]
        );
    }
    if let Some(b) = &r.backlog {
        let _ = write!(
            s,
            "; backlog {} acked in {:.1} s, RSS {} -> {} MiB ({} B/msg), drained {} in {:.1} s ({:.0}/s)",
            b.acked_before_attach,
            b.fill_secs,
            mib(b.rss_before_fill_bytes.map_or(f64::NAN, |v| v as f64)),
            mib(b.rss_after_fill_bytes.map_or(f64::NAN, |v| v as f64)),
            cell(b.rss_bytes_per_message.unwrap_or(f64::NAN), 0),
            b.drained,
            b.drain_secs,
            b.drain_per_sec
        );
    }
    s
}

/// Runs every case, prints the table on stdout, writes the JSON report to `json` (or stdout
/// after the table when None). Errors when a case failed or lost an acknowledged message.
pub fn run(spec: &QueueSpec, json: Option<&PathBuf>) -> anyhow::Result<()> {
    spec.validate()?;
    let started = Instant::now();
    let parent = std::env::temp_dir();
    let probe = disk_preflight(&parent, spec.probe_syncs, spec.keep_logs.as_deref(), spec.durability == Durability::Fsync)?;
    if spec.prefetch > spec.settings.broker_inflight {
        eprintln!(
            "note: prefetch {} is above max_inflight_messages {}: fluxd allows each consumer {}",
            spec.prefetch,
            spec.settings.broker_inflight,
            spec.effective_prefetch()
        );
    }
    let schedule = spec.schedule();
    let mut cases = Vec::with_capacity(schedule.len());
    for (k, &(round, consumers)) in schedule.iter().enumerate() {
        eprintln!(
            "== case {}/{}: round {round}, {} publishers, {consumers} consumers{}",
            k + 1,
            schedule.len(),
            spec.publishers,
            spec.backlog
                .map_or(String::new(), |n| format!(", backlog {n}"))
        );
        let c = run_case(spec, k, round, consumers);
        if let Some(p50) = c.disk_sync_p50_us {
            eprintln!("  disk probe before the case: fdatasync p50 {p50:.0} µs");
        }
        eprintln!("  {}", describe(&c));
        if let (Some(_), Some(e)) = (&c.result, &c.error) {
            eprintln!("  error: {e}");
        }
        if c.broker_warning_count > 0 {
            eprintln!(
                "  fluxd logged {} warnings, first: {}",
                c.broker_warning_count,
                c.broker_warnings.first().map_or("", |s| s.as_str())
            );
        }
        cases.push(c);
    }
    let summary = summarize(&spec.consumer_counts, &cases);
    let table = render_table(&summary, spec.rounds);
    println!("{table}");
    let ok = cases.iter().all(case_ok);
    let bin = spec.paths.binary(BrokerKind::Fluxd);
    let report = Report {
        date_utc: utc_now(),
        machine: machine(),
        command_line: &spec.command_line,
        fluxd_bin: bin.display().to_string(),
        fluxd_version: fluxd_version(&bin),
        data_dir_parent: parent.display().to_string(),
        data_dir_filesystem: filesystem_of(&parent),
        sync_probe: probe,
        durability: spec.durability,
        rounds: spec.rounds,
        publishers: spec.publishers,
        consumer_counts: &spec.consumer_counts,
        inflight: spec.inflight,
        window: spec.window,
        payload_bytes: spec.payload_bytes,
        mqtt_v5: spec.mqtt_v5,
        placement: spec.placement,
        duration_secs: spec.duration.as_secs_f64(),
        warmup_secs: spec.warmup.as_secs_f64(),
        messages_per_case: spec.backlog.unwrap_or(spec.messages),
        backlog: spec.backlog,
        queue_name: &spec.queue_name,
        queue_config: queue_config(
            &spec.queue_name,
            &format!("{TOPIC_PREFIX}/#"),
            spec.prefetch,
            spec.max_messages,
            spec.max_bytes,
        ),
        prefetch: spec.prefetch,
        effective_prefetch: spec.effective_prefetch(),
        flush_interval_ms: spec.flush_interval_ms,
        segment_size_bytes: spec.segment_size_bytes,
        settings: &spec.settings,
        cases: &cases,
        summary: &summary,
        table: &table,
        ok,
    };
    crate::write_json(json, &report)?;
    eprintln!(
        "queue: {} cases in {:.0} s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    if !ok {
        let bad: Vec<String> = cases
            .iter()
            .filter(|c| !case_ok(c))
            .map(|c| {
                let lost =
                    c.result
                        .as_ref()
                        .and_then(|r| r.ledger.as_ref())
                        .map_or(String::new(), |v| {
                            format!(
                                " (lost {}, e.g. (publisher, seq) {:?}; phantom {})",
                                v.lost, v.lost_examples, v.phantom
                            )
                        });
                format!(
                    "{} consumers round {}: {}{lost}",
                    c.consumers,
                    c.round,
                    c.error.clone().unwrap_or_else(|| describe(c))
                )
            })
            .collect();
        bail!(
            "{} case(s) failed (lost acknowledged messages, refused publishes, closed connections or errors):\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Verdict;

    fn spec() -> QueueSpec {
        QueueSpec {
            publishers: 16,
            consumer_counts: vec![1, 4, 16],
            rounds: 2,
            inflight: 16,
            window: 1000,
            payload_bytes: 64,
            mqtt_v5: false,
            placement: Placement::Spread,
            duration: Duration::from_secs(4),
            warmup: Duration::from_secs(1),
            drain: Duration::from_secs(5),
            messages: 1000,
            backlog: None,
            backlog_bound: Duration::from_secs(60),
            durability: Durability::Fsync,
            flush_interval_ms: None,
            segment_size_bytes: None,
            queue_name: "bench".into(),
            prefetch: 256,
            max_messages: 10_000_000,
            max_bytes: 4 << 30,
            probe_syncs: 0,
            paths: BrokerPaths {
                fluxd_bin: "fluxd".into(),
                mosquitto_bin: "m".into(),
                rumqttd_bin: "r".into(),
            },
            settings: BrokerSettings {
                shards: 2,
                broker_inflight: 256,
                broker_queued: 1000,
                broker_max_connections: 100,
            },
            progress: false,
            keep_logs: None,
            command_line: String::new(),
        }
    }

    #[test]
    fn schedule_runs_every_count_each_round_and_rotates_the_first() {
        let s = spec();
        assert_eq!(
            s.schedule(),
            vec![(1, 1), (1, 4), (1, 16), (2, 4), (2, 16), (2, 1)]
        );
        let one = QueueSpec {
            consumer_counts: vec![4],
            rounds: 3,
            ..spec()
        };
        assert_eq!(one.schedule(), vec![(1, 4), (2, 4), (3, 4)]);
    }

    #[test]
    fn validation_bounds_the_run() {
        assert!(spec().validate().is_ok());
        for bad in [
            QueueSpec {
                consumer_counts: vec![],
                ..spec()
            },
            QueueSpec {
                consumer_counts: vec![4, 0],
                ..spec()
            },
            QueueSpec {
                warmup: Duration::from_secs(4),
                ..spec()
            },
            QueueSpec {
                backlog: Some(20_000_000),
                ..spec()
            },
            QueueSpec {
                backlog: Some(1000),
                backlog_bound: Duration::from_secs(301),
                ..spec()
            },
            QueueSpec {
                queue_name: "a/b".into(),
                ..spec()
            },
        ] {
            assert!(bad.validate().is_err());
        }
        assert!(QueueSpec {
            backlog: Some(1_000_000),
            ..spec()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn prefetch_is_capped_by_max_inflight() {
        assert_eq!(spec().effective_prefetch(), 256);
        let mut s = spec();
        s.settings.broker_inflight = 128;
        assert_eq!(s.effective_prefetch(), 128);
    }

    #[test]
    fn case_spec_binds_the_queue_and_bounds_the_backlog() {
        let s = spec();
        let l = s.load_spec(2, 4);
        assert_eq!(l.scenario, Scenario::Queue);
        assert_eq!((l.publishers, l.subscribers), (16, 4));
        assert_eq!(l.queue_filter, "$queue/bench");
        assert!(l.topic_base.starts_with("bench/"), "{}", l.topic_base);
        assert!(!l.backlog);
        assert!(l.validate().is_ok());
        let b = QueueSpec {
            backlog: Some(1_000_000),
            ..spec()
        }
        .load_spec(1, 4);
        assert!(b.backlog);
        assert_eq!(b.messages, 1_000_000);
        assert_eq!(b.duration, Duration::from_secs(60));
        assert_eq!(b.drain, Duration::from_secs(60));
        assert!(b.validate().is_ok());
    }

    #[test]
    fn config_declares_the_queue_and_a_private_admin_port() {
        let text = queue_config("bench", "bench/#", 256, 10_000_000, 4294967296);
        assert_eq!(
            text,
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[queue]]\nname = \"bench\"\nbind = [\"bench/#\"]\n\
             max_messages = 10000000\nmax_bytes = 4294967296\nprefetch = 256\n"
        );
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn admin_answers_are_parsed() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n{\"depth\":3,\"name\":\"bench\"}";
        let (status, v) = parse_http_json(raw).unwrap();
        assert_eq!(status, 200);
        assert_eq!(v["depth"], 3);
        let (status, v) =
            parse_http_json("HTTP/1.1 404 Not Found\r\n\r\n{\"error\":\"no queue\"}").unwrap();
        assert_eq!((status, v["error"].as_str()), (404, Some("no queue")));
        assert!(parse_http_json("HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_http_json("HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }

    fn result(acked_per_sec: f64, p99: f64, lost: u64, dup: u64) -> LoadResult {
        let mut r: LoadResult = serde_json::from_value(serde_json::json!({
            "label": "", "scenario": "queue", "mode": "max", "qos": 1, "payload_bytes": 64,
            "publishers": 16, "subscribers": 4, "offered_rate_per_sec": null, "window": 1000,
            "stopped_by": "time", "sent": 100, "expected_deliveries": 100, "delivered": 100,
            "lost": 0, "dup_or_reorder": 0, "measured_deliveries": 100, "measured_secs": 1.0,
            "delivered_per_sec": acked_per_sec, "latency": serde_json::to_value(crate::stats::Percentiles::default()).unwrap(),
            "send_lag": serde_json::to_value(crate::stats::Percentiles::default()).unwrap(), "broker_cpu_us": null,
            "broker_cpu_us_per_msg": 5.0, "broker_rss_bytes": 50 << 20, "publisher_shards": [0],
            "subscriber_shards": [1]
        }))
        .unwrap();
        r.acked_per_sec = acked_per_sec;
        r.measured_acks = 100;
        r.ack_latency.p99_us = p99;
        r.ledger = Some(Verdict {
            received: 100,
            lost,
            duplicates: dup,
            ..Verdict::default()
        });
        r
    }

    fn case(round: usize, consumers: usize, r: LoadResult) -> CaseResult {
        CaseResult {
            round,
            consumers,
            result: Some(r),
            broker_died: false,
            error: None,
            queue_stats: Some(serde_json::json!({"redelivered": 2})),
            queue_owner_shard: 0,
            disk_sync_p50_us: None,
            broker_warnings: Vec::new(),
            broker_warning_count: 0,
        }
    }

    #[test]
    fn summary_takes_medians_and_sums_losses() {
        let cases = vec![
            case(1, 4, result(1000.0, 3000.0, 0, 1)),
            case(2, 4, result(3000.0, 5000.0, 2, 0)),
            case(3, 4, result(2000.0, 4000.0, 0, 0)),
            case(1, 1, result(500.0, 1000.0, 0, 0)),
        ];
        assert!(case_ok(&cases[0]) && !case_ok(&cases[1]));
        let rows = summarize(&[1, 4, 16], &cases);
        assert_eq!(rows.len(), 2, "no row for a count that never ran");
        let four = &rows[1];
        assert_eq!(four.consumers, 4);
        assert_eq!(four.acked_per_sec, 2000.0);
        assert_eq!(four.acked_per_sec_range, (1000.0, 3000.0));
        assert_eq!(four.confirm_p99_us, 4000.0);
        assert_eq!((four.lost, four.duplicates, four.redelivered), (2, 1, 6));
        assert_eq!(four.rounds_ok, 2);
        assert!(four.backlog.is_none());
        let t = render_table(&rows, 3);
        assert!(t.contains("| 4 | 2000 (1000–3000) | 2000 |"), "{t}");
        assert!(t.contains("| 2 | 1 | 0 | 0 | 6 | 0 | 2/3 |"), "{t}");
        assert!(!t.contains("backlog msgs"));
        // A case without a verdict fails, and so does one where fluxd refused a publish or
        // closed a client's connection (nothing lost, but not the run asked for).
        let mut none = case(1, 4, result(1.0, 1.0, 0, 0));
        none.result.as_mut().unwrap().ledger = None;
        assert!(!case_ok(&none));
        let mut refused = case(1, 4, result(1.0, 1.0, 0, 0));
        refused.result.as_mut().unwrap().refused = 3;
        assert!(!case_ok(&refused));
        let mut closed = case(1, 4, result(1.0, 1.0, 0, 0));
        closed.result.as_mut().unwrap().warnings = vec!["publisher 0: closed".into()];
        assert!(!case_ok(&closed));
    }

    #[test]
    fn backlog_rows_report_memory_per_message_and_drain() {
        let mut r = result(1000.0, 3000.0, 0, 0);
        r.backlog = Some(load::BacklogFigures {
            acked_before_attach: 1_000_000,
            fill_secs: 25.0,
            fill_acked_per_sec: 40_000.0,
            rss_before_fill_bytes: Some(40 << 20),
            rss_after_fill_bytes: Some(240 << 20),
            rss_bytes_per_message: Some(209.7),
            drain_per_sec: 50_000.0,
            drain_secs: 20.0,
            first_delivery_ms: Some(3.5),
            ..load::BacklogFigures::default()
        });
        let rows = summarize(&[4], &[case(1, 4, r)]);
        let b = rows[0].backlog.as_ref().unwrap();
        assert_eq!(b.messages, 1_000_000.0);
        assert_eq!(b.rss_bytes_per_message, 209.7);
        let t = render_table(&rows, 1);
        assert!(
            t.contains(
                "| 4 | 1000000 | 40000 | 40.0 | 240.0 | 210 | 50000 | 20.0 | 3.5 | 50.0 | - | - |"
            ),
            "{t}"
        );
    }
}
