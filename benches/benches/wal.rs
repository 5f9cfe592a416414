//! The write-ahead log on this machine's disk (flux_wal with glommio O_DIRECT files).
//!
//! - `append_commit/1`: one record appended and committed (one write + one fdatasync): the
//!   latency floor of a durable acknowledgement.
//! - `append_commit/64`: 64 tasks each append one record and await its commit, concurrently;
//!   group commit makes them share syncs. Throughput is per record.
//! - `recovery_64mib`: reopening a log holding 64 MiB of 1 KiB records (replay rate).
//!
//! Each measurement runs on a fresh glommio executor with its log in a temporary directory under
//! `FLUX_BENCH_DIR` (default: the system temp dir), removed afterwards.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flux_wal::{DmaStorage, DmaStorageOptions, Record, StoredMessage, Wal, WalConfig};
use glommio::{LocalExecutorBuilder, Placement};

const SEGMENT_BYTES: u64 = 16 << 20;

fn record(i: u64, payload: usize) -> Record {
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

fn temp_dir() -> tempfile::TempDir {
    match std::env::var_os("FLUX_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory")
}

/// Run `f` on a fresh executor (io memory kept small so no memlock raise is needed).
fn on_executor<F, Fut>(f: F) -> Duration
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Duration> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor ran")
}

async fn open(dir: &std::path::Path) -> Wal<DmaStorage> {
    let storage = DmaStorage::open(dir, DmaStorageOptions::default()).await.expect("storage");
    let config = WalConfig { segment_size_bytes: SEGMENT_BYTES, ..WalConfig::default() };
    Wal::open(storage, config, |_, _| {}).await.expect("wal").0
}

fn append_commit(iters: u64, tasks: u64) -> Duration {
    on_executor(move || async move {
        let dir = temp_dir();
        let wal = Rc::new(open(dir.path()).await);
        // The first commit creates and zero-fills the segment: outside the measurement.
        wal.append(&record(0, 100)).expect("append");
        wal.commit().await.expect("commit");
        let start = Instant::now();
        let rounds = iters.div_ceil(tasks).max(1);
        let mut handles = Vec::new();
        for t in 0..tasks {
            let wal = wal.clone();
            handles.push(glommio::spawn_local(async move {
                for r in 0..rounds {
                    wal.append(&record(t * rounds + r, 100)).expect("append");
                    wal.commit().await.expect("commit");
                }
            }));
        }
        for h in handles {
            h.await;
        }
        start.elapsed().mul_f64(iters as f64 / (rounds * tasks) as f64)
    })
}

fn recovery(iters: u64, bytes: u64) -> Duration {
    on_executor(move || async move {
        let dir = temp_dir();
        {
            let wal = open(dir.path()).await;
            let mut i = 0;
            while wal.disk_usage().used_bytes < bytes {
                for _ in 0..1000 {
                    wal.append(&record(i, 1000)).expect("append");
                    i += 1;
                }
                wal.commit().await.expect("commit");
            }
        }
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let start = Instant::now();
            let storage = DmaStorage::open(dir.path(), DmaStorageOptions::default()).await.expect("storage");
            let config = WalConfig { segment_size_bytes: SEGMENT_BYTES, ..WalConfig::default() };
            let mut n = 0u64;
            let (_wal, _) = Wal::open(storage, config, |_, _| n += 1).await.expect("recover");
            total += start.elapsed();
            assert!(n > 0);
        }
        total
    })
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    for tasks in [1u64, 64] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("append_commit/{tasks}"), |b| b.iter_custom(|iters| append_commit(iters, tasks)));
    }
    let bytes = 64u64 << 20;
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.bench_function("recovery_64mib", |b| b.iter_custom(|iters| recovery(iters, bytes)));
    g.finish();
}

criterion_group!(wal, benches);
criterion_main!(wal);
