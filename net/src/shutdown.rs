//! The broker's stop request: a flag any thread may set, and a wait that shard tasks park on, so
//! an idle shard has no reason to wake up and look at the flag.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

/// Cheap to clone; every clone sees the same request.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    /// Also set directly by the CLI's signal handler (signal-safe: a store, no lock). Whoever
    /// handles the signal outside the handler then calls [`Shutdown::request`] to wake waiters.
    requested: Arc<AtomicBool>,
    /// Tasks waiting in [`Shutdown::wait`], one entry per waiting task (glommio wakers may be
    /// woken from any thread).
    waiters: Mutex<Vec<Waker>>,
}

impl Shutdown {
    /// A request that is raised when `flag` is set and [`Shutdown::request`] is called.
    pub fn new(flag: Arc<AtomicBool>) -> Self {
        Shutdown { inner: Arc::new(Inner { requested: flag, waiters: Mutex::new(Vec::new()) }) }
    }

    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::Acquire)
    }

    /// Sets the flag and wakes every waiting task. Idempotent; not for signal handlers (it locks).
    pub fn request(&self) {
        self.inner.requested.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *self.waiters());
        for w in waiters {
            w.wake();
        }
    }

    /// Resolves once a stop has been requested.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.is_requested() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            drop(waiters);
            // A request between the first check and the push has already drained the list.
            if self.is_requested() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, Vec<Waker>> {
        self.inner.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown").field("requested", &self.is_requested()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A shard task parked in `wait` is woken by a request from a plain thread.
    #[test]
    fn request_from_another_thread_wakes_a_shard_task() {
        let shutdown = Shutdown::new(Arc::new(AtomicBool::new(false)));
        let s = shutdown.clone();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move {
                s.wait().await;
                s.is_requested()
            })
            .expect("executor");
        // Wait until the task is parked (its waker registered), with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shutdown.waiters().is_empty() {
            assert!(std::time::Instant::now() < deadline, "task never parked");
            std::thread::yield_now();
        }
        shutdown.request();
        assert!(ex.join().expect("join"));
    }

    #[test]
    fn wait_after_request_returns_at_once() {
        let shutdown = Shutdown::new(Arc::new(AtomicBool::new(true)));
        let s = shutdown.clone();
        let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .spawn(move || async move { s.wait().await })
            .expect("executor");
        ex.join().expect("join");
        assert!(shutdown.waiters().is_empty());
    }
}
