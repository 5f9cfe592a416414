//! The outbound side of one live client connection, shared between its writer task and anything
//! on the shard that sends to it (deliveries from drain tasks, takeover, shutdown).
//!
//! Lives on the connection's home shard only (it is `!Send`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::future::Future;
use std::num::NonZeroU32;
use std::task::Poll;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flux_core::mqtt::{encode_packet, Disconnect, Packet, ProtocolVersion, ReasonCode};

use crate::durable::{Pending, ShardLog};
use crate::signal::BitSignal;

/// Something the bytes after a point of the outbound stream must wait for: an acknowledgement
/// is written only once what it acknowledges is durable.
pub enum Hold {
    /// This shard's log must be durable below the LSN.
    Commit(Rc<ShardLog>, flux_wal::Lsn),
    /// A packet decided later (a PUBACK whose reason code depends on other shards' answers),
    /// written here in the stream once the broker fills the slot.
    Slot(Rc<AckSlot>),
}

/// What a resolved [`Hold`] lets the writer do.
pub enum Resolved {
    Go,
    /// Write this packet, then go on.
    Write(Box<Packet>),
    /// The durable work failed: what follows must not be written.
    Failed,
}

/// A packet the broker decides after the fact; see [`Hold::Slot`].
#[derive(Default)]
pub struct AckSlot {
    /// `Some(None)`: decided, nothing to write.
    decided: RefCell<Option<Option<Packet>>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl AckSlot {
    pub fn fill(&self, packet: Option<Packet>) {
        *self.decided.borrow_mut() = Some(packet);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait(&self) -> Option<Packet> {
        std::future::poll_fn(|cx| match self.decided.borrow_mut().take() {
            Some(p) => std::task::Poll::Ready(p),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

impl Hold {
    /// The hold for a [`Pending`] of `log`; `Err` when the work already failed.
    pub fn from_pending(log: &Rc<ShardLog>, pending: Pending) -> Result<Option<Hold>, ()> {
        match pending {
            Pending::Nothing => Ok(None),
            Pending::Commit(lsn) => Ok(Some(Hold::Commit(log.clone(), lsn))),
            Pending::Failed => Err(()),
        }
    }

    /// Its outcome if already known (no waiting), so the writer can batch past it.
    pub fn try_resolve(&self) -> Option<Resolved> {
        match self {
            Hold::Commit(log, lsn) => {
                if log.wal().poisoned().is_some() {
                    Some(Resolved::Failed)
                } else {
                    (log.wal().durable_lsn() >= *lsn).then_some(Resolved::Go)
                }
            }
            Hold::Slot(slot) => slot.decided.borrow_mut().take().map(|p| match p {
                Some(p) => Resolved::Write(Box::new(p)),
                None => Resolved::Go,
            }),
        }
    }

    /// Wait for it.
    pub async fn resolve(self) -> Resolved {
        let ok = match self {
            Hold::Commit(log, lsn) => log.commit_to(lsn).await,
            Hold::Slot(slot) => {
                return match slot.wait().await {
                    Some(p) => Resolved::Write(Box::new(p)),
                    None => Resolved::Go,
                }
            }
        };
        if ok {
            Resolved::Go
        } else {
            Resolved::Failed
        }
    }
}

/// What the writer task should do next.
pub enum Next {
    Write(BytesMut),
    Wait(Hold),
    Idle,
}

pub struct Outbound {
    version: ProtocolVersion,
    buf: RefCell<BytesMut>,
    /// Holds at absolute stream offsets (bytes encoded since the connection opened), in order.
    holds: RefCell<VecDeque<(u64, Hold)>>,
    /// Absolute offset of `buf`'s first byte.
    taken: Cell<u64>,
    wake: BitSignal,
    /// Notified when the writer finished a write (or the connection closes): the reader waits on
    /// it while too much output is unwritten.
    drained: BitSignal,
    /// `WAKE`, `DRAINED` (the two signals' notified bits) and `CLOSING`, in one byte: every
    /// connection has an `Outbound`, and this keeps it in the allocator's 160-byte class.
    flags: Cell<u8>,
    fd: RawFd,
    /// 1.5 x the negotiated keep alive (MQTT 3.1.2.10); `None`: no keep alive.
    /// In milliseconds (4 bytes, not 16): keep alive is at most 65,535 s, times 1.5.
    keep_alive_grace_ms: Option<NonZeroU32>,
    /// When the client last sent bytes. Checked by the shard's housekeeping sweep rather than a
    /// timer per read: a read only stores an instant.
    /// Milliseconds after [`origin`] (8 bytes, not 16).
    last_read_ms: Cell<u64>,
}

/// `Outbound::flags` bits.
const WAKE: u8 = 1;
const DRAINED: u8 = 2;
const CLOSING: u8 = 4;

/// The instant keep-alive times count from (the first use in the process).
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn millis_since_origin(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(origin()).as_millis()).unwrap_or(u64::MAX)
}

impl Outbound {
    fn is_flag(&self, bit: u8) -> bool {
        self.flags.get() & bit != 0
    }

    fn set_flag(&self, bit: u8, on: bool) {
        let flags = self.flags.get();
        self.flags.set(if on { flags | bit } else { flags & !bit });
    }

    pub fn new(version: ProtocolVersion, fd: RawFd, keep_alive_grace: Option<Duration>, now: Instant) -> Outbound {
        Outbound {
            version,
            buf: RefCell::new(BytesMut::new()),
            holds: RefCell::new(VecDeque::new()),
            taken: Cell::new(0),
            wake: BitSignal::default(),
            drained: BitSignal::default(),
            flags: Cell::new(0),
            fd,
            keep_alive_grace_ms: keep_alive_grace
                .and_then(|g| NonZeroU32::new(u32::try_from(g.as_millis()).unwrap_or(u32::MAX).max(1))),
            last_read_ms: Cell::new(millis_since_origin(now)),
        }
    }

    /// The client sent something at `now`.
    pub fn touch(&self, now: Instant) {
        self.last_read_ms.set(millis_since_origin(now));
    }

    /// Whether the client has been silent for longer than 1.5 x its keep alive.
    pub fn keep_alive_expired(&self, now: Instant) -> bool {
        self.keep_alive_grace_ms.is_some_and(|grace| {
            millis_since_origin(now).saturating_sub(self.last_read_ms.get()) > u64::from(grace.get())
        })
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Encode `packets` for this peer and wake the writer. Ignored once closing.
    pub fn send<'a>(&self, packets: impl IntoIterator<Item = &'a Packet>) {
        if self.is_flag(CLOSING) {
            return;
        }
        let mut buf = self.buf.borrow_mut();
        let before = buf.len();
        for p in packets {
            encode_packet(p, self.version, &mut buf);
        }
        if buf.len() != before {
            drop(buf);
            self.wake.notify(&self.flags, WAKE);
        }
    }

    /// Encode `packets` to be written only after `hold` resolved (and everything before it).
    pub fn send_after<'a>(&self, hold: Option<Hold>, packets: impl IntoIterator<Item = &'a Packet>) {
        if self.is_flag(CLOSING) {
            return;
        }
        if let Some(h) = hold {
            let at = self.taken.get() + self.buf.borrow().len() as u64;
            let mut holds = self.holds.borrow_mut();
            // A commit no later than one already waited for is covered by it.
            let covered = match (&h, holds.iter().rev().find(|(_, x)| matches!(x, Hold::Commit(..)))) {
                (Hold::Commit(_, lsn), Some((_, Hold::Commit(_, earlier)))) => lsn <= earlier,
                _ => false,
            };
            if !covered {
                holds.push_back((at, h));
                // The writer may be idle with nothing to write: it must come and wait on this.
                self.wake.notify(&self.flags, WAKE);
            }
        }
        self.send(packets);
    }

    /// Hold what is left to write, and the socket's shutdown, behind `hold` (even once closing).
    pub fn hold_close(&self, hold: Hold) {
        let at = self.taken.get() + self.buf.borrow().len() as u64;
        self.holds.borrow_mut().push_back((at, hold));
        self.wake.notify(&self.flags, WAKE);
    }

    /// For the writer task: the next bytes to write, a hold to wait for first, or nothing.
    pub fn next(&self) -> Next {
        let mut holds = self.holds.borrow_mut();
        let taken = self.taken.get();
        let mut buf = self.buf.borrow_mut();
        let limit = match holds.front() {
            Some(&(at, _)) if at <= taken => {
                // One hold fewer: a reader waiting in `wait_writable` may go on.
                self.drained.notify(&self.flags, DRAINED);
                return match holds.pop_front() {
                    Some((_, h)) => Next::Wait(h),
                    None => Next::Idle,
                };
            }
            Some(&(at, _)) => ((at - taken) as usize).min(buf.len()),
            None => buf.len(),
        };
        if limit == 0 {
            return Next::Idle;
        }
        self.taken.set(taken + limit as u64);
        Next::Write(buf.split_to(limit))
    }

    /// A hold failed: what follows it acknowledges work that is not durable. Nothing more is
    /// written but a DISCONNECT (MQTT 5: 0x80 Unspecified error); the connection closes.
    pub fn fail_held(&self) {
        self.holds.borrow_mut().clear();
        self.buf.borrow_mut().clear();
        self.set_flag(CLOSING, false);
        self.close(Some(ReasonCode::UnspecifiedError));
        // The DISCONNECT just encoded is the only thing left; nothing holds it.
    }

    /// A packet encoded on its own (for the writer, when a slot is filled).
    pub fn encode_one(&self, packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode_packet(packet, self.version, &mut out);
        out
    }

    /// Bytes encoded but not yet written to the socket.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.borrow().len()
    }

    pub fn is_closing(&self) -> bool {
        self.is_flag(CLOSING)
    }

    /// Close from the server side: a DISCONNECT with `reason` for MQTT 5 peers (when given); the
    /// read side is shut at once (the reader ends even if the client stopped reading and the
    /// writer is stuck); the writer flushes what is buffered and shuts the socket down.
    pub fn close(&self, reason: Option<ReasonCode>) {
        if self.is_flag(CLOSING) {
            return;
        }
        if let Some(reason) = reason.filter(|_| self.version.is_v5()) {
            self.send([&Packet::Disconnect(Disconnect::new(reason))]);
        }
        self.set_flag(CLOSING, true);
        self.wake.notify(&self.flags, WAKE);
        self.drained.notify(&self.flags, DRAINED);
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
        self.drained.notify(&self.flags, DRAINED);
    }

    /// For the reader: wait while more than `limit_bytes` of output are unwritten, or more than
    /// `max_holds` acknowledgements wait for durability, so a client that does not read its
    /// replies (or floods QoS 1 publishes faster than the disk commits them; MQTT 3.1.1 has no
    /// Receive Maximum) cannot make the server buffer one per request (TCP pushes back on it
    /// instead). Returns at once when closing.
    ///
    /// Poll functions rather than `async fn`s here and in [`Outbound::wait`]: these waits are
    /// part of every idle connection's task state.
    pub fn wait_writable(&self, limit_bytes: usize, max_holds: usize) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| loop {
            let full = self.buffered_bytes() > limit_bytes || self.holds.borrow().len() > max_holds;
            if !full || self.is_flag(CLOSING) {
                return Poll::Ready(());
            }
            match self.drained.poll_wait(&self.flags, DRAINED, cx) {
                Poll::Ready(()) => continue, // notified: look again
                Poll::Pending => return Poll::Pending,
            }
        })
    }

    /// For the writer task: wait until there is something to write or the connection closes.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.wake.poll_wait(&self.flags, WAKE, cx))
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
