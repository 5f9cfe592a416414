//! Every shard sends numbered messages to every other over real executors; all must arrive, in
//! per-sender order, batched.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flux_core::ShardId;
use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
use flux_shard::mesh::{build_mesh, MeshStats};
use glommio::channels::local_channel;

const DEADLINE: Duration = Duration::from_secs(60);

/// (sender, sequence number)
type Msg = (u16, u64);

struct Report {
    errors: Vec<String>,
    stats: Option<MeshStats>,
}

fn exchange(shards: u16, ring_capacity: usize, per_peer: u64) -> Vec<Report> {
    let endpoints = build_mesh::<Msg>(shards, ring_capacity);
    let reports: Arc<Mutex<Vec<Option<Report>>>> =
        Arc::new(Mutex::new((0..shards).map(|_| None).collect()));
    let spec = ExecutorSpec {
        shards,
        io_memory_bytes: 256 * 1024,
    };
    let r = reports.clone();
    run_shards_with(spec, Pinning::Unbound, endpoints, move |me, ep| {
        let reports = r.clone();
        async move {
            let report = shard_main(me, shards, per_peer, ep).await;
            reports.lock().unwrap()[me.index()] = Some(report);
        }
    })
    .expect("executors ran");
    let mut reports = reports.lock().unwrap();
    reports
        .iter_mut()
        .map(|r| r.take().expect("every shard reported"))
        .collect()
}

async fn shard_main(
    me: ShardId,
    shards: u16,
    per_peer: u64,
    ep: flux_shard::mesh::MeshEndpoints<Msg>,
) -> Report {
    let mut errors = Vec::new();
    let Ok((mesh, inbound)) =
        glommio::timer::timeout(DEADLINE, async { Ok(ep.connect().await) }).await
    else {
        return Report {
            errors: vec![format!("{me}: connect timed out")],
            stats: None,
        };
    };
    let expected_total = per_peer * u64::from(shards - 1);
    let next = Rc::new(RefCell::new(vec![0u64; usize::from(shards)]));
    let bad = Rc::new(RefCell::new(Vec::<String>::new()));
    let received = Rc::new(RefCell::new(0u64));
    let (done_tx, done_rx) = local_channel::new_unbounded::<()>();
    {
        let (next, bad, received) = (next.clone(), bad.clone(), received.clone());
        inbound.spawn_drains(None, move |from, batch| {
            let mut next = next.borrow_mut();
            for (sender, seq) in batch {
                if sender != from.0 {
                    bad.borrow_mut().push(format!(
                        "ring from {from} carried a message of shard-{sender}"
                    ));
                }
                let want = &mut next[from.index()];
                if seq != *want {
                    bad.borrow_mut()
                        .push(format!("from {from}: got #{seq}, expected #{want}"));
                }
                *want = seq + 1;
                *received.borrow_mut() += 1;
            }
            if *received.borrow() == expected_total {
                let _ = done_tx.try_send(());
            }
        });
    }

    for seq in 0..per_peer {
        for to in (0..shards).filter(|&s| s != me.0) {
            mesh.send(ShardId(to), (me.0, seq));
        }
        if seq % 97 == 96 {
            futures_lite::future::yield_now().await;
        }
        if mesh.congested() {
            mesh.wait_uncongested().await;
        }
    }

    if expected_total > 0
        && glommio::timer::timeout(DEADLINE, async {
            done_rx.recv().await;
            Ok(())
        })
        .await
        .is_err()
    {
        errors.push(format!(
            "{me}: received {} of {expected_total} before the deadline",
            received.borrow()
        ));
    }
    if glommio::timer::timeout(DEADLINE, async {
        mesh.flushed().await;
        Ok(())
    })
    .await
    .is_err()
    {
        errors.push(format!("{me}: outbound not flushed before the deadline"));
    }
    errors.extend(bad.borrow().iter().take(5).cloned());
    Report {
        errors,
        stats: Some(mesh.stats()),
    }
}

fn check(reports: &[Report], per_peer: u64) {
    for r in reports {
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let stats = r.stats.as_ref().expect("stats");
        assert_eq!(stats.misrouted_msgs, 0);
        for p in &stats.peers {
            assert_eq!(p.messages_sent, per_peer, "{stats:?}");
            assert_eq!(p.messages_received, per_peer, "{stats:?}");
            assert_eq!(p.dropped_msgs, 0, "{stats:?}");
            assert_eq!(p.overflow_msgs, 0, "{stats:?}");
            // Batching: 10_000 messages in ticks of 97 must not take one slot per message.
            assert!(p.batches_sent * 10 <= p.messages_sent, "{stats:?}");
        }
    }
}

#[test]
fn two_shards_deliver_everything_in_sender_order() {
    let reports = exchange(2, 1024, 10_000);
    check(&reports, 10_000);
}

#[test]
fn three_shards_deliver_everything_in_sender_order() {
    let reports = exchange(3, 1024, 10_000);
    check(&reports, 10_000);
}

#[test]
fn three_shards_small_rings_deliver_everything_in_sender_order() {
    let reports = exchange(3, 4, 10_000);
    check(&reports, 10_000);
}

#[test]
fn one_shard_mesh_has_no_peers() {
    let reports = exchange(1, 16, 10);
    assert!(reports[0].errors.is_empty());
    assert!(reports[0].stats.as_ref().unwrap().peers.is_empty());
}

#[test]
fn sending_to_a_shard_that_is_gone_drops_and_counts_without_blocking() {
    let outcome: Arc<Mutex<Option<Result<MeshStats, String>>>> = Arc::new(Mutex::new(None));
    let o = outcome.clone();
    run_shards_with(
        ExecutorSpec {
            shards: 2,
            io_memory_bytes: 256 * 1024,
        },
        Pinning::Unbound,
        build_mesh::<Msg>(2, 4),
        move |me, ep| {
            let outcome = o.clone();
            async move {
                let (mesh, inbound) = ep.connect().await;
                if me == ShardId(1) {
                    return; // shard 1 leaves at once: its rings close
                }
                inbound.spawn_drains(None, |_, _| {});
                mesh.send(ShardId(0), (0, 0)); // to myself: dropped and counted, no panic
                let start = std::time::Instant::now();
                let res = loop {
                    for seq in 0..100 {
                        mesh.send(ShardId(1), (0, seq));
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    let stats = mesh.stats();
                    if stats.peers[0].dropped_msgs > 0 && mesh.is_flushed() {
                        break Ok(stats);
                    }
                    if start.elapsed() > DEADLINE {
                        break Err(format!("no drop seen: {stats:?}"));
                    }
                };
                *outcome.lock().unwrap() = Some(res);
            }
        },
    )
    .expect("executors ran");
    let stats = outcome
        .lock()
        .unwrap()
        .take()
        .expect("shard 0 reported")
        .expect("drops seen");
    assert_eq!(stats.misrouted_msgs, 1);
    assert!(stats.peers[0].dropped_msgs > 0);
}
