//! Helpers shared by the WAL integration tests.
#![allow(dead_code)]

use std::future::Future;

use flux_wal::{Lsn, MemStorage, Record, RecoveryReport, StoredMessage, Wal, WalConfig, WalError};

/// A record whose content is derived from `i` (size varies with `i`).
pub fn rec(i: u64) -> Record {
    match i % 4 {
        0 => Record::MessageEnqueued {
            client_id: format!("client-{}", i % 7),
            msg_id: i,
            message: StoredMessage {
                topic: format!("t/{i}"),
                qos: 1,
                retain: false,
                payload: vec![(i % 251) as u8; (i % 300) as usize],
                properties: vec![],
                expires_at_ms: None,
            },
        },
        1 => Record::RetainedClear {
            topic: format!("r/{i}"),
        },
        2 => Record::Outbound {
            client_id: format!("client-{}", i % 7),
            msg_id: i,
            state: flux_wal::OutboundState::Sent {
                packet_id: (i % 65535 + 1) as u16,
            },
        },
        _ => Record::Checkpoint {
            kind: i as u32,
            data: vec![0x5A; (i % 900) as usize],
        },
    }
}

pub fn small_config(segment_size_bytes: u64) -> WalConfig {
    WalConfig {
        segment_size_bytes,
        max_group_bytes: 64 << 10,
        max_pending_bytes: 1 << 20,
        ..WalConfig::default()
    }
}

/// A reopened log, what it replayed, and its recovery report.
pub type Opened = (Wal<MemStorage>, Vec<(Lsn, Record)>, RecoveryReport);

/// Opens the log and collects what recovery replays.
pub fn open_mem(storage: &MemStorage, config: WalConfig) -> Result<Opened, WalError> {
    let mut got = Vec::new();
    let (wal, report) =
        futures_lite::future::block_on(Wal::open(storage.clone(), config, |lsn, r| {
            got.push((lsn, r.to_record().expect("deserialize")))
        }))?;
    Ok((wal, got, report))
}

/// Polls all futures to completion, concurrently, on the current thread.
pub fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    futures_lite::future::block_on(flux_wal::join::join_all(futs))
}

/// glommio needs RLIMIT_MEMLOCK to cover its io_uring rings and registered buffers; raise the
/// soft limit to what the tests need (the hard limit allowing).
pub fn ensure_memlock(min_bytes: u64) {
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= min_bytes {
            return;
        }
        let want = if lim.rlim_max == libc::RLIM_INFINITY {
            min_bytes
        } else {
            min_bytes.min(lim.rlim_max)
        };
        lim.rlim_cur = want;
        let _ = libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim);
    }
}

/// Runs `f` on a fresh glommio executor with a small io_memory (keeps RLIMIT_MEMLOCK needs low).
pub fn run_glommio<T, F, Fut>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    ensure_memlock(16 << 20);
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(f)
        .expect("start glommio executor")
        .join()
        .expect("executor thread")
}
