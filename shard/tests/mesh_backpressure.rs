//! Tiny rings: two shards flooding each other at once must finish, in order, without deadlock;
//! the overflow must report congestion while it is backed up and clear it afterwards.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flux_core::ShardId;
use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
use flux_shard::mesh::{build_mesh_with, Mesh, MeshConfig, MeshEndpoints, MeshStats};
use glommio::channels::local_channel;

const DEADLINE: Duration = Duration::from_secs(60);
const PER_PEER: u64 = 20_000;
const THRESHOLD_MSGS: usize = 64;

type Msg = (u16, u64);

#[derive(Debug, Default)]
struct Report {
    errors: Vec<String>,
    saw_congested: bool,
    congested_at_end: bool,
    stats: Option<MeshStats>,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Drains start only after both shards have flooded: the rings are certain to fill. (Without
    /// that barrier a shard whose executor started a few ms after its peer's found the peer
    /// already draining and never saw congestion.)
    DrainLate,
    /// Drains run from the start; senders respect `congested()` like connection drivers do.
    DrainEarlyWithBackpressure,
}

fn flood(mode: Mode) -> Vec<Report> {
    let shards = 2;
    let config = MeshConfig {
        ring_capacity: 2,
        congestion_threshold_msgs: THRESHOLD_MSGS,
    };
    let endpoints = build_mesh_with::<Msg>(shards, config);
    let reports: Arc<Mutex<Vec<Option<Report>>>> = Arc::new(Mutex::new(vec![None, None]));
    let r = reports.clone();
    let flooded = Arc::new(AtomicUsize::new(0));
    run_shards_with(
        ExecutorSpec {
            shards,
            io_memory_bytes: 256 * 1024,
        },
        Pinning::Unbound,
        endpoints,
        move |me, ep| {
            let reports = r.clone();
            let flooded = flooded.clone();
            async move {
                let report = shard_main(me, ep, mode, &flooded).await;
                reports.lock().unwrap()[me.index()] = Some(report);
            }
        },
    )
    .expect("executors ran");
    let mut reports = reports.lock().unwrap();
    reports
        .iter_mut()
        .map(|r| r.take().expect("every shard reported"))
        .collect()
}

async fn shard_main(
    me: ShardId,
    ep: MeshEndpoints<Msg>,
    mode: Mode,
    flooded: &AtomicUsize,
) -> Report {
    let mut report = Report::default();
    let Ok((mesh, inbound)) =
        glommio::timer::timeout(DEADLINE, async { Ok(ep.connect().await) }).await
    else {
        report.errors.push("connect timed out".into());
        return report;
    };
    let peer = ShardId(1 - me.0);
    let next = Rc::new(RefCell::new(0u64));
    let bad = Rc::new(RefCell::new(Vec::<String>::new()));
    let (done_tx, done_rx) = local_channel::new_unbounded::<()>();
    let handler = {
        let (next, bad) = (next.clone(), bad.clone());
        move |from: ShardId, batch: Vec<Msg>| {
            let mut next = next.borrow_mut();
            for (sender, seq) in batch {
                if sender != from.0 || seq != *next {
                    bad.borrow_mut().push(format!(
                        "from {from}: got ({sender}, #{seq}), expected #{next}"
                    ));
                }
                *next = seq + 1;
            }
            if *next == PER_PEER {
                let _ = done_tx.try_send(());
            }
        }
    };

    let mut inbound = Some(inbound);
    let mut handler = Some(handler);
    if let Mode::DrainEarlyWithBackpressure = mode {
        if let (Some(i), Some(h)) = (inbound.take(), handler.take()) {
            i.spawn_drains(None, h);
        }
    }

    for seq in 0..PER_PEER {
        mesh.send(peer, (me.0, seq));
        if seq % 100 == 99 {
            futures_lite::future::yield_now().await;
            report.saw_congested |= mesh.congested();
            if let Mode::DrainEarlyWithBackpressure = mode {
                if mesh.congested() {
                    mesh.wait_uncongested().await;
                }
            }
        }
    }
    futures_lite::future::yield_now().await;
    report.saw_congested |= mesh.congested();
    flooded.fetch_add(1, Ordering::SeqCst);
    if let Mode::DrainLate = mode {
        let both = glommio::timer::timeout(DEADLINE, async {
            while flooded.load(Ordering::SeqCst) < 2 {
                glommio::timer::sleep(Duration::from_micros(100)).await;
            }
            Ok(())
        })
        .await;
        if both.is_err() {
            report.errors.push("the peer did not finish flooding before the deadline".into());
        }
    }

    if let (Some(i), Some(h)) = (inbound.take(), handler.take()) {
        i.spawn_drains(None, h);
    }
    if glommio::timer::timeout(DEADLINE, async { Ok(done_rx.recv().await) })
        .await
        .is_err()
    {
        report.errors.push(format!(
            "received {} of {PER_PEER} before the deadline",
            next.borrow()
        ));
    }
    wait_quiet(&mesh, &mut report).await;
    report.congested_at_end = mesh.congested();
    report.errors.extend(bad.borrow().iter().take(5).cloned());
    report.stats = Some(mesh.stats());
    report
}

async fn wait_quiet(mesh: &Mesh<Msg>, report: &mut Report) {
    let quiet = glommio::timer::timeout(DEADLINE, async {
        mesh.flushed().await;
        mesh.wait_uncongested().await;
        Ok(())
    })
    .await;
    if quiet.is_err() {
        report
            .errors
            .push("outbound did not drain before the deadline".into());
    }
}

fn check_common(reports: &[Report]) {
    for r in reports {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(!r.congested_at_end, "{r:?}");
        let stats = r.stats.as_ref().expect("stats");
        let p = &stats.peers[0];
        assert_eq!(p.messages_sent, PER_PEER, "{stats:?}");
        assert_eq!(p.messages_received, PER_PEER, "{stats:?}");
        assert_eq!(p.overflow_msgs, 0, "{stats:?}");
        assert_eq!(p.dropped_msgs, 0, "{stats:?}");
    }
}

#[test]
fn tiny_rings_flooded_both_ways_complete_in_order_and_report_congestion() {
    let reports = flood(Mode::DrainLate);
    check_common(&reports);
    for r in &reports {
        assert!(r.saw_congested, "{r:?}");
        let p = &r.stats.as_ref().unwrap().peers[0];
        assert!(p.overflow_high_water_msgs > THRESHOLD_MSGS, "{r:?}");
    }
}

#[test]
fn tiny_rings_with_live_drains_and_backpressure_complete_in_order() {
    let reports = flood(Mode::DrainEarlyWithBackpressure);
    check_common(&reports);
}
