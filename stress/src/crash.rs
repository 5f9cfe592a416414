//! Crash mode (extension point, not implemented yet): load, `kill -9`, restart, verify that no
//! acknowledged message was lost. The durability and queue issues fill this in.
//!
//! Intended shape, reusing the pieces that exist:
//! 1. [`crate::brokers::RunningBroker::start`] fluxd with a data directory that survives the kill
//!    (today `start` makes a fresh temporary one; add a variant taking the directory).
//! 2. Publish QoS 1 with [`crate::load`]'s publisher, recording every packet id whose PUBACK
//!    arrived (the acknowledged set) — the ack reader in `load.rs` is where to record it.
//! 3. `kill -9` the broker pid at a random point ([`RunningBroker::pid`]), restart it on the same
//!    directory and port.
//! 4. Reconnect a persistent-session subscriber (or consume the `$queue/...` queue), read until
//!    quiet, and check acknowledged ⊆ received; report losses and duplicates as JSON.
//!
//! [`RunningBroker::pid`]: crate::brokers::RunningBroker::pid

pub fn run() -> anyhow::Result<()> {
    anyhow::bail!(
        "crash mode is not implemented yet: it lands with the durability issue (see stress/src/crash.rs)"
    )
}
