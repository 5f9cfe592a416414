//! flux-net: listeners and connection drivers.

use std::net::SocketAddr;
use std::sync::Arc;

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flux_core::{Limits, ShardId};
use flux_shard::broker::Broker;
use flux_shard::durable::{shard_log_dir, DurabilityConfig, Replayed, ShardLog, WallClock};
use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
use flux_shard::handover::SocketHandover;
use flux_shard::mesh::{build_mesh, MeshEndpoints};
use flux_shard::msg::ShardMsg;
use glommio::net::TcpListener;

pub mod admin;
pub mod conn;
mod shutdown;

pub use shutdown::Shutdown;

/// Everything the broker runtime needs to start. The CLI builds it from flags and `fluxd.toml`.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// MQTT listener address; port 0 picks a free port (shard 0 binds first, the others reuse its
    /// port). The bound address is logged as `mqtt listener bound addr=...`.
    pub mqtt_listen: SocketAddr,
    /// Number of shards (executors), each pinned to a CPU.
    pub shards: u16,
    pub limits: Limits,
    /// Accept clients without credentials. fluxd refuses to start a non-loopback listener without
    /// authentication unless this is set.
    pub allow_anonymous: bool,
    /// Data directory (already created, checked writable and locked by the CLI).
    pub data_dir: std::path::PathBuf,
    /// io_uring registered-buffer memory per executor, in bytes (glommio `io_memory`). The CLI
    /// raises RLIMIT_MEMLOCK to cover `shards * io_memory_bytes` or lowers this value.
    pub io_memory_bytes: usize,
    /// The per-shard write-ahead logs under `data_dir` (`wal-shard-N`).
    pub durability: DurabilityConfig,
    /// Durable queues declared in the config file.
    pub queues: Vec<flux_shard::broker::queues::QueueSpec>,
    /// Admin endpoint (HTTP + JSON), served by shard 0; `None`: off.
    pub admin_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind MQTT listener on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start shard executor: {0}")]
    Executor(String),
    #[error("cannot recover shard {shard}'s write-ahead log in {dir}: {reason}")]
    Recovery { shard: u16, dir: String, reason: String },
}

/// Run the broker until `shutdown` is requested, then disconnect clients (MQTT 5: DISCONNECT 0x8B
/// Server shutting down) and return. Blocks the calling thread.
pub fn run(config: BrokerConfig, shutdown: Shutdown) -> Result<(), StartError> {
    let shards = config.shards.max(1);
    let endpoints = build_mesh::<ShardMsg>(shards, config.limits.ring_capacity.max(1));
    let shared = Arc::new(Shared {
        config,
        shutdown,
        connections: Arc::new(AtomicUsize::new(0)),
        bound: Mutex::new(None),
        bound_cv: Condvar::new(),
        error: Mutex::new(None),
        restored: AtomicUsize::new(0),
    });
    let spec = ExecutorSpec { shards, io_memory_bytes: shared.config.io_memory_bytes };
    let s = shared.clone();
    let outcome = run_shards_with(spec, Pinning::PerCpu, endpoints, move |id, ep| shard_main(id, ep, s.clone()));
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    outcome.map_err(|e| StartError::Executor(e.to_string()))
}

/// How often each shard closes silent connections (keep alive), publishes due wills and ends
/// expired sessions: the granularity of those deadlines.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(500);

/// Start-up state shared by the shard threads (not the data path: touched once per shard).
struct Shared {
    config: BrokerConfig,
    shutdown: Shutdown,
    connections: Arc<AtomicUsize>,
    /// The address shard 0 bound (its real port when asked for port 0), or why it could not.
    bound: Mutex<Option<Result<SocketAddr, String>>>,
    bound_cv: Condvar,
    error: Mutex<Option<StartError>>,
    /// Shards done restoring their state. No shard accepts before all are: a connection accepted
    /// by one shard may be handed over to another, whose sessions must be back first.
    restored: AtomicUsize,
}

fn shards_of(shared: &Shared) -> u16 {
    shared.config.shards.max(1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Shard 0 binds first (resolving port 0); the others then bind the same address, and the
/// kernel spreads accepts over them (SO_REUSEPORT).
fn bind_listener(me: ShardId, shared: &Shared) -> Option<TcpListener> {
    let want = shared.config.mqtt_listen;
    if me.0 == 0 {
        let result = TcpListener::bind(want).map_err(|e| std::io::Error::other(e.to_string()));
        let report = match &result {
            Ok(l) => l.local_addr().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        *lock(&shared.bound) = Some(report);
        shared.bound_cv.notify_all();
        match result {
            Ok(l) => Some(l),
            Err(source) => {
                *lock(&shared.error) = Some(StartError::Bind { addr: want, source });
                None
            }
        }
    } else {
        let mut bound = lock(&shared.bound);
        while bound.is_none() {
            bound = shared.bound_cv.wait(bound).unwrap_or_else(|p| p.into_inner());
        }
        let addr = match bound.as_ref() {
            Some(Ok(addr)) => *addr,
            _ => return None,
        };
        drop(bound);
        match TcpListener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                *lock(&shared.error) =
                    Some(StartError::Bind { addr, source: std::io::Error::other(e.to_string()) });
                None
            }
        }
    }
}

async fn shard_main(me: ShardId, endpoints: MeshEndpoints<ShardMsg>, shared: Arc<Shared>) {
    // Bind before connecting the mesh: shard 0 never waits on anyone before binding.
    let listener = bind_listener(me, &shared);
    let (mesh, inbound) = endpoints.connect().await;
    let Some(listener) = listener else {
        shared.shutdown.request();
        return;
    };
    if me.0 == 0 {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, shards = shared.config.shards, "mqtt listener bound");
        }
    }
    // Recover this shard's log before serving anyone: its sessions and retained messages come
    // back, and its subscriptions are in every shard's route table before the first accept.
    let clock = WallClock::now();
    let dir = shard_log_dir(&shared.config.data_dir, me);
    let mut replayed = Replayed::default();
    let log = match ShardLog::open(dir.clone(), &shared.config.durability, clock, |r| replayed.apply(r, &clock)).await {
        Ok(log) => Rc::new(log),
        Err(e) => {
            tracing::error!(shard = %me, dir = %dir.display(), error = %e, "WAL recovery failed");
            *lock(&shared.error) =
                Some(StartError::Recovery { shard: me.0, dir: dir.display().to_string(), reason: e.to_string() });
            shared.shutdown.request();
            shared.restored.fetch_add(1, Ordering::AcqRel);
            // Keep answering the mesh so the other shards' start-up never waits on this one.
            let m = mesh.clone();
            inbound.spawn_drains(None, move |from, batch| {
                for msg in batch {
                    if let ShardMsg::RouteUpdate { req: Some(req), .. } = msg {
                        m.send(from, ShardMsg::Ack { req });
                    }
                }
            });
            return;
        }
    };
    let broker = Rc::new_cyclic(|weak: &std::rc::Weak<Broker>| {
        let weak = weak.clone();
        let on_handover = Box::new(move |h: SocketHandover| {
            let Some(broker) = weak.upgrade() else { return };
            match h.into_stream() {
                Ok((stream, bytes)) => {
                    glommio::spawn_local(conn::serve(broker, stream, bytes)).detach();
                }
                Err(e) => tracing::warn!(error = %e, "cannot adopt handed-over socket"),
            };
        });
        Broker::new(mesh.clone(), shared.config.limits.clone(), shared.connections.clone(), on_handover, Some(log.clone()))
    });
    let b = broker.clone();
    inbound.spawn_drains(None, move |from, batch| b.on_shard_msgs(from, batch));
    glommio::spawn_local(broker.clone().run_confirmations()).detach();
    glommio::spawn_local(broker.clone().run_checkpoints()).detach();
    glommio::spawn_local(broker.clone().run_pumps()).detach();
    glommio::spawn_local(log.clone().run_flusher()).detach();
    glommio::spawn_local(log.clone().run_spare()).detach();
    for wait in broker.restore(replayed, Instant::now()) {
        wait.done().await;
    }
    for q in &shared.config.queues {
        broker.declare_configured_queue(q.name.clone(), q.config.clone(), q.filters.clone());
    }
    let spill_dir = flux_shard::spill::spill_dir(&shared.config.data_dir, me.0);
    match broker.open_spill(spill_dir.clone()) {
        Ok(()) => {
            glommio::spawn_local(broker.clone().run_spills()).detach();
        }
        Err(e) => tracing::error!(shard = %me, dir = %spill_dir.display(), error = %e,
            "spill files cannot be opened: queue backlogs stay in memory"),
    }
    shared.restored.fetch_add(1, Ordering::AcqRel);
    while shared.restored.load(Ordering::Acquire) < usize::from(shards_of(&shared)) && !shared.shutdown.is_requested() {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    if me.0 == 0 {
        tracing::info!("state restored on every shard; accepting clients");
        if let Some(addr) = shared.config.admin_listen {
            // Not fatal: the broker serves clients without it (and a second fluxd on the same
            // machine may hold the default port).
            match TcpListener::bind(addr) {
                Ok(l) => {
                    if let Ok(bound) = l.local_addr() {
                        tracing::info!(addr = %bound, "admin listener bound");
                    }
                    glommio::spawn_local(admin::serve(broker.clone(), l)).detach();
                }
                Err(e) => tracing::warn!(%addr, error = %e, "admin endpoint not started: cannot bind"),
            }
        }
    }

    let b = broker.clone();
    let housekeeping = glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(HOUSEKEEPING_INTERVAL).await;
            b.housekeeping(Instant::now());
        }
    })
    .detach();

    let b = broker.clone();
    let accept = glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    glommio::spawn_local(conn::serve(b.clone(), stream, Bytes::new())).detach();
                }
                Err(e) => {
                    // Out of fds or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .detach();

    shared.shutdown.wait().await;
    accept.cancel();
    housekeeping.cancel();
    broker.shutdown();
    let deadline = Instant::now() + Duration::from_secs(3);
    while broker.connected_sessions() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if !log.flush().await {
        tracing::error!(shard = %me, "final WAL flush failed");
    }
    tracing::info!(shard = %me, "shard stopped");
}
