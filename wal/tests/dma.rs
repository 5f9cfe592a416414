//! The log on a real disk: glommio `DmaFile` (O_DIRECT) segments in a temporary directory.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use common::{rec, run_glommio};
use flux_wal::storage::segment_file_name;
use flux_wal::{DmaStorage, DmaStorageOptions, Lsn, Record, Wal, WalConfig, WalError};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("flux-wal-test-")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn config(segment_size_bytes: u64) -> WalConfig {
    WalConfig {
        segment_size_bytes,
        max_group_bytes: 1 << 20,
        max_pending_bytes: 8 << 20,
        ..WalConfig::default()
    }
}

async fn open(
    dir: &std::path::Path,
    cfg: WalConfig,
) -> Result<
    (
        Wal<DmaStorage>,
        Vec<(Lsn, Record)>,
        flux_wal::RecoveryReport,
    ),
    WalError,
> {
    let storage = DmaStorage::open(dir, DmaStorageOptions::default())
        .await
        .expect("storage");
    let mut got = Vec::new();
    let (wal, report) = Wal::open(storage, cfg, |lsn, r| {
        got.push((lsn, r.to_record().expect("deserialize")))
    })
    .await?;
    Ok((wal, got, report))
}

#[test]
fn append_commit_reopen_recover_on_disk() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    run_glommio(move || async move {
        let (wal, got, _) = open(&path, config(64 << 10)).await.unwrap();
        assert!(got.is_empty());
        let wal = Rc::new(wal);
        // 16 concurrent appenders, each awaiting its commit.
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let wal = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                for i in 0..50u64 {
                    let lsn = wal.append(&rec(t * 1000 + i)).unwrap();
                    let durable = wal.commit().await.unwrap();
                    assert!(durable > lsn);
                }
            }));
        }
        for t in tasks {
            t.await;
        }
        assert_eq!(wal.durable_lsn(), Lsn(800));
        assert!(
            wal.group_commits() < 800,
            "no grouping: {}",
            wal.group_commits()
        );
        let segments = wal.segment_ids();
        assert!(segments.len() > 1, "expected rollover: {segments:?}");
        let usage = wal.disk_usage();
        drop(wal);
        let (wal, got, report) = open(&path, config(64 << 10)).await.unwrap();
        assert_eq!(got.len(), 800);
        assert_eq!(report.truncated, None);
        assert_eq!(wal.segment_ids(), segments);
        assert_eq!(wal.disk_usage(), usage);
        for (i, (lsn, _)) in got.iter().enumerate() {
            assert_eq!(lsn.0, i as u64);
        }
        // Each task's records appear in its own order.
        for t in 0..16u64 {
            let mine: Vec<_> = got
                .iter()
                .filter_map(|(_, r)| (0..50).find(|i| *r == rec(t * 1000 + i)))
                .collect();
            assert_eq!(mine, (0..50).collect::<Vec<_>>(), "task {t}");
        }
        // Reclaim and check the files are gone.
        let r = wal.reclaim_before(Lsn(segments[1])).await.unwrap();
        assert_eq!(r.removed_segments, vec![segments[0]]);
        assert!(!path.join(segment_file_name(segments[0])).exists());
    });
}

/// Writes `bytes` at `offset` of a segment file with std (the log is closed).
fn poke(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0; len];
    f.read_exact(&mut v).unwrap();
    v
}

#[test]
fn torn_tail_on_disk_is_truncated_and_logged() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    run_glommio(move || async move {
        let (wal, _, _) = open(&path, config(1 << 20)).await.unwrap();
        for i in 0..10 {
            wal.append(&rec(i)).unwrap();
        }
        wal.commit().await.unwrap();
        let end = wal.disk_usage().used_bytes;
        drop(wal);
        // Simulate a torn group after the end: a frame copied from the start, cut in half, with
        // an LSN that would follow, plus a stray later sector.
        let seg = path.join(segment_file_name(0));
        let head = read_at(&seg, 0, 64);
        poke(&seg, end, &head[..40]);
        poke(&seg, end + 1024, &[0xEE; 100]);
        let (wal, got, report) = open(&path, config(1 << 20)).await.unwrap();
        assert_eq!(got.len(), 10);
        let cut = report.truncated.expect("torn tail reported");
        assert_eq!(cut.offset, end);
        assert_eq!(read_at(&seg, end, 2048), vec![0; 2048], "torn bytes zeroed");
        wal.append(&rec(10)).unwrap();
        wal.commit().await.unwrap();
        drop(wal);
        let (_, got, report) = open(&path, config(1 << 20)).await.unwrap();
        assert_eq!(got.len(), 11);
        assert_eq!(report.truncated, None);
    });
}

#[test]
fn corruption_on_disk_names_file_and_offset() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    run_glommio(move || async move {
        let (wal, _, _) = open(&path, config(1 << 20)).await.unwrap();
        for i in 0..10 {
            wal.append(&rec(i)).unwrap();
            wal.commit().await.unwrap();
        }
        drop(wal);
        let seg = path.join(segment_file_name(0));
        let mut b = read_at(&seg, 20, 1);
        b[0] ^= 0x40;
        poke(&seg, 20, &b);
        match open(&path, config(1 << 20)).await {
            Err(WalError::Corrupt {
                segment, offset, ..
            }) => {
                assert_eq!(segment, seg.display().to_string());
                assert_eq!(offset, 0);
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("corruption not detected"),
        }
    });
}

/// The default data directory is relative (`./data`): segments created there must sync their
/// directory too (glommio's directory open fails with EBADF on a relative path).
#[test]
fn relative_directory_creates_segments_and_recovers() {
    let dir = tempdir();
    let cwd = std::env::current_dir().expect("cwd");
    let up = "../".repeat(cwd.components().count().saturating_sub(1));
    let absolute = dir.path().to_path_buf();
    let relative = std::path::PathBuf::from(format!("{up}{}", absolute.display().to_string().trim_start_matches('/')));
    assert!(relative.is_relative());
    run_glommio(move || async move {
        let (wal, _, _) = open(&relative, config(64 << 10)).await.unwrap();
        for i in 0..10 {
            wal.append(&rec(i)).unwrap();
            wal.commit().await.expect("commit in a relative directory");
        }
        drop(wal);
        let (_, got, _) = open(&relative, config(64 << 10)).await.unwrap();
        assert_eq!(got.len(), 10);
    });
}

#[test]
fn rollover_takes_the_spare_segment_and_recovery_reads_through_it() {
    let dir = tempdir();
    let path = dir.path().to_path_buf();
    run_glommio(move || async move {
        let (wal, _, _) = open(&path, config(64 << 10)).await.unwrap();
        assert!(!wal.prepare_spare().await.unwrap(), "a log never written keeps no spare");
        wal.append_commit(&rec(0)).await.unwrap();
        let mut n = 1u64;
        assert!(wal.prepare_spare().await.unwrap(), "a spare is made");
        assert!(wal.has_spare());
        assert!(!wal.prepare_spare().await.unwrap(), "one spare at a time");
        assert!(path.join("spare.wal.tmp").exists());
        // Enough records to roll over into a second segment.
        while wal.segment_ids().len() < 2 {
            wal.append_commit(&rec(n)).await.unwrap();
            n += 1;
        }
        assert!(!wal.has_spare(), "the rollover took the spare");
        assert!(!path.join("spare.wal.tmp").exists());
        let seg = path.join(segment_file_name(wal.segment_ids()[1]));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), 64 << 10);
        assert!(wal.prepare_spare().await.unwrap());
        drop(wal);
        let (_, got, _) = open(&path, config(64 << 10)).await.unwrap();
        assert_eq!(got.len() as u64, n, "every committed record recovered across the spare");
        assert!(!path.join("spare.wal.tmp").exists(), "a leftover spare is removed at open");
    });
}
