//! Flux patch 8: read readiness of a socket by one multishot poll (see `sys::uring::readiness`).

use std::{
    marker::PhantomData,
    os::unix::io::RawFd,
    rc::Rc,
    task::{Context, Poll},
};

use crate::sys::readiness;

/// Watches a socket for readability with one multishot poll that stays armed until this is
/// dropped: no re-arm and no per-wait allocation. [`ReadReadiness::poll_readable`] is ready once
/// per readiness event; the caller then reads without blocking (`recv` with `MSG_DONTWAIT`)
/// until it would block, and polls again. Eight bytes (a key into a per-thread table).
///
/// Drop it before the socket is closed for good: the poll holds a reference on the file and is
/// removed (with the next submission) by the drop. Use it on the executor thread that made it.
#[derive(Debug)]
pub struct ReadReadiness {
    key: u64,
    /// The key names a slot of this thread's table.
    _thread_bound: PhantomData<Rc<()>>,
}

impl ReadReadiness {
    /// Starts watching `fd`. Must be called on an executor thread; the poll is submitted with the
    /// executor's next submission.
    pub fn new(fd: RawFd) -> ReadReadiness {
        let key = crate::executor().reactor().sys.watch_readable(fd);
        ReadReadiness { key, _thread_bound: PhantomData }
    }

    /// `Ready` when data (or an error or hang-up) arrived since the last `Ready`, or when the
    /// poll had ended and was submitted again (readiness unknown: read to find out). Otherwise
    /// registers the waker and is `Pending`.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        readiness::poll(self.key, cx)
    }
}

impl ReadReadiness {
    /// The socket reported a hang-up or an error (sticky). Several events reported before one
    /// read are a single `Ready`: after a short read the socket may still hold the end of the
    /// stream (or an error) for the next read, and no further event will come for it.
    pub fn hung_up(&self) -> bool {
        readiness::hung_up(self.key)
    }
}

impl Drop for ReadReadiness {
    fn drop(&mut self) {
        readiness::release(self.key);
    }
}
