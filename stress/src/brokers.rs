//! Starting and stopping the brokers under test: fluxd, Mosquitto and rumqttd, each from a
//! generated configuration with the same limits, on a free loopback port, in its own temporary
//! directory. The child's pid is what CPU and RSS are read from.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

pub struct RunningBroker {
    pub kind: BrokerKind,
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

fn expand_home(p: &Path) -> PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => {
            std::env::var_os("HOME").map_or_else(|| p.to_path_buf(), |h| Path::new(&h).join(rest))
        }
        None => p.to_path_buf(),
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
        let bin = paths.binary(kind);
        if !bin.exists() {
            bail!("{} binary not found at {}", kind.name(), bin.display());
        }
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let dir = std::env::temp_dir().join(format!(
            "flux-stress-{}-{}-{port}",
            std::process::id(),
            kind.name()
        ));
        fs::create_dir_all(&dir)?;
        let log = fs::File::create(dir.join("broker.log"))?;
        let mut cmd = Command::new(&bin);
        match kind {
            BrokerKind::Fluxd => {
                let config = dir.join("fluxd.toml");
                fs::write(
                    &config,
                    format!(
                        "[limits]\nmax_connections = {}\nmax_inflight_messages = {}\nmax_queued_messages = {}\n",
                        settings.broker_max_connections, settings.broker_inflight, settings.broker_queued
                    ),
                )?;
                let data = dir.join("data");
                fs::create_dir_all(&data)?;
                cmd.arg("--mqtt-listen")
                    .arg(addr.to_string())
                    .arg("--shards")
                    .arg(settings.shards.to_string())
                    .arg("--data-dir")
                    .arg(&data)
                    .arg("--config")
                    .arg(&config);
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
                BrokerKind::Fluxd => fs::read_to_string(self.dir.join("broker.log"))
                    .is_ok_and(|l| l.contains("mqtt listener bound")),
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

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
