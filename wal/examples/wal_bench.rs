//! Measures the log on this machine's disk (a harness, not a test; numbers are printed).
//!
//! ```text
//! cargo run --release -p flux-wal --example wal_bench -- [--dir /tmp] [--seconds 3]
//!     [--recovery-mib 1024] [--prezero true|false] [--payload 100] [--io-memory-mib 4]
//!     [--read-chunk-kib 1024] [--read-depth 4]
//! ```
//!
//! 1. append + commit: 1, 16 and 64 glommio tasks, each appending one record (a queued QoS 1
//!    message with a `--payload`-byte body) and awaiting its commit, in a loop for `--seconds`.
//!    Prints commits/s, latency percentiles, group commits and records per group.
//! 2. recovery: writes about `--recovery-mib` MiB of 1 KiB records, reopens, and prints the replay
//!    rate.
//!
//! Data goes to a fresh directory under `--dir`, removed at the end.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use flux_wal::{DmaStorage, DmaStorageOptions, Record, StoredMessage, Wal, WalConfig};

struct Args {
    dir: std::path::PathBuf,
    seconds: u64,
    recovery_mib: u64,
    prezero: bool,
    payload: usize,
    io_memory_mib: usize,
    chunk_kib: usize,
    depth: usize,
}

fn args() -> Args {
    let mut a = Args {
        dir: "/tmp".into(),
        seconds: 3,
        recovery_mib: 1024,
        prezero: true,
        payload: 100,
        io_memory_mib: 4,
        chunk_kib: 1024,
        depth: 4,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--dir" => a.dir = val.into(),
            "--seconds" => a.seconds = val.parse().expect("--seconds N"),
            "--recovery-mib" => a.recovery_mib = val.parse().expect("--recovery-mib N"),
            "--prezero" => a.prezero = val.parse().expect("--prezero true|false"),
            "--payload" => a.payload = val.parse().expect("--payload BYTES"),
            "--read-chunk-kib" => a.chunk_kib = val.parse().expect("--read-chunk-kib N"),
            "--read-depth" => a.depth = val.parse().expect("--read-depth N"),
            "--io-memory-mib" => a.io_memory_mib = val.parse().expect("--io-memory-mib N"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn message(i: u64, payload: usize) -> Record {
    Record::MessageEnqueued {
        client_id: format!("client-{}", i % 64),
        msg_id: i,
        message: StoredMessage {
            topic: format!("sensors/{}/temperature", i % 1000),
            qos: 1,
            retain: false,
            payload: vec![(i % 251) as u8; payload],
            properties: Vec::new(),
            expires_at_ms: None,
        },
    }
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn open(dir: &std::path::Path, prezero: bool) -> (Wal<DmaStorage>, flux_wal::RecoveryReport) {
    let storage = DmaStorage::open(
        dir,
        DmaStorageOptions {
            prezero,
            ..DmaStorageOptions::default()
        },
    )
    .await
    .expect("open storage");
    Wal::open(storage, WalConfig::default(), |_, _| {})
        .await
        .expect("open wal")
}

async fn commit_bench(
    dir: &std::path::Path,
    tasks: usize,
    seconds: u64,
    prezero: bool,
    payload: usize,
) {
    let (wal, _) = open(dir, prezero).await;
    let wal = Rc::new(wal);
    // Warm-up: creates (and zero-fills) the first segment outside the measurement.
    wal.append(&message(0, payload)).unwrap();
    wal.commit().await.unwrap();
    let groups0 = wal.group_commits();
    let lat = Rc::new(RefCell::new(Vec::<u32>::new()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let wal = wal.clone();
        let lat = lat.clone();
        handles.push(glommio::spawn_local(async move {
            let mut i = t as u64 * 1_000_000_000;
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                wal.append(&message(i, payload)).unwrap();
                wal.commit().await.unwrap();
                mine.push(t0.elapsed().as_micros() as u32);
                i += 1;
            }
            lat.borrow_mut().extend(mine);
        }));
    }
    for h in handles {
        h.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = lat.borrow_mut();
    l.sort_unstable();
    let n = l.len();
    let groups = wal.group_commits() - groups0;
    println!(
        "append+commit tasks={tasks:>2}: {:>8.0} commits/s  latency µs p50={} p90={} p99={} p99.9={} max={}  groups={} ({:.0}/s, {:.1} records/group)",
        n as f64 / elapsed,
        pct(&l, 0.5),
        pct(&l, 0.9),
        pct(&l, 0.99),
        pct(&l, 0.999),
        l.last().copied().unwrap_or(0),
        groups,
        groups as f64 / elapsed,
        n as f64 / groups.max(1) as f64,
    );
}

async fn recovery_bench(
    dir: &std::path::Path,
    mib: u64,
    prezero: bool,
    chunk_kib: usize,
    depth: usize,
) {
    let (wal, _) = open(dir, prezero).await;
    let target = mib << 20;
    let t0 = Instant::now();
    let mut i = 0u64;
    while wal.disk_usage().used_bytes < target {
        for _ in 0..2000 {
            wal.append(&message(i, 1000)).unwrap();
            i += 1;
        }
        wal.commit().await.unwrap();
    }
    let write_s = t0.elapsed().as_secs_f64();
    let usage = wal.disk_usage();
    println!(
        "wrote {} records, {:.0} MiB of frames in {} segments in {:.2} s ({:.0} MiB/s incl. segment creation)",
        i,
        usage.used_bytes as f64 / 1048576.0,
        usage.segments,
        write_s,
        usage.used_bytes as f64 / 1048576.0 / write_s
    );
    drop(wal);
    let t0 = Instant::now();
    let mut n = 0u64;
    let storage = DmaStorage::open(dir, DmaStorageOptions::default())
        .await
        .expect("open storage");
    let cfg = WalConfig {
        recovery_read_chunk_bytes: chunk_kib << 10,
        recovery_read_depth: depth,
        ..WalConfig::default()
    };
    let (_wal, report) = Wal::open(storage, cfg, |_, _| n += 1)
        .await
        .expect("recover");
    let s = t0.elapsed().as_secs_f64();
    println!(
        "recovery: {} records, {:.0} MiB of frames ({:.0} MiB read, {:.3} s waiting for reads) in {:.3} s = {:.0} MiB/s of frames, {:.0} records/s",
        report.records,
        report.frame_bytes as f64 / 1048576.0,
        report.bytes_read as f64 / 1048576.0,
        report.read_time.as_secs_f64(),
        s,
        report.frame_bytes as f64 / 1048576.0 / s,
        n as f64 / s
    );
}

fn main() {
    let a = args();
    let io_memory_mib = a.io_memory_mib;
    raise_memlock(((io_memory_mib as u64) * 3 + 16) << 20);
    let root = tempfile::Builder::new()
        .prefix("flux-wal-bench-")
        .tempdir_in(&a.dir)
        .expect("tempdir");
    let root_path = root.path().to_path_buf();
    let (seconds, prezero, payload, mib) = (a.seconds, a.prezero, a.payload, a.recovery_mib);
    let (chunk_kib, depth) = (a.chunk_kib, a.depth);
    println!(
        "flux-wal bench in {} (prezero={prezero}, payload={payload} B)",
        root_path.display()
    );
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(io_memory_mib << 20)
        .spawn(move || async move {
            let concurrency: &[usize] = if seconds == 0 { &[] } else { &[1, 16, 64] };
            for &tasks in concurrency {
                let dir = root_path.join(format!("commit-{tasks}"));
                commit_bench(&dir, tasks, seconds, prezero, payload).await;
                std::fs::remove_dir_all(&dir).ok();
            }
            if mib > 0 {
                let dir = root_path.join("recovery");
                recovery_bench(&dir, mib, prezero, chunk_kib, depth).await;
                std::fs::remove_dir_all(&dir).ok();
            }
        })
        .expect("executor")
        .join()
        .expect("executor thread");
    drop(root);
}

fn raise_memlock(min_bytes: u64) {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) == 0
            && lim.rlim_cur != libc::RLIM_INFINITY
            && lim.rlim_cur < min_bytes
        {
            lim.rlim_cur = if lim.rlim_max == libc::RLIM_INFINITY {
                min_bytes
            } else {
                min_bytes.min(lim.rlim_max)
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                eprintln!("warning: could not raise RLIMIT_MEMLOCK; glommio may fail to start");
            }
        }
    }
}
