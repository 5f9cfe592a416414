//! Segments as files written with glommio's `DmaFile` (O_DIRECT).
//!
//! Lives on one shard's executor (it holds glommio files); must be created and used there.
//!
//! glommio 0.9 trap handled in [`DmaStorage::open`]: glommio decides once per disk whether
//! O_DIRECT I/O on it can be polled, and decides wrongly if the first file it sees on that disk
//! is freshly created and empty; later O_DIRECT reads then fail with EOPNOTSUPP and every commit
//! costs milliseconds. So `open` first writes a small non-empty marker file with std and opens it
//! with `DmaFile` before touching any segment.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::{DmaFile, OpenOptions, ReadResult};

use super::{parse_segment_file_name, segment_file_name, Storage, BLOCK};

/// Name of the marker file [`DmaStorage::open`] writes (see the module docs).
pub const PROBE_FILE_NAME: &str = "flux-wal.probe";

/// Options of [`DmaStorage`].
#[derive(Debug, Clone)]
pub struct DmaStorageOptions {
    /// Write zeros over a new segment's whole length when creating it (after `fallocate`).
    /// Costs one sequential write of the segment at creation, and saves the unwritten-extent
    /// conversion (a journal commit) that writing into a merely fallocated range adds to the
    /// fdatasync of every group commit.
    pub prezero: bool,
    /// Size of the zero-filling writes, in bytes (a multiple of 4096).
    pub prezero_chunk_bytes: usize,
}

impl Default for DmaStorageOptions {
    fn default() -> Self {
        DmaStorageOptions {
            prezero: true,
            prezero_chunk_bytes: 1 << 20,
        }
    }
}

/// Segment files in one directory. See the module docs.
pub struct DmaStorage {
    dir: PathBuf,
    options: DmaStorageOptions,
    files: RefCell<HashMap<u64, Rc<DmaFile>>>,
    /// The size of the segment allocated and zero-filled ahead of its rollover (under
    /// [`SPARE_FILE_NAME`], closed: it holds no descriptor), and whether one is being made.
    spare: RefCell<Option<u64>>,
    preparing: std::cell::Cell<bool>,
}

/// Name of the spare segment file while it waits for its rollover (not a segment: recovery
/// ignores it, and `open` deletes a leftover one).
pub const SPARE_FILE_NAME: &str = "spare.wal.tmp";

impl DmaStorage {
    /// Opens (creating it if needed) the segment directory `dir`. Must run inside a glommio
    /// executor. Writes and opens the probe file (see the module docs).
    pub async fn open(dir: impl AsRef<Path>, options: DmaStorageOptions) -> io::Result<Self> {
        std::fs::create_dir_all(dir.as_ref())?;
        // Absolute: glommio's `Directory::open` (the directory sync after creating or removing a
        // segment) fails with EBADF on a relative path such as the default `./data/...`.
        let dir = std::fs::canonicalize(dir.as_ref())?;
        let probe = dir.join(PROBE_FILE_NAME);
        // Blocking std I/O on purpose, once per shard at start: the file must exist and be
        // non-empty before glommio's first O_DIRECT open on this disk.
        std::fs::write(&probe, [0x46u8; BLOCK])?;
        let f = DmaFile::open(&probe).await?;
        f.close().await?;
        match std::fs::remove_file(dir.join(SPARE_FILE_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(DmaStorage {
            dir,
            options,
            files: RefCell::new(HashMap::new()),
            spare: RefCell::new(None),
            preparing: std::cell::Cell::new(false),
        })
    }

    /// The segment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_file_name(id))
    }

    async fn file(&self, id: u64) -> io::Result<Rc<DmaFile>> {
        if let Some(f) = self.files.borrow().get(&id) {
            return Ok(f.clone());
        }
        let f = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .dma_open(self.path(id))
                .await?,
        );
        self.files.borrow_mut().insert(id, f.clone());
        Ok(f)
    }

    async fn sync_dir(&self) -> io::Result<()> {
        let d = glommio::io::Directory::open(&self.dir).await?;
        d.sync().await?;
        d.close().await?;
        Ok(())
    }

    async fn create_segment_inner(&self, id: u64, size_bytes: u64) -> io::Result<()> {
        if let Some(old) = self.forget(id) {
            close_quietly(old).await;
        }
        let spare = self.spare.borrow_mut().take();
        if let Some(size) = spare {
            if size == size_bytes {
                // Opened on its first write, like a segment found at start.
                glommio::io::rename(self.dir.join(SPARE_FILE_NAME), self.path(id)).await.map_err(io::Error::from)?;
                return self.sync_dir().await;
            }
            let _ = std::fs::remove_file(self.dir.join(SPARE_FILE_NAME));
        }
        let f = self.allocate(&self.path(id), size_bytes).await?;
        self.files.borrow_mut().insert(id, Rc::new(f));
        self.sync_dir().await
    }

    /// A file at `path` of `size_bytes`, allocated, zero-filled (with `prezero`) and synced.
    async fn allocate(&self, path: &Path, size_bytes: u64) -> io::Result<DmaFile> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(path)
            .await?;
        f.pre_allocate(size_bytes, false).await?;
        if self.options.prezero {
            let chunk = self.options.prezero_chunk_bytes.max(BLOCK) / BLOCK * BLOCK;
            let mut pos = 0u64;
            while pos < size_bytes {
                let n = chunk.min((size_bytes - pos) as usize);
                let n = n.div_ceil(BLOCK) * BLOCK;
                let mut buf = f.alloc_dma_buffer(n);
                buf.as_bytes_mut().fill(0);
                let written = f.write_at(buf, pos).await?;
                if written == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "zero-filling segment",
                    ));
                }
                pos += written as u64;
            }
        }
        f.fdatasync().await?;
        Ok(f)
    }

    fn forget(&self, id: u64) -> Option<Rc<DmaFile>> {
        self.files.borrow_mut().remove(&id)
    }
}

async fn close_quietly(f: Rc<DmaFile>) {
    if let Err(e) = f.close_rc().await {
        tracing::debug!(error = %e, "closing segment file");
    }
}

impl Storage for DmaStorage {
    type ReadBuf = ReadResult;

    async fn list_segments(&self) -> io::Result<Vec<u64>> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Some(id) = entry.file_name().to_str().and_then(parse_segment_file_name) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    async fn create_segment(&self, id: u64, size_bytes: u64) -> io::Result<()> {
        let result = self.create_segment_inner(id, size_bytes).await;
        if result.is_err() {
            // A segment that could not be fully allocated (a full disk) holds nothing: leave no
            // short file behind for recovery to take as the active segment.
            if let Some(f) = self.forget(id) {
                close_quietly(f).await;
            }
            let _ = std::fs::remove_file(self.path(id));
        }
        result
    }

    async fn remove_segment(&self, id: u64) -> io::Result<()> {
        if let Some(f) = self.forget(id) {
            close_quietly(f).await;
        }
        // Off the executor thread: unlinking a 64 MiB segment takes ~10 ms on ext4, which would
        // stall every connection of the shard.
        glommio::io::remove(self.path(id)).await.map_err(io::Error::from)?;
        self.sync_dir().await
    }

    async fn segment_len(&self, id: u64) -> io::Result<u64> {
        self.file(id).await?.file_size().await.map_err(Into::into)
    }

    async fn read(&self, id: u64, offset: u64, len: usize) -> io::Result<ReadResult> {
        let f = self.file(id).await?;
        Ok(f.read_at_aligned(offset, len).await?)
    }

    async fn write(&self, id: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        assert!(
            offset % BLOCK as u64 == 0 && data.len() % BLOCK == 0,
            "unaligned write {offset}+{}",
            data.len()
        );
        let f = self.file(id).await?;
        let mut done = 0usize;
        while done < data.len() {
            let mut buf = f.alloc_dma_buffer(data.len() - done);
            buf.as_bytes_mut().copy_from_slice(&data[done..]);
            let n = f.write_at(buf, offset + done as u64).await?;
            if n == 0 || n % BLOCK != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short O_DIRECT write of {n} bytes"),
                ));
            }
            done += n;
        }
        Ok(())
    }

    async fn sync(&self, id: u64) -> io::Result<()> {
        self.file(id).await?.fdatasync().await.map_err(Into::into)
    }

    async fn prepare_spare(&self, size_bytes: u64) -> io::Result<bool> {
        if self.spare.borrow().is_some() || self.preparing.get() {
            return Ok(false);
        }
        self.preparing.set(true);
        let path = self.dir.join(SPARE_FILE_NAME);
        let made = self.allocate(&path, size_bytes).await;
        self.preparing.set(false);
        match made {
            Ok(f) => {
                f.close().await?;
                *self.spare.borrow_mut() = Some(size_bytes);
                Ok(true)
            }
            Err(e) => {
                // A full disk: do not hold the space a partial spare took.
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn has_spare(&self) -> bool {
        self.spare.borrow().is_some()
    }

    fn describe(&self, id: u64) -> String {
        self.path(id).display().to_string()
    }
}
