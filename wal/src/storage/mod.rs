//! Where segments live: the [`Storage`] trait, a glommio O_DIRECT implementation
//! ([`DmaStorage`]) and an in-memory, fault-injecting twin for tests ([`MemStorage`]).
//!
//! A storage holds numbered segments (the number is the segment's first LSN). The log only ever
//! writes whole [`BLOCK`]s at block-aligned offsets, rewriting the partial last block of the
//! previous group with identical leading bytes, and asks for one `sync` per group commit.

mod dma;
mod mem;

pub use dma::{DmaStorage, DmaStorageOptions};
pub use mem::{CrashReport, MemStorage};

use std::io;
use std::ops::Deref;

/// The unit of writes: O_DIRECT alignment on the disks we target.
pub const BLOCK: usize = 4096;

/// Segment storage. All offsets and write lengths are multiples of [`BLOCK`].
///
/// Implementations are single-threaded (one per shard); futures need not be `Send`.
#[allow(async_fn_in_trait)] // one shard, one executor: no Send bound wanted.
pub trait Storage {
    /// A buffer returned by [`read`](Storage::read).
    type ReadBuf: Deref<Target = [u8]>;

    /// Ids of the existing segments, ascending.
    async fn list_segments(&self) -> io::Result<Vec<u64>>;

    /// Creates segment `id` with `size_bytes` reading as zeros (replacing any segment `id`), and
    /// makes its existence durable (directory entry synced) before returning.
    async fn create_segment(&self, id: u64, size_bytes: u64) -> io::Result<()>;

    /// Deletes segment `id`.
    async fn remove_segment(&self, id: u64) -> io::Result<()>;

    /// Current length of segment `id` in bytes.
    async fn segment_len(&self, id: u64) -> io::Result<u64>;

    /// Reads up to `len` bytes at `offset` (fewer at the end of the segment).
    async fn read(&self, id: u64, offset: u64, len: usize) -> io::Result<Self::ReadBuf>;

    /// Writes `data` at `offset` (both multiples of [`BLOCK`]). Not durable until `sync`.
    async fn write(&self, id: u64, offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes every completed write to segment `id` durable (fdatasync).
    async fn sync(&self, id: u64) -> io::Result<()>;

    /// How to name segment `id` in logs and errors (a file path for file storage).
    fn describe(&self, id: u64) -> String;

    /// Makes a spare segment of `size_bytes` ready ahead of time, so that the next
    /// [`create_segment`](Storage::create_segment) of that size only renames it (instead of
    /// allocating and zero-filling inside a group commit). Ok(false) when one is ready already
    /// or the storage has no use for it.
    async fn prepare_spare(&self, _size_bytes: u64) -> io::Result<bool> {
        Ok(false)
    }

    /// Whether a spare segment is ready (see [`prepare_spare`](Storage::prepare_spare)).
    fn has_spare(&self) -> bool {
        true
    }
}

/// File name of segment `id`: its first LSN, zero-padded so names sort like numbers.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.wal")
}

/// The id of a segment file name made by [`segment_file_name`], if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}
