//! Start-up scan: replay every record, truncate a torn tail, refuse corruption before the tail.
//!
//! Rules (see [`crate::frame`] for why they hold):
//! * Segments are read in id order; the first record of segment `id` must have LSN `id`, each
//!   next record the next LSN. A segment ends cleanly where a zero header starts a zero-filled
//!   remainder.
//! * The first bad frame (checksum, length, archive or LSN wrong, or non-zero garbage where the
//!   zero fill should be) ends the replay at `(segment, offset)`. It is **corruption** if valid
//!   data proves that the bad frame's group had been synced: a valid group-start frame later in
//!   the segment, or any valid frame in a later segment. Otherwise it is a **torn tail** (the last
//!   group commit, interrupted): the segment is zeroed from the offset, later (empty) segments are
//!   deleted, and this is logged.
//! * A bad frame where a segment's records end, when the next segment starts at the next LSN, is
//!   garbage in unused space: logged, no record is missing.
//! * A later segment whose first LSN does not follow is likewise corruption if it holds valid
//!   frames, and an unused leftover (deleted) otherwise.

use rkyv::util::AlignedVec;

use crate::frame::{self, Decoded, FRAME_ALIGN, HEADER_LEN};
use crate::record::ArchivedRecord;
use crate::storage::{Storage, BLOCK};
use crate::{Lsn, WalError};

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records replayed.
    pub records: u64,
    /// Segments read.
    pub segments: usize,
    /// Bytes of frames replayed.
    pub frame_bytes: u64,
    /// Bytes read from storage.
    pub bytes_read: u64,
    /// Time spent waiting for reads (the rest of recovery is checking and replaying).
    pub read_time: std::time::Duration,
    /// The LSN the next append gets.
    pub next_lsn: Lsn,
    /// Set when a torn tail was cut off.
    pub truncated: Option<TruncatedTail>,
    /// Segments deleted because they held nothing valid past the end of the log.
    pub removed_segments: Vec<u64>,
}

/// Where a torn tail was cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    /// Segment id.
    pub segment_id: u64,
    /// Byte offset where the log now ends.
    pub offset: u64,
    /// Bytes zeroed (up to the last non-zero byte found).
    pub zeroed_bytes: u64,
    /// Why the frame at `offset` was rejected.
    pub reason: String,
}

/// One segment as the writer resumes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegMeta {
    pub id: u64,
    pub used_bytes: u64,
}

pub(crate) struct Recovered {
    pub segments: Vec<SegMeta>,
    pub next_lsn: u64,
    /// Bytes of the last segment from the block holding its end up to its end.
    pub tail_block: Vec<u8>,
    pub report: RecoveryReport,
}

enum SegEnd {
    /// Frames up to `data_end`, zeros after.
    Clean { data_end: usize },
    /// A bad frame at `pos`.
    Stopped { pos: usize, reason: String },
}

/// Replays the frames of one segment buffer (16-aligned in memory).
fn scan_segment(
    seg: &[u8],
    expected: &mut u64,
    frame_bytes: &mut u64,
    on_record: &mut impl FnMut(Lsn, &ArchivedRecord),
) -> SegEnd {
    let mut pos = 0usize;
    loop {
        match frame::decode(seg, pos) {
            Decoded::Frame {
                lsn,
                record,
                frame_len,
                ..
            } => {
                if lsn != *expected {
                    return SegEnd::Stopped {
                        pos,
                        reason: format!("frame carries LSN {lsn} where {} was expected", *expected),
                    };
                }
                on_record(Lsn(lsn), record);
                *expected += 1;
                *frame_bytes += frame_len as u64;
                pos += frame_len;
            }
            Decoded::Empty => {
                let rest = seg.get(pos..).unwrap_or(&[]);
                return if rest.iter().all(|&b| b == 0) {
                    SegEnd::Clean { data_end: pos }
                } else {
                    SegEnd::Stopped {
                        pos,
                        reason: "zero header followed by non-zero bytes".to_string(),
                    }
                };
            }
            Decoded::Bad(bad) => {
                return SegEnd::Stopped {
                    pos,
                    reason: bad.to_string(),
                }
            }
        }
    }
}

/// First offset at or after `from` (16-aligned) holding a frame with a valid checksum, with
/// `group_start` set if `need_group_start`.
fn find_valid_frame(seg: &[u8], from: usize, need_group_start: bool) -> Option<usize> {
    let mut pos = from.div_ceil(FRAME_ALIGN) * FRAME_ALIGN;
    while pos + HEADER_LEN <= seg.len() {
        // Cheap pre-check: an all-zero length word is never a frame.
        if seg[pos..pos + 4] != [0, 0, 0, 0] {
            if let Some((_, group_start)) = frame::probe(seg, pos) {
                if group_start || !need_group_start {
                    return Some(pos);
                }
            }
        }
        pos += FRAME_ALIGN;
    }
    None
}

/// How recovery reads: chunk size and reads in flight (a single large O_DIRECT read leaves the
/// disk half idle). See [`crate::WalConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadPlan {
    pub chunk_bytes: usize,
    pub depth: usize,
}

impl Default for ReadPlan {
    fn default() -> Self {
        let c = crate::WalConfig::default();
        ReadPlan {
            chunk_bytes: c.recovery_read_chunk_bytes,
            depth: c.recovery_read_depth,
        }
    }
}

/// Reads a whole segment into `out` (16-aligned, reused across segments so its pages are
/// faulted in once), with up to `plan.depth` chunk reads in flight.
async fn read_segment<S: Storage>(
    storage: &S,
    id: u64,
    out: &mut AlignedVec<16>,
    plan: ReadPlan,
) -> Result<(), WalError> {
    let chunk_bytes = (plan.chunk_bytes.max(BLOCK) / BLOCK) * BLOCK;
    let io = |op, source| WalError::Io {
        op,
        segment: storage.describe(id),
        source,
    };
    let len = storage.segment_len(id).await.map_err(|e| io("stat", e))?;
    let len =
        usize::try_from(len).map_err(|_| io("read", std::io::Error::other("segment too large")))?;
    let len = len.div_ceil(BLOCK) * BLOCK;
    out.clear();
    out.reserve(len);
    let offsets: Vec<usize> = (0..len).step_by(chunk_bytes).collect();
    for window in offsets.chunks(plan.depth.max(1)) {
        let reads = window
            .iter()
            .map(|&off| storage.read(id, off as u64, chunk_bytes.min(len - off)))
            .collect();
        for (i, chunk) in crate::join::join_all(reads).await.into_iter().enumerate() {
            let chunk = chunk.map_err(|e| io("read", e))?;
            out.extend_from_slice(&chunk);
            let want = chunk_bytes.min(len - window[i]);
            if chunk.len() < want {
                // End of file before the stat'ed length (the file shrank): stop there.
                return Ok(());
            }
        }
    }
    Ok(())
}

/// First segment of `ids` holding any frame with a valid checksum, with its offset.
async fn find_valid_in_segments<S: Storage>(
    storage: &S,
    ids: &[u64],
    plan: ReadPlan,
) -> Result<Option<(u64, usize)>, WalError> {
    let mut buf = AlignedVec::<16>::new();
    for &id in ids {
        read_segment(storage, id, &mut buf, plan).await?;
        if let Some(off) = find_valid_frame(&buf, 0, false) {
            return Ok(Some((id, off)));
        }
    }
    Ok(None)
}

/// Zeroes `seg` (the current content of segment `id`) from `pos` to its last non-zero byte, and
/// syncs. Returns the number of bytes zeroed.
async fn zero_from<S: Storage>(
    storage: &S,
    id: u64,
    seg: &[u8],
    pos: usize,
) -> Result<u64, WalError> {
    let io = |op, source| WalError::Io {
        op,
        segment: storage.describe(id),
        source,
    };
    let pos = pos.min(seg.len());
    let Some(last) = seg[pos..].iter().rposition(|&b| b != 0) else {
        return Ok(0);
    };
    let end = (pos + last + 1).div_ceil(BLOCK) * BLOCK;
    let start = pos / BLOCK * BLOCK;
    let mut data = vec![0u8; end - start];
    data[..pos - start].copy_from_slice(&seg[start..pos]);
    storage
        .write(id, start as u64, &data)
        .await
        .map_err(|e| io("write", e))?;
    storage.sync(id).await.map_err(|e| io("sync", e))?;
    Ok((last + 1) as u64)
}

async fn remove_segments<S: Storage>(
    storage: &S,
    ids: &[u64],
    report: &mut RecoveryReport,
) -> Result<(), WalError> {
    for &id in ids {
        tracing::warn!(segment = %storage.describe(id), "removing WAL segment past the end of the log");
        storage.remove_segment(id).await.map_err(|e| WalError::Io {
            op: "remove",
            segment: storage.describe(id),
            source: e,
        })?;
        report.removed_segments.push(id);
    }
    Ok(())
}

pub(crate) async fn recover<S: Storage>(
    storage: &S,
    plan: ReadPlan,
    mut on_record: impl FnMut(Lsn, &ArchivedRecord),
) -> Result<Recovered, WalError> {
    let ids = storage.list_segments().await.map_err(|e| WalError::Io {
        op: "list",
        segment: storage.describe(0),
        source: e,
    })?;
    let mut report = RecoveryReport::default();
    let mut expected = ids.first().copied().unwrap_or(0);
    let mut segments: Vec<SegMeta> = Vec::new();
    let mut tail_block = Vec::new();
    let mut buf = AlignedVec::<16>::new();
    for (i, &id) in ids.iter().enumerate() {
        if id != expected {
            // The previous segment ended cleanly but this one does not continue it.
            if let Some((bad_id, off)) = find_valid_in_segments(storage, &ids[i..], plan).await? {
                return Err(WalError::Corrupt {
                    segment: storage.describe(id),
                    segment_id: id,
                    offset: 0,
                    reason: format!(
                        "segment starts at LSN {id} but the log ends at LSN {expected}; valid frames follow (segment {bad_id} offset {off})"
                    ),
                });
            }
            remove_segments(storage, &ids[i..], &mut report).await?;
            break;
        }
        let t0 = std::time::Instant::now();
        read_segment(storage, id, &mut buf, plan).await?;
        report.read_time += t0.elapsed();
        report.segments += 1;
        report.bytes_read += buf.len() as u64;
        match scan_segment(&buf, &mut expected, &mut report.frame_bytes, &mut on_record) {
            SegEnd::Clean { data_end } => {
                segments.push(SegMeta {
                    id,
                    used_bytes: data_end as u64,
                });
                tail_block = buf[data_end / BLOCK * BLOCK..data_end].to_vec();
            }
            SegEnd::Stopped { pos, reason } if ids.get(i + 1) == Some(&expected) => {
                // The next segment starts exactly at the next LSN: every record of this segment
                // was replayed, and what follows `pos` is garbage in its unused zero fill.
                tracing::warn!(
                    segment = %storage.describe(id),
                    offset = pos,
                    %reason,
                    "WAL segment has non-zero bytes after its last record (no record lost)"
                );
                segments.push(SegMeta {
                    id,
                    used_bytes: pos as u64,
                });
            }
            SegEnd::Stopped { pos, reason } => {
                if let Some(off) = find_valid_frame(&buf, pos + FRAME_ALIGN, true) {
                    return Err(WalError::Corrupt {
                        segment: storage.describe(id),
                        segment_id: id,
                        offset: pos as u64,
                        reason: format!(
                            "{reason}; a later group commit starts at offset {off}, so this data had been synced"
                        ),
                    });
                }
                if let Some((later, off)) =
                    find_valid_in_segments(storage, &ids[i + 1..], plan).await?
                {
                    return Err(WalError::Corrupt {
                        segment: storage.describe(id),
                        segment_id: id,
                        offset: pos as u64,
                        reason: format!(
                            "{reason}; segment {later} holds valid frames (offset {off}), so this data had been synced"
                        ),
                    });
                }
                let zeroed = zero_from(storage, id, &buf, pos).await?;
                tracing::warn!(
                    segment = %storage.describe(id),
                    offset = pos,
                    zeroed_bytes = zeroed,
                    %reason,
                    "WAL tail torn (interrupted group commit): truncated"
                );
                report.truncated = Some(TruncatedTail {
                    segment_id: id,
                    offset: pos as u64,
                    zeroed_bytes: zeroed,
                    reason,
                });
                segments.push(SegMeta {
                    id,
                    used_bytes: pos as u64,
                });
                tail_block = buf[pos / BLOCK * BLOCK..pos].to_vec();
                remove_segments(storage, &ids[i + 1..], &mut report).await?;
                break;
            }
        }
    }
    report.records = expected - ids.first().copied().unwrap_or(0);
    report.next_lsn = Lsn(expected);
    Ok(Recovered {
        segments,
        next_lsn: expected,
        tail_block,
        report,
    })
}

/// Cuts the log at `offset` of segment `segment_id`: zeroes that segment from `offset` on and
/// deletes every later segment. The repair for [`WalError::Corrupt`]; loses every record from
/// there on. Run it with the log closed, then [`Wal::open`](crate::Wal::open) again.
pub async fn repair_truncate<S: Storage>(
    storage: &S,
    segment_id: u64,
    offset: u64,
) -> Result<(), WalError> {
    let mut buf = AlignedVec::<16>::new();
    read_segment(storage, segment_id, &mut buf, ReadPlan::default()).await?;
    let offset = usize::try_from(offset).unwrap_or(usize::MAX);
    let zeroed = zero_from(storage, segment_id, &buf, offset).await?;
    tracing::warn!(
        segment = %storage.describe(segment_id),
        offset,
        zeroed_bytes = zeroed,
        "WAL repaired: truncated"
    );
    let ids = storage.list_segments().await.map_err(|e| WalError::Io {
        op: "list",
        segment: storage.describe(segment_id),
        source: e,
    })?;
    let later: Vec<u64> = ids.into_iter().filter(|&id| id > segment_id).collect();
    let mut report = RecoveryReport::default();
    remove_segments(storage, &later, &mut report).await
}
