//! The outbound side of one live client connection, shared between its writer task and anything
//! on the shard that sends to it (deliveries from drain tasks, takeover, shutdown).
//!
//! Lives on the connection's home shard only (it is `!Send`).

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flux_core::mqtt::{encode_packet, Disconnect, Packet, ProtocolVersion, ReasonCode};

use crate::signal::Signal;

pub struct Outbound {
    version: ProtocolVersion,
    buf: RefCell<BytesMut>,
    wake: Signal,
    /// Notified when the writer finished a write (or the connection closes): the reader waits on
    /// it while too much output is unwritten.
    drained: Signal,
    closing: Cell<bool>,
    fd: RawFd,
    /// 1.5 x the negotiated keep alive (MQTT 3.1.2.10); `None`: no keep alive.
    keep_alive_grace: Option<Duration>,
    /// When the client last sent bytes. Checked by the shard's housekeeping sweep rather than a
    /// timer per read: a read only stores an instant.
    last_read: Cell<Instant>,
}

impl Outbound {
    pub fn new(version: ProtocolVersion, fd: RawFd, keep_alive_grace: Option<Duration>, now: Instant) -> Outbound {
        Outbound {
            version,
            buf: RefCell::new(BytesMut::new()),
            wake: Signal::default(),
            drained: Signal::default(),
            closing: Cell::new(false),
            fd,
            keep_alive_grace,
            last_read: Cell::new(now),
        }
    }

    /// The client sent something at `now`.
    pub fn touch(&self, now: Instant) {
        self.last_read.set(now);
    }

    /// Whether the client has been silent for longer than 1.5 x its keep alive.
    pub fn keep_alive_expired(&self, now: Instant) -> bool {
        self.keep_alive_grace.is_some_and(|grace| now.saturating_duration_since(self.last_read.get()) > grace)
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Encode `packets` for this peer and wake the writer. Ignored once closing.
    pub fn send<'a>(&self, packets: impl IntoIterator<Item = &'a Packet>) {
        if self.closing.get() {
            return;
        }
        let mut buf = self.buf.borrow_mut();
        let before = buf.len();
        for p in packets {
            encode_packet(p, self.version, &mut buf);
        }
        if buf.len() != before {
            drop(buf);
            self.wake.notify();
        }
    }

    /// Bytes encoded but not yet written to the socket.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.borrow().len()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Close from the server side: a DISCONNECT with `reason` for MQTT 5 peers (when given); the
    /// read side is shut at once (the reader ends even if the client stopped reading and the
    /// writer is stuck); the writer flushes what is buffered and shuts the socket down.
    pub fn close(&self, reason: Option<ReasonCode>) {
        if self.closing.get() {
            return;
        }
        if let Some(reason) = reason.filter(|_| self.version.is_v5()) {
            self.send([&Packet::Disconnect(Disconnect::new(reason))]);
        }
        self.closing.set(true);
        self.wake.notify();
        self.drained.notify();
        // End the reader now, whatever the writer is doing: its pending read returns EOF and the
        // session detaches. The write side stays open so the DISCONNECT can still go out (within
        // close_flush_timeout_secs) to a client that is reading.
        // SAFETY: as in `shutdown_socket`; shutdown(2) does not invalidate the descriptor.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RD);
        }
    }

    /// For the writer task: a write finished; a reader waiting in `wait_writable` may go on.
    pub fn notify_drained(&self) {
        self.drained.notify();
    }

    /// For the reader: wait while more than `limit_bytes` of output are unwritten, so a client
    /// that does not read its replies cannot make the server buffer one per request (TCP pushes
    /// back on it instead). Returns at once when closing.
    pub async fn wait_writable(&self, limit_bytes: usize) {
        while self.buffered_bytes() > limit_bytes && !self.closing.get() {
            self.drained.wait().await;
        }
    }

    /// For the writer task: wait until there is something to write or the connection closes.
    pub async fn wait(&self) {
        self.wake.wait().await
    }

    /// For the writer task: everything buffered so far (the buffer's allocation is reused when
    /// the writer hands it back with `recycle`).
    pub fn take(&self) -> BytesMut {
        self.buf.borrow_mut().split()
    }

    /// Shut the socket down in both directions: the reader's pending read returns.
    pub fn shutdown_socket(&self) {
        // SAFETY: `fd` belongs to the connection's stream, which outlives this handle's use by
        // the writer task; shutdown(2) does not close or invalidate the descriptor.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
    }
}
