//! flux-stress: load generator and side-by-side comparison of MQTT brokers.
//!
//! - `run`: one bounded load (fixed rate or max rate) against a broker, JSON out.
//! - `idle`: many idle connections, broker RSS per connection.
//! - `compare`: the same scenario against fluxd, Mosquitto and rumqttd, interleaved rounds, a table,
//!   JSON and an SVG plot.
//! - `durable`: durable QoS 1 throughput and PUBACK latency, fluxd `--durability fsync` vs
//!   `interval`, at several publisher counts (see `durable.rs`).
//! - `crash`: load, kill -9, restart, verify that every acknowledged message and the retained
//!   message survived (see `crash.rs`).
//! - `queue`: fluxd durable queue throughput, confirm and end-to-end latency at several consumer
//!   counts, every acknowledged message accounted for; `--backlog N` for memory per queued
//!   message and the drain rate (see `queue.rs`).

mod brokers;
mod client;
mod compare;
mod crash;
mod durable;
mod idle;
mod ledger;
mod load;
mod plot;
mod queue;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use flux_core::mqtt::QoS;

use crate::brokers::{BrokerKind, BrokerPaths, BrokerSettings, Durability, RunningBroker};
use crate::load::{LoadSpec, Mode, Placement, Scenario, Target};

#[derive(Parser)]
#[command(
    name = "flux-stress",
    version,
    about = "Load and comparison tool for MQTT brokers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One bounded load run (fixed rate, or max rate with --max).
    Run(RunArgs),
    /// Hold many idle connections and report broker RSS per connection.
    Idle(IdleArgs),
    /// Same scenario against several brokers, interleaved rounds; table, JSON and SVG.
    Compare(CompareArgs),
    /// Durable QoS 1 publish throughput and PUBACK latency: fluxd fsync vs interval durability.
    Durable(DurableArgs),
    /// Load, kill -9 fluxd at random moments, restart, verify no acknowledged message was lost.
    Crash(CrashArgs),
    /// fluxd durable queue: publishers -> one queue -> competing consumers; throughput, confirm
    /// and end-to-end latency, losses (`--backlog N`: fill first, then drain).
    Queue(QueueArgs),
}

#[derive(Args)]
struct QueueArgs {
    /// QoS 1 publishers, all on topics bound to the queue.
    #[arg(long, default_value_t = 16)]
    publishers: usize,
    /// Consumer counts, one case (per round) each; the consumers compete on `$queue/<name>`.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    consumers: Vec<usize>,
    /// Rounds (each runs every consumer count; the first count rotates).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Unacknowledged publishes per publisher.
    #[arg(long, default_value_t = 16)]
    inflight: u16,
    /// Undelivered messages per publisher (closed loop, counted at the consumers).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    #[arg(long)]
    mqtt_v5: bool,
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    placement: Placement,
    /// Send phase per case, seconds.
    #[arg(long, default_value_t = 6.0)]
    duration_secs: f64,
    /// Start of each case not measured, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Wait for unacknowledged and undelivered messages after each case, seconds (bound).
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// Message bound per case (all publishers).
    #[arg(long, default_value_t = 5_000_000)]
    messages: u64,
    /// Instead of live cases: publish this many messages with no consumer attached (fluxd RSS
    /// before and after), then attach the consumers and time the drain.
    #[arg(long)]
    backlog: Option<u64>,
    /// Backlog: bound on the fill, and on the drain, seconds (at most 300).
    #[arg(long, default_value_t = 60.0)]
    backlog_secs: f64,
    /// fluxd durability mode (fluxd's default: fsync).
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    #[arg(long)]
    flush_interval_ms: Option<u32>,
    #[arg(long)]
    segment_size_bytes: Option<u64>,
    /// Queue name (declared in the generated fluxd.toml, bound to `bench/#`).
    #[arg(long, default_value = "bench")]
    queue_name: String,
    /// `[[queue]] prefetch`: unacknowledged deliveries per consumer (fluxd caps it by
    /// --broker-inflight, its max_inflight_messages).
    #[arg(long, default_value_t = 256)]
    prefetch: u16,
    /// `[[queue]] max_messages`.
    #[arg(long, default_value_t = 10_000_000)]
    queue_max_messages: u64,
    /// `[[queue]] max_bytes`.
    #[arg(long, default_value_t = 4 << 30)]
    queue_max_bytes: u64,
    /// write+fdatasync rounds of the disk probe before the cases (0 skips it).
    #[arg(long, default_value_t = 200)]
    probe_syncs: usize,
    #[command(flatten)]
    paths: BrokerPaths,
    /// fluxd shards.
    #[arg(long, default_value_t = 2)]
    shards: u16,
    /// fluxd max_inflight_messages (also the cap on each consumer's prefetch).
    #[arg(long, default_value_t = 256)]
    broker_inflight: u16,
    /// Write the JSON report here (default: stdout, after the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep each case's fluxd log in this directory.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct DurableArgs {
    /// Publisher counts, one case (per mode, per round) each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    publishers: Vec<usize>,
    /// fluxd durability modes compared.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fsync,interval"
    )]
    modes: Vec<Durability>,
    /// Rounds (each runs every case; the first mode alternates).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Persistent subscribers (each receives every publish).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Unacknowledged QoS 1 publishes per publisher.
    #[arg(long, default_value_t = 16)]
    inflight: u16,
    /// Undelivered publishes per publisher and subscriber (closed-loop bound on the subscribers'
    /// queues; large enough not to bind while the subscribers keep up).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    #[arg(long)]
    mqtt_v5: bool,
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    placement: Placement,
    /// Send phase per case, seconds.
    #[arg(long, default_value_t = 3.0)]
    duration_secs: f64,
    /// Start of each case not measured, seconds.
    #[arg(long, default_value_t = 0.5)]
    warmup_secs: f64,
    /// Wait for undelivered messages after each case, seconds (bound).
    #[arg(long, default_value_t = 5.0)]
    drain_secs: f64,
    /// Message bound per case (all publishers).
    #[arg(long, default_value_t = 5_000_000)]
    messages: u64,
    /// fluxd `[durability] flush_interval_ms` (interval mode; fluxd's default 10 when absent).
    #[arg(long)]
    flush_interval_ms: Option<u32>,
    /// fluxd `[durability] segment_size_bytes` (fluxd's default 64 MiB when absent).
    #[arg(long)]
    segment_size_bytes: Option<u64>,
    /// write+fdatasync rounds of the disk probe before the cases (0 skips it).
    #[arg(long, default_value_t = 200)]
    probe_syncs: usize,
    #[command(flatten)]
    paths: BrokerPaths,
    /// fluxd shards.
    #[arg(long, default_value_t = 2)]
    shards: u16,
    /// fluxd max_inflight_messages: also the window of unacknowledged deliveries to each
    /// subscriber. At 100 (the `run`/`compare` default) one subscriber caps the run at about
    /// 100 messages per delivery round trip, so the consumer, not the publish path, is measured.
    #[arg(long, default_value_t = 1000)]
    broker_inflight: u16,
    /// fluxd max_queued_messages (raised to what the window can leave queued, if lower).
    #[arg(long, default_value_t = 100_000)]
    broker_queued: usize,
    /// Write the JSON report here (default: stdout, after the table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep each case's fluxd log in this directory (case-<k>-<mode>-<n>p-r<round>.log).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct CrashArgs {
    /// kill -9s (each followed by a restart on the same data directory).
    #[arg(long, default_value_t = 5)]
    cycles: usize,
    /// Bound on the load-and-kill loop, seconds (fewer cycles run if it is reached).
    #[arg(long, default_value_t = 60.0)]
    duration_secs: f64,
    /// QoS 1 publishers (plus one retained publisher).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Persistent subscribers, each subscribed to every publisher, connected throughout.
    #[arg(long, default_value_t = 2)]
    subscribers: usize,
    /// Persistent subscribers that subscribe, disconnect, and return only at the end: their
    /// queues must carry every acknowledged message through every kill.
    #[arg(long, default_value_t = 1)]
    offline_subscribers: usize,
    /// Unacknowledged publishes per publisher.
    #[arg(long, default_value_t = 32)]
    inflight: u16,
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    #[arg(long)]
    mqtt_v5: bool,
    /// Load time before each kill: uniform in [min, max] milliseconds.
    #[arg(long, default_value_t = 100)]
    min_run_ms: u64,
    #[arg(long, default_value_t = 1500)]
    max_run_ms: u64,
    /// After the last cycle, wait at most this long for every acknowledged message, seconds.
    #[arg(long, default_value_t = 15.0)]
    drain_secs: f64,
    /// fluxd durability mode (interval is expected to lose acknowledged messages: a control).
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    #[arg(long)]
    flush_interval_ms: Option<u32>,
    /// fluxd `[durability] segment_size_bytes` (small values force segment rollovers and
    /// checkpoints into the kill window).
    #[arg(long)]
    segment_size_bytes: Option<u64>,
    /// Seed for the kill moments (default: from the clock; printed in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Data directory fluxd runs on across restarts (default: a new one under $TMPDIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the data directory and fluxd logs even when the run passes (always kept on failure).
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    paths: BrokerPaths,
    #[command(flatten)]
    settings: BrokerSettings,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct ScenarioArgs {
    #[arg(long, value_enum, default_value_t = Scenario::P2p)]
    scenario: Scenario,
    /// Publishers (default: 1, or 50 for fanin).
    #[arg(long)]
    publishers: Option<usize>,
    /// Subscribers (default: 1, 50 for fanout, 4 for shared).
    #[arg(long)]
    subscribers: Option<usize>,
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload bytes (at least 20: the stamp).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Speak MQTT 5 instead of 3.1.1.
    #[arg(long)]
    mqtt_v5: bool,
    /// Subscribers hold persistent sessions (clean_session=0 / Session Expiry Interval): in
    /// fluxd every QoS 1/2 message is then logged to the WAL before its PUBACK.
    #[arg(long)]
    persistent_subscribers: bool,
    /// Unacknowledged QoS 1/2 publishes per publisher.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Closed-loop window: undelivered messages per publisher (max mode).
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Which fluxd shard each client id homes on (FNV-1a of the id).
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    placement: Placement,
    /// Seconds at the start whose messages are not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Seconds to wait for in-flight messages after the send phase.
    #[arg(long, default_value_t = 3.0)]
    drain_secs: f64,
    /// Load generator threads under SCHED_FIFO priority 1 (needs root): keeps the generator's own
    /// scheduling delays out of the latency figures on a shared machine.
    #[arg(long)]
    client_rt: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// Broker address (host:port). Without it, --spawn starts one.
    #[arg(long, conflicts_with = "spawn")]
    addr: Option<SocketAddr>,
    /// Pid of the broker at --addr, for CPU and RSS figures.
    #[arg(long, requires = "addr")]
    broker_pid: Option<u32>,
    /// Start this broker for the run (on a free loopback port) and stop it after.
    #[arg(long, value_enum)]
    spawn: Option<BrokerKind>,
    #[command(flatten)]
    paths: BrokerPaths,
    #[command(flatten)]
    settings: BrokerSettings,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    #[command(flatten)]
    target: TargetArgs,
    /// Offered rate, messages/s across all publishers (fixed mode).
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Closed-loop max-throughput mode instead of fixed rate.
    #[arg(long)]
    max: bool,
    /// Bound on messages sent (all publishers). Default: rate x duration, or 10 million with --max.
    #[arg(long)]
    messages: Option<u64>,
    /// Bound on the send phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Write the JSON result here (default: stdout).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Exit with an error if any expected delivery is missing (for smoke tests at QoS 1/2).
    #[arg(long)]
    fail_on_loss: bool,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long)]
    mqtt_v5: bool,
    /// Seconds to keep the connections open after measuring.
    #[arg(long, default_value_t = 0.0)]
    hold_secs: f64,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    scenario: ScenarioArgs,
    /// Brokers, in first-round order (later rounds rotate it).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fluxd,mosquitto,rumqttd"
    )]
    brokers: Vec<BrokerKind>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Offered rate of the fixed phase, messages/s.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    /// Fixed phase send duration, seconds (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    fixed_secs: f64,
    /// Max phase send duration, seconds (0 skips it).
    #[arg(long, default_value_t = 5.0)]
    max_secs: f64,
    /// Max phase message bound.
    #[arg(long, default_value_t = 5_000_000)]
    max_messages: u64,
    /// Idle connections (0 skips the phase).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Output directory (default stress-out/compare-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    paths: BrokerPaths,
    #[command(flatten)]
    settings: BrokerSettings,
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !(0.0..=3600.0).contains(&v) {
        bail!("{what} must be between 0 and 3600 seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

fn load_spec(a: &ScenarioArgs, shards: u16) -> anyhow::Result<LoadSpec> {
    let (dp, ds) = a.scenario.default_counts();
    let qos = QoS::from_u8(a.qos).context("qos")?;
    let tag = std::process::id();
    Ok(LoadSpec {
        scenario: a.scenario,
        publishers: a.publishers.unwrap_or(dp),
        subscribers: a.subscribers.unwrap_or(ds),
        qos,
        payload_bytes: a.payload_bytes,
        mqtt_v5: a.mqtt_v5,
        mode: Mode::Max { window: a.window },
        messages: 1,
        duration: Duration::from_secs(1),
        warmup: secs(a.warmup_secs, "--warmup-secs")?,
        drain: secs(a.drain_secs, "--drain-secs")?,
        inflight: a.inflight,
        placement: a.placement,
        flux_shards: shards,
        topic_base: format!("stress/{tag}"),
        client_prefix: format!("st{tag}"),
        client_rt: a.client_rt,
        persistent_subscribers: a.persistent_subscribers,
        // Scenario queue: a queue named after the run, bound by its consumers' subscriptions.
        queue_filter: format!("$queue/st{tag}/stress/{tag}/queue/+"),
        backlog: false,
        progress: !a.quiet,
        label: String::new(),
    })
}

/// The broker to load: an address given, or one started now (kept alive by the returned guard).
fn resolve_target(
    t: &TargetArgs,
    mqtt_v5: bool,
) -> anyhow::Result<(Target, Option<RunningBroker>, String)> {
    match (t.addr, t.spawn) {
        (Some(addr), _) => Ok((
            Target {
                addr,
                pid: t.broker_pid,
            },
            None,
            addr.to_string(),
        )),
        (None, Some(kind)) => {
            let b = RunningBroker::start(kind, &t.paths, &t.settings, mqtt_v5)?;
            eprintln!("started {} pid {} on {}", kind.name(), b.pid(), b.addr);
            Ok((
                Target {
                    addr: b.addr,
                    pid: Some(b.pid()),
                },
                Some(b),
                kind.name().to_string(),
            ))
        }
        (None, None) => bail!("give --addr HOST:PORT or --spawn fluxd|mosquitto|rumqttd"),
    }
}

pub(crate) fn write_json(
    path: Option<&PathBuf>,
    value: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    match path {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
            eprintln!("wrote {}", p.display());
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    idle::raise_nofile_limit();
    match cli.command {
        Command::Run(a) => {
            let mut spec = load_spec(&a.scenario, a.target.settings.shards)?;
            spec.duration = secs(a.duration_secs, "--duration-secs")?;
            if a.max {
                spec.mode = Mode::Max {
                    window: a.scenario.window,
                };
                spec.messages = a.messages.unwrap_or(10_000_000);
            } else {
                spec.mode = Mode::Fixed {
                    rate_per_sec: a.rate,
                };
                spec.messages = a
                    .messages
                    .unwrap_or((a.rate * a.duration_secs).ceil() as u64);
            }
            let (target, mut broker, name) = resolve_target(&a.target, spec.mqtt_v5)?;
            spec.label = name;
            let result = load::run(&spec, target);
            if let Some(b) = broker.as_mut() {
                if !b.alive() {
                    eprintln!("broker exited during the run:\n{}", b.log_tail());
                }
                b.stop();
            }
            let result = result?;
            eprintln!("{}", compare::one_line(&result));
            write_json(a.json.as_ref(), &result)?;
            if result.delivered == 0 {
                bail!("nothing was delivered");
            }
            if result.measured_deliveries == 0 {
                eprintln!("warning: no delivery fell in the measured window (the run ended within --warmup-secs)");
            }
            if a.fail_on_loss && result.lost > 0 {
                bail!(
                    "{} of {} expected deliveries missing",
                    result.lost,
                    result.expected_deliveries
                );
            }
            // Scenario queue: the per-message verdict (acknowledged, never consumed).
            if let Some(v) = result.ledger.as_ref().filter(|v| v.lost > 0) {
                bail!(
                    "{} acknowledged messages never consumed, e.g. (publisher, seq) {:?}",
                    v.lost,
                    v.lost_examples
                );
            }
        }
        Command::Idle(a) => {
            let (target, mut broker, name) = resolve_target(&a.target, a.mqtt_v5)?;
            let spec = idle::IdleSpec {
                connections: a.connections,
                mqtt_v5: a.mqtt_v5,
                client_prefix: format!("st{}", std::process::id()),
                threads: 4,
                timeout: Duration::from_secs(120),
                settle: Duration::from_millis(1000),
                hold: secs(a.hold_secs, "--hold-secs")?,
                progress: !a.quiet,
                label: name,
            };
            let result = idle::run(&spec, target.addr, target.pid);
            if let Some(b) = broker.as_mut() {
                b.stop();
            }
            let result = result?;
            eprintln!(
                "idle: {} connected ({} failed) in {:.1}s; {} B/connection",
                result.connected,
                result.failed,
                result.connect_secs,
                result
                    .bytes_per_connection
                    .map_or("?".into(), |b| format!("{b:.0}"))
            );
            write_json(a.json.as_ref(), &result)?;
            if result.failed > 0 {
                bail!(
                    "{} connections failed: {}",
                    result.failed,
                    result.first_error.unwrap_or_default()
                );
            }
        }
        Command::Compare(a) => {
            if a.rounds == 0 || a.rounds > 20 {
                bail!("--rounds must be 1..=20");
            }
            let load = load_spec(&a.scenario, a.settings.shards)?;
            let spec = compare::CompareSpec {
                brokers: a.brokers.clone(),
                rounds: a.rounds,
                load,
                rate_per_sec: a.rate,
                fixed_duration: secs(a.fixed_secs, "--fixed-secs")?,
                max_duration: secs(a.max_secs, "--max-secs")?,
                max_messages: a.max_messages,
                window: a.scenario.window,
                idle_connections: a.idle_connections,
                out_dir: a.out.clone().unwrap_or_else(compare::default_out_dir),
                paths: a.paths.clone(),
                settings: a.settings.clone(),
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
            };
            compare::run(&spec)?;
        }
        Command::Durable(a) => {
            let spec = durable::DurableSpec {
                publisher_counts: a.publishers.clone(),
                modes: a.modes.clone(),
                rounds: a.rounds,
                subscribers: a.subscribers,
                inflight: a.inflight,
                window: a.window,
                payload_bytes: a.payload_bytes,
                mqtt_v5: a.mqtt_v5,
                placement: a.placement,
                duration: secs(a.duration_secs, "--duration-secs")?,
                messages: a.messages,
                warmup: secs(a.warmup_secs, "--warmup-secs")?,
                drain: secs(a.drain_secs, "--drain-secs")?,
                flush_interval_ms: a.flush_interval_ms,
                segment_size_bytes: a.segment_size_bytes,
                probe_syncs: a.probe_syncs,
                paths: a.paths.clone(),
                settings: BrokerSettings {
                    shards: a.shards,
                    broker_inflight: a.broker_inflight,
                    broker_queued: a.broker_queued,
                    broker_max_connections: 25_000,
                },
                progress: !a.quiet,
                keep_logs: a.keep_logs.clone(),
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
            };
            durable::run(&spec, a.json.as_ref())?;
        }
        Command::Queue(a) => {
            let spec = queue::QueueSpec {
                publishers: a.publishers,
                consumer_counts: a.consumers.clone(),
                rounds: a.rounds,
                inflight: a.inflight,
                window: a.window,
                payload_bytes: a.payload_bytes,
                mqtt_v5: a.mqtt_v5,
                placement: a.placement,
                duration: secs(a.duration_secs, "--duration-secs")?,
                warmup: secs(a.warmup_secs, "--warmup-secs")?,
                drain: secs(a.drain_secs, "--drain-secs")?,
                messages: a.messages,
                backlog: a.backlog,
                backlog_bound: secs(a.backlog_secs, "--backlog-secs")?,
                durability: a.durability,
                flush_interval_ms: a.flush_interval_ms,
                segment_size_bytes: a.segment_size_bytes,
                queue_name: a.queue_name.clone(),
                prefetch: a.prefetch,
                max_messages: a.queue_max_messages,
                max_bytes: a.queue_max_bytes,
                probe_syncs: a.probe_syncs,
                paths: a.paths.clone(),
                settings: BrokerSettings {
                    shards: a.shards,
                    broker_inflight: a.broker_inflight,
                    broker_queued: 1000,
                    broker_max_connections: 25_000,
                },
                progress: !a.quiet,
                keep_logs: a.keep_logs.clone(),
                command_line: std::env::args().collect::<Vec<_>>().join(" "),
            };
            queue::run(&spec, a.json.as_ref())?;
        }
        Command::Crash(a) => {
            let spec = crash::CrashSpec {
                cycles: a.cycles,
                duration: secs(a.duration_secs, "--duration-secs")?,
                publishers: a.publishers,
                subscribers: a.subscribers,
                offline_subscribers: a.offline_subscribers,
                inflight: a.inflight,
                payload_bytes: a.payload_bytes,
                mqtt_v5: a.mqtt_v5,
                min_run: Duration::from_millis(a.min_run_ms),
                max_run: Duration::from_millis(a.max_run_ms),
                drain: secs(a.drain_secs, "--drain-secs")?,
                durability: a.durability,
                flush_interval_ms: a.flush_interval_ms,
                segment_size_bytes: a.segment_size_bytes,
                seed: a.seed,
                data_dir: a.data_dir.clone(),
                keep: a.keep,
                paths: a.paths.clone(),
                settings: a.settings.clone(),
                progress: !a.quiet,
            };
            let report = crash::run(&spec)?;
            eprintln!(
                "crash: {} kills, sent {} acked {}, lost {}, duplicates {}, unacked received {}, sessions lost {}, retained failures {}/{} checks: {}",
                report.kills,
                report.sent,
                report.acked,
                report.lost,
                report.duplicates,
                report.unacked_received,
                report.sessions_lost,
                report.retained_failures,
                report.retained_checks,
                if report.ok { "OK" } else { "FAILED" }
            );
            write_json(a.json.as_ref(), &report)?;
            if !report.ok {
                if report.kept_files {
                    eprintln!("data directory and fluxd logs kept: {}", report.data_dir);
                }
                bail!("crash check failed:\n{}", report.failures.join("\n"));
            }
        }
    }
    Ok(())
}
