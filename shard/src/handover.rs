//! Moving an accepted TCP connection from one shard to another.
//!
//! Where it lives: [`SocketHandover::from_stream`] runs on the shard that accepted the socket; the
//! resulting value is `Send` and travels over the ring mesh; [`SocketHandover::into_stream`] runs
//! on the receiving shard and gives a glommio `TcpStream` registered with *that* shard's reactor.
//!
//! How: the fd is `dup`ed (`F_DUPFD_CLOEXEC`) and the original glommio stream is dropped, which
//! closes only the original fd number; the socket itself lives on through the duplicate. Nothing
//! here calls `shutdown(2)` — which glommio's `AsyncWrite::close` does, and which would break the
//! connection for both fds — and [`SocketHandover::from_stream`] takes the stream by value so the
//! caller cannot close it afterwards. glommio's old reactor may still hold an io_uring poll on the
//! socket; it only observes readiness and does not consume data.
//!
//! The bytes the accepting shard already read (e.g. the CONNECT packet) travel along as `Bytes`
//! and must be processed by the new owner before anything it reads from the socket.
//! TLS state is not handled here yet.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use bytes::Bytes;
use glommio::net::TcpStream;

/// A connection in transit between shards: an owned duplicate of the socket fd plus the bytes
/// already read from it. Dropping it closes the duplicate (and the connection, if no one else
/// holds it).
#[derive(Debug)]
pub struct SocketHandover {
    fd: OwnedFd,
    already_read: Bytes,
    peer_addr: Option<SocketAddr>,
}

impl SocketHandover {
    /// Detaches `stream` from the current shard. `already_read` are the bytes read from it that
    /// were not yet processed. Fails only if `dup` fails (fd exhaustion); the stream is then
    /// dropped (closing the connection).
    pub fn from_stream(stream: TcpStream, already_read: Bytes) -> std::io::Result<SocketHandover> {
        let peer_addr = stream.peer_addr().ok();
        // SAFETY: the fd is open for as long as `stream` lives, which covers the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned()?;
        // Drop, not close(): dropping closes this fd number only, no shutdown(2).
        drop(stream);
        Ok(SocketHandover {
            fd,
            already_read,
            peer_addr,
        })
    }

    /// The bytes read by the previous owner and not yet processed.
    pub fn already_read(&self) -> &Bytes {
        &self.already_read
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }

    /// Rebuilds a glommio stream on the current shard (must run inside a glommio executor),
    /// with `TCP_NODELAY` set, and returns it with the already-read bytes.
    pub fn into_stream(self) -> std::io::Result<(TcpStream, Bytes)> {
        let SocketHandover {
            fd, already_read, ..
        } = self;
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` is an open TCP socket fd whose ownership we just took from the OwnedFd.
        let stream = unsafe { TcpStream::from_raw_fd(raw) };
        stream.set_nodelay(true).map_err(std::io::Error::from)?;
        Ok((stream, already_read))
    }
}
