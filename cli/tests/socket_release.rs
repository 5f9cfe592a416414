//! A closed connection gives its socket back to the kernel. Each session's socket waits on a
//! multishot io_uring poll, and an armed poll holds a reference on the socket's file. If the poll
//! were not removed when the connection ends, the TCP connection would still finish (fluxd shuts
//! the socket down), but the kernel socket would stay allocated for the life of the process: a
//! leak that `/proc/<pid>/fd` and `/proc/net/tcp` do not show and `/proc/net/sockstat` does
//! (`TCP: ... alloc N`). One test, so that nothing else in this binary opens sockets meanwhile.

mod common;

use std::io::Write;
use std::thread;
use std::time::{Duration, Instant};

use common::raw::{self, Raw, V311, V5};
use common::{client_id_on_shard, Broker, WAIT};

const CONNECTIONS: u16 = 40;
/// Sockets other processes on the machine may open meanwhile; far below `CONNECTIONS`.
const SLACK: u64 = 5;

/// Allocated TCP sockets on the machine (`/proc/net/sockstat`).
fn tcp_sockets_allocated() -> u64 {
    let stat = std::fs::read_to_string("/proc/net/sockstat").expect("/proc/net/sockstat");
    let line = stat.lines().find(|l| l.starts_with("TCP:")).expect("TCP line");
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "alloc" {
            return words.next().and_then(|n| n.parse().ok()).expect("alloc count");
        }
    }
    panic!("no alloc count in {line:?}");
}

/// Waits (deadline `WAIT`) until allocated TCP sockets are back to `baseline` (plus `SLACK`).
fn wait_released(broker: &Broker, baseline: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = tcp_sockets_allocated();
        if now <= baseline + SLACK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {now} TCP sockets allocated, {baseline} before, after {WAIT:?}\n{}",
            broker.log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn closed_sessions_release_their_kernel_sockets() {
    let broker = Broker::start();
    // A first client, so that whatever the broker allocates once is in the baseline.
    drop(Raw::connected(broker.addr(), V311, &client_id_on_shard("warm", 0)));
    thread::sleep(Duration::from_millis(100));
    let baseline = tcp_sockets_allocated();

    // Clients that go away without DISCONNECT, after their session's read loop has waited.
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        let version = if i % 2 == 0 { V311 } else { V5 };
        let id = client_id_on_shard(&format!("release{i}"), i % 2);
        clients.push(Raw::connected(broker.addr(), version, &id));
    }
    let open = tcp_sockets_allocated();
    assert!(open >= baseline + u64::from(CONNECTIONS), "{open} allocated with {CONNECTIONS} open, {baseline} before");
    drop(clients);
    wait_released(&broker, baseline, "after the clients closed");

    // CONNECT and DISCONNECT in one write: the session ends on bytes it already has, before its
    // read loop ever waits, so its poll is released while it may still be queued for submission.
    for i in 0..CONNECTIONS {
        let version = if i % 2 == 0 { V311 } else { V5 };
        let id = client_id_on_shard(&format!("brief{i}"), i % 2);
        let mut raw = Raw::connect_tcp(broker.addr());
        let mut bytes = raw::connect(version, &id, 0);
        bytes.extend_from_slice(&raw::packet(raw::DISCONNECT << 4, &[]));
        raw.stream.write_all(&bytes).expect("write");
        raw.expect_close(WAIT);
    }
    wait_released(&broker, baseline, "after sessions that ended on their first bytes");
}
