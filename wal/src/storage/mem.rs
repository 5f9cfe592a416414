//! In-memory storage with fault injection, for tests.
//!
//! Each segment keeps two images: what a reader sees now (`current`) and what survived the last
//! `sync` (`durable`), plus the writes made since. [`MemStorage::crash`] rebuilds every segment
//! from its durable image and applies each unsynced write fully, not at all, or torn (a random
//! subset of its 512-byte sectors, one of them cut at a random byte), which is what a power loss
//! may leave. Faults on demand: failing syncs and writes, bit flips, and a yield inside every I/O
//! so that concurrent tasks interleave as they would around real disk latency.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use rkyv::util::AlignedVec;

use super::Storage;

const SECTOR: usize = 512;

#[derive(Default)]
struct Segment {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<(usize, Vec<u8>)>,
}

#[derive(Default)]
struct State {
    segments: BTreeMap<u64, Segment>,
    fail_syncs: u32,
    fail_writes: u32,
    yield_io: bool,
    syncs: u64,
    writes: u64,
}

/// In-memory [`Storage`]; clones share the same disk. See the module docs.
#[derive(Clone, Default)]
pub struct MemStorage {
    state: Rc<RefCell<State>>,
}

/// What [`MemStorage::crash`] did to the unsynced writes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CrashReport {
    /// Writes applied in full.
    pub kept: usize,
    /// Writes lost entirely.
    pub lost: usize,
    /// Writes applied in part.
    pub torn: usize,
}

/// A small deterministic generator (xorshift64*), so a crash is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

impl MemStorage {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every read, write and sync yield once to the executor before completing, so that
    /// appends and commits from other tasks interleave with an in-flight flush.
    pub fn set_yield_io(&self, on: bool) {
        self.state.borrow_mut().yield_io = on;
    }

    /// The next `n` syncs fail with EIO (their writes stay unsynced, as after a real fsync error).
    pub fn fail_next_syncs(&self, n: u32) {
        self.state.borrow_mut().fail_syncs = n;
    }

    /// The next `n` writes fail with EIO without touching the data.
    pub fn fail_next_writes(&self, n: u32) {
        self.state.borrow_mut().fail_writes = n;
    }

    /// Number of successful syncs so far.
    pub fn sync_count(&self) -> u64 {
        self.state.borrow().syncs
    }

    /// Number of successful writes so far.
    pub fn write_count(&self) -> u64 {
        self.state.borrow().writes
    }

    /// Flips bit `bit % 8` of byte `offset` of segment `id`, in what is durable and what is seen.
    /// Returns false if there is no such byte.
    pub fn flip_bit(&self, id: u64, offset: usize, bit: u8) -> bool {
        let mut st = self.state.borrow_mut();
        let Some(seg) = st.segments.get_mut(&id) else {
            return false;
        };
        let mask = 1u8 << (bit % 8);
        let mut done = false;
        if let Some(b) = seg.current.get_mut(offset) {
            *b ^= mask;
            done = true;
        }
        if let Some(b) = seg.durable.get_mut(offset) {
            *b ^= mask;
        }
        done
    }

    /// The bytes of segment `id` as a reader sees them now.
    pub fn segment_bytes(&self, id: u64) -> Option<Vec<u8>> {
        self.state
            .borrow()
            .segments
            .get(&id)
            .map(|s| s.current.clone())
    }

    /// Simulates a power loss: every segment falls back to its durable image plus a random
    /// fate for each write made since its last sync (kept, lost, or torn), chosen from `seed`.
    /// Pending fault injections are cleared. Drop the `Wal` before calling this.
    pub fn crash(&self, seed: u64) -> CrashReport {
        let mut rng = Rng(seed | 1);
        let mut report = CrashReport::default();
        let mut st = self.state.borrow_mut();
        st.fail_syncs = 0;
        st.fail_writes = 0;
        for seg in st.segments.values_mut() {
            let mut image = std::mem::take(&mut seg.durable);
            for (offset, data) in seg.unsynced.drain(..) {
                if image.len() < offset + data.len() {
                    image.resize(offset + data.len(), 0);
                }
                match rng.below(3) {
                    0 => {
                        image[offset..offset + data.len()].copy_from_slice(&data);
                        report.kept += 1;
                    }
                    1 => report.lost += 1,
                    _ => {
                        report.torn += 1;
                        let sectors = data.len().div_ceil(SECTOR);
                        let cut = rng.below(sectors);
                        for s in 0..sectors {
                            let lo = s * SECTOR;
                            let hi = (lo + SECTOR).min(data.len());
                            let hi = if s == cut {
                                lo + rng.below(hi - lo + 1)
                            } else {
                                hi
                            };
                            if s == cut || rng.below(2) == 0 {
                                image[offset + lo..offset + hi].copy_from_slice(&data[lo..hi]);
                            }
                        }
                    }
                }
            }
            seg.current = image.clone();
            seg.durable = image;
        }
        report
    }

    async fn maybe_yield(&self) {
        let yield_io = self.state.borrow().yield_io;
        if yield_io {
            YieldOnce(false).await;
        }
    }
}

/// Returns Pending once (waking itself), then Ready.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

fn not_found(id: u64) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("no segment {id}"))
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure (EIO)"))
}

impl Storage for MemStorage {
    type ReadBuf = AlignedVec<16>;

    async fn list_segments(&self) -> io::Result<Vec<u64>> {
        Ok(self.state.borrow().segments.keys().copied().collect())
    }

    async fn create_segment(&self, id: u64, size_bytes: u64) -> io::Result<()> {
        self.maybe_yield().await;
        let size = usize::try_from(size_bytes).map_err(io::Error::other)?;
        let seg = Segment {
            current: vec![0; size],
            durable: vec![0; size],
            unsynced: Vec::new(),
        };
        self.state.borrow_mut().segments.insert(id, seg);
        Ok(())
    }

    async fn remove_segment(&self, id: u64) -> io::Result<()> {
        self.state
            .borrow_mut()
            .segments
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| not_found(id))
    }

    async fn segment_len(&self, id: u64) -> io::Result<u64> {
        let st = self.state.borrow();
        let seg = st.segments.get(&id).ok_or_else(|| not_found(id))?;
        Ok(seg.current.len() as u64)
    }

    async fn read(&self, id: u64, offset: u64, len: usize) -> io::Result<AlignedVec<16>> {
        self.maybe_yield().await;
        let st = self.state.borrow();
        let seg = st.segments.get(&id).ok_or_else(|| not_found(id))?;
        let start = (offset as usize).min(seg.current.len());
        let end = start.saturating_add(len).min(seg.current.len());
        let mut out = AlignedVec::<16>::with_capacity(end - start);
        out.extend_from_slice(&seg.current[start..end]);
        Ok(out)
    }

    async fn write(&self, id: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        assert!(
            offset as usize % super::BLOCK == 0 && data.len() % super::BLOCK == 0,
            "unaligned write {offset}+{}",
            data.len()
        );
        {
            let mut st = self.state.borrow_mut();
            if st.fail_writes > 0 {
                st.fail_writes -= 1;
                return Err(eio("write"));
            }
        }
        self.maybe_yield().await;
        let mut st = self.state.borrow_mut();
        let seg = st.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        let offset = offset as usize;
        if seg.current.len() < offset + data.len() {
            seg.current.resize(offset + data.len(), 0);
        }
        seg.current[offset..offset + data.len()].copy_from_slice(data);
        seg.unsynced.push((offset, data.to_vec()));
        st.writes += 1;
        Ok(())
    }

    async fn sync(&self, id: u64) -> io::Result<()> {
        self.maybe_yield().await;
        let mut st = self.state.borrow_mut();
        if st.fail_syncs > 0 {
            st.fail_syncs -= 1;
            return Err(eio("fdatasync"));
        }
        let seg = st.segments.get_mut(&id).ok_or_else(|| not_found(id))?;
        seg.durable = seg.current.clone();
        seg.unsynced.clear();
        st.syncs += 1;
        Ok(())
    }

    fn describe(&self, id: u64) -> String {
        format!("mem:{}", super::segment_file_name(id))
    }
}
