//! Many idle connections: connect K MQTT clients that then say nothing, and report how much the
//! broker's resident memory grew per connection.
//!
//! Source addresses rotate over 127.0.0.2, 127.0.0.3, ... (bind before connect), so the
//! (source, destination) 4-tuples never run out however many rounds run back to back. Each
//! connection holds one file descriptor here; the count is capped below this process's open-files
//! limit.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use flux_core::mqtt::ProtocolVersion;
use serde::Serialize;

use crate::client::{self, ConnectOptions};
use crate::stats;

/// Distinct source addresses used (127.0.0.2 ..= 127.0.0.201).
const SOURCE_ADDRESSES: u32 = 200;
/// File descriptors kept free for everything else this process opens.
const SPARE_FDS: u64 = 200;
/// Connections made before the baseline RSS is read, so one-time costs (first accept, lazily
/// initialized tables, allocator arenas) do not count as per-connection memory.
pub const WARMUP_CONNECTIONS: usize = 200;

#[derive(Clone, Debug)]
pub struct IdleSpec {
    pub connections: usize,
    pub mqtt_v5: bool,
    pub client_prefix: String,
    /// Threads connecting in parallel.
    pub threads: usize,
    /// Bound on the whole connect phase.
    pub timeout: Duration,
    /// Wait after the last connection before reading RSS (the broker may still be allocating).
    pub settle: Duration,
    /// How long to hold the connections after measuring (0: close at once).
    pub hold: Duration,
    pub progress: bool,
    pub label: String,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IdleResult {
    pub label: String,
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub connect_secs: f64,
    pub rss_baseline_bytes: Option<u64>,
    pub rss_after_bytes: Option<u64>,
    /// (RSS after - RSS at baseline) / connections made after the baseline.
    pub bytes_per_connection: Option<f64>,
    pub first_error: Option<String>,
}

/// Raises this process's soft open-files limit to its hard limit and returns it.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// The most idle connections this process can hold.
pub fn max_connections() -> usize {
    raise_nofile_limit().saturating_sub(SPARE_FDS) as usize
}

fn source_address(i: usize) -> IpAddr {
    let host = 2 + (i as u32 % SOURCE_ADDRESSES);
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 0)) + host,
    ))
}

pub fn run(spec: &IdleSpec, addr: SocketAddr, pid: Option<u32>) -> anyhow::Result<IdleResult> {
    let cap = max_connections();
    if spec.connections > cap {
        bail!(
            "{} idle connections requested; this process can open at most {cap}",
            spec.connections
        );
    }
    if spec.connections <= WARMUP_CONNECTIONS {
        bail!("need more than {WARMUP_CONNECTIONS} idle connections (the first {WARMUP_CONNECTIONS} are warm-up)");
    }
    let version = if spec.mqtt_v5 {
        ProtocolVersion::V5
    } else {
        ProtocolVersion::V311
    };
    let started = Instant::now();
    let deadline = started + spec.timeout;
    let mut held: Vec<TcpStream> = Vec::with_capacity(spec.connections);
    let mut failed = 0usize;
    let mut first_error = None;

    // Warm-up batch, then the baseline.
    let warm = connect_range(spec, addr, version, 0..WARMUP_CONNECTIONS, deadline);
    held.extend(warm.streams);
    failed += warm.failed;
    first_error = first_error.or(warm.first_error);
    std::thread::sleep(spec.settle);
    let rss_baseline = pid.and_then(stats::process_rss_bytes);

    // The rest, in parallel.
    let threads = spec.threads.clamp(1, 16);
    let rest = WARMUP_CONNECTIONS..spec.connections;
    let chunk = rest.len().div_ceil(threads);
    let done = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..threads {
            let lo = rest.start + t * chunk;
            let hi = (lo + chunk).min(rest.end);
            if lo >= hi {
                continue;
            }
            let (results, done) = (&results, &done);
            s.spawn(move || {
                let r = connect_range_counted(spec, addr, version, lo..hi, deadline, done);
                if let Ok(mut v) = results.lock() {
                    v.push(r);
                }
            });
        }
        if spec.progress {
            let total = spec.connections - WARMUP_CONNECTIONS;
            let mut last = Instant::now();
            while done.load(Ordering::Relaxed) < total && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= Duration::from_secs(2) {
                    eprintln!(
                        "  [{}] idle: {} / {total} connected",
                        spec.label,
                        done.load(Ordering::Relaxed)
                    );
                    last = Instant::now();
                }
            }
        }
    });
    let connect_secs = started.elapsed().as_secs_f64();
    for r in results.into_inner().unwrap_or_default() {
        held.extend(r.streams);
        failed += r.failed;
        first_error = first_error.or(r.first_error);
    }
    std::thread::sleep(spec.settle);
    let rss_after = pid.and_then(stats::process_rss_bytes);
    let measured = held.len().saturating_sub(WARMUP_CONNECTIONS);
    let bytes_per_connection = match (rss_baseline, rss_after) {
        (Some(a), Some(b)) if measured > 0 => Some((b as f64 - a as f64) / measured as f64),
        _ => None,
    };
    if !spec.hold.is_zero() {
        std::thread::sleep(spec.hold);
    }
    let connected = held.len();
    drop(held);
    Ok(IdleResult {
        label: spec.label.clone(),
        requested: spec.connections,
        connected,
        failed,
        connect_secs,
        rss_baseline_bytes: rss_baseline,
        rss_after_bytes: rss_after,
        bytes_per_connection,
        first_error,
    })
}

struct RangeResult {
    streams: Vec<TcpStream>,
    failed: usize,
    first_error: Option<String>,
}

fn connect_range(
    spec: &IdleSpec,
    addr: SocketAddr,
    version: ProtocolVersion,
    range: std::ops::Range<usize>,
    deadline: Instant,
) -> RangeResult {
    connect_range_counted(spec, addr, version, range, deadline, &AtomicUsize::new(0))
}

fn connect_range_counted(
    spec: &IdleSpec,
    addr: SocketAddr,
    version: ProtocolVersion,
    range: std::ops::Range<usize>,
    deadline: Instant,
    done: &AtomicUsize,
) -> RangeResult {
    let mut out = RangeResult {
        streams: Vec::with_capacity(range.len()),
        failed: 0,
        first_error: None,
    };
    for i in range {
        if Instant::now() >= deadline {
            out.failed += 1;
            out.first_error
                .get_or_insert_with(|| "idle connect phase timed out".into());
            continue;
        }
        let id = format!("{}-idle{i}", spec.client_prefix);
        match client::connect(&ConnectOptions {
            addr,
            bind: Some(source_address(i)),
            client_id: &id,
            version,
            keep_alive_secs: crate::load::LOAD_KEEP_ALIVE_SECS,
            timeout: Duration::from_secs(10),
            clean_start: true,
            session_expiry_secs: None,
        }) {
            // Keep one descriptor per connection: the writer's; the reader's closes here.
            Ok((_reader, writer, _)) => out.streams.push(writer.into_stream()),
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_rotate_over_loopback_hosts() {
        assert_eq!(source_address(0), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(
            source_address(199),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 201))
        );
        assert_eq!(source_address(200), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    }
}
