//! The log: append, group commit, poisoning, reclamation.
//!
//! Lives on one shard; `!Send`. The shard's tasks share it through an `Rc<Wal<_>>`.
//!
//! Group commit needs no flusher task: the first committer that finds no flush in flight becomes
//! the leader of the next group. It snapshots the pending frames (up to `max_group_bytes`, never
//! past the end of the segment), writes them with one aligned write and one sync, and only then
//! advances the durable LSN, drops the flushed bytes and wakes everyone. Appends made meanwhile
//! stay pending and form the next group, led by a waiter whose target is not yet durable. If the
//! leader's future is dropped mid-flush, nothing was marked durable and the pending bytes are
//! intact: the next leader rewrites the same range (identical bytes, plus more).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::frame;
use crate::record::{ArchivedRecord, Record};
use crate::recovery::{self, RecoveryReport, SegMeta};
use crate::storage::{Storage, BLOCK};
use crate::{Lsn, WalConfig, WalError, MAX_SEGMENT_SIZE_BYTES, MIN_SEGMENT_SIZE_BYTES};

/// Disk use of the log, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskUsage {
    /// Segment files.
    pub segments: usize,
    /// Bytes of disk they reserve (segment files are preallocated).
    pub allocated_bytes: u64,
    /// Bytes of frames they hold (durable ones).
    pub used_bytes: u64,
}

/// What [`Wal::reclaim_before`] deleted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReclaimReport {
    /// Ids of the deleted segments.
    pub removed_segments: Vec<u64>,
    /// Bytes of disk freed.
    pub freed_bytes: u64,
}

struct State {
    segments: VecDeque<SegMeta>,
    /// Frames appended and not yet durable, starting at the end of the active segment's data.
    pending: Vec<u8>,
    /// Length of each pending frame, in order.
    pending_frames: VecDeque<u32>,
    /// Bytes of the active segment from the block holding its end up to its end (rewritten,
    /// unchanged, at the start of the next group's write).
    tail_block: Vec<u8>,
    next_lsn: u64,
    /// Every LSN below this is durable.
    durable_lsn: u64,
    flushing: bool,
    /// Bumped at the end of every flush attempt.
    flush_gen: u64,
    waiters: Vec<Waker>,
    poisoned: Option<String>,
    groups: u64,
    /// Extra pending bytes bounded appends may use while the owner writes a large copy of its
    /// state (see [`Wal::set_pending_allowance`]).
    allowance: usize,
}

/// The write-ahead log of one shard. See the module and crate docs.
pub struct Wal<S: Storage> {
    storage: S,
    config: WalConfig,
    state: RefCell<State>,
}

impl<S: Storage> Wal<S> {
    /// Opens the log in `storage`: replays every record in LSN order through `on_record`
    /// (validated in place; deserialize with [`ArchivedRecord::to_record`] if an owned value is
    /// wanted), truncates a torn tail, and fails with [`WalError::Corrupt`] on corruption before
    /// the tail. An empty storage is a new, empty log.
    pub async fn open(
        storage: S,
        config: WalConfig,
        on_record: impl FnMut(Lsn, &ArchivedRecord),
    ) -> Result<(Self, RecoveryReport), WalError> {
        check_config(&config)?;
        let plan = recovery::ReadPlan {
            chunk_bytes: config.recovery_read_chunk_bytes,
            depth: config.recovery_read_depth,
        };
        let rec = recovery::recover(&storage, plan, on_record).await?;
        let state = State {
            segments: rec.segments.into_iter().collect(),
            pending: Vec::new(),
            pending_frames: VecDeque::new(),
            tail_block: rec.tail_block,
            next_lsn: rec.next_lsn,
            durable_lsn: rec.next_lsn,
            flushing: false,
            flush_gen: 0,
            waiters: Vec::new(),
            poisoned: None,
            groups: 0,
            allowance: 0,
        };
        Ok((
            Wal {
                storage,
                config,
                state: RefCell::new(state),
            },
            rec.report,
        ))
    }

    /// Buffers `record` and returns its LSN. Not durable until a [`commit`](Wal::commit) that
    /// started after this call returns `Ok`.
    pub fn append(&self, record: &Record) -> Result<Lsn, WalError> {
        self.append_inner(record, true)
    }

    /// As [`append`](Wal::append), but beyond `max_pending_bytes`: for an owner rewriting state
    /// it already holds in memory (a checkpoint), whose size that state bounds.
    pub fn append_unbounded(&self, record: &Record) -> Result<Lsn, WalError> {
        self.append_inner(record, false)
    }

    fn append_inner(&self, record: &Record, bounded: bool) -> Result<Lsn, WalError> {
        let mut st = self.state.borrow_mut();
        if let Some(why) = &st.poisoned {
            return Err(WalError::Poisoned(why.clone()));
        }
        if bounded && st.pending.len() >= self.config.max_pending_bytes.saturating_add(st.allowance) {
            return Err(WalError::Backpressure {
                pending_bytes: st.pending.len(),
                limit_bytes: self.config.max_pending_bytes,
            });
        }
        let lsn = st.next_lsn;
        let frame_len = frame::encode(&mut st.pending, lsn, record)
            .map_err(|e| WalError::Record(e.to_string()))?;
        if frame_len as u64 > self.config.segment_size_bytes
            || frame_len > self.config.max_group_bytes
        {
            let keep = st.pending.len() - frame_len;
            st.pending.truncate(keep);
            return Err(WalError::Record(format!(
                "frame of {frame_len} bytes exceeds the segment size or the group limit"
            )));
        }
        st.pending_frames.push_back(frame_len as u32);
        st.next_lsn += 1;
        Ok(Lsn(lsn))
    }

    /// Makes every record appended before this call durable. Returns the LSN below which every
    /// record is durable. Concurrent callers share group commits (one write and one fdatasync per
    /// group). Fails if the log is or becomes poisoned; then nothing more is acknowledged.
    pub async fn commit(&self) -> Result<Lsn, WalError> {
        let target = self.state.borrow().next_lsn;
        self.commit_to(Lsn(target)).await
    }

    /// Appends `record` and waits until it is durable.
    pub async fn append_commit(&self, record: &Record) -> Result<Lsn, WalError> {
        let lsn = self.append(record)?;
        self.commit_to(Lsn(lsn.0 + 1)).await?;
        Ok(lsn)
    }

    /// Waits until every record with an LSN below `target` is durable (flushing as needed).
    pub async fn commit_to(&self, target: Lsn) -> Result<Lsn, WalError> {
        loop {
            let gen = {
                let mut st = self.state.borrow_mut();
                if let Some(why) = &st.poisoned {
                    return Err(WalError::Poisoned(why.clone()));
                }
                if st.durable_lsn >= target.0 || st.durable_lsn >= st.next_lsn {
                    return Ok(Lsn(st.durable_lsn));
                }
                if !st.flushing {
                    st.flushing = true;
                    None
                } else {
                    Some(st.flush_gen)
                }
            };
            match gen {
                None => {
                    let guard = FlushGuard { state: &self.state };
                    let result = self.flush_group().await;
                    drop(guard);
                    result?;
                }
                Some(gen) => {
                    FlushWait {
                        state: &self.state,
                        gen,
                    }
                    .await
                }
            }
        }
    }

    /// Writes and syncs one group. Called by the leader only (`flushing` is set).
    async fn flush_group(&self) -> Result<(), WalError> {
        let seg_size = self.config.segment_size_bytes;
        // Decide the group and whether it needs a new segment.
        let (rollover, first_lsn) = {
            let st = self.state.borrow();
            let Some(&first) = st.pending_frames.front() else {
                return Ok(());
            };
            let fits = match st.segments.back() {
                Some(active) => active.used_bytes + first as u64 <= seg_size,
                None => false,
            };
            (!fits, st.durable_lsn)
        };
        if rollover {
            self.storage
                .create_segment(first_lsn, seg_size)
                .await
                .map_err(|e| self.poison("create", first_lsn, e))?;
            let mut st = self.state.borrow_mut();
            st.segments.push_back(SegMeta {
                id: first_lsn,
                used_bytes: 0,
            });
            st.tail_block.clear();
        }
        let (seg_id, write_offset, buf, frames, bytes) = {
            let st = self.state.borrow();
            let Some(active) = st.segments.back().copied() else {
                return Ok(());
            };
            let room = (seg_size - active.used_bytes).min(self.config.max_group_bytes as u64);
            let mut bytes = 0usize;
            let mut frames = 0usize;
            for &len in &st.pending_frames {
                if (bytes + len as usize) as u64 > room {
                    break;
                }
                bytes += len as usize;
                frames += 1;
            }
            if frames == 0 {
                // Cannot happen: a frame never exceeds the segment size or the group limit, and
                // a full segment was rolled over above.
                return Err(WalError::Record(format!(
                    "frame does not fit an empty segment of {seg_size} bytes"
                )));
            }
            let write_offset = active.used_bytes / BLOCK as u64 * BLOCK as u64;
            let head = st.tail_block.len();
            debug_assert_eq!(write_offset + head as u64, active.used_bytes);
            let total = (head + bytes).div_ceil(BLOCK) * BLOCK;
            let mut buf = Vec::with_capacity(total);
            buf.extend_from_slice(&st.tail_block);
            buf.extend_from_slice(&st.pending[..bytes]);
            buf.resize(total, 0);
            frame::mark_group_start(&mut buf[head..]);
            (active.id, write_offset, buf, frames, bytes)
        };
        self.storage
            .write(seg_id, write_offset, &buf)
            .await
            .map_err(|e| self.poison("write", seg_id, e))?;
        self.storage
            .sync(seg_id)
            .await
            .map_err(|e| self.poison("fdatasync", seg_id, e))?;
        let mut st = self.state.borrow_mut();
        let Some(active) = st.segments.back_mut() else {
            return Ok(());
        };
        active.used_bytes += bytes as u64;
        let end = active.used_bytes;
        st.pending.drain(..bytes);
        st.pending_frames.drain(..frames);
        st.durable_lsn += frames as u64;
        let tail_start = (end / BLOCK as u64 * BLOCK as u64 - write_offset) as usize;
        let tail_end = (end - write_offset) as usize;
        st.tail_block = buf[tail_start..tail_end].to_vec();
        st.groups += 1;
        Ok(())
    }

    fn poison(&self, op: &'static str, seg_id: u64, source: std::io::Error) -> WalError {
        let segment = self.storage.describe(seg_id);
        tracing::error!(%segment, op, error = %source, "WAL I/O failed: log poisoned, nothing more is acknowledged until it is reopened");
        let mut st = self.state.borrow_mut();
        st.poisoned = Some(format!("{op} on {segment}: {source}"));
        WalError::Io {
            op,
            segment,
            source,
        }
    }

    /// Deletes every segment all of whose records have LSNs below `lsn` (the owner no longer
    /// needs them: their effects are superseded or captured by a committed checkpoint). The
    /// active segment is never deleted.
    pub async fn reclaim_before(&self, lsn: Lsn) -> Result<ReclaimReport, WalError> {
        let victims: Vec<u64> = {
            let st = self.state.borrow();
            st.segments
                .iter()
                .zip(st.segments.iter().skip(1))
                .filter(|(_, next)| next.id <= lsn.0)
                .map(|(seg, _)| seg.id)
                .collect()
        };
        let mut report = ReclaimReport::default();
        for id in victims {
            // Forget it first: if the removal fails half-way, recovery copes with a missing or
            // present segment at the head of the log alike.
            {
                let mut st = self.state.borrow_mut();
                st.segments.retain(|s| s.id != id);
            }
            self.storage
                .remove_segment(id)
                .await
                .map_err(|e| WalError::Io {
                    op: "remove",
                    segment: self.storage.describe(id),
                    source: e,
                })?;
            report.removed_segments.push(id);
            report.freed_bytes += self.config.segment_size_bytes;
        }
        Ok(report)
    }

    /// Let bounded appends go `bytes` beyond `max_pending_bytes` (0 to end it): while an owner's
    /// [`append_unbounded`](Wal::append_unbounded) copy is waiting for its commit, its ordinary
    /// appends are not refused for the room the copy takes.
    pub fn set_pending_allowance(&self, bytes: usize) {
        self.state.borrow_mut().allowance = bytes;
    }

    /// Disk use now.
    pub fn disk_usage(&self) -> DiskUsage {
        let st = self.state.borrow();
        DiskUsage {
            segments: st.segments.len(),
            allocated_bytes: st.segments.len() as u64 * self.config.segment_size_bytes,
            used_bytes: st.segments.iter().map(|s| s.used_bytes).sum(),
        }
    }

    /// Make the next segment ready ahead of its rollover (see [`Storage::prepare_spare`]); run
    /// it off the commit path (a background task), and again after each rollover. Ok(true)
    /// when it made one.
    pub async fn prepare_spare(&self) -> std::io::Result<bool> {
        // Not for a log that has never been written (an idle broker keeps no spare).
        if self.poisoned().is_some() || self.state.borrow().segments.is_empty() {
            return Ok(false);
        }
        self.storage.prepare_spare(self.config.segment_size_bytes).await
    }

    /// Whether the next rollover finds a segment ready.
    pub fn has_spare(&self) -> bool {
        self.storage.has_spare()
    }

    /// The LSN the next append gets.
    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.state.borrow().next_lsn)
    }

    /// Every record below this LSN is durable.
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.state.borrow().durable_lsn)
    }

    /// First LSN of each segment, ascending (the first is the oldest record still on disk).
    pub fn segment_ids(&self) -> Vec<u64> {
        self.state.borrow().segments.iter().map(|s| s.id).collect()
    }

    /// Group commits done since open.
    pub fn group_commits(&self) -> u64 {
        self.state.borrow().groups
    }

    /// Bytes appended and not yet durable.
    pub fn pending_bytes(&self) -> usize {
        self.state.borrow().pending.len()
    }

    /// Why the log refuses work, if it does.
    pub fn poisoned(&self) -> Option<String> {
        self.state.borrow().poisoned.clone()
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}

fn check_config(c: &WalConfig) -> Result<(), WalError> {
    let s = c.segment_size_bytes;
    if s % BLOCK as u64 != 0 || !(MIN_SEGMENT_SIZE_BYTES..=MAX_SEGMENT_SIZE_BYTES).contains(&s) {
        return Err(WalError::Config(format!(
            "segment_size_bytes {s} must be a multiple of {BLOCK} in {MIN_SEGMENT_SIZE_BYTES}..={MAX_SEGMENT_SIZE_BYTES}"
        )));
    }
    if c.max_group_bytes < BLOCK {
        return Err(WalError::Config(format!(
            "max_group_bytes {} is below {BLOCK}",
            c.max_group_bytes
        )));
    }
    Ok(())
}

/// Ends a flush attempt however it ends (done, failed, or the leader's future dropped): clears
/// `flushing`, bumps the generation and wakes the waiters so one of them leads the next group.
struct FlushGuard<'a> {
    state: &'a RefCell<State>,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut st = self.state.borrow_mut();
            st.flushing = false;
            st.flush_gen += 1;
            std::mem::take(&mut st.waiters)
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// Resolves when the flush generation moves past `gen`.
struct FlushWait<'a> {
    state: &'a RefCell<State>,
    gen: u64,
}

impl Future for FlushWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state.borrow_mut();
        if st.flush_gen != self.gen {
            Poll::Ready(())
        } else {
            st.waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}
