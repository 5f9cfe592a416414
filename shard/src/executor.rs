//! Executor bootstrap: start-up checks (io_uring, RLIMIT_MEMLOCK) and one pinned glommio
//! `LocalExecutor` per shard.
//!
//! Where it lives: called once from the main thread (the `fluxd` start-up path). Each shard's
//! future is built *on its executor thread* by `make`, so it may hold `Rc`s and other `!Send`
//! state. A per-shard `Send` value (its [`crate::mesh::MeshEndpoints`], a listener config, ...)
//! gets in through [`run_shards_with`]: pass a `Vec` with one value per shard and `make` receives
//! shard `i`'s value by move. [`run_shards`] is the same without per-shard values.
//!
//! ```no_run
//! use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
//! use flux_shard::mesh::build_mesh;
//! let spec = ExecutorSpec { shards: 4, io_memory_bytes: 2 << 20 };
//! let endpoints = build_mesh::<u64>(spec.shards, 1024);
//! run_shards_with(spec, Pinning::PerCpu, endpoints, |me, endpoints| async move {
//!     let (mesh, inbound) = endpoints.connect().await;
//!     inbound.spawn_drains(None, |_from, _batch| {});
//!     let _ = (me, mesh);
//! })
//! .unwrap();
//! ```

use std::future::Future;
use std::sync::mpsc;

use flux_core::ShardId;
use glommio::{LocalExecutorBuilder, Placement};

/// How many executors to start and how much io memory (registered DMA buffers) each gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecutorSpec {
    pub shards: u16,
    /// Per executor. glommio registers this buffer in each of its three io_uring rings, so it
    /// counts three times against RLIMIT_MEMLOCK. glommio's floor is 64 KiB.
    pub io_memory_bytes: usize,
}

/// Where each executor thread runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pinning {
    /// Shard `i` is pinned to the `i % n`-th CPU this process may run on (its affinity mask).
    PerCpu,
    /// Not pinned (tests, oversubscribed machines).
    Unbound,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("--shards must be at least 1")]
    NoShards,
    #[error("{per_shard} per-shard values given for {shards} shards")]
    ShardValueCount { shards: u16, per_shard: usize },
    #[error("{shard}: the executor could not be spawned: {reason}")]
    Spawn { shard: ShardId, reason: String },
    #[error("{shard}: the executor failed: {reason}")]
    Failed { shard: ShardId, reason: String },
    #[error("{shard}: the executor panicked: {message}")]
    Panicked { shard: ShardId, message: String },
    #[error(transparent)]
    Memlock(#[from] MemlockError),
}

/// Starts `spec.shards` executors, one thread each, pinned per CPU, named `flux-shard-{i}`
/// (glommio appends `-{its executor id}` to the thread name), each running `make(ShardId(i))`.
/// Raises RLIMIT_MEMLOCK first (see [`ensure_memlock`]). Returns when all shards have finished,
/// or as soon as one fails to start, fails or panics (an error naming the shard; the other
/// shards keep running, the caller is expected to exit the process).
pub fn run_shards<F, Fut>(spec: ExecutorSpec, make: F) -> Result<(), ExecutorError>
where
    F: Fn(ShardId) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let unit = vec![(); usize::from(spec.shards)];
    run_shards_with(spec, Pinning::PerCpu, unit, move |id, ()| make(id))
}

/// [`run_shards`] with a choice of pinning and one `Send` value per shard, moved into shard `i`'s
/// `make` call (`per_shard.len()` must equal `spec.shards`).
pub fn run_shards_with<S, F, Fut>(
    spec: ExecutorSpec,
    pinning: Pinning,
    per_shard: Vec<S>,
    make: F,
) -> Result<(), ExecutorError>
where
    S: Send + 'static,
    F: Fn(ShardId, S) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    if spec.shards == 0 {
        return Err(ExecutorError::NoShards);
    }
    if per_shard.len() != usize::from(spec.shards) {
        return Err(ExecutorError::ShardValueCount {
            shards: spec.shards,
            per_shard: per_shard.len(),
        });
    }
    let memlock = ensure_memlock(spec.shards, spec.io_memory_bytes)?;
    let cpus = allowed_cpus();

    // One watcher thread per executor joins it and reports here, so a failure is seen at once
    // whatever the order in which shards end.
    let (done_tx, done_rx) = mpsc::channel::<(ShardId, Result<(), ExecutorError>)>();
    for (i, value) in (0..spec.shards).zip(per_shard) {
        let id = ShardId(i);
        let placement = match (pinning, cpus.is_empty()) {
            (Pinning::PerCpu, false) => Placement::Fixed(cpus[usize::from(i) % cpus.len()]),
            _ => Placement::Unbound,
        };
        let make = make.clone();
        let spawned = LocalExecutorBuilder::new(placement)
            .name(&format!("flux-shard-{i}"))
            .io_memory(memlock.io_memory_bytes)
            .spawn(move || make(id, value));
        let handle = match spawned {
            Ok(h) => h,
            Err(e) => {
                return Err(ExecutorError::Spawn {
                    shard: id,
                    reason: e.to_string(),
                })
            }
        };
        let done_tx = done_tx.clone();
        let watcher = std::thread::Builder::new()
            .name(format!("flux-shard-{i}-watch"))
            .spawn(move || {
                let outcome = match handle.join() {
                    Ok(()) => Ok(()),
                    Err(glommio::GlommioError::BuilderError(
                        glommio::BuilderErrorKind::ThreadPanic(p),
                    )) => Err(ExecutorError::Panicked {
                        shard: id,
                        message: panic_message(p.as_ref()),
                    }),
                    Err(e) => Err(ExecutorError::Failed {
                        shard: id,
                        reason: e.to_string(),
                    }),
                };
                // The receiver only goes away once run_shards has returned; nothing left to tell.
                let _ = done_tx.send((id, outcome));
            });
        if let Err(e) = watcher {
            return Err(ExecutorError::Spawn {
                shard: id,
                reason: format!("watcher thread: {e}"),
            });
        }
    }
    drop(done_tx);
    for _ in 0..spec.shards {
        match done_rx.recv() {
            Ok((_, Ok(()))) => {}
            Ok((shard, Err(e))) => {
                tracing::error!(%shard, error = %e, "shard executor ended with an error");
                return Err(e);
            }
            // Every watcher sends exactly once before dropping its sender.
            Err(_) => break,
        }
    }
    Ok(())
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// CPUs in this process's affinity mask, ascending; empty if it cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most size_of::<cpu_set_t>().
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IoUringError {
    #[error("io_uring is not available: this kernel does not implement it (ENOSYS); Flux needs Linux 5.8 or newer with CONFIG_IO_URING")]
    NotImplemented,
    #[error("io_uring is not permitted (EPERM): it may be disabled by the kernel.io_uring_disabled sysctl, a seccomp profile, or the container runtime; allow it or run on a host that does")]
    NotPermitted,
    #[error("io_uring_setup failed: {0}")]
    Other(std::io::Error),
}

/// Checks that this process can create an io_uring (a one-entry ring, closed again at once).
pub fn check_io_uring() -> Result<(), IoUringError> {
    // struct io_uring_params is 120 bytes of u32/u64 fields; the kernel wants it zeroed.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup(entries, params*) reads and writes only the 120-byte params struct.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        unsafe { libc::close(fd as libc::c_int) };
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => Err(IoUringError::NotImplemented),
        Some(libc::EPERM) | Some(libc::EACCES) => Err(IoUringError::NotPermitted),
        _ => Err(IoUringError::Other(err)),
    }
}

/// glommio refuses to start an executor below this RLIMIT_MEMLOCK.
pub const GLOMMIO_MIN_MEMLOCK_BYTES: u64 = 512 * 1024;
/// glommio's floor for an executor's io memory.
pub const GLOMMIO_MIN_IO_MEMORY_BYTES: usize = 64 * 1024;
/// Rings glommio registers each executor's io memory in (main, poll, latency).
const REGISTRATIONS_PER_EXECUTOR: u64 = 3;
/// Headroom per shard for the rings themselves and other locked pages.
const MEMLOCK_MARGIN_PER_SHARD_BYTES: u64 = 1024 * 1024;

/// What [`ensure_memlock`] settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemlockOutcome {
    /// The soft RLIMIT_MEMLOCK now in force (`u64::MAX` for unlimited).
    pub limit_bytes: u64,
    /// The io memory each executor should get: the requested amount, or less if the limit
    /// could not be raised far enough.
    pub io_memory_bytes: usize,
    pub raised: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MemlockError {
    #[error("RLIMIT_MEMLOCK is {limit_bytes} bytes and could not be raised ({reason}); glommio needs at least {GLOMMIO_MIN_MEMLOCK_BYTES}. Raise `ulimit -l` or run as root")]
    TooLow { limit_bytes: u64, reason: String },
    #[error("cannot read RLIMIT_MEMLOCK: {0}")]
    Read(std::io::Error),
}

/// Makes RLIMIT_MEMLOCK cover `shards` executors with `io_memory_bytes` each (three
/// registrations per executor, plus a margin), raising the limit when allowed (root). If it
/// cannot be raised enough, logs a warning and returns a lowered io memory that fits the limit.
pub fn ensure_memlock(shards: u16, io_memory_bytes: usize) -> Result<MemlockOutcome, MemlockError> {
    let shards64 = u64::from(shards.max(1));
    let want_io = io_memory_bytes.max(GLOMMIO_MIN_IO_MEMORY_BYTES) as u64;
    let margin = shards64 * MEMLOCK_MARGIN_PER_SHARD_BYTES;
    let required = shards64
        .saturating_mul(REGISTRATIONS_PER_EXECUTOR)
        .saturating_mul(want_io)
        .saturating_add(margin)
        .max(GLOMMIO_MIN_MEMLOCK_BYTES);

    let (cur, max) = get_memlock().map_err(MemlockError::Read)?;
    if cur >= required {
        return Ok(MemlockOutcome {
            limit_bytes: cur,
            io_memory_bytes,
            raised: false,
        });
    }
    // First try to raise both limits (needs CAP_SYS_RESOURCE), then the soft one up to the hard.
    let mut last_err = String::new();
    for (new_cur, new_max) in [(required, max.max(required)), (required.min(max), max)] {
        if new_cur <= cur {
            continue;
        }
        match set_memlock(new_cur, new_max) {
            Ok(()) => {
                if new_cur >= required {
                    tracing::info!(from = cur, to = new_cur, "raised RLIMIT_MEMLOCK");
                    return Ok(MemlockOutcome {
                        limit_bytes: new_cur,
                        io_memory_bytes,
                        raised: true,
                    });
                }
                return lowered(new_cur, shards64, margin, io_memory_bytes, true);
            }
            Err(e) => last_err = e.to_string(),
        }
    }
    if cur < GLOMMIO_MIN_MEMLOCK_BYTES {
        return Err(MemlockError::TooLow {
            limit_bytes: cur,
            reason: last_err,
        });
    }
    lowered(cur, shards64, margin, io_memory_bytes, false)
}

fn lowered(
    limit: u64,
    shards: u64,
    margin: u64,
    requested: usize,
    raised: bool,
) -> Result<MemlockOutcome, MemlockError> {
    let per_exec = limit.saturating_sub(margin) / (shards * REGISTRATIONS_PER_EXECUTOR);
    let fit = (per_exec as usize / 4096 * 4096).max(GLOMMIO_MIN_IO_MEMORY_BYTES);
    tracing::warn!(
        limit_bytes = limit,
        requested_io_memory_bytes = requested,
        io_memory_bytes = fit,
        "RLIMIT_MEMLOCK cannot cover the requested io memory; lowering it per executor"
    );
    Ok(MemlockOutcome {
        limit_bytes: limit,
        io_memory_bytes: fit.min(requested.max(GLOMMIO_MIN_IO_MEMORY_BYTES)),
        raised,
    })
}

fn get_memlock() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((from_rlim(r.rlim_cur), from_rlim(r.rlim_max)))
}

fn set_memlock(cur: u64, max: u64) -> std::io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: to_rlim(cur),
        rlim_max: to_rlim(max),
    };
    // SAFETY: setrlimit reads one rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn from_rlim(v: libc::rlim_t) -> u64 {
    if v == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        v
    }
}

fn to_rlim(v: u64) -> libc::rlim_t {
    if v == u64::MAX {
        libc::RLIM_INFINITY
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn spec(shards: u16) -> ExecutorSpec {
        ExecutorSpec {
            shards,
            io_memory_bytes: 128 * 1024,
        }
    }

    #[test]
    fn every_shard_runs_once_with_its_value() {
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        run_shards_with(
            spec(3),
            Pinning::PerCpu,
            vec![1usize, 10, 100],
            move |id, v| {
                let s = s.clone();
                async move {
                    assert_eq!(v, 10usize.pow(u32::from(id.0)));
                    s.fetch_add(v, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 111);
    }

    #[test]
    fn a_panicking_shard_is_reported_by_id() {
        let err = run_shards_with(
            spec(2),
            Pinning::Unbound,
            vec![(), ()],
            |id, ()| async move {
                if id == ShardId(1) {
                    panic!("boom on purpose");
                }
            },
        )
        .unwrap_err();
        match err {
            ExecutorError::Panicked { shard, message } => {
                assert_eq!(shard, ShardId(1));
                assert!(message.contains("boom on purpose"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(matches!(
            run_shards(spec(0), |_| async {}),
            Err(ExecutorError::NoShards)
        ));
        assert!(matches!(
            run_shards_with(spec(2), Pinning::Unbound, vec![()], |_, ()| async {}),
            Err(ExecutorError::ShardValueCount {
                shards: 2,
                per_shard: 1
            })
        ));
    }

    #[test]
    fn io_uring_is_available_here() {
        check_io_uring().unwrap();
    }

    #[test]
    fn memlock_covers_or_lowers_io_memory() {
        let out = ensure_memlock(2, 1 << 20).unwrap();
        assert!(out.io_memory_bytes >= GLOMMIO_MIN_IO_MEMORY_BYTES);
        assert!(out.io_memory_bytes <= 1 << 20);
        if out.io_memory_bytes == 1 << 20 {
            assert!(out.limit_bytes >= 2 * 3 * (1 << 20));
        }
    }

    #[test]
    fn lowered_io_memory_fits_the_limit() {
        let out = lowered(16 << 20, 4, 4 << 20, 8 << 20, false).unwrap();
        assert_eq!(out.io_memory_bytes, 1 << 20);
        assert!(4 * 3 * out.io_memory_bytes as u64 + (4 << 20) <= 16 << 20);
    }
}
