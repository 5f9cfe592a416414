//! Starting and stopping the brokers under test: fluxd, Mosquitto and rumqttd, each from a
//! generated configuration with the same limits, on a free loopback port, in its own temporary
//! directory. The child's pid is what CPU and RSS are read from.
//!
//! fluxd listens on port 0 (the kernel picks a free port) and the address is read back from its
//! `mqtt listener bound addr=...` log line, so there is no window in which another process can take
//! the port. [`FluxdOptions`] adds its durability mode and a data directory that outlives the
//! process (for kill -9 and restart).

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Fluxd,
    Mosquitto,
    Rumqttd,
}

impl BrokerKind {
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Fluxd => "fluxd",
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Rumqttd => "rumqttd",
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct BrokerPaths {
    /// fluxd binary (build it with `cargo build --release --bin fluxd`).
    #[arg(long, default_value = "target/release/fluxd")]
    pub fluxd_bin: PathBuf,
    /// Mosquitto binary (Debian: `apt-get install mosquitto`).
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// rumqttd binary (`cargo install rumqttd`).
    #[arg(long, default_value = "~/.cargo/bin/rumqttd")]
    pub rumqttd_bin: PathBuf,
}

/// Limits given to every broker alike.
#[derive(Clone, Debug, clap::Args, Serialize)]
pub struct BrokerSettings {
    /// fluxd shards (`--shards`).
    #[arg(long, default_value_t = 2)]
    pub shards: u16,
    /// Inflight QoS 1/2 messages per client (fluxd max_inflight_messages, Mosquitto
    /// max_inflight_messages, rumqttd max_inflight_count).
    #[arg(long, default_value_t = 100)]
    pub broker_inflight: u16,
    /// Queued messages per session beyond the inflight window (fluxd max_queued_messages,
    /// Mosquitto max_queued_messages; rumqttd has no equivalent).
    #[arg(long, default_value_t = 1000)]
    pub broker_queued: usize,
    /// Connections the broker accepts (rumqttd router max_connections, fluxd max_connections).
    #[arg(long, default_value_t = 25_000)]
    pub broker_max_connections: usize,
}

/// fluxd `--durability`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledgements wait for fdatasync (group commit).
    Fsync,
    /// Synced every flush_interval_ms; acknowledgements do not wait.
    Interval,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Interval => "interval",
        }
    }
}

/// fluxd-only settings beyond the shared limits. The default is what `start` uses: fluxd's own
/// durability default and a fresh data directory removed at stop.
#[derive(Clone, Debug, Default)]
pub struct FluxdOptions {
    /// `--durability` (None: fluxd's default, fsync).
    pub durability: Option<Durability>,
    /// `[durability] flush_interval_ms` (interval mode).
    pub flush_interval_ms: Option<u32>,
    /// `[durability] segment_size_bytes` (fluxd's default: 64 MiB).
    pub segment_size_bytes: Option<u64>,
    /// `[limits] max_queued_bytes` (fluxd's default: 64 MiB).
    pub max_queued_bytes: Option<u64>,
    /// A data directory that survives the process (left in place by `stop`), for restarts on the
    /// same state. None: a fresh one inside the broker's temporary directory.
    pub data_dir: Option<PathBuf>,
    /// Write the log here instead of inside the temporary directory (so it outlives `stop`).
    pub log_file: Option<PathBuf>,
    /// TOML appended to the generated fluxd.toml after its tables (`[admin]`, `[[queue]]`).
    pub extra_config: Option<String>,
}

pub struct RunningBroker {
    pub kind: BrokerKind,
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
    log_path: PathBuf,
}

/// Distinguishes the temporary directories of brokers started by one process.
static STARTS: AtomicU64 = AtomicU64::new(0);

/// The address in fluxd's `mqtt listener bound addr=HOST:PORT ...` log line (the last such line).
pub fn parse_fluxd_bound_addr(log: &str) -> Option<SocketAddr> {
    parse_bound_addr(log, "mqtt listener bound")
}

/// The address in the last `<what> addr=HOST:PORT ...` line of a fluxd log (`admin listener
/// bound` for the admin endpoint).
pub fn parse_bound_addr(log: &str, what: &str) -> Option<SocketAddr> {
    log.lines()
        .rev()
        .filter(|l| l.contains(what))
        .find_map(|l| {
            let rest = &l[l.find("addr=")? + "addr=".len()..];
            let token = rest.split_whitespace().next()?.trim_matches('"');
            token.parse().ok()
        })
}

fn expand_home(p: &Path) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => {
            std::env::var_os("HOME").map_or_else(|| p.to_path_buf(), |h| Path::new(&h).join(rest))
        }
        None => p.to_path_buf(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "?",
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl BrokerPaths {
    pub fn binary(&self, kind: BrokerKind) -> PathBuf {
        expand_home(match kind {
            BrokerKind::Fluxd => &self.fluxd_bin,
            BrokerKind::Mosquitto => &self.mosquitto_bin,
            BrokerKind::Rumqttd => &self.rumqttd_bin,
        })
    }
}

impl RunningBroker {
    pub fn start(
        kind: BrokerKind,
        paths: &BrokerPaths,
        settings: &BrokerSettings,
        mqtt_v5: bool,
    ) -> anyhow::Result<RunningBroker> {
        Self::start_with(kind, paths, settings, mqtt_v5, &FluxdOptions::default())
    }

    /// fluxd with [`FluxdOptions`].
    pub fn start_fluxd(
        paths: &BrokerPaths,
        settings: &BrokerSettings,
        options: &FluxdOptions,
    ) -> anyhow::Result<RunningBroker> {
        Self::start_with(BrokerKind::Fluxd, paths, settings, false, options)
    }

    fn start_with(
        kind: BrokerKind,
        paths: &BrokerPaths,
        settings: &BrokerSettings,
        mqtt_v5: bool,
        options: &FluxdOptions,
    ) -> anyhow::Result<RunningBroker> {
        let bin = paths.binary(kind);
        if !bin.exists() {
            bail!("{} binary not found at {}", kind.name(), bin.display());
        }
        // fluxd picks its own port (0) and logs it; the others get one that was free a moment ago.
        let port = match kind {
            BrokerKind::Fluxd => 0,
            _ => free_port()?,
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let dir = std::env::temp_dir().join(format!(
            "flux-stress-{}-{}-{}",
            std::process::id(),
            kind.name(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir)?;
        let log_path = options
            .log_file
            .clone()
            .unwrap_or_else(|| dir.join("broker.log"));
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(&bin);
        match kind {
            BrokerKind::Fluxd => {
                let config = dir.join("fluxd.toml");
                let mut text = format!(
                    "[limits]\nmax_connections = {}\nmax_inflight_messages = {}\nmax_queued_messages = {}\n",
                    settings.broker_max_connections, settings.broker_inflight, settings.broker_queued
                );
                if let Some(b) = options.max_queued_bytes {
                    text.push_str(&format!("max_queued_bytes = {b}\n"));
                }
                if options.flush_interval_ms.is_some() || options.segment_size_bytes.is_some() {
                    text.push_str("\n[durability]\n");
                }
                if let Some(ms) = options.flush_interval_ms {
                    text.push_str(&format!("flush_interval_ms = {ms}\n"));
                }
                if let Some(b) = options.segment_size_bytes {
                    text.push_str(&format!("segment_size_bytes = {b}\n"));
                }
                if let Some(extra) = &options.extra_config {
                    text.push('\n');
                    text.push_str(extra);
                }
                fs::write(&config, text)?;
                let data = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
                fs::create_dir_all(&data)?;
                cmd.arg("--mqtt-listen")
                    .arg(addr.to_string())
                    .arg("--shards")
                    .arg(settings.shards.to_string())
                    .arg("--data-dir")
                    .arg(&data)
                    .arg("--config")
                    .arg(&config);
                if let Some(d) = options.durability {
                    cmd.arg("--durability").arg(d.name());
                }
            }
            BrokerKind::Mosquitto => {
                let config = dir.join("mosquitto.conf");
                // Per-connection log lines off (they cost CPU in the measured window), Nagle off
                // like fluxd, no persistence (fluxd QoS 0 never touches disk either).
                fs::write(
                    &config,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\n\
                         max_inflight_messages {}\nmax_queued_messages {}\n\
                         set_tcp_nodelay true\npersistence false\nconnection_messages false\n\
                         log_dest stderr\nlog_type error\nlog_type warning\n",
                        settings.broker_inflight, settings.broker_queued
                    ),
                )?;
                cmd.arg("-c").arg(&config);
            }
            BrokerKind::Rumqttd => {
                let config = dir.join("rumqttd.toml");
                let section = if mqtt_v5 { "v5" } else { "v4" };
                // next_connection_delay_ms = 0: the sample config's 1 ms pause between accepts
                // would make the idle-connection phase take seconds per thousand.
                fs::write(
                    &config,
                    format!(
                        "id = 0\n\n[router]\nid = 0\nmax_connections = {}\nmax_outgoing_packet_count = 200\n\
                         max_segment_size = 104857600\nmax_segment_count = 10\n\n\
                         [{section}.1]\nname = \"{section}-1\"\nlisten = \"{addr}\"\nnext_connection_delay_ms = 0\n\
                         [{section}.1.connections]\nconnection_timeout_ms = 60000\nmax_payload_size = 1048576\n\
                         max_inflight_count = {}\ndynamic_filters = true\n",
                        settings.broker_max_connections, settings.broker_inflight
                    ),
                )?;
                cmd.arg("-c").arg(&config);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut broker = RunningBroker {
            kind,
            addr,
            child,
            dir,
            log_path,
        };
        if let Err(e) = broker.wait_ready(Duration::from_secs(15)) {
            let log = broker.log_tail();
            broker.stop();
            bail!(
                "{} did not become ready: {e:#}\n--- log ---\n{log}",
                kind.name()
            );
        }
        Ok(broker)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited with {status}");
            }
            let ready = match self.kind {
                // fluxd logs this once every shard's mesh is connected and shard 0 listens.
                BrokerKind::Fluxd => {
                    match fs::read_to_string(&self.log_path)
                        .ok()
                        .and_then(|l| parse_fluxd_bound_addr(&l))
                    {
                        Some(a) => {
                            self.addr = a;
                            true
                        }
                        None => false,
                    }
                }
                _ => TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok(),
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("not listening on {} after {:?}", self.addr, timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended ("exit status 1", "signal 11 (SIGSEGV)"), or None while it runs.
    pub fn exit_description(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        let status = self.child.try_wait().ok()??;
        Some(match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!(
                "signal {sig} ({}){}",
                signal_name(sig),
                if status.core_dumped() {
                    ", core dumped"
                } else {
                    ""
                }
            ),
            _ => format!("{status}"),
        })
    }

    /// SIGKILL now (no shutdown path runs), and reap the process. The temporary directory stays
    /// until `stop` or drop; a [`FluxdOptions::data_dir`] stays for good.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if self.alive() {
            self.child.kill().context("SIGKILL")?;
        }
        self.child.wait().context("reaping the killed broker")?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s; removes the temporary directory.
    pub fn stop(&mut self) {
        if self.alive() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.alive() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_address_is_read_from_the_last_listener_line() {
        let log = "2026-12-01T19:07:50.177474Z  INFO fluxd: effective config mqtt_listen=127.0.0.1:0\n\
                   2026-12-01T19:07:50.209465Z  INFO flux_net: mqtt listener bound addr=127.0.0.1:57771 shards=2\n\
                   2026-12-01T19:07:51.209465Z  INFO flux_net: mqtt listener bound addr=127.0.0.1:40001 shards=2\n";
        assert_eq!(
            parse_fluxd_bound_addr(log),
            Some("127.0.0.1:40001".parse().unwrap())
        );
        assert_eq!(
            parse_fluxd_bound_addr("INFO mqtt listener bound addr=[::1]:1883"),
            Some("[::1]:1883".parse().unwrap())
        );
        assert_eq!(parse_fluxd_bound_addr("INFO fluxd: starting\n"), None);
        let both = "INFO flux_net: mqtt listener bound addr=127.0.0.1:1883 shards=2\n\
                    INFO flux_net: admin listener bound addr=127.0.0.1:8089\n";
        assert_eq!(
            parse_bound_addr(both, "admin listener bound"),
            Some("127.0.0.1:8089".parse().unwrap())
        );
        assert_eq!(
            parse_fluxd_bound_addr(both),
            Some("127.0.0.1:1883".parse().unwrap())
        );
        assert_eq!(
            parse_fluxd_bound_addr("mqtt listener bound addr=127.0.0.1:"),
            None
        );
    }
}
