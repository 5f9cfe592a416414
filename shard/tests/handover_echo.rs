//! Shard 0 accepts a TCP connection, reads a few bytes and hands the socket plus those bytes to
//! shard 1 over the mesh; shard 1 rebuilds the stream and echoes. The client must see the
//! handed-over bytes first, then the echo of what it sends after the handover.

use std::io::{Read, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flux_core::ShardId;
use flux_shard::executor::{run_shards_with, ExecutorSpec, Pinning};
use flux_shard::handover::SocketHandover;
use flux_shard::mesh::{build_mesh, MeshEndpoints};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel;
use glommio::net::TcpListener;

type ShardResult = Option<Result<(), String>>;

const DEADLINE: Duration = Duration::from_secs(30);
const HEAD: &[u8] = b"HEAD";
const TAIL: &[u8] = b"tail after the handover";

fn client(port_rx: mpsc::Receiver<u16>) -> Result<Vec<u8>, String> {
    let port = port_rx
        .recv_timeout(DEADLINE)
        .map_err(|e| format!("no port: {e}"))?;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(HEAD).map_err(|e| e.to_string())?;
    // The head comes back from shard 1 only after the handover happened.
    let mut got = vec![0u8; HEAD.len()];
    s.read_exact(&mut got)
        .map_err(|e| format!("reading echoed head: {e}"))?;
    s.write_all(TAIL).map_err(|e| e.to_string())?;
    let mut tail = vec![0u8; TAIL.len()];
    s.read_exact(&mut tail)
        .map_err(|e| format!("reading echoed tail: {e}"))?;
    got.extend_from_slice(&tail);
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for close: {e}"))?;
    got.extend_from_slice(&rest);
    Ok(got)
}

async fn shard0(
    ep: MeshEndpoints<SocketHandover>,
    port_tx: mpsc::Sender<u16>,
) -> Result<(), String> {
    let (mesh, inbound) = ep.connect().await;
    inbound.spawn_drains(None, |_, _| {});
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    port_tx.send(port).map_err(|e| e.to_string())?;
    let mut stream = listener.accept().await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut head = vec![0u8; HEAD.len()];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let handover =
        SocketHandover::from_stream(stream, Bytes::from(head)).map_err(|e| e.to_string())?;
    mesh.send(ShardId(1), handover);
    mesh.flushed().await;
    Ok(())
}

async fn shard1(ep: MeshEndpoints<SocketHandover>) -> Result<(), String> {
    let (_mesh, inbound) = ep.connect().await;
    let (tx, rx) = local_channel::new_unbounded::<SocketHandover>();
    inbound.spawn_drains(None, move |_, batch| {
        for h in batch {
            let _ = tx.try_send(h);
        }
    });
    let handover = rx.recv().await.ok_or("mesh closed before the handover")?;
    let (mut stream, already_read) = handover.into_stream().map_err(|e| e.to_string())?;
    stream
        .write_all(&already_read)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        stream
            .write_all(&buf[..n])
            .await
            .map_err(|e| e.to_string())?;
    }
    stream.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn handed_over_socket_echoes_read_bytes_and_later_data() {
    let (port_tx, port_rx) = mpsc::channel();
    let client = std::thread::spawn(move || client(port_rx));
    let results: Arc<Mutex<Vec<ShardResult>>> = Arc::new(Mutex::new(vec![None, None]));
    let r = results.clone();
    // Per-shard values: each shard's endpoints, and the port reporter for shard 0 only.
    let per_shard: Vec<_> = build_mesh::<SocketHandover>(2, 16)
        .into_iter()
        .zip([Some(port_tx), None])
        .collect();
    run_shards_with(
        ExecutorSpec {
            shards: 2,
            io_memory_bytes: 256 * 1024,
        },
        Pinning::Unbound,
        per_shard,
        move |me, (ep, port_tx)| {
            let results = r.clone();
            async move {
                let work = async {
                    match (me.0, port_tx) {
                        (0, Some(port_tx)) => shard0(ep, port_tx).await,
                        (0, None) => Err("no port sender".to_string()),
                        _ => shard1(ep).await,
                    }
                };
                let res = glommio::timer::timeout(DEADLINE, async { Ok(work.await) })
                    .await
                    .unwrap_or_else(|_| Err("deadline passed".to_string()));
                results.lock().unwrap()[me.index()] = Some(res);
            }
        },
    )
    .expect("executors ran");
    for (i, r) in results.lock().unwrap().iter().enumerate() {
        assert_eq!(r, &Some(Ok(())), "shard {i}");
    }
    let seen = client.join().expect("client thread").expect("client");
    let mut want = HEAD.to_vec();
    want.extend_from_slice(TAIL);
    assert_eq!(seen, want);
}
