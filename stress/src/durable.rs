//! `durable`: QoS 1 publish throughput and PUBACK latency when every publish has to be made
//! durable, fluxd `--durability fsync` against `--durability interval`, at several publisher
//! counts, in one run.
//!
//! Each case is one [`crate::load::run`] (closed loop, QoS 1) against a freshly started fluxd
//! with a fresh data directory: N publishers on topics `<base>/fanin/<i>`, S subscribers of
//! `<base>/fanin/+` holding *persistent* sessions (3.1.1 clean_session=0, MQTT 5 Session Expiry
//! Interval > 0), connected and acknowledging throughout. Every publish therefore lands in a
//! persistent session's queue, which fluxd logs to its WAL; in fsync mode the PUBACK waits for the
//! group commit, in interval mode it does not. Each publisher keeps at most `--inflight`
//! publishes unacknowledged and at most `--window` undelivered (the second bound keeps the
//! subscribers' queues, and so the broker's memory, bounded).
//!
//! Figures per case: acknowledged publishes per second and PUBACK latency (write of the PUBLISH to
//! read of its PUBACK), both over the measured window (after the warm-up), plus end-to-end
//! delivery checks (every publish reached every subscriber). Cases are interleaved: for each
//! round and publisher count the two modes run back to back, the first one alternating between
//! rounds. Summary figures are medians over rounds.
//!
//! Before the cases, a small probe times `write` + `fdatasync` of 4 KiB blocks on the filesystem
//! of the data directories (`$TMPDIR`, default /tmp): the floor under any fsync-mode PUBACK.

use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flux_core::mqtt::QoS;
use serde::Serialize;

use crate::brokers::{BrokerPaths, BrokerSettings, Durability, FluxdOptions, RunningBroker};
use crate::compare::{machine, utc_now, Machine};
use crate::load::{self, LoadResult, LoadSpec, Mode, Placement, Scenario, Target};
use crate::stats::{median, new_histogram, Percentiles};

#[derive(Clone, Debug)]
pub struct DurableSpec {
    pub publisher_counts: Vec<usize>,
    pub modes: Vec<Durability>,
    pub rounds: usize,
    pub subscribers: usize,
    pub inflight: u16,
    pub window: usize,
    pub payload_bytes: usize,
    pub mqtt_v5: bool,
    pub placement: Placement,
    /// Send phase per case.
    pub duration: Duration,
    /// Message bound per case (all publishers).
    pub messages: u64,
    pub warmup: Duration,
    pub drain: Duration,
    pub flush_interval_ms: Option<u32>,
    pub segment_size_bytes: Option<u64>,
    pub probe_syncs: usize,
    pub paths: BrokerPaths,
    pub settings: BrokerSettings,
    pub progress: bool,
    /// Keep each case's fluxd log here.
    pub keep_logs: Option<PathBuf>,
    pub command_line: String,
}

impl DurableSpec {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.publisher_counts.is_empty() || self.publisher_counts.contains(&0) {
            bail!("--publishers needs one or more counts > 0");
        }
        if self.publisher_counts.iter().any(|&n| n > 1000) {
            bail!("at most 1000 publishers per case");
        }
        if self.modes.is_empty() {
            bail!("--modes needs fsync and/or interval");
        }
        if self.rounds == 0 || self.rounds > 20 {
            bail!("--rounds must be 1..=20");
        }
        if self.subscribers == 0 || self.subscribers > 64 {
            bail!("--subscribers must be 1..=64");
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
        Ok(())
    }

    /// Cases in run order: for each round and publisher count, every mode, the first mode
    /// rotating from one round (and count) to the next.
    pub fn schedule(&self) -> Vec<(usize, usize, Durability)> {
        let mut out = Vec::new();
        for round in 1..=self.rounds {
            for (k, &n) in self.publisher_counts.iter().enumerate() {
                let m = self.modes.len();
                for j in 0..m {
                    out.push((round, n, self.modes[(j + round - 1 + k) % m]));
                }
            }
        }
        out
    }

    /// Queue room each subscriber's session needs: everything the publishers may have
    /// undelivered at once (the closed-loop window counts deliveries over all subscribers, so one
    /// lagging subscriber may hold window x subscribers per publisher), with slack.
    fn queue_room(&self, publishers: usize) -> usize {
        publishers * (self.window * self.subscribers + usize::from(self.inflight)) + 1000
    }
}

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub round: usize,
    pub publishers: usize,
    pub durability: Durability,
    pub result: Option<LoadResult>,
    pub broker_died: bool,
    pub error: Option<String>,
    /// fluxd max_inflight_messages / max_queued_messages used.
    pub broker_inflight: u16,
    pub broker_queued: usize,
    /// WARN/ERROR lines fluxd logged (RLIMIT_MEMLOCK notes left out), first 10.
    pub broker_warnings: Vec<String>,
    pub broker_warning_count: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ModeSummary {
    pub rounds_ok: usize,
    /// Medians over rounds.
    pub acked_per_sec: f64,
    pub acked_per_sec_range: (f64, f64),
    pub puback_p50_us: f64,
    pub puback_p90_us: f64,
    pub puback_p99_us: f64,
    /// Largest over rounds.
    pub puback_max_us: f64,
    pub delivery_p50_us: f64,
    pub delivery_p99_us: f64,
    pub broker_cpu_us_per_msg: f64,
    /// Summed over rounds.
    pub lost: u64,
    pub dup_or_reorder: u64,
    /// fluxd WARN/ERROR lines, summed over rounds.
    pub broker_warnings: usize,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub publishers: usize,
    pub fsync: Option<ModeSummary>,
    pub interval: Option<ModeSummary>,
    /// fsync / interval, acknowledged publishes per second.
    pub throughput_ratio: f64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct SyncProbe {
    pub path: String,
    pub filesystem: String,
    pub syncs: usize,
    /// One 4 KiB write + fdatasync, overwriting a preallocated file.
    pub latency: Percentiles,
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
    rounds: usize,
    publisher_counts: &'a [usize],
    subscribers: usize,
    inflight: u16,
    window: usize,
    payload_bytes: usize,
    mqtt_v5: bool,
    placement: Placement,
    duration_secs: f64,
    warmup_secs: f64,
    messages_per_case: u64,
    flush_interval_ms: Option<u32>,
    segment_size_bytes: Option<u64>,
    settings: &'a BrokerSettings,
    cases: &'a [CaseResult],
    summary: &'a [Row],
    table: &'a str,
    ok: bool,
}

/// The filesystem type holding `path` (longest matching mount point in /proc/mounts).
pub fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt)
                .then(|| (mnt.len(), format!("{fs} ({dev} on {mnt})")))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, s)| s)
}

/// Times `syncs` rounds of (4 KiB write, fdatasync) in a preallocated file under `dir`.
pub fn sync_probe(dir: &Path, syncs: usize) -> anyhow::Result<SyncProbe> {
    const BLOCK: usize = 4096;
    let path = dir.join(format!("flux-stress-sync-probe-{}", std::process::id()));
    let result = (|| -> anyhow::Result<SyncProbe> {
        let mut f = std::fs::File::create(&path)?;
        let zeros = vec![0u8; BLOCK];
        for _ in 0..syncs {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
        f.seek(SeekFrom::Start(0))?;
        let block = vec![0x5Au8; BLOCK];
        let mut h = new_histogram();
        for _ in 0..syncs {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            let _ = h.record((t.elapsed().as_nanos() as u64).max(1));
        }
        Ok(SyncProbe {
            path: dir.display().to_string(),
            filesystem: filesystem_of(dir),
            syncs,
            latency: Percentiles::of(&h),
        })
    })();
    let _ = std::fs::remove_file(&path);
    result.with_context(|| format!("sync probe in {}", dir.display()))
}

fn run_case(spec: &DurableSpec, k: usize, round: usize, n: usize, mode: Durability) -> CaseResult {
    let mut settings = spec.settings.clone();
    settings.broker_queued = settings.broker_queued.max(spec.queue_room(n));
    settings.broker_inflight = settings.broker_inflight.max(spec.inflight);
    let mut out = CaseResult {
        round,
        publishers: n,
        durability: mode,
        result: None,
        broker_died: false,
        error: None,
        broker_inflight: settings.broker_inflight,
        broker_queued: settings.broker_queued,
        broker_warnings: Vec::new(),
        broker_warning_count: 0,
    };
    let options = FluxdOptions {
        durability: Some(mode),
        flush_interval_ms: spec.flush_interval_ms,
        segment_size_bytes: spec.segment_size_bytes,
        log_file: spec
            .keep_logs
            .as_ref()
            .map(|d| d.join(format!("case-{}-{}-{n}p-r{round}.log", k + 1, mode.name()))),
        ..FluxdOptions::default()
    };
    let mut broker = match RunningBroker::start_fluxd(&spec.paths, &settings, &options) {
        Ok(b) => b,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    let tag = format!("st{}r{round}{}p{n}", std::process::id(), mode.name());
    let load = LoadSpec {
        scenario: Scenario::Fanin,
        publishers: n,
        subscribers: spec.subscribers,
        qos: QoS::AtLeastOnce,
        payload_bytes: spec.payload_bytes,
        mqtt_v5: spec.mqtt_v5,
        mode: Mode::Max {
            window: spec.window,
        },
        messages: spec.messages,
        duration: spec.duration,
        warmup: spec.warmup,
        drain: spec.drain,
        inflight: spec.inflight,
        placement: spec.placement,
        flux_shards: settings.shards,
        topic_base: format!("stress/{tag}"),
        client_prefix: tag,
        client_rt: false,
        persistent_subscribers: true,
        queue_filter: String::new(),
        backlog: false,
        progress: spec.progress,
        label: format!("{} {n}p r{round}", mode.name()),
    };
    let target = Target {
        addr: broker.addr,
        pid: Some(broker.pid()),
    };
    match load::run(&load, target) {
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
    }
    let log = std::fs::read_to_string(broker.log_path()).unwrap_or_default();
    (out.broker_warnings, out.broker_warning_count) = broker_warnings(&log);
    broker.stop();
    out
}

/// fluxd's WARN and ERROR lines (the RLIMIT_MEMLOCK note at start left out): the first 10, and
/// how many there were.
pub fn broker_warnings(log: &str) -> (Vec<String>, usize) {
    let mut first = Vec::new();
    let mut count = 0;
    for line in log.lines().filter(|l| {
        (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("RLIMIT_MEMLOCK")
    }) {
        count += 1;
        if first.len() < 10 {
            first.push(line.to_string());
        }
    }
    (first, count)
}

fn case_ok(c: &CaseResult) -> bool {
    c.error.is_none()
        && c.result
            .as_ref()
            .is_some_and(|r| r.lost == 0 && r.measured_acks > 0)
}

fn summarize_mode(cases: &[&CaseResult]) -> Option<ModeSummary> {
    let results: Vec<&LoadResult> = cases.iter().filter_map(|c| c.result.as_ref()).collect();
    if results.is_empty() {
        return None;
    }
    let f = |get: &dyn Fn(&LoadResult) -> f64| results.iter().map(|r| get(r)).collect::<Vec<_>>();
    let rates = f(&|r| r.acked_per_sec);
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(ModeSummary {
        rounds_ok: cases.iter().filter(|c| case_ok(c)).count(),
        acked_per_sec: median(&rates),
        acked_per_sec_range: (lo, hi),
        puback_p50_us: median(&f(&|r| r.ack_latency.p50_us)),
        puback_p90_us: median(&f(&|r| r.ack_latency.p90_us)),
        puback_p99_us: median(&f(&|r| r.ack_latency.p99_us)),
        puback_max_us: f(&|r| r.ack_latency.max_us).into_iter().fold(0.0, f64::max),
        delivery_p50_us: median(&f(&|r| r.latency.p50_us)),
        delivery_p99_us: median(&f(&|r| r.latency.p99_us)),
        broker_cpu_us_per_msg: median(&f(&|r| r.broker_cpu_us_per_msg.unwrap_or(f64::NAN))),
        lost: results.iter().map(|r| r.lost).sum(),
        dup_or_reorder: results.iter().map(|r| r.dup_or_reorder).sum(),
        broker_warnings: cases.iter().map(|c| c.broker_warning_count).sum(),
    })
}

pub fn summarize(publisher_counts: &[usize], cases: &[CaseResult]) -> Vec<Row> {
    publisher_counts
        .iter()
        .map(|&n| {
            let of = |mode: Durability| {
                let mine: Vec<&CaseResult> = cases
                    .iter()
                    .filter(|c| c.publishers == n && c.durability == mode)
                    .collect();
                summarize_mode(&mine)
            };
            let (fsync, interval) = (of(Durability::Fsync), of(Durability::Interval));
            let ratio = |get: &dyn Fn(&ModeSummary) -> f64| match (&fsync, &interval) {
                (Some(a), Some(b)) if get(b) > 0.0 => get(a) / get(b),
                _ => f64::NAN,
            };
            Row {
                publishers: n,
                throughput_ratio: ratio(&|s| s.acked_per_sec),
                p50_ratio: ratio(&|s| s.puback_p50_us),
                p99_ratio: ratio(&|s| s.puback_p99_us),
                fsync,
                interval,
            }
        })
        .collect()
}

pub fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// Markdown table: one row per (publishers, mode), then the fsync / interval ratio row.
pub fn render_table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| publishers | durability | acked msg/s | PUBACK p50 µs | p90 µs | p99 µs | max µs | delivery p50 µs | delivery p99 µs | CPU µs/msg | lost | dup | fluxd warnings | rounds ok |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        for (name, s) in [("fsync", &row.fsync), ("interval", &row.interval)] {
            let Some(s) = s else { continue };
            let _ = writeln!(
                t,
                "| {} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.publishers,
                cell(s.acked_per_sec, 0),
                cell(s.puback_p50_us, 0),
                cell(s.puback_p90_us, 0),
                cell(s.puback_p99_us, 0),
                cell(s.puback_max_us, 0),
                cell(s.delivery_p50_us, 0),
                cell(s.delivery_p99_us, 0),
                cell(s.broker_cpu_us_per_msg, 2),
                s.lost,
                s.dup_or_reorder,
                s.broker_warnings,
                s.rounds_ok
            );
        }
        if row.fsync.is_some() && row.interval.is_some() {
            let x = |v: f64| {
                if v.is_finite() {
                    format!("{v:.2}x")
                } else {
                    "-".into()
                }
            };
            let _ = writeln!(
                t,
                "| {} | fsync / interval | {} | {} | - | {} | - | - | - | - | - | - | - | - |",
                row.publishers,
                x(row.throughput_ratio),
                x(row.p50_ratio),
                x(row.p99_ratio)
            );
        }
    }
    t
}

pub fn fluxd_version(bin: &Path) -> String {
    match std::process::Command::new(bin).arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Before a durable run: creates `keep_logs`, probes `parent`'s fdatasync latency (`syncs` > 0)
/// and, with `warn_tmpfs`, warns when `parent` is on a RAM file system (fsync is free there).
pub fn disk_preflight(
    parent: &Path,
    syncs: usize,
    keep_logs: Option<&Path>,
    warn_tmpfs: bool,
) -> anyhow::Result<Option<SyncProbe>> {
    if let Some(d) = keep_logs {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let probe = if syncs > 0 {
        match sync_probe(parent, syncs) {
            Ok(p) => {
                eprintln!(
                    "sync probe ({}): 4 KiB write+fdatasync p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                    p.filesystem, p.latency.p50_us, p.latency.p99_us, p.latency.max_us
                );
                Some(p)
            }
            Err(e) => {
                eprintln!("warning: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let fs = filesystem_of(parent);
    if warn_tmpfs && (fs.starts_with("tmpfs") || fs.starts_with("ramfs")) {
        eprintln!(
            "warning: {} is on {fs}: fdatasync is free there, fsync figures mean nothing (set TMPDIR)",
            parent.display()
        );
    }
    Ok(probe)
}

/// Runs every case, prints the table on stdout, writes the JSON report to `json` (or stdout
/// after the table when None). Errors when a case failed or lost messages.
pub fn run(spec: &DurableSpec, json: Option<&PathBuf>) -> anyhow::Result<()> {
    spec.validate()?;
    let started = Instant::now();
    let parent = std::env::temp_dir();
    let probe = disk_preflight(&parent, spec.probe_syncs, spec.keep_logs.as_deref(), true)?;
    let schedule = spec.schedule();
    let mut cases = Vec::with_capacity(schedule.len());
    for (k, &(round, n, mode)) in schedule.iter().enumerate() {
        eprintln!(
            "== case {}/{}: round {round}, {n} publishers, durability {}",
            k + 1,
            schedule.len(),
            mode.name()
        );
        let c = run_case(spec, k, round, n, mode);
        match (&c.result, &c.error) {
            (Some(r), _) => eprintln!(
                "  {:.0} acked/s, PUBACK p50 {:.0} p99 {:.0} max {:.0} µs; delivered {}/{} (lost {}, dup {}), stopped by {}",
                r.acked_per_sec,
                r.ack_latency.p50_us,
                r.ack_latency.p99_us,
                r.ack_latency.max_us,
                r.delivered,
                r.expected_deliveries,
                r.lost,
                r.dup_or_reorder,
                r.stopped_by
            ),
            (None, Some(e)) => eprintln!("  failed: {e}"),
            (None, None) => {}
        }
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
    let summary = summarize(&spec.publisher_counts, &cases);
    let table = render_table(&summary);
    println!("{table}");
    let ok = cases.iter().all(case_ok);
    let bin = spec.paths.binary(crate::brokers::BrokerKind::Fluxd);
    let report = Report {
        date_utc: utc_now(),
        machine: machine(),
        command_line: &spec.command_line,
        fluxd_bin: bin.display().to_string(),
        fluxd_version: fluxd_version(&bin),
        data_dir_parent: parent.display().to_string(),
        data_dir_filesystem: filesystem_of(&parent),
        sync_probe: probe,
        rounds: spec.rounds,
        publisher_counts: &spec.publisher_counts,
        subscribers: spec.subscribers,
        inflight: spec.inflight,
        window: spec.window,
        payload_bytes: spec.payload_bytes,
        mqtt_v5: spec.mqtt_v5,
        placement: spec.placement,
        duration_secs: spec.duration.as_secs_f64(),
        warmup_secs: spec.warmup.as_secs_f64(),
        messages_per_case: spec.messages,
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
        "durable: {} cases in {:.0} s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    if !ok {
        let bad: Vec<String> = cases
            .iter()
            .filter(|c| !case_ok(c))
            .map(|c| {
                format!(
                    "{} publishers {} round {}: {}",
                    c.publishers,
                    c.durability.name(),
                    c.round,
                    c.error.clone().unwrap_or_else(|| c.result.as_ref().map_or(
                        "no result".into(),
                        |r| format!(
                            "lost {} of {}, {} measured acks",
                            r.lost, r.expected_deliveries, r.measured_acks
                        )
                    ))
                )
            })
            .collect();
        bail!(
            "{} case(s) failed or lost messages:\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DurableSpec {
        DurableSpec {
            publisher_counts: vec![1, 16, 64],
            modes: vec![Durability::Fsync, Durability::Interval],
            rounds: 2,
            subscribers: 1,
            inflight: 16,
            window: 256,
            payload_bytes: 64,
            mqtt_v5: false,
            placement: Placement::Spread,
            duration: Duration::from_secs(3),
            messages: 1000,
            warmup: Duration::from_millis(500),
            drain: Duration::from_secs(3),
            flush_interval_ms: None,
            segment_size_bytes: None,
            probe_syncs: 0,
            paths: BrokerPaths {
                fluxd_bin: "fluxd".into(),
                mosquitto_bin: "m".into(),
                rumqttd_bin: "r".into(),
            },
            settings: BrokerSettings {
                shards: 2,
                broker_inflight: 100,
                broker_queued: 1000,
                broker_max_connections: 100,
            },
            progress: false,
            keep_logs: None,
            command_line: String::new(),
        }
    }

    #[test]
    fn broker_warnings_skip_the_memlock_note_and_keep_the_first_ten() {
        let mut log = String::from(
            "2026-12-01T20:09:21Z  WARN flux_shard::executor: RLIMIT_MEMLOCK cannot cover it\n\
             2026-12-01T20:09:21Z  INFO fluxd: effective config\n",
        );
        for i in 0..12 {
            log.push_str(&format!(
                "2026-12-01T20:09:28Z  WARN flux_shard::broker: refused {i}\n"
            ));
        }
        log.push_str("2026-12-01T20:09:29Z ERROR flux_shard::durable: WAL append refused\n");
        let (first, count) = broker_warnings(&log);
        assert_eq!(count, 13);
        assert_eq!(first.len(), 10);
        assert!(first[0].ends_with("refused 0"));
        assert_eq!(broker_warnings("INFO only\n"), (vec![], 0));
    }

    #[test]
    fn schedule_interleaves_modes_and_alternates_the_first() {
        let s = spec();
        let sched = s.schedule();
        assert_eq!(sched.len(), 12);
        // Each (round, count) runs both modes back to back.
        for pair in sched.chunks(2) {
            assert_eq!(pair[0].0, pair[1].0);
            assert_eq!(pair[0].1, pair[1].1);
            assert_ne!(pair[0].2, pair[1].2);
        }
        // The first mode alternates between consecutive counts and between rounds.
        assert_eq!(sched[0].2, Durability::Fsync);
        assert_eq!(sched[2].2, Durability::Interval);
        assert_eq!(sched[6].2, Durability::Interval);
        let fsync_first = sched
            .chunks(2)
            .filter(|p| p[0].2 == Durability::Fsync)
            .count();
        assert_eq!(fsync_first, 3);
    }

    #[test]
    fn validation_bounds_the_run() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.publisher_counts = vec![];
        assert!(s.validate().is_err());
        let mut s = spec();
        s.warmup = s.duration;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.duration = Duration::from_secs(301);
        assert!(s.validate().is_err());
        assert_eq!(spec().queue_room(64), 64 * (256 + 16) + 1000);
        let mut s = spec();
        s.subscribers = 4;
        assert_eq!(s.queue_room(16), 16 * (256 * 4 + 16) + 1000);
    }

    fn result(acked_per_sec: f64, p50: f64, p99: f64, lost: u64) -> LoadResult {
        let mut r: LoadResult = serde_json::from_value(serde_json::json!({
            "label": "", "scenario": "fanin", "mode": "max", "qos": 1, "payload_bytes": 64,
            "publishers": 1, "subscribers": 1, "offered_rate_per_sec": null, "window": 256,
            "stopped_by": "time", "sent": 10, "expected_deliveries": 10, "delivered": 10 - lost,
            "lost": lost, "dup_or_reorder": 0, "measured_deliveries": 10, "measured_secs": 1.0,
            "delivered_per_sec": 10.0, "latency": serde_json::to_value(Percentiles::default()).unwrap(),
            "send_lag": serde_json::to_value(Percentiles::default()).unwrap(), "broker_cpu_us": null,
            "broker_cpu_us_per_msg": null, "broker_rss_bytes": null, "publisher_shards": [0],
            "subscriber_shards": [1]
        }))
        .unwrap();
        r.acked_per_sec = acked_per_sec;
        r.measured_acks = 10;
        r.ack_latency.p50_us = p50;
        r.ack_latency.p99_us = p99;
        r
    }

    #[test]
    fn summary_takes_medians_and_fsync_over_interval_ratios() {
        let case = |round, mode, r: LoadResult| CaseResult {
            round,
            publishers: 16,
            durability: mode,
            result: Some(r),
            broker_died: false,
            error: None,
            broker_inflight: 1000,
            broker_queued: 1000,
            broker_warnings: Vec::new(),
            broker_warning_count: 0,
        };
        let cases = vec![
            case(1, Durability::Fsync, result(1000.0, 2000.0, 5000.0, 0)),
            case(2, Durability::Fsync, result(3000.0, 1000.0, 3000.0, 2)),
            case(1, Durability::Interval, result(8000.0, 100.0, 400.0, 0)),
            case(2, Durability::Interval, result(8000.0, 100.0, 600.0, 0)),
        ];
        let rows = summarize(&[16], &cases);
        let f = rows[0].fsync.as_ref().unwrap();
        assert_eq!(f.acked_per_sec, 2000.0);
        assert_eq!(f.acked_per_sec_range, (1000.0, 3000.0));
        assert_eq!(f.lost, 2);
        assert_eq!(f.rounds_ok, 1);
        assert_eq!(rows[0].throughput_ratio, 0.25);
        assert_eq!(rows[0].p50_ratio, 15.0);
        assert_eq!(rows[0].p99_ratio, 8.0);
        let t = render_table(&rows);
        assert!(
            t.contains("| 16 | fsync / interval | 0.25x | 15.00x |"),
            "{t}"
        );
    }
}
