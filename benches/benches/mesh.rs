//! One ring hop between two shards (flux_shard::mesh) on real glommio executors.
//!
//! Two executors run for the whole bench; the criterion closure (main thread) hands shard 0 a
//! command over a std channel and blocks for the measured duration, which shard 0 times itself:
//! - `ping_pong`: shard 0 sends one message, shard 1 echoes it, shard 0 waits for the echo before
//!   the next. One iteration is a round trip = two hops, each including the mesh's flush task and
//!   the receiving drain task being scheduled (latency; the shards are unpinned, so on a 2-core
//!   machine they share the CPUs with criterion's thread).
//! - `burst_echo_1000`: shard 0 sends 1000 messages back to back (batched by the mesh), shard 1
//!   echoes each; time until all 1000 echoes are back (throughput per message, per round trip).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flux_core::ShardId;
use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
use flux_shard::mesh::{build_mesh, MeshEndpoints};
use glommio::channels::local_channel;

const STOP: u64 = u64::MAX;
const BURST: u64 = 1000;

enum Cmd {
    PingPong(u64),
    Burst(u64),
    Stop,
}

type Control = (mpsc::Receiver<Cmd>, mpsc::Sender<Duration>);

struct Harness {
    cmd: mpsc::Sender<Cmd>,
    result: mpsc::Receiver<Duration>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    fn start() -> Harness {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        let endpoints = build_mesh::<u64>(2, 1024);
        let mut per_shard: Vec<(MeshEndpoints<u64>, Option<Control>)> = Vec::new();
        let mut control = Some((cmd_rx, res_tx));
        for ep in endpoints {
            per_shard.push((ep, control.take()));
        }
        let thread = std::thread::spawn(move || {
            let spec = ExecutorSpec { shards: 2, io_memory_bytes: 256 * 1024 };
            run_shards_with(spec, Pinning::Unbound, per_shard, |me, (ep, control)| async move {
                shard_main(me, ep, control).await
            })
            .expect("executors ran");
        });
        Harness { cmd: cmd_tx, result: res_rx, thread: Some(thread) }
    }

    fn measure(&self, cmd: Cmd) -> Duration {
        self.cmd.send(cmd).expect("shard 0 is running");
        self.result.recv_timeout(Duration::from_secs(120)).expect("shard 0 answered in time")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn shard_main(me: ShardId, ep: MeshEndpoints<u64>, control: Option<Control>) {
    let (mesh, inbound) = ep.connect().await;
    let (stop_tx, stop_rx) = local_channel::new_bounded::<()>(1);
    let received = Rc::new(Cell::new(0u64));
    let (wake_tx, wake_rx) = local_channel::new_unbounded::<()>();
    let target = Rc::new(Cell::new(u64::MAX));
    {
        let (mesh, received, target) = (mesh.clone(), received.clone(), target.clone());
        inbound.spawn_drains(None, move |from, batch| {
            for msg in batch {
                if me.0 == 1 {
                    // Echo shard.
                    if msg == STOP {
                        let _ = stop_tx.try_send(());
                    } else {
                        mesh.send(from, msg);
                    }
                } else {
                    received.set(received.get() + 1);
                    if received.get() >= target.get() {
                        target.set(u64::MAX);
                        let _ = wake_tx.try_send(());
                    }
                }
            }
        });
    }
    let Some((cmd_rx, res_tx)) = control else {
        // Shard 1: echo until told to stop.
        let _ = stop_rx.recv().await;
        mesh.flushed().await;
        return;
    };
    let peer = ShardId(1);
    loop {
        let cmd = match cmd_rx.try_recv() {
            Ok(cmd) => cmd,
            Err(mpsc::TryRecvError::Empty) => {
                glommio::timer::sleep(Duration::from_micros(100)).await;
                continue;
            }
            Err(mpsc::TryRecvError::Disconnected) => Cmd::Stop,
        };
        match cmd {
            Cmd::PingPong(iters) => {
                let start = Instant::now();
                for i in 0..iters {
                    received.set(0);
                    target.set(1);
                    mesh.send(peer, i);
                    let _ = wake_rx.recv().await;
                }
                let _ = res_tx.send(start.elapsed());
            }
            Cmd::Burst(iters) => {
                let start = Instant::now();
                for _ in 0..iters {
                    received.set(0);
                    target.set(BURST);
                    for i in 0..BURST {
                        mesh.send(peer, i);
                        if mesh.congested() {
                            mesh.wait_uncongested().await;
                        }
                    }
                    let _ = wake_rx.recv().await;
                }
                let _ = res_tx.send(start.elapsed());
            }
            Cmd::Stop => {
                mesh.send(peer, STOP);
                mesh.flushed().await;
                return;
            }
        }
    }
}

fn bench_mesh(c: &mut Criterion) {
    let harness = Harness::start();
    let mut group = c.benchmark_group("mesh_two_shards");
    group.bench_function("ping_pong_round_trip", |b| {
        b.iter_custom(|iters| harness.measure(Cmd::PingPong(iters)))
    });
    group.throughput(Throughput::Elements(BURST));
    group.bench_function("burst_echo_1000", |b| {
        b.iter_custom(|iters| harness.measure(Cmd::Burst(iters)))
    });
    group.finish();
    drop(harness);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_mesh
}
criterion_main!(benches);
