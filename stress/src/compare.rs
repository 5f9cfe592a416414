//! `compare`: the same scenario against fluxd, Mosquitto and rumqttd, one broker after another,
//! repeated and interleaved (the starting broker rotates each round, so slow drifts of the shared
//! machine spread over all brokers). Each broker is started fresh for each round and runs three
//! phases:
//!
//! 1. **fixed**: open loop at the offered rate: delivered msg/s, latency percentiles, and broker CPU
//!    per delivered message (the stable figure on a shared 2-core machine);
//! 2. **max**: closed loop with a bounded window: the most it delivers, and CPU per message there;
//! 3. **idle**: K idle connections: RSS growth per connection.
//!
//! Summary figures are medians over rounds (per percentile for latency). Ratios are
//! broker / fluxd: above 1 means the peer is higher (slower, hungrier) than fluxd.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use crate::brokers::{BrokerKind, BrokerPaths, BrokerSettings, RunningBroker};
use crate::idle::{self, IdleResult, IdleSpec};
use crate::load::{self, LoadResult, LoadSpec, Mode, Target};
use crate::stats::median;

#[derive(Clone, Debug)]
pub struct CompareSpec {
    pub brokers: Vec<BrokerKind>,
    pub rounds: usize,
    /// Scenario, QoS, sizes; mode/messages/duration are set per phase from the fields below.
    pub load: LoadSpec,
    pub rate_per_sec: f64,
    pub fixed_duration: Duration,
    pub max_duration: Duration,
    pub max_messages: u64,
    pub window: usize,
    pub idle_connections: usize,
    pub out_dir: PathBuf,
    pub paths: BrokerPaths,
    pub settings: BrokerSettings,
    pub command_line: String,
}

#[derive(Debug, Serialize)]
pub struct RoundResult {
    pub round: usize,
    pub broker: BrokerKind,
    pub fixed: Option<LoadResult>,
    pub max: Option<LoadResult>,
    pub idle: Option<IdleResult>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub broker: String,
    pub rounds_ok: usize,
    pub fixed_delivered_per_sec: f64,
    pub fixed_lost: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub cpu_us_per_msg_fixed: f64,
    /// Smallest and largest round value, to show the spread.
    pub cpu_us_per_msg_fixed_range: (f64, f64),
    pub max_delivered_per_sec: f64,
    pub max_delivered_per_sec_range: (f64, f64),
    pub cpu_us_per_msg_max: f64,
    pub idle_bytes_per_connection: f64,
    pub idle_bytes_per_connection_range: (f64, f64),
    /// Median machine steal time during the fixed-rate phases, %.
    pub steal_percent_fixed: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    date_utc: String,
    machine: Machine,
    command_line: &'a str,
    brokers: Vec<String>,
    rounds: usize,
    scenario: &'a LoadSpec,
    rate_per_sec: f64,
    fixed_duration_secs: f64,
    max_duration_secs: f64,
    max_messages: u64,
    window: usize,
    idle_connections: usize,
    settings: &'a BrokerSettings,
    versions: Vec<(String, String)>,
    runs: &'a [RoundResult],
    summary: &'a [Summary],
    table: &'a str,
}

#[derive(Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub mem_total_kb: u64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or_else(String::new, |s| s.trim().to_string());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        mem_total_kb,
    }
}

/// `YYYY-MM-DD HH:MM:SS` UTC, without a date crate.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn version_of(kind: BrokerKind, paths: &BrokerPaths) -> String {
    let bin = paths.binary(kind);
    let arg = if kind == BrokerKind::Mosquitto {
        "-h"
    } else {
        "--version"
    };
    match std::process::Command::new(&bin).arg(arg).output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .to_string();
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unknown ({e})"),
    }
}

pub fn run(spec: &CompareSpec) -> anyhow::Result<()> {
    std::fs::create_dir_all(&spec.out_dir)
        .with_context(|| format!("creating {}", spec.out_dir.display()))?;
    let idle_cap = idle::max_connections();
    if spec.idle_connections > idle_cap {
        anyhow::bail!(
            "--idle-connections {} exceeds what this process can open ({idle_cap})",
            spec.idle_connections
        );
    }
    let mut runs: Vec<RoundResult> = Vec::new();
    let n = spec.brokers.len();
    for round in 1..=spec.rounds {
        for k in 0..n {
            let broker = spec.brokers[(k + round - 1) % n];
            eprintln!("== round {round}/{}: {}", spec.rounds, broker.name());
            runs.push(run_one(spec, broker, round));
        }
    }
    let summary: Vec<Summary> = spec.brokers.iter().map(|b| summarize(*b, &runs)).collect();
    let table = render_table(&summary);
    println!("{table}");

    let versions = spec
        .brokers
        .iter()
        .map(|b| (b.name().to_string(), version_of(*b, &spec.paths)))
        .collect();
    let report = Report {
        date_utc: utc_now(),
        machine: machine(),
        command_line: &spec.command_line,
        brokers: spec.brokers.iter().map(|b| b.name().to_string()).collect(),
        rounds: spec.rounds,
        scenario: &spec.load,
        rate_per_sec: spec.rate_per_sec,
        fixed_duration_secs: spec.fixed_duration.as_secs_f64(),
        max_duration_secs: spec.max_duration.as_secs_f64(),
        max_messages: spec.max_messages,
        window: spec.window,
        idle_connections: spec.idle_connections,
        settings: &spec.settings,
        versions,
        runs: &runs,
        summary: &summary,
        table: &table,
    };
    let json_path = spec.out_dir.join("compare.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let svg_path = spec.out_dir.join("compare.svg");
    let title = format!(
        "{} QoS {} {} B, {} msg/s",
        spec.load.scenario.name(),
        spec.load.qos.as_u8(),
        spec.load.payload_bytes,
        spec.rate_per_sec
    );
    if let Err(e) = crate::plot::write_compare_svg(&svg_path, &title, &summary) {
        eprintln!("warning: plot not written: {e:#}");
    }
    std::fs::write(spec.out_dir.join("compare.txt"), &table)?;
    eprintln!(
        "wrote {}, {} and compare.txt",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

fn run_one(spec: &CompareSpec, kind: BrokerKind, round: usize) -> RoundResult {
    let mut out = RoundResult {
        round,
        broker: kind,
        fixed: None,
        max: None,
        idle: None,
        errors: Vec::new(),
    };
    let prefix = format!("st{}r{round}", std::process::id());
    // Each phase gets a freshly started broker: the fixed-rate figures must not depend on what
    // the max phase left behind (queues, allocator state), nor the idle RSS on either.
    let phases: [(&str, bool); 3] = [
        ("fixed", !spec.fixed_duration.is_zero()),
        ("max", !spec.max_duration.is_zero()),
        ("idle", spec.idle_connections > 0),
    ];
    for (phase, enabled) in phases {
        if !enabled {
            continue;
        }
        let mut broker =
            match RunningBroker::start(kind, &spec.paths, &spec.settings, spec.load.mqtt_v5) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("  {phase}: {e:#}");
                    out.errors.push(format!("{phase}: {e:#}"));
                    continue;
                }
            };
        let target = Target {
            addr: broker.addr,
            pid: Some(broker.pid()),
        };
        let label = format!("{} r{round} {phase}", kind.name());
        match phase {
            "fixed" | "max" => {
                let mut load = spec.load.clone();
                load.label = label;
                load.client_prefix = format!("{prefix}{phase}");
                load.topic_base = format!("stress/{prefix}{phase}");
                if phase == "fixed" {
                    load.mode = Mode::Fixed {
                        rate_per_sec: spec.rate_per_sec,
                    };
                    load.duration = spec.fixed_duration;
                    load.messages =
                        (spec.rate_per_sec * spec.fixed_duration.as_secs_f64()).ceil() as u64;
                } else {
                    load.mode = Mode::Max {
                        window: spec.window,
                    };
                    load.duration = spec.max_duration;
                    load.messages = spec.max_messages;
                }
                match load::run(&load, target) {
                    Ok(r) => {
                        eprintln!("  {}", one_line(&r));
                        if phase == "fixed" {
                            out.fixed = Some(r);
                        } else {
                            out.max = Some(r);
                        }
                    }
                    Err(e) => {
                        eprintln!("  {phase}: {e:#}");
                        out.errors.push(format!("{phase}: {e:#}"));
                    }
                }
            }
            _ => {
                let idle = IdleSpec {
                    connections: spec.idle_connections,
                    mqtt_v5: spec.load.mqtt_v5,
                    client_prefix: format!("{prefix}idle"),
                    threads: 4,
                    timeout: Duration::from_secs(120),
                    settle: Duration::from_millis(1000),
                    hold: Duration::ZERO,
                    progress: spec.load.progress,
                    label,
                };
                match idle::run(&idle, broker.addr, Some(broker.pid())) {
                    Ok(r) => {
                        eprintln!(
                            "  idle: {} connected ({} failed) in {:.1}s, {:.0} B/connection",
                            r.connected,
                            r.failed,
                            r.connect_secs,
                            r.bytes_per_connection.unwrap_or(f64::NAN)
                        );
                        if let Some(e) = &r.first_error {
                            eprintln!("  idle: first error: {e}");
                        }
                        out.idle = Some(r);
                    }
                    Err(e) => {
                        eprintln!("  idle: {e:#}");
                        out.errors.push(format!("idle: {e:#}"));
                    }
                }
            }
        }
        if !broker.alive() {
            let msg = format!(
                "{phase}: broker exited during the phase\n{}",
                broker.log_tail()
            );
            eprintln!("  {msg}");
            out.errors.push(msg);
        }
        broker.stop();
    }
    out
}

pub fn one_line(r: &LoadResult) -> String {
    format!(
        "{}: {:.0} msg/s delivered, {}/{} (lost {}), p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0} µs, CPU {} µs/msg, send lag p99 {:.0} µs, steal {}, stopped by {}",
        r.mode,
        r.delivered_per_sec,
        r.delivered,
        r.expected_deliveries,
        r.lost,
        r.latency.p50_us,
        r.latency.p99_us,
        r.latency.p999_us,
        r.latency.max_us,
        r.broker_cpu_us_per_msg.map_or("?".into(), |c| format!("{c:.2}")),
        r.send_lag.p99_us,
        r.steal_percent.map_or("?".into(), |p| format!("{p:.0}%")),
        r.stopped_by
    )
}

fn range(v: &[f64]) -> (f64, f64) {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (
        finite.iter().copied().fold(f64::INFINITY, f64::min),
        finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

pub fn summarize(kind: BrokerKind, runs: &[RoundResult]) -> Summary {
    let mine: Vec<&RoundResult> = runs.iter().filter(|r| r.broker == kind).collect();
    let fixed: Vec<&LoadResult> = mine.iter().filter_map(|r| r.fixed.as_ref()).collect();
    let max: Vec<&LoadResult> = mine.iter().filter_map(|r| r.max.as_ref()).collect();
    let idle: Vec<f64> = mine
        .iter()
        .filter_map(|r| r.idle.as_ref().and_then(|i| i.bytes_per_connection))
        .collect();
    let f = |get: &dyn Fn(&LoadResult) -> f64| fixed.iter().map(|r| get(r)).collect::<Vec<f64>>();
    let x = |get: &dyn Fn(&LoadResult) -> f64| max.iter().map(|r| get(r)).collect::<Vec<f64>>();
    let cpu_fixed = f(&|r| r.broker_cpu_us_per_msg.unwrap_or(f64::NAN));
    let max_rate = x(&|r| r.delivered_per_sec);
    Summary {
        broker: kind.name().into(),
        rounds_ok: mine.iter().filter(|r| r.errors.is_empty()).count(),
        fixed_delivered_per_sec: median(&f(&|r| r.delivered_per_sec)),
        fixed_lost: median(&f(&|r| r.lost as f64)),
        p50_us: median(&f(&|r| r.latency.p50_us)),
        p90_us: median(&f(&|r| r.latency.p90_us)),
        p99_us: median(&f(&|r| r.latency.p99_us)),
        p999_us: median(&f(&|r| r.latency.p999_us)),
        max_us: median(&f(&|r| r.latency.max_us)),
        cpu_us_per_msg_fixed: median(&cpu_fixed),
        cpu_us_per_msg_fixed_range: range(&cpu_fixed),
        max_delivered_per_sec: median(&max_rate),
        max_delivered_per_sec_range: range(&max_rate),
        cpu_us_per_msg_max: median(&x(&|r| r.broker_cpu_us_per_msg.unwrap_or(f64::NAN))),
        idle_bytes_per_connection: median(&idle),
        idle_bytes_per_connection_range: range(&idle),
        steal_percent_fixed: median(&f(&|r| r.steal_percent.unwrap_or(f64::NAN))),
    }
}

fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// (header, value, decimals)
type Column<'a> = (&'a str, &'a dyn Fn(&Summary) -> f64, usize);

/// A Markdown table: one row per broker, then one ratio row per peer (peer / fluxd).
pub fn render_table(summary: &[Summary]) -> String {
    let cols: [Column; 13] = [
        ("fixed msg/s", &|s| s.fixed_delivered_per_sec, 0),
        ("lost", &|s| s.fixed_lost, 0),
        ("p50 µs", &|s| s.p50_us, 0),
        ("p90 µs", &|s| s.p90_us, 0),
        ("p99 µs", &|s| s.p99_us, 0),
        ("p99.9 µs", &|s| s.p999_us, 0),
        ("max µs", &|s| s.max_us, 0),
        ("CPU µs/msg (fixed)", &|s| s.cpu_us_per_msg_fixed, 2),
        ("max msg/s", &|s| s.max_delivered_per_sec, 0),
        ("CPU µs/msg (max)", &|s| s.cpu_us_per_msg_max, 2),
        ("B/idle conn", &|s| s.idle_bytes_per_connection, 0),
        ("rounds ok", &|s| s.rounds_ok as f64, 0),
        ("steal % (fixed)", &|s| s.steal_percent_fixed, 0),
    ];
    let mut t = String::new();
    let _ = write!(t, "| broker |");
    for (name, _, _) in &cols {
        let _ = write!(t, " {name} |");
    }
    let _ = write!(t, "\n|---|");
    for _ in &cols {
        let _ = write!(t, "---:|");
    }
    t.push('\n');
    for s in summary {
        let _ = write!(t, "| {} |", s.broker);
        for (_, get, d) in &cols {
            let _ = write!(t, " {} |", cell(get(s), *d));
        }
        t.push('\n');
    }
    if let Some(flux) = summary.iter().find(|s| s.broker == "fluxd") {
        for s in summary.iter().filter(|s| s.broker != "fluxd") {
            let _ = write!(t, "| {} / fluxd |", s.broker);
            for (name, get, _) in &cols {
                let ratio = if *name == "rounds ok" || *name == "lost" || name.starts_with("steal") {
                    f64::NAN
                } else {
                    get(s) / get(flux)
                };
                let _ = write!(
                    t,
                    " {} |",
                    if ratio.is_finite() {
                        format!("{ratio:.2}x")
                    } else {
                        "-".into()
                    }
                );
            }
            t.push('\n');
        }
    }
    t
}

pub fn default_out_dir() -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Path::new("stress-out").join(format!("compare-{secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_has_the_expected_shape() {
        let d = utc_now();
        assert_eq!(d.len(), 19, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn table_has_a_ratio_row_per_peer() {
        let flux = Summary {
            broker: "fluxd".into(),
            cpu_us_per_msg_fixed: 2.0,
            ..Default::default()
        };
        let mosq = Summary {
            broker: "mosquitto".into(),
            cpu_us_per_msg_fixed: 5.0,
            ..Default::default()
        };
        let t = render_table(&[flux, mosq]);
        assert!(t.contains("| mosquitto / fluxd |"), "{t}");
        assert!(t.contains("2.50x"), "{t}");
    }
}
