//! Two tiny single-shard synchronization primitives (no locks, no atomics): a [`Signal`] that
//! wakes one waiting task, and a [`Gather`] that completes when a number of replies arrived.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use flux_core::session::Message;

/// Wakes one waiting task; a notify with nobody waiting is remembered until the next wait. A
/// [`BitSignal`] with a flag byte of its own.
#[derive(Default)]
pub struct Signal {
    set: Cell<u8>,
    inner: BitSignal,
}

impl Signal {
    pub fn notify(&self) {
        self.inner.notify(&self.set, 1);
    }

    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait { signal: self }
    }
}

/// A [`Signal`] whose "notified" bit lives in a flag byte that its owner shares with other
/// state: a struct with several pays one byte for all their bits instead of a padded word each
/// (every connection's `Outbound` has two). The waker sits in a `Cell`, taken and put back.
#[derive(Default)]
pub struct BitSignal {
    waker: Cell<Option<Waker>>,
}

impl BitSignal {
    /// Sets `bit` in `flags` and wakes the waiter, if any.
    pub fn notify(&self, flags: &Cell<u8>, bit: u8) {
        flags.set(flags.get() | bit);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Ready (clearing `bit`) once `bit` is set in `flags`; otherwise keeps the waker. A poll
    /// function rather than a future type, so that the owner's wait futures hold one reference.
    pub fn poll_wait(&self, flags: &Cell<u8>, bit: u8, cx: &mut Context<'_>) -> Poll<()> {
        let now = flags.get();
        if now & bit != 0 {
            flags.set(now & !bit);
            return Poll::Ready(());
        }
        self.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

pub struct SignalWait<'a> {
    signal: &'a Signal,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.signal.inner.poll_wait(&self.signal.set, 1, cx)
    }
}

/// Replies expected from other shards (route acks, retained messages). Shared by the waiter(s)
/// and the broker's table of pending requests.
#[derive(Default)]
pub struct GatherState {
    remaining: Cell<usize>,
    messages: RefCell<Vec<Message>>,
    wakers: RefCell<Vec<Waker>>,
}

pub type Gather = Rc<GatherState>;

impl GatherState {
    pub fn new(expected: usize) -> Gather {
        Rc::new(GatherState { remaining: Cell::new(expected), ..GatherState::default() })
    }

    pub fn is_done(&self) -> bool {
        self.remaining.get() == 0
    }

    /// One reply arrived (with its messages, if any). Returns true when that was the last.
    pub fn reply(&self, messages: Vec<Message>) -> bool {
        self.messages.borrow_mut().extend(messages);
        let left = self.remaining.get().saturating_sub(1);
        self.remaining.set(left);
        if left == 0 {
            for w in self.wakers.borrow_mut().drain(..) {
                w.wake();
            }
        }
        left == 0
    }

    pub fn take_messages(&self) -> Vec<Message> {
        std::mem::take(&mut *self.messages.borrow_mut())
    }

    /// Completes once every reply is in.
    pub fn done(self: &Rc<Self>) -> GatherWait {
        GatherWait { state: self.clone() }
    }
}

pub struct GatherWait {
    state: Gather,
}

impl Future for GatherWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.is_done() {
            return Poll::Ready(());
        }
        self.state.wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}
