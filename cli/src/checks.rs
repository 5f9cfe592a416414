//! Start-up checks: each either passes, adjusts something and says so, or fails with one line that
//! tells the operator what to change.
//!
//! The io_uring and RLIMIT_MEMLOCK checks live in `flux_shard::executor`, next to the glommio
//! executors whose needs they encode (three ring registrations of each shard's io memory, glommio's
//! floors); the runtime runs them again and they agree, so there is one formula. fluxd runs them
//! first so that a failure is reported before anything else starts and so the effective config
//! line shows the io memory actually used. The data directory lock is fluxd's own.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::bail;
use anyhow::Context;
use flux_shard::executor;

/// Creates a small io_uring and closes it again: proves io_uring_setup works for this process.
/// Errors name the cause (ENOSYS: kernel too old; EPERM: kernel.io_uring_disabled or seccomp).
pub fn check_io_uring() -> anyhow::Result<()> {
    executor::check_io_uring()?;
    Ok(())
}

/// The oldest kernel fluxd runs on: 5.13 brought multishot io_uring polls, which every session's
/// socket waits on (glommio patch 8). An older kernel would fail each poll at once, and the read
/// loop would turn into a busy loop of failed polls.
const MIN_KERNEL: (u32, u32) = (5, 13);

/// Refuses kernels older than [`MIN_KERNEL`], naming the running one.
pub fn check_kernel_version() -> anyhow::Result<()> {
    // SAFETY: uname fills the struct it is given; utsname is plain data.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        bail!("cannot read the kernel version: {}", std::io::Error::last_os_error());
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => bail!(
            "Linux {}.{} or later is needed (multishot io_uring polls); this kernel is {release}",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
        None => bail!("cannot parse the kernel version {release:?}"),
    }
}

/// `"6.18.0-foo"` -> `(6, 18)`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Keeps transparent huge pages out of this process (`PR_SET_THP_DISABLE`; pages faulted in from
/// now on are 4 KiB). The allocator asks for huge pages on its arenas, and a huge page is resident
/// as a whole once one byte of it is touched: with many small per-connection states spread over
/// them that cost ~1.1 KB per idle connection. Failure is only logged: THP then stays as the
/// system configured it.
pub fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not disable transparent huge pages");
    }
}

/// Makes RLIMIT_MEMLOCK cover `shards` executors of `io_memory_bytes` each (raising it to the
/// hard limit, or beyond as root); when it cannot, returns a lower io memory per shard that fits
/// (and logs that). Fails only when not even glommio's minimum fits.
pub fn ensure_memlock(shards: u16, io_memory_bytes: usize) -> anyhow::Result<usize> {
    let outcome = executor::ensure_memlock(shards, io_memory_bytes)?;
    Ok(outcome.io_memory_bytes)
}

/// The exclusive lock on a data directory, held for as long as this value lives (the process
/// lifetime in fluxd). The kernel drops the flock when the process exits, however it exits.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    pub path: PathBuf,
}

/// Name of the lock file inside the data directory; it holds the pid of the fluxd that owns it.
pub const LOCK_FILE_NAME: &str = "fluxd.lock";

/// Creates the data directory if missing, locks it against a second fluxd, writes our pid into
/// the lock file and checks that the directory is writable.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<DataDirLock> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE_NAME);
    // No truncate here: the file may belong to a running fluxd whose pid we want to report.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("data directory {} is not writable", dir.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut text = String::new();
            let pid = match file.read_to_string(&mut text) {
                Ok(_) if !text.trim().is_empty() => text.trim().to_string(),
                _ => "unknown".to_string(),
            };
            bail!(
                "data directory {} is locked by another fluxd (pid {pid})",
                dir.display()
            );
        }
        return Err(err).with_context(|| format!("cannot lock {}", path.display()));
    }
    let write_pid = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())?;
        file.sync_data()
    };
    write_pid(&mut file).with_context(|| format!("cannot write {}", path.display()))?;
    check_writable(dir)?;
    Ok(DataDirLock { _file: file, path })
}

/// Creating a file proves more than opening an existing one (the lock file may predate a chmod).
/// A full disk is not a reason to refuse to start: the logs can still be recovered and served,
/// and durable writes are refused (with a reason code) until there is room.
fn check_writable(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(".fluxd-write-check");
    let result = File::create(&probe).and_then(|mut f| f.write_all(b"ok"));
    let _ = std::fs::remove_file(&probe);
    match result {
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
            tracing::error!(dir = %dir.display(), "data directory is full: starting anyway; durable writes will be refused until there is room");
            Ok(())
        }
        r => r.with_context(|| format!("data directory {} is not writable", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_and_compare() {
        assert_eq!(kernel_version("6.18.0-flux"), Some((6, 18)));
        assert_eq!(kernel_version("5.13"), Some((5, 13)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.12.19").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.13.0").unwrap() >= MIN_KERNEL);
        assert!(kernel_version("6.1.0").unwrap() >= MIN_KERNEL);
        // This machine runs fluxd.
        check_kernel_version().unwrap();
    }

    #[test]
    fn io_uring_is_available_here() {
        // fluxd cannot run without it; this machine is one fluxd runs on.
        check_io_uring().unwrap();
    }

    #[test]
    fn data_dir_is_created_locked_and_holds_our_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/data");
        let lock = prepare_data_dir(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join(LOCK_FILE_NAME)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        assert!(!dir.join(".fluxd-write-check").exists());

        // flock conflicts between open file descriptions, even within one process.
        let err = prepare_data_dir(&dir).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "data directory {} is locked by another fluxd (pid {})",
                dir.display(),
                std::process::id()
            )
        );
        drop(lock);
        let _again = prepare_data_dir(&dir).unwrap();
    }

    #[test]
    fn data_dir_that_is_a_file_fails_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("data");
        std::fs::write(&file, b"x").unwrap();
        let err = format!("{:#}", prepare_data_dir(&file).unwrap_err());
        assert!(err.contains("cannot create data directory"), "{err}");
    }
}
