//! Shared harness for the loopback suites in `cli/tests/mqtt_*.rs`: starts a real broker process
//! (fluxd, or Mosquitto when `BROKER=mosquitto`), picks client ids by home shard, and wraps
//! rumqttc event loops so that every wait is a condition with a deadline.
//!
//! Each test owns its broker; dropping [`Broker`] kills the process and removes its data dir.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod raw;
pub mod v4;
pub mod v5;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a broker may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(20);
/// Default deadline for one expected event (a CONNACK, a delivery, a close).
pub const WAIT: Duration = Duration::from_secs(10);
/// Shard count every fluxd in these suites runs with.
pub const SHARDS: u16 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Fluxd,
    Mosquitto,
}

/// Which broker the suite drives: `BROKER=mosquitto` selects Mosquitto (to debug the tests
/// themselves against a reference broker); anything else runs the real fluxd.
pub fn broker_kind() -> BrokerKind {
    match std::env::var("BROKER").as_deref() {
        Ok("mosquitto") => BrokerKind::Mosquitto,
        _ => BrokerKind::Fluxd,
    }
}

/// True (and says so on stderr) when the running broker is Mosquitto and the test checks
/// Flux-specific behaviour. Never true under fluxd.
pub fn skip_under_mosquitto(why: &str) -> bool {
    if broker_kind() == BrokerKind::Mosquitto {
        eprintln!("skipped under mosquitto: {why}");
        return true;
    }
    false
}

/// `[limits]` entries for fluxd, as (field of `flux_core::Limits`, TOML value).
pub type LimitsToml<'a> = &'a [(&'a str, &'a str)];

pub struct Broker {
    child: Child,
    pub port: u16,
    pub kind: BrokerKind,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Broker {
    /// A broker with default limits.
    pub fn start() -> Broker {
        Broker::with_limits(&[])
    }

    /// A broker with the given `[limits]`. Under Mosquitto the limits that have a Mosquitto
    /// equivalent are translated; asking for one that has none is a test bug (skip first).
    pub fn with_limits(limits: LimitsToml) -> Broker {
        match broker_kind() {
            BrokerKind::Fluxd => Broker::start_fluxd(limits),
            BrokerKind::Mosquitto => Broker::start_mosquitto(limits),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Everything the broker printed so far (for failure messages).
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn start_fluxd(limits: LimitsToml) -> Broker {
        let dir = fresh_dir("fluxd");
        let data_dir = dir.join("data");
        std::fs::create_dir_all(&data_dir).expect("create data dir");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluxd"));
        cmd.args(["--mqtt-listen", "127.0.0.1:0", "--shards", &SHARDS.to_string()])
            .arg("--data-dir")
            .arg(&data_dir);
        if !limits.is_empty() {
            let mut toml = String::from("[limits]\n");
            for (key, value) in limits {
                toml.push_str(&format!("{key} = {value}\n"));
            }
            let path = dir.join("fluxd.toml");
            std::fs::write(&path, toml).expect("write fluxd.toml");
            cmd.arg("--config").arg(&path);
        }
        cmd.env("NO_COLOR", "1");
        let (child, log, lines) = spawn_logged(cmd);
        let deadline = Instant::now() + START_DEADLINE;
        let mut child = child;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(line) => {
                    if let Some(port) = parse_bound_port(&line) {
                        return Broker { child, port, kind: BrokerKind::Fluxd, dir, log };
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                let text = log.lock().map(|l| l.clone()).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                panic!("fluxd exited before listening ({status}):\n{text}");
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let text = log.lock().map(|l| l.clone()).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                panic!("fluxd did not log `mqtt listener bound addr=` within {START_DEADLINE:?}:\n{text}");
            }
        }
    }

    fn start_mosquitto(limits: LimitsToml) -> Broker {
        let dir = fresh_dir("mosquitto");
        // Mosquitto cannot bind port 0 and report it, so pick a free port and retry on a clash.
        for _attempt in 0..5 {
            let port = free_port();
            let mut conf = format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type all\n"
            );
            for (key, value) in limits {
                let line = match *key {
                    "max_packet_size_bytes" => format!("max_packet_size {value}"),
                    "max_queued_messages" => format!("max_queued_messages {value}"),
                    "max_inflight_messages" => format!("max_inflight_messages {value}"),
                    "max_keep_alive_secs" => format!("max_keepalive {value}"),
                    "max_connections" => format!("max_connections {value}"),
                    "max_topic_aliases" => format!("max_topic_alias {value}"),
                    other => panic!("limit {other} has no Mosquitto equivalent; skip this test under mosquitto"),
                };
                conf.push_str(&line);
                conf.push('\n');
            }
            let path = dir.join("mosquitto.conf");
            std::fs::write(&path, conf).expect("write mosquitto.conf");
            let mut cmd = Command::new("mosquitto");
            cmd.arg("-c").arg(&path);
            let (mut child, log, _lines) = spawn_logged(cmd);
            let deadline = Instant::now() + START_DEADLINE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // Port taken between pick and bind: try another.
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Broker { child, port, kind: BrokerKind::Mosquitto, dir, log };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("mosquitto did not start (is it installed? apt-get install -y mosquitto)");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        if std::thread::panicking() {
            eprintln!("---- broker log ----\n{}", self.log());
        }
    }
}

/// Spawns `cmd` with stdout and stderr each read by a thread into a shared log; every line also
/// goes to the returned channel.
fn spawn_logged(mut cmd: Command) -> (Child, Arc<Mutex<String>>, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let outs: Vec<Box<dyn Read + Send>> = vec![
        Box::new(child.stdout.take().expect("piped stdout")),
        Box::new(child.stderr.take().expect("piped stderr")),
    ];
    for out in outs {
        let log = Arc::clone(&log);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
                let _ = tx.send(line);
            }
        });
    }
    (child, log, rx)
}

/// The port from a `mqtt listener bound addr=127.0.0.1:PORT` log line (plain text or JSON,
/// with or without ANSI colours).
pub fn parse_bound_port(line: &str) -> Option<u16> {
    let line = strip_ansi(line);
    let at = line.find("mqtt listener bound")?;
    let _ = at;
    let rest = &line[line.find("addr")? + 4..];
    let rest = rest.trim_start_matches(|c: char| c == '=' || c == '"' || c == ':' || c.is_whitespace());
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
        .unwrap_or(rest.len());
    rest[..end].parse::<SocketAddr>().ok().map(|a| a.port())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind a free port").port()
}

fn fresh_dir(what: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "flux-test-{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// fluxd's home shard of a client id: FNV-1a 64 of the id bytes modulo the shard count (the same
/// function as `flux_core::shard_for`, restated so the suite checks placement independently).
pub fn shard_for(client_id: &str, shards: u16) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards)) as u16
}

/// A client id starting with `prefix` whose home shard is `shard`. Also unique per call, so
/// tests running in parallel against different brokers never share ids by accident.
pub fn client_id_on_shard(prefix: &str, shard: u16) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    loop {
        let id = format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed));
        if shard_for(&id, SHARDS) == shard {
            return id;
        }
    }
}

#[test]
fn harness_parses_bound_lines() {
    assert_eq!(
        parse_bound_port("2024-01-01T00:00:00Z  INFO fluxd: mqtt listener bound addr=127.0.0.1:40123 shard=0"),
        Some(40123)
    );
    assert_eq!(
        parse_bound_port(
            r#"{"level":"INFO","fields":{"message":"mqtt listener bound","addr":"127.0.0.1:5555"}}"#
        ),
        Some(5555)
    );
    assert_eq!(
        parse_bound_port("\u{1b}[32m INFO\u{1b}[0m mqtt listener bound \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:7")
            .filter(|p| *p == 7),
        Some(7)
    );
    assert_eq!(parse_bound_port("effective config mqtt_listen=127.0.0.1:0"), None);
}

#[test]
fn harness_shard_for_matches_core() {
    for id in ["", "a", "client-1", "sensor/17", "ünïcode"] {
        assert_eq!(shard_for(id, SHARDS), flux_core::shard_for(id.as_bytes(), SHARDS).0);
    }
    assert_eq!(shard_for(&client_id_on_shard("x", 1), SHARDS), 1);
    assert_eq!(shard_for(&client_id_on_shard("x", 0), SHARDS), 0);
}
