//! A shard's spill files: where its queues keep the runs of messages that do not fit their
//! memory budget (see `flux_core::queue::engine`). The log stays the only place an append is
//! acknowledged from; a run is written here (and fdatasync'd) only after its messages are in
//! the log, and a checkpoint may then refer to it instead of copying its messages.
//!
//! Files are `<data_dir>/spill-shard-N/<seq>.spill`, append-only, rotated at [`FILE_BYTES`],
//! made of log frames (`QueueAppend` records, checksummed). A file is deleted once no run refers
//! to it, no read of it is under way, and the log records that stopped referring to it are
//! durable (so a replay never meets a reference to a deleted file). At start, files no
//! replayed run refers to are deleted.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flux_core::queue::{QueueJournal, QueueName, SpillLoc};
use flux_wal::{Lsn, Record};
use glommio::io::{BufferedFile, OpenOptions};

use crate::broker::queues::queue_record;
use crate::durable::{self, WallClock};

/// A spill file is rotated past this size.
pub const FILE_BYTES: u64 = 64 << 20;

#[derive(Default)]
struct FileRefs {
    /// Runs stored in it, plus reads under way.
    refs: usize,
    /// Not deleted before the log is durable up to here.
    after: Lsn,
}

struct Current {
    seq: u64,
    file: Rc<BufferedFile>,
    pos: u64,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    next_seq: u64,
    files: HashMap<u64, FileRefs>,
}

pub struct SpillStore {
    dir: PathBuf,
    state: RefCell<State>,
    /// One write at a time (each one appends at the current position).
    writing: glommio::sync::Semaphore,
}

pub fn spill_dir(data_dir: &Path, shard: u16) -> PathBuf {
    data_dir.join(format!("spill-shard-{shard}"))
}

fn file_seq(name: &str) -> Option<u64> {
    name.strip_suffix(".spill")?.parse().ok()
}

impl SpillStore {
    /// Open the directory (created if missing), keep the files `live` runs are in and delete the
    /// others.
    pub fn open(dir: PathBuf, live: &[SpillLoc]) -> io::Result<SpillStore> {
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(&dir)?;
        let mut st = State::default();
        for loc in live {
            st.files.entry(loc.file).or_default().refs += 1;
        }
        let mut max_seq = None;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Some(seq) = entry.file_name().to_str().and_then(file_seq) else { continue };
            max_seq = max_seq.max(Some(seq));
            if !st.files.contains_key(&seq) {
                std::fs::remove_file(entry.path())?;
            }
        }
        if let Some(missing) = st.files.keys().find(|f| !dir.join(format!("{f:020}.spill")).exists()) {
            // The log refers to a run whose file is gone: its messages cannot be read back.
            tracing::error!(file = missing, dir = %dir.display(), "spill file referred to by the WAL is missing");
        }
        st.next_seq = max_seq.map_or(0, |s| s + 1).max(st.files.keys().max().map_or(0, |m| m + 1));
        Ok(SpillStore { dir, state: RefCell::new(st), writing: glommio::sync::Semaphore::new(1) })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.spill"))
    }

    /// Store `data` durably; the returned place holds one reference (the run's).
    pub async fn write(&self, data: Vec<u8>) -> io::Result<SpillLoc> {
        let _permit = self.writing.acquire_permit(1).await.map_err(|e| io::Error::other(e.to_string()))?;
        let len = data.len() as u64;
        let needs_new = self.state.borrow().current.as_ref().is_none_or(|c| c.pos > 0 && c.pos + len > FILE_BYTES);
        if needs_new {
            let seq = {
                let mut st = self.state.borrow_mut();
                let seq = st.next_seq;
                st.next_seq += 1;
                seq
            };
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .buffered_open(self.path(seq))
                .await
                .map_err(io::Error::from)?;
            // The new name must survive a crash along with the data.
            let d = glommio::io::Directory::open(&self.dir).await.map_err(io::Error::from)?;
            d.sync().await.map_err(io::Error::from)?;
            let _ = d.close().await;
            let mut st = self.state.borrow_mut();
            st.files.entry(seq).or_default();
            st.current = Some(Current { seq, file: Rc::new(file), pos: 0 });
        }
        let (seq, file, pos) = {
            let st = self.state.borrow();
            let c = st.current.as_ref().ok_or_else(|| io::Error::other("no spill file"))?;
            (c.seq, c.file.clone(), c.pos)
        };
        // The buffer moves into the write (no copy). A short write (a full disk) fails the
        // spill: the run stays in memory and is tried again later.
        let n = file.write_at(data, pos).await.map_err(io::Error::from)?;
        if n as u64 != len {
            return Err(io::Error::new(io::ErrorKind::WriteZero, format!("short spill write ({n} of {len} bytes)")));
        }
        file.fdatasync().await.map_err(io::Error::from)?;
        let mut st = self.state.borrow_mut();
        if let Some(c) = st.current.as_mut().filter(|c| c.seq == seq) {
            c.pos = pos + len;
        }
        st.files.entry(seq).or_default().refs += 1;
        Ok(SpillLoc { file: seq, pos, len })
    }

    /// Read what is stored at `loc` (the caller holds a reference to its file meanwhile).
    pub async fn read(&self, loc: SpillLoc) -> io::Result<Vec<u8>> {
        let file = BufferedFile::open(self.path(loc.file)).await.map_err(io::Error::from)?;
        let len = usize::try_from(loc.len).map_err(|_| io::Error::other("run too long"))?;
        let got = file.read_at(loc.pos, len).await.map_err(io::Error::from);
        let _ = file.close().await;
        let got = got?;
        if got.len() != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read {} of {len} bytes", got.len())));
        }
        Ok(got.to_vec())
    }

    pub fn retain(&self, file: u64) {
        self.state.borrow_mut().files.entry(file).or_default().refs += 1;
    }

    /// Drop a reference; the file may go once the log is durable up to `after`.
    pub fn release(&self, file: u64, after: Lsn) {
        let mut st = self.state.borrow_mut();
        if let Some(f) = st.files.get_mut(&file) {
            f.refs = f.refs.saturating_sub(1);
            f.after = f.after.max(after);
        }
    }

    /// Delete the files nobody refers to, whose releases are durable. Returns how many.
    pub async fn collect(&self, durable: Lsn) -> usize {
        let gone: Vec<u64> = {
            let st = self.state.borrow();
            let current = st.current.as_ref().map(|c| c.seq);
            st.files.iter().filter(|(seq, f)| f.refs == 0 && f.after <= durable && Some(**seq) != current).map(|(s, _)| *s).collect()
        };
        let mut n = 0;
        for seq in gone {
            // Off the executor thread (unlinking a large file takes milliseconds).
            match glommio::io::remove(self.path(seq)).await.map_err(io::Error::from) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %self.path(seq).display(), error = %e, "cannot delete spill file");
                    continue;
                }
            }
            self.state.borrow_mut().files.remove(&seq);
        }
        n
    }

}

/// A run as stored: one `QueueAppend` frame per message.
pub fn encode_run(name: &QueueName, messages: &[QueueJournal], clock: &WallClock) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    for (i, j) in messages.iter().enumerate() {
        let record = queue_record(name, j, clock);
        flux_wal::frame::encode(&mut buf, i as u64, &record).map_err(|e| e.to_string())?;
    }
    Ok(buf)
}

/// The messages of a stored run (`QueueJournal::Appended`, in stored order).
pub fn decode_run(bytes: &[u8], clock: &WallClock) -> Result<Vec<QueueJournal>, String> {
    let records = flux_wal::frame::decode_all(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if let Record::QueueAppend { offset, message, key, at_ms, .. } = r {
            let m = durable::message_from_stored(&message, clock, None).ok_or("stored message does not decode")?;
            out.push(QueueJournal::Appended {
                offset,
                message: m,
                key: key.map(|k| std::sync::Arc::from(k.as_str())),
                at: clock.to_instant(at_ms),
            });
        }
    }
    Ok(out)
}
