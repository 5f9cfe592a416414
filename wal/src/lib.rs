//! flux-wal: the per-shard write-ahead log of Flux.
//!
//! One [`Wal`] per shard, owned by that shard's executor and used only from it (it is `!Send`;
//! share it between the shard's tasks with `Rc`). A task [`append`](Wal::append)s records
//! (buffered, returns the record's [`Lsn`]), then awaits [`commit`](Wal::commit): concurrent
//! committers are grouped, one write and one `fdatasync` per group, and nobody is answered before
//! their group's sync returned. On start, [`Wal::open`] replays every record in LSN order through
//! a callback, truncates a torn tail, and refuses to start on corruption before the tail.
//!
//! * [`frame`]: the on-disk frame (length, CRC32C, LSN, rkyv payload, 16-byte padding).
//! * [`record`]: the [`Record`]s the broker writes.
//! * [`storage`]: the [`Storage`] trait, [`DmaStorage`] (glommio O_DIRECT files) and
//!   [`MemStorage`] (in memory, with injected faults).
//! * `recovery`: the start-up scan and its torn-tail/corruption rules.
//! * `wal`: append, group commit, poisoning, reclamation.
//!
//! *Architecture invariant:* a commit returns `Ok` only after the sync of a write containing
//! every record it covers has returned `Ok`; after any write or sync error the log refuses all
//! further appends and commits until it is reopened through recovery.
//!
//! # Segments
//! A segment is a file of `segment_size_bytes` (default 64 MiB) named after the LSN of its first
//! record (`00000000000000000000.wal`), created zero-filled. Frames are packed from offset 0;
//! a group commit never spans two segments (a group that does not fit starts a new segment), so
//! the rest of a full segment stays zero.
//!
//! # Repairing corruption
//! [`WalError::Corrupt`] names a segment and a byte offset: the first frame that is bad while
//! later data is valid. Everything from that offset on is suspect. To start anyway, losing the
//! records from there on, call [`repair_truncate`] with that segment and offset (it zeroes the
//! segment from the offset and deletes later segments); by hand, with the shard stopped:
//! `truncate -s OFFSET SEGMENT_FILE` and delete the segment files with larger names.

pub mod frame;
pub mod join;
pub mod record;
mod recovery;
pub mod storage;
mod wal;

pub use record::{ArchivedOutboundState, ArchivedRecord, ArchivedStoredMessage};
pub use record::{OutboundState, Record, StoredMessage, StoredQueueConfig};
pub use recovery::{repair_truncate, RecoveryReport, TruncatedTail};
pub use storage::{DmaStorage, DmaStorageOptions, MemStorage, Storage};
pub use wal::{DiskUsage, ReclaimReport, Wal};

/// Log sequence number: the position of a record in the shard's log, starting at 0 and growing
/// by one per record, never reused while the log lives (reclamation removes old numbers only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Default segment size.
pub const DEFAULT_SEGMENT_SIZE_BYTES: u64 = 64 << 20;
/// Smallest segment size accepted.
pub const MIN_SEGMENT_SIZE_BYTES: u64 = 2 * storage::BLOCK as u64;
/// Largest segment size accepted (recovery holds one whole segment in memory).
pub const MAX_SEGMENT_SIZE_BYTES: u64 = 1 << 30;

/// Tuning of a [`Wal`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Size of each segment file, a multiple of 4096 between [`MIN_SEGMENT_SIZE_BYTES`] and
    /// [`MAX_SEGMENT_SIZE_BYTES`]. Costs that much disk per segment, and that much memory while
    /// recovery scans one segment.
    pub segment_size_bytes: u64,
    /// Most bytes of frames written by one group commit (more waits for the next group). Bounds
    /// the write buffer of a flush: this much memory while a flush is in flight.
    pub max_group_bytes: usize,
    /// Most bytes of appended, not yet durable frames; [`Wal::append`] refuses beyond it with
    /// [`WalError::Backpressure`]. Memory: up to this much per shard.
    pub max_pending_bytes: usize,
    /// Size of each read while recovering. With glommio, reads are fastest when
    /// `recovery_read_chunk_bytes * recovery_read_depth` fits the executor's `io_memory` (its
    /// pre-registered buffers); beyond it glommio allocates (and page-faults) a buffer per read.
    pub recovery_read_chunk_bytes: usize,
    /// Recovery reads in flight at once.
    pub recovery_read_depth: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            segment_size_bytes: DEFAULT_SEGMENT_SIZE_BYTES,
            max_group_bytes: 4 << 20,
            max_pending_bytes: 32 << 20,
            recovery_read_chunk_bytes: 1 << 20,
            recovery_read_depth: 4,
        }
    }
}

/// Errors of the log. Each says what the owner must do: `Poisoned` and `Io` mean the log is not
/// trusted until reopened (refuse durable work); `Backpressure` means wait for a commit and retry;
/// `Corrupt` stops the start (see the crate docs for the repair).
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A storage operation failed; the log is now poisoned.
    #[error("WAL {op} failed on {segment}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The segment (file path) concerned.
        segment: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An earlier write or sync failed; nothing more is accepted until the log is reopened.
    #[error("WAL is poisoned by an earlier failure ({0}); reopen it through recovery")]
    Poisoned(String),
    /// Corruption before the tail: the record at `offset` of `segment` is bad while later data is
    /// valid. See the crate docs ("Repairing corruption").
    #[error("WAL corrupt at {segment} offset {offset}: {reason}; to start anyway, losing everything from there on, truncate the log at that offset (flux_wal::repair_truncate)")]
    Corrupt {
        /// The segment (file path).
        segment: String,
        /// Segment id (first LSN), for [`repair_truncate`].
        segment_id: u64,
        /// Byte offset of the bad frame in the segment.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// More than `max_pending_bytes` are waiting for a commit.
    #[error("WAL has {pending_bytes} bytes awaiting commit (limit {limit_bytes}); commit first")]
    Backpressure {
        /// Bytes buffered now.
        pending_bytes: usize,
        /// The configured limit.
        limit_bytes: usize,
    },
    /// The record cannot be framed (too large for a segment, or not serializable).
    #[error("record cannot be written: {0}")]
    Record(String),
    /// The configuration is invalid.
    #[error("invalid WAL configuration: {0}")]
    Config(String),
}
