//! The driver of one client connection: reads bytes, feeds the codec and the session machine,
//! carries out their decisions. All protocol decisions live in flux-core; this file only moves
//! bytes and waits.
//!
//! Runs on the session's home shard. A connection accepted elsewhere is handed over right after
//! its CONNECT is decoded, before any session state is touched.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flux_core::mqtt::{encode_packet, ConnAck, Connect, DecodeError, Decoder, Packet, ProtocolVersion, ReasonCode};
use flux_core::session::{connack_refusal, negotiate, Close, Event};
use flux_shard::broker::{Broker, ConnectionPermit, Opened};
use flux_shard::handover::SocketHandover;
use flux_shard::msg::ShardMsg;
use flux_shard::outbound::{Hold, Next, Outbound, Resolved};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{ReadReadiness, TcpStream};
use std::os::fd::AsRawFd;

/// Size of the per-shard scratch buffer reads land in; the largest single read.
const SCRATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// One scratch buffer per shard thread. glommio's non-buffered `poll_read` calls `recv` only
    /// inside `poll` and waits for readiness without a buffer, so a connection waiting for data
    /// holds no receive memory at all: bytes are copied from here into its own buffer only when
    /// they arrive.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice());
}

enum Read {
    Data,
    Eof,
    TimedOut,
    Failed(std::io::Error),
}

/// Wait for bytes and append them to `buf`. The stream is borrowed only inside `poll`, so the
/// writer task can use it between polls. A read timeout set on the stream ends the wait with
/// `TimedOut`.
async fn read_some(stream: &RefCell<TcpStream>, buf: &mut BytesMut) -> Read {
    std::future::poll_fn(|cx| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut s = stream.borrow_mut();
            match Pin::new(&mut *s).poll_read(cx, &mut scratch[..]) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(0)) => Poll::Ready(Read::Eof),
                Poll::Ready(Ok(n)) => {
                    buf.extend_from_slice(&scratch[..n]);
                    Poll::Ready(Read::Data)
                }
                Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => Poll::Ready(Read::TimedOut),
                Poll::Ready(Err(e)) => Poll::Ready(Read::Failed(e)),
            }
        })
    })
    .await
}

/// Wait until the socket is readable, as its multishot poll `ready` reports, and append what
/// `recv` returns to `buf`. An active connection re-arms nothing and allocates nothing per read; an
/// idle one holds only its readiness slot. `more` says the last `recv` filled the buffer (the
/// socket may hold more); after a short one, `recv` waits for the next readiness event, so a
/// message costs one `recv`, not a second one that finds the socket empty.
fn read_ready<'a>(
    stream: &'a RefCell<TcpStream>,
    ready: &'a ReadReadiness,
    more: &'a mut bool,
    buf: &'a mut BytesMut,
) -> impl Future<Output = Read> + 'a {
    std::future::poll_fn(move |cx| {
        if !*more && ready.poll_readable(cx).is_pending() {
            return Poll::Pending;
        }
        let fd = stream.borrow().as_raw_fd();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            loop {
                // SAFETY: `recv` writes at most `scratch.len()` bytes into the buffer it is given.
                let n = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
                if n > 0 {
                    let n = n as usize;
                    // After a short read the socket is drained, unless the peer hung up: the end
                    // of the stream (or an error) then waits for a read of its own, and no further
                    // readiness event will announce it.
                    *more = n == scratch.len() || ready.hung_up();
                    buf.extend_from_slice(&scratch[..n]);
                    return Poll::Ready(Read::Data);
                }
                if n == 0 {
                    return Poll::Ready(Read::Eof);
                }
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    // Ready consumes one readiness event (completions are only processed between
                    // polls, so there is at most one): this retries at most once.
                    std::io::ErrorKind::WouldBlock => {
                        *more = false;
                        match ready.poll_readable(cx) {
                            Poll::Ready(()) => continue,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    std::io::ErrorKind::Interrupted => continue,
                    _ => return Poll::Ready(Read::Failed(e)),
                }
            }
        })
    })
}

/// Write all of `data`, borrowing the stream only inside `poll`. A plain `poll_fn` (not an
/// `async fn`): it is part of every connection's task state.
fn write_all<'a>(stream: &'a RefCell<TcpStream>, data: &'a [u8]) -> impl Future<Output = std::io::Result<()>> + 'a {
    let mut written = 0;
    std::future::poll_fn(move |cx| {
        while written < data.len() {
            match Pin::new(&mut *stream.borrow_mut()).poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    })
}

fn set_read_timeout(stream: &RefCell<TcpStream>, timeout: Option<Duration>) {
    // glommio refuses a zero duration; the smallest wait stands in for "already due".
    let timeout = timeout.map(|d| d.max(Duration::from_millis(1)));
    if let Err(e) = stream.borrow().set_read_timeout(timeout) {
        tracing::debug!(error = %e, "set_read_timeout failed");
    }
}

/// Serve a socket accepted on this shard, or handed over to it (`already_read` then holds the
/// CONNECT and whatever followed it).
pub async fn serve(broker: Rc<Broker>, stream: TcpStream, already_read: Bytes) {
    let peer = stream.peer_addr().ok();
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let limits = broker.limits().clone();
    let stream = RefCell::new(stream);
    let mut buf = BytesMut::from(&already_read[..]);
    let mut decoder = Decoder::new(limits.max_packet_size_bytes as usize);
    let connect_timeout = Duration::from_secs(u64::from(limits.connect_timeout_secs));
    let deadline = Instant::now() + connect_timeout;

    // Phase 1: the CONNECT.
    let connect: Connect = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(Packet::Connect(c))) => break c,
            Ok(Some(_)) => {
                tracing::info!(?peer, "first packet is not CONNECT; closing");
                return;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::info!(?peer, error = %e, "bad CONNECT; closing");
                refuse_bad_connect(&stream, &e).await;
                return;
            }
        }
        set_read_timeout(&stream, Some(deadline.saturating_duration_since(Instant::now())));
        match read_some(&stream, &mut buf).await {
            Read::Data => {}
            Read::TimedOut => {
                tracing::info!(?peer, timeout_secs = limits.connect_timeout_secs, "no CONNECT in time; closing");
                return;
            }
            Read::Eof | Read::Failed(_) => return,
        }
    };

    // Phase 2: find the session's home shard.
    let home = if connect.client_id.is_empty() {
        broker.me()
    } else {
        flux_core::shard_for(connect.client_id.as_bytes(), broker.shard_count())
    };
    if home != broker.me() {
        // The CONNECT is re-encoded rather than kept as read: the same packet, no copy of the
        // receive buffer kept around for the rare handover.
        let mut bytes = BytesMut::new();
        let version = connect.protocol;
        encode_packet(&Packet::Connect(connect), version, &mut bytes);
        bytes.extend_from_slice(&buf);
        match SocketHandover::from_stream(stream.into_inner(), bytes.freeze()) {
            Ok(h) => broker.mesh().send(home, ShardMsg::Handover(h)),
            Err(e) => tracing::warn!(error = %e, "socket handover failed (dup)"),
        }
        return;
    }

    let version = connect.protocol;
    let Some(permit) = broker.try_acquire_connection() else {
        tracing::warn!(?peer, max_connections = limits.max_connections, "connection refused: max_connections reached");
        let reason = if version.is_v5() { ReasonCode::QuotaExceeded } else { ReasonCode::ServerUnavailable };
        write_connack(&stream, version, connack_refusal(reason)).await;
        return;
    };
    let negotiated = match negotiate(&connect, &limits, || broker.assign_client_id()) {
        Ok(n) => n,
        Err(reason) => {
            tracing::info!(?peer, client_id = %connect.client_id, ?reason, "CONNECT refused");
            write_connack(&stream, version, connack_refusal(reason)).await;
            return;
        }
    };
    drop(connect);
    // MQTT 3.1.2.10: the server closes after one and a half keep alive periods of silence
    // (enforced by the shard's housekeeping sweep).
    let keep_alive = (negotiated.keep_alive_secs > 0)
        .then(|| Duration::from_millis(u64::from(negotiated.keep_alive_secs) * 1500));
    let conn = Rc::new(Outbound::new(negotiated.protocol, stream.borrow().as_raw_fd(), keep_alive, Instant::now()));
    let opened = broker.open_session(&negotiated, conn.clone(), Instant::now());
    tracing::debug!(client_id = %negotiated.client_id, shard = %broker.me(), session_present = opened.session_present, "client connected");
    let client_id = broker
        .session_client_id(opened.key)
        .unwrap_or_else(|| std::sync::Arc::from(negotiated.client_id.as_str()));
    // The session loop runs as its own task: glommio sizes a task for its largest state, and the
    // CONNECT phase's state (3 KB: the CONNECT, limits, refusal paths) would otherwise stay
    // allocated for the whole life of every connection. This task ends here and frees it.
    let attached = Attached { buf, decoder, client_id, _permit: permit };
    glommio::spawn_local(run_session(broker, stream, conn, opened, attached)).detach();
}

/// What the read loop keeps of the CONNECT phase (the rest is dropped before the loop starts,
/// so that a long-lived idle connection carries only this).
struct Attached {
    buf: BytesMut,
    decoder: Decoder,
    /// The session's own `Arc` (one allocation for the session, the broker's table and this).
    client_id: std::sync::Arc<str>,
    _permit: ConnectionPermit,
}

/// One task per connection: the read loop and the write loop are two futures polled by the same
/// task (an idle connection then costs one task, and the socket lives inline in it instead of in
/// an `Rc` shared by two tasks). Each loop borrows the stream only inside `poll`, so they never
/// overlap. The reader goes first in every poll, so replies it produced are written in the same
/// poll.
///
/// Written as functions returning `async move` blocks rather than `async fn`s: an `async fn`
/// keeps its arguments twice in its state (as captured upvars and as moved locals), and this
/// state is what every idle connection costs.
fn run_session(
    broker: Rc<Broker>,
    stream: RefCell<TcpStream>,
    conn: Rc<Outbound>,
    opened: Opened,
    mut attached: Attached,
) -> impl Future<Output = ()> {
    async move {
        set_read_timeout(&stream, None); // the CONNECT deadline no longer applies
        // From here the reader waits on one multishot poll (see `read_ready`), not on the
        // stream's one-shot poll, which is dropped.
        stream.borrow_mut().release_read_poll();
        let ready = ReadReadiness::new(stream.borrow().as_raw_fd());
        // Once the reader ends, let the writer flush the DISCONNECT and what was queued, but not
        // forever: a client that stopped reading would otherwise hold this task, its buffers and
        // its socket.
        let flushed = Loops {
            reader: read_loop(&broker, &stream, &ready, &conn, &opened, &mut attached),
            writer: write_loop(&stream, &conn),
            reader_done: false,
            writer_done: false,
            flush_secs: broker.limits().close_flush_timeout_secs,
            flush_deadline: None,
        }
        .await;
        if !flushed {
            tracing::info!(client_id = %attached.client_id, "client not reading; socket shut down without a full flush");
            conn.shutdown_socket(); // the pending write is dropped with this task
        }
        tracing::debug!(client_id = %attached.client_id, "client disconnected");
    }
}

/// The read loop and the write loop of one connection, polled together by its task; a plain
/// struct rather than pinned locals and a `poll_fn`, because its size is what every idle
/// connection costs (with the task header it fits the allocator's 512-byte class). Completes
/// when the reader has ended and the writer has finished too (`true`) or its flush time ran out
/// (`false`).
struct Loops<R, W> {
    reader: R,
    writer: W,
    reader_done: bool,
    writer_done: bool,
    /// Seconds (not a `Duration`: 4 bytes instead of 16, and every idle connection has this).
    flush_secs: u32,
    flush_deadline: Option<glommio::timer::Timer>,
}

impl<R: Future<Output = ()>, W: Future<Output = ()>> Future for Loops<R, W> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        // SAFETY: structural pinning. `reader` and `writer` are only ever used through pinned
        // references made here, never moved out, and `Loops` has no `Drop` impl; the other
        // fields are not pinned (a `Timer` is `Unpin`).
        let this = unsafe { self.get_unchecked_mut() };
        if !this.reader_done {
            // The reader goes first, so replies it produced are written in the same poll.
            let reader = unsafe { Pin::new_unchecked(&mut this.reader) };
            this.reader_done = reader.poll(cx).is_ready();
        }
        if !this.writer_done {
            let writer = unsafe { Pin::new_unchecked(&mut this.writer) };
            this.writer_done = writer.poll(cx).is_ready();
        }
        match (this.reader_done, this.writer_done) {
            (false, _) => Poll::Pending,
            (true, true) => Poll::Ready(true),
            (true, false) => {
                let flush = Duration::from_secs(u64::from(this.flush_secs));
                let deadline = this.flush_deadline.get_or_insert_with(|| glommio::timer::Timer::new(flush));
                match Pin::new(deadline).poll(cx) {
                    Poll::Ready(_) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

/// Write what the connection's `Outbound` hands out, in order, waiting on its holds. Ends when the
/// connection is closing and everything is written (or a write failed); the socket is then shut.
fn write_loop<'a>(stream: &'a RefCell<TcpStream>, conn: &'a Outbound) -> impl Future<Output = ()> + 'a {
    async move {
        // Bytes gathered for one write: everything up to a hold that must still be waited for
        // (holds already resolved, such as a run of acknowledgements behind one commit, are
        // passed without a write each).
        let mut batch = BytesMut::new();
        loop {
            // Taken out of the match so that no `Next` stays in the task's state across the
            // awaits below.
            let hold = match conn.next() {
                Next::Write(data) => {
                    if batch.is_empty() {
                        batch = data;
                    } else {
                        batch.extend_from_slice(&data);
                    }
                    continue;
                }
                Next::Wait(hold) => Some(hold),
                Next::Idle => None,
            };
            let Some(hold) = hold else {
                if !batch.is_empty() {
                    if write_all(stream, &batch).await.is_err() {
                        conn.shutdown_socket();
                        break;
                    }
                    // Give the allocation back: an idle connection holds no send buffer.
                    batch = BytesMut::new();
                    conn.notify_drained();
                } else if conn.is_closing() {
                    conn.shutdown_socket();
                    break;
                } else {
                    conn.wait().await;
                }
                continue;
            };
            let resolved = match hold.try_resolve() {
                Some(r) => r,
                // Boxed: flushing what came before and waiting for the hold (a WAL commit is a
                // future of about 1 KB) is rare next to the life of a connection; inline, that
                // state would size every connection's task, idle ones included.
                None => match Box::pin(flush_then_resolve(stream, conn, &mut batch, hold)).await {
                    Some(r) => r,
                    None => break,
                },
            };
            match resolved {
                Resolved::Go => {}
                Resolved::Write(packet) => batch.extend_from_slice(&conn.encode_one(&packet)),
                Resolved::Failed => {
                    tracing::error!("durable write failed; acknowledgement withheld and connection closed");
                    batch.clear();
                    conn.fail_held();
                }
            }
        }
    }
}

/// Writes `batch` (if any), then waits for `hold`. `None`: the write failed and the socket is shut.
async fn flush_then_resolve(stream: &RefCell<TcpStream>, conn: &Outbound, batch: &mut BytesMut, hold: Hold) -> Option<Resolved> {
    if !batch.is_empty() {
        if write_all(stream, batch).await.is_err() {
            conn.shutdown_socket();
            return None;
        }
        batch.clear();
        conn.notify_drained();
    }
    Some(hold.resolve().await)
}

/// Read, decode and process packets until the connection closes; then detach the session.
fn read_loop<'a>(
    broker: &'a Rc<Broker>,
    stream: &'a RefCell<TcpStream>,
    ready: &'a ReadReadiness,
    conn: &'a Outbound,
    opened: &'a Opened,
    attached: &'a mut Attached,
) -> impl Future<Output = ()> + 'a {
    async move {
        let mut publish_will = true;
        // The socket may already hold bytes sent right after the CONNECT: read before waiting.
        let mut more = true;
        'conn: loop {
            loop {
                let packet = match attached.decoder.decode(&mut attached.buf) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(client_id = %attached.client_id, error = %e, reason = ?e.reason(), "malformed input; closing connection");
                        conn.close(Some(e.reason()));
                        break 'conn;
                    }
                };
                match process(broker, opened, packet) {
                    Ok(None) => {}
                    Ok(Some(wait)) => wait.await,
                    Err(close) => {
                        if close.reason.is_error() {
                            tracing::info!(client_id = %attached.client_id, reason = ?close.reason, "closing connection");
                        }
                        conn.close(close.send_disconnect.then_some(close.reason));
                        publish_will = !close.discard_will;
                        break 'conn;
                    }
                }
            }
            if conn.is_closing() {
                break;
            }
            if attached.buf.is_empty() {
                // Drop our handle on the last read's allocation: an idle connection holds no
                // receive memory (decoded payloads keep their own references).
                attached.buf = BytesMut::new();
            }
            if broker.mesh().congested() {
                broker.mesh().wait_uncongested().await;
            }
            // Replies (PUBACK, PINGRESP, ...) to a client that does not read them are bounded
            // too. Acknowledgements waiting for the disk: a few windows' worth (receive maximum).
            let max_holds = usize::from(broker.limits().max_inflight_messages.max(1)) * 4;
            conn.wait_writable(broker.limits().max_outbound_buffer_bytes, max_holds).await;
            // A socket that always has data never makes a read wait: let the shard's other
            // tasks (ring flushes, drains, other connections) run when this one had its share.
            glommio::yield_if_needed().await;
            match read_ready(stream, ready, &mut more, &mut attached.buf).await {
                Read::Data => conn.touch(Instant::now()),
                Read::TimedOut | Read::Eof => {
                    conn.close(None);
                    break;
                }
                Read::Failed(e) => {
                    tracing::debug!(client_id = %attached.client_id, error = %e, "read failed; closing connection");
                    conn.close(None);
                    break;
                }
            }
        }
        broker.connection_closed(opened.key, opened.conn_id, publish_will, Instant::now());
    }
}

/// Work the read loop must finish before the next packet: rare (a SUBACK waiting for every
/// shard's route table and the retained replay), so it is boxed and the connection's own state
/// stays small.
type Continuation = Pin<Box<dyn Future<Output = ()>>>;

/// Run one packet through the session and carry out its events.
fn process(broker: &Rc<Broker>, opened: &Opened, packet: Packet) -> Result<Option<Continuation>, Close> {
    let now = Instant::now();
    let (key, conn_id) = (opened.key, opened.conn_id);
    let mut wait: Option<Continuation> = None;
    for event in broker.handle_packet(key, packet, now)? {
        let next: Option<Continuation> = match event {
            Event::Publish { message, ack } => {
                // The acknowledgement waits (if it must) in the connection's outbound stream,
                // behind a hold, so reading goes on meanwhile.
                broker.publish_from(key, conn_id, message, ack, now);
                None
            }
            Event::Subscribe { added, suback } => {
                let broker = broker.clone();
                Some(Box::pin(async move { broker.subscribe(key, conn_id, added, suback, now).await }))
            }
            Event::Unsubscribe { removed } => {
                broker.unsubscribe(key, &removed);
                None
            }
            Event::QueueAck { tag, accepted } => {
                broker.queue_ack(tag, accepted);
                None
            }
        };
        // One packet yields at most one event today; chain them in order if that changes.
        wait = match (wait, next) {
            (Some(a), Some(b)) => Some(Box::pin(async move {
                a.await;
                b.await
            })),
            (a, b) => a.or(b),
        };
    }
    Ok(wait)
}

async fn write_connack(stream: &RefCell<TcpStream>, version: ProtocolVersion, connack: ConnAck) {
    let mut out = BytesMut::new();
    encode_packet(&Packet::ConnAck(connack), version, &mut out);
    let _ = write_all(stream, &out).await;
}

/// MQTT 3.1.2.2 / 5 3.1.2.2: an unsupported protocol level is answered with CONNACK 0x01 (3.1.1
/// form) or 0x84 (5.0), then the connection closes. Other CONNECT errors close without a reply.
async fn refuse_bad_connect(stream: &RefCell<TcpStream>, e: &DecodeError) {
    if let DecodeError::UnsupportedProtocolVersion(_) = e {
        write_connack(stream, ProtocolVersion::V311, connack_refusal(ReasonCode::UnsupportedProtocolVersion)).await;
    }
}
