//! `fluxd`: reads flags and the config file, runs the start-up checks, installs signal handlers
//! and hands over to `flux_net::run` until a signal asks it to stop.

mod admin_client;
mod checks;
mod config;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;

use crate::config::{Cli, Config, LogFormat};

#[cfg(not(debug_assertions))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a configuration error found before logging is set up (as clap does for usage).
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failed start-up check or a runtime error.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(config::Command::Queue { admin, action }) = &cli.command {
        return match admin_client::run(admin, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fluxd: error: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    let rust_log = std::env::var("RUST_LOG").ok();
    let config = match config::load(&cli, rust_log, config::available_cores()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("fluxd: error: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("fluxd: error: {e:#}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(mut config: Config) -> anyhow::Result<()> {
    if !config.transparent_huge_pages {
        checks::disable_transparent_huge_pages();
    }
    checks::check_kernel_version()?;
    checks::check_io_uring()?;
    // Raises RLIMIT_MEMLOCK, or lowers io memory to fit it (both logged by flux_shard).
    let io_memory_bytes = checks::ensure_memlock(config.shards, config.io_memory_bytes)?;
    config.io_memory_bytes = io_memory_bytes;
    // Held until run() returns: the process lifetime.
    let lock = checks::prepare_data_dir(&config.data_dir)?;

    let shutdown = install_signal_handlers()?;

    tracing::info!(
        config_file = %config.config_file.as_deref().map_or("none".into(), |p| p.display().to_string()),
        mqtt_listen = %config.mqtt_listen,
        data_dir = %config.data_dir.display(),
        shards = config.shards,
        allow_anonymous = config.effective_allow_anonymous(),
        io_memory_bytes = config.io_memory_bytes,
        log_level = %config.log_level,
        log_format = %config.log_format,
        limits = ?config.limits,
        lock_file = %lock.path.display(),
        pid = std::process::id(),
        version = env!("CARGO_PKG_VERSION"),
        "effective config"
    );

    flux_net::run(config.broker_config(), shutdown)
        .context("broker runtime failed")?;
    tracing::info!("fluxd stopped");
    drop(lock);
    Ok(())
}

/// The first SIGINT/SIGTERM requests the returned shutdown (graceful: the runtime disconnects
/// clients and returns); a second one ends the process at once from the signal handler.
fn install_signal_handlers() -> anyhow::Result<flux_net::Shutdown> {
    let flag = Arc::new(AtomicBool::new(false));
    for (signal, code) in [(SIGINT, 130), (SIGTERM, 143)] {
        // Registered first, so it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(signal, code, Arc::clone(&flag))
            .context("cannot install signal handler")?;
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .context("cannot install signal handler")?;
    }
    let shutdown = flux_net::Shutdown::new(flag);
    let waker = shutdown.clone();
    // A signal handler can only set the flag; this thread logs the signal and wakes the shards
    // (which park on the request instead of polling the flag).
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handler")?;
    std::thread::Builder::new()
        .name("fluxd-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                tracing::info!(
                    signal = name,
                    "shutting down gracefully; send the signal again to exit immediately"
                );
                waker.request();
            }
        })
        .context("cannot start signal thread")?;
    Ok(shutdown)
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("invalid log level {:?}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}
