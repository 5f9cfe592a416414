//! `fluxd` configuration: the command-line flags, the TOML file, and how they merge.
//!
//! Precedence, highest first: command-line flag, then the config file, then the built-in default.
//! The log filter additionally honours `RUST_LOG` between the flag and the file.
//! `fluxd.example.toml` at the repository root documents every key; keep it in step with this file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use flux_core::Limits;
use serde::Deserialize;

/// Default MQTT listener: loopback only, so a fresh `fluxd` is not reachable from the network.
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:1883";
/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Default io_uring registered-buffer memory per shard: 2 MiB.
pub const DEFAULT_IO_MEMORY_BYTES: usize = 2 * 1024 * 1024;
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Flux broker: MQTT 3.1.1/5.0 with durable queues, one shard per core.
#[derive(Debug, Default, Parser)]
#[command(name = "fluxd", version)]
pub struct Cli {
    /// TOML config file (see fluxd.example.toml). Flags override its values.
    #[arg(long, short = 'c', value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// MQTT listener address [default: 127.0.0.1:1883]. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<SocketAddr>,

    /// Data directory, created if missing and locked against a second fluxd [default: ./data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Number of shards (one executor pinned per CPU); 0 = one per available core [default: 0].
    #[arg(long, value_name = "N")]
    pub shards: Option<u16>,

    /// Accept clients without credentials on a non-loopback listener (loopback always allows it).
    #[arg(long)]
    pub allow_anonymous: bool,

    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives such as
    /// "info,flux_net=debug". Overrides RUST_LOG, which overrides the config file [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log output format [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// When an acknowledged message is on disk: "fsync" (before the acknowledgement) or
    /// "interval" (synced every [durability] flush_interval_ms; a crash may lose that window)
    /// [default: fsync].
    #[arg(long, value_name = "MODE")]
    pub durability: Option<DurabilityModeName>,

    /// Admin endpoint (HTTP + JSON, for `fluxd queue ...`) address, or "off"
    /// [default: 127.0.0.1:8088]. Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<String>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Default admin endpoint address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8088";

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Operate durable queues through a running fluxd's admin endpoint.
    Queue {
        /// Admin endpoint of the fluxd to talk to.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_LISTEN, global = true)]
        admin: String,
        #[command(subcommand)]
        action: QueueCommand,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum QueueCommand {
    /// Every queue with its depth, consumers and per-group lag.
    List,
    /// One queue's figures.
    Stats { name: String },
    /// Create a queue (or change its settings).
    Create {
        name: String,
        /// Topic filter to bind (repeat for several).
        #[arg(long)]
        bind: Vec<String>,
        /// Settings as JSON, with the keys of a `[[queue]]` table.
        #[arg(long, value_name = "JSON")]
        settings: Option<String>,
    },
    /// Delete a queue and its messages.
    Delete { name: String },
    /// Drop every message of a queue.
    Purge { name: String },
    /// Make a consumer group start over at an offset, or at the first message appended at or
    /// after a time (messages still kept: those some group has not finished).
    Seek {
        name: String,
        #[arg(long, default_value = "default")]
        group: String,
        #[arg(long, conflicts_with_all = ["time_ms", "since_secs"])]
        offset: Option<u64>,
        /// Milliseconds since the Unix epoch.
        #[arg(long, conflicts_with = "since_secs")]
        time_ms: Option<u64>,
        /// This many seconds ago.
        #[arg(long)]
        since_secs: Option<u64>,
    },
    /// Move messages of a (dead-letter) queue back: to `--to`, or each to the queue it was
    /// dead-lettered from. Each is stored there durably before it leaves this queue.
    Redrive {
        name: String,
        #[arg(long)]
        to: Option<String>,
        /// At most this many (default: all).
        #[arg(long)]
        max: Option<u64>,
    },
    /// Remove bindings of a queue (publishes matching them are no longer stored in it).
    Unbind {
        name: String,
        /// Topic filter to unbind (repeat for several).
        #[arg(long, required = true)]
        bind: Vec<String>,
    },
}

/// `durability` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityModeName {
    /// Acknowledged means fdatasync'd (group commit).
    #[default]
    Fsync,
    /// Acknowledgements do not wait for the disk; the log is synced every flush_interval_ms.
    Interval,
}

/// Default `[durability] flush_interval_ms`.
pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 10;
/// Default `[durability] segment_size_bytes`.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 << 20;

/// `[admin]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Address, or "off".
    pub listen: Option<String>,
}

/// `[durability]` in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurabilitySection {
    pub mode: Option<DurabilityModeName>,
    pub flush_interval_ms: Option<u64>,
    pub segment_size_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines with key=value fields.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// The config file as written. Every key is optional; unknown keys are an error.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub shards: Option<u16>,
    pub allow_anonymous: Option<bool>,
    pub io_memory_bytes: Option<usize>,
    pub transparent_huge_pages: Option<bool>,
    pub mqtt: MqttSection,
    pub log: LogSection,
    pub limits: Limits,
    pub durability: DurabilitySection,
    pub admin: AdminSection,
    #[serde(rename = "queue")]
    pub queues: Vec<flux_core::queue::QueueSettings>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    pub level: Option<String>,
    pub format: Option<LogFormat>,
}

/// The merged, validated configuration fluxd runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub mqtt_listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Resolved: never 0.
    pub shards: u16,
    /// What the operator asked for (flag or file).
    pub allow_anonymous: bool,
    pub io_memory_bytes: usize,
    /// Whether fluxd's memory may be backed by transparent huge pages (default: no, see
    /// `fluxd.example.toml`).
    pub transparent_huge_pages: bool,
    pub log_level: String,
    pub log_format: LogFormat,
    pub limits: Limits,
    pub durability: DurabilityModeName,
    pub flush_interval_ms: u64,
    pub segment_size_bytes: u64,
    pub queues: Vec<flux_shard::broker::queues::QueueSpec>,
    /// `None`: no admin endpoint.
    pub admin_listen: Option<SocketAddr>,
}

impl Config {
    /// Whether the broker accepts clients without credentials. Authentication does not exist yet,
    /// so anonymous is the only mode: always on for a loopback listener, and on elsewhere only
    /// when the operator said so (`validate` refuses to start otherwise).
    pub fn effective_allow_anonymous(&self) -> bool {
        self.allow_anonymous || self.mqtt_listen.ip().is_loopback()
    }

    /// The rules that make a configuration refuse to start.
    pub fn validate(&self) -> anyhow::Result<()> {
        let seg = self.segment_size_bytes;
        #[allow(clippy::manual_is_multiple_of)] // `is_multiple_of` is newer than rust-version 1.85
        if seg % 4096 != 0 || !(flux_wal::MIN_SEGMENT_SIZE_BYTES..=flux_wal::MAX_SEGMENT_SIZE_BYTES).contains(&seg) {
            bail!(
                "[durability] segment_size_bytes = {seg} must be a multiple of 4096 between {} and {}",
                flux_wal::MIN_SEGMENT_SIZE_BYTES,
                flux_wal::MAX_SEGMENT_SIZE_BYTES
            );
        }
        if !(1..=60_000).contains(&self.flush_interval_ms) {
            bail!("[durability] flush_interval_ms = {} must be between 1 and 60000", self.flush_interval_ms);
        }
        if !self.mqtt_listen.ip().is_loopback() && !self.allow_anonymous {
            bail!(
                "refusing to start: MQTT listener {} is not a loopback address and authentication \
                 is not configured; set allow_anonymous = true in the config file or pass \
                 --allow-anonymous to accept anonymous clients on it",
                self.mqtt_listen
            );
        }
        if self.io_memory_bytes == 0 {
            bail!("io_memory_bytes must be greater than 0");
        }
        Ok(())
    }

    /// What `flux_net::run` takes.
    pub fn broker_config(&self) -> flux_net::BrokerConfig {
        flux_net::BrokerConfig {
            mqtt_listen: self.mqtt_listen,
            shards: self.shards,
            limits: self.limits.clone(),
            allow_anonymous: self.effective_allow_anonymous(),
            data_dir: self.data_dir.clone(),
            io_memory_bytes: self.io_memory_bytes,
            durability: flux_shard::durable::DurabilityConfig {
                mode: match self.durability {
                    DurabilityModeName::Fsync => flux_shard::durable::DurabilityMode::Fsync,
                    DurabilityModeName::Interval => flux_shard::durable::DurabilityMode::Interval(
                        std::time::Duration::from_millis(self.flush_interval_ms),
                    ),
                },
                segment_size_bytes: self.segment_size_bytes,
                ..Default::default()
            },
            queues: self.queues.clone(),
            admin_listen: self.admin_listen,
        }
    }
}

/// Reads the file named by `--config` (if any) and merges it with the flags.
/// `rust_log` is the value of `RUST_LOG`, passed in so tests need not touch the environment.
pub fn load(cli: &Cli, rust_log: Option<String>, available_cores: u16) -> anyhow::Result<Config> {
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            parse_file(path, &text)?
        }
        None => FileConfig::default(),
    };
    merge(cli, file, rust_log, available_cores)
}

/// Parses config text; errors name the file, the line and column, and toml's message (which names
/// an unknown key and lists the expected ones), all on one line.
pub fn parse_file(path: &Path, text: &str) -> anyhow::Result<FileConfig> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (line, column) = line_column(text, span.start);
                anyhow::anyhow!("config file {}:{line}:{column}: {message}", path.display())
            }
            None => anyhow::anyhow!("config file {}: {message}", path.display()),
        }
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary_compat(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, index: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, index: usize) -> usize {
        let mut i = index.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Flag > file > default (and for the log filter: flag > RUST_LOG > file > default).
pub fn merge(
    cli: &Cli,
    file: FileConfig,
    rust_log: Option<String>,
    available_cores: u16,
) -> anyhow::Result<Config> {
    let mqtt_listen = match cli.mqtt_listen.or(file.mqtt.listen) {
        Some(addr) => addr,
        None => DEFAULT_MQTT_LISTEN
            .parse()
            .context("built-in default MQTT address")?,
    };
    let shards = match cli.shards.or(file.shards).unwrap_or(0) {
        0 => available_cores.max(1),
        n => n,
    };
    let rust_log = rust_log.filter(|s| !s.trim().is_empty());
    let config = Config {
        config_file: cli.config.clone(),
        mqtt_listen,
        data_dir: cli
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        shards,
        allow_anonymous: cli.allow_anonymous || file.allow_anonymous.unwrap_or(false),
        io_memory_bytes: file.io_memory_bytes.unwrap_or(DEFAULT_IO_MEMORY_BYTES),
        transparent_huge_pages: file.transparent_huge_pages.unwrap_or(false),
        log_level: cli
            .log_level
            .clone()
            .or(rust_log)
            .or(file.log.level)
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string()),
        log_format: cli.log_format.or(file.log.format).unwrap_or_default(),
        limits: file.limits,
        durability: cli.durability.or(file.durability.mode).unwrap_or_default(),
        flush_interval_ms: file.durability.flush_interval_ms.unwrap_or(DEFAULT_FLUSH_INTERVAL_MS),
        segment_size_bytes: file.durability.segment_size_bytes.unwrap_or(DEFAULT_SEGMENT_SIZE_BYTES),
        admin_listen: match cli.admin_listen.clone().or(file.admin.listen).as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN) {
            "off" | "" => None,
            addr => Some(addr.parse().with_context(|| format!("admin listen address {addr:?}"))?),
        },
        queues: file
            .queues
            .iter()
            .map(|q| {
                q.spec().map(|(name, config, filters)| flux_shard::broker::queues::QueueSpec { name, config, filters })
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| anyhow::anyhow!("[[queue]] {e}"))?,
    };
    config.validate()?;
    Ok(config)
}

/// Cores this process may run on (affinity mask and cgroup quota aware), at most u16::MAX.
pub fn available_cores() -> u16 {
    std::thread::available_parallelism()
        .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<FileConfig> {
        parse_file(Path::new("test.toml"), text)
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("fluxd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn no_file_no_flags_gives_defaults() {
        let c = merge(&cli(&[]), FileConfig::default(), None, 6).unwrap();
        assert_eq!(c.mqtt_listen, "127.0.0.1:1883".parse::<SocketAddr>().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.shards, 6, "shards 0 means one per available core");
        assert!(!c.allow_anonymous);
        assert!(
            c.effective_allow_anonymous(),
            "loopback allows anonymous by default"
        );
        assert_eq!(c.io_memory_bytes, 2 * 1024 * 1024);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file = parse(
            r#"
            data_dir = "/var/lib/flux"
            shards = 3
            io_memory_bytes = 1048576
            [mqtt]
            listen = "127.0.0.1:2883"
            [log]
            level = "debug"
            format = "json"
            [limits]
            max_inflight_messages = 7
            "#,
        )
        .unwrap();
        let c = merge(&cli(&[]), file, None, 6).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/flux"));
        assert_eq!(c.shards, 3);
        assert_eq!(c.io_memory_bytes, 1024 * 1024);
        assert_eq!(c.mqtt_listen, "127.0.0.1:2883".parse::<SocketAddr>().unwrap());
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.limits.max_inflight_messages, 7);
        assert_eq!(
            c.limits.max_packet_size_bytes,
            Limits::default().max_packet_size_bytes,
            "limits not given keep their defaults"
        );

        let file = parse("shards = 3\ndata_dir = \"/a\"\n[mqtt]\nlisten = \"127.0.0.1:2883\"\n[log]\nlevel = \"debug\"\nformat = \"json\"").unwrap();
        let flags = cli(&[
            "--shards",
            "5",
            "--data-dir",
            "/b",
            "--mqtt-listen",
            "[::1]:9000",
            "--log-level",
            "warn",
            "--log-format",
            "text",
        ]);
        let c = merge(&flags, file, Some("trace".into()), 6).unwrap();
        assert_eq!(c.shards, 5);
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.mqtt_listen, "[::1]:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(c.log_level, "warn", "the flag beats RUST_LOG and the file");
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn rust_log_beats_the_file_but_not_the_flag() {
        let file = || parse("[log]\nlevel = \"debug\"").unwrap();
        assert_eq!(
            merge(&cli(&[]), file(), Some("trace".into()), 1)
                .unwrap()
                .log_level,
            "trace"
        );
        assert_eq!(
            merge(&cli(&[]), file(), Some(" ".into()), 1)
                .unwrap()
                .log_level,
            "debug"
        );
        assert_eq!(
            merge(&cli(&[]), file(), None, 1).unwrap().log_level,
            "debug"
        );
    }

    #[test]
    fn explicit_shards_zero_means_available_cores() {
        let c = merge(
            &cli(&["--shards", "0"]),
            parse("shards = 4").unwrap(),
            None,
            2,
        )
        .unwrap();
        assert_eq!(c.shards, 2);
        let c = merge(&cli(&[]), FileConfig::default(), None, 0).unwrap();
        assert_eq!(c.shards, 1, "never zero shards");
    }

    #[test]
    fn non_loopback_listener_requires_allow_anonymous() {
        let err = merge(
            &cli(&["--mqtt-listen", "0.0.0.0:1883"]),
            FileConfig::default(),
            None,
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("0.0.0.0:1883"), "{err}");
        assert!(err.contains("allow_anonymous = true"), "{err}");
        assert!(err.contains("--allow-anonymous"), "{err}");

        let c = merge(
            &cli(&["--mqtt-listen", "0.0.0.0:1883", "--allow-anonymous"]),
            FileConfig::default(),
            None,
            1,
        )
        .unwrap();
        assert!(c.effective_allow_anonymous());
        let c = merge(
            &cli(&["--mqtt-listen", "0.0.0.0:1883"]),
            parse("allow_anonymous = true").unwrap(),
            None,
            1,
        )
        .unwrap();
        assert!(c.broker_config().allow_anonymous);
    }

    #[test]
    fn allow_anonymous_false_in_file_does_not_block_loopback() {
        let c = merge(
            &cli(&[]),
            parse("allow_anonymous = false").unwrap(),
            None,
            1,
        )
        .unwrap();
        assert!(c.broker_config().allow_anonymous);
    }

    #[test]
    fn unknown_keys_are_errors_naming_key_and_line() {
        let err = parse("shards = 1\n\nbogus_key = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus_key"), "{err}");
        assert!(err.contains("test.toml:3:1"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");

        let err = parse("[limits]\nmax_inflight = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_inflight"), "{err}");
        assert!(err.contains("test.toml:2:1"), "{err}");

        let err = parse("[mqtt]\nlisten = \"127.0.0.1:1883\"\nport = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("port") && err.contains(":3:1"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_with_line() {
        let err = parse("[mqtt]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2:"), "{err}");
        let err = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
        assert!(err.contains("xml") || err.contains("variant"), "{err}");
        assert!(parse("shards = -1").is_err());
    }

    #[test]
    fn example_config_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fluxd.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let file = parse_file(&path, &text).unwrap();
        let c = merge(&cli(&[]), file, None, 4).unwrap();
        let d = merge(&cli(&[]), FileConfig::default(), None, 4).unwrap();
        assert_eq!(
            Config {
                config_file: None,
                ..c
            },
            d,
            "the example documents the defaults"
        );
    }

    #[test]
    fn durability_flag_beats_the_file_and_bad_values_are_refused() {
        let file = parse("[durability]\nmode = \"interval\"\nflush_interval_ms = 50\n").unwrap();
        let c = merge(&cli(&[]), file, None, 4).unwrap();
        assert_eq!((c.durability, c.flush_interval_ms), (DurabilityModeName::Interval, 50));
        let file = parse("[durability]\nmode = \"interval\"\n").unwrap();
        let c = merge(&cli(&["--durability", "fsync"]), file, None, 4).unwrap();
        assert_eq!(c.durability, DurabilityModeName::Fsync);
        let file = parse("[durability]\nsegment_size_bytes = 5000\n").unwrap();
        let err = merge(&cli(&[]), file, None, 4).unwrap_err().to_string();
        assert!(err.contains("segment_size_bytes"), "{err}");
        let file = parse("[durability]\nflush_interval_ms = 0\n").unwrap();
        assert!(merge(&cli(&[]), file, None, 4).is_err());
        assert!(parse("[durability]\nmode = \"sometimes\"\n").is_err());
    }

    /// A new field in `flux_core::Limits` must be documented in the example too. Limits has no
    /// Serialize, so its field names come from its Debug output.
    #[test]
    fn example_config_documents_every_limit() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fluxd.example.toml");
        let table: toml::Table = std::fs::read_to_string(path).unwrap().parse().unwrap();
        let limits = table["limits"].as_table().expect("[limits] table");
        let debug = format!("{:?}", Limits::default());
        let body = debug.trim_start_matches("Limits {").trim_end_matches('}');
        let names: Vec<&str> = body
            .split(',')
            .filter_map(|f| f.split(':').next())
            .map(str::trim)
            .collect();
        assert!(names.len() > 5, "{debug}");
        for name in names.iter().filter(|n| !n.is_empty()) {
            assert!(
                limits.contains_key(*name),
                "fluxd.example.toml lacks limits.{name}"
            );
        }
        for key in [
            "data_dir",
            "shards",
            "allow_anonymous",
            "io_memory_bytes",
            "transparent_huge_pages",
            "mqtt",
            "log",
        ] {
            assert!(table.contains_key(key), "fluxd.example.toml lacks {key}");
        }
    }

    #[test]
    fn line_column_handles_multibyte_text() {
        assert_eq!(line_column("a\nbé c", 5), (2, 3));
        assert_eq!(line_column("a\nbé c", 4), (2, 2), "inside é: its start");
        assert_eq!(line_column("é", 1), (1, 1));
    }
}
