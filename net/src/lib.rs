//! flux-net: listeners and connection drivers.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use flux_core::Limits;

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
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind MQTT listener on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start shard executor: {0}")]
    Executor(String),
}

/// Run the broker until `shutdown` becomes true, then disconnect clients (MQTT 5: DISCONNECT 0x8B
/// Server shutting down) and return. Blocks the calling thread.
pub fn run(config: BrokerConfig, shutdown: Arc<AtomicBool>) -> Result<(), StartError> {
    let _ = (config, shutdown);
    todo!("runtime in progress")
}
