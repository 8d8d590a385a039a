//! `Completion`: the answer to one `Store::write`.

use crate::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::oneshot;

/// How the writer thread answers one request: a tokio oneshot behind a
/// `Completion`, or a std channel for the blocking `flush`, which must not
/// use tokio's `blocking_recv` (it panics inside a runtime).
#[derive(Debug)]
pub(crate) enum Responder {
    Async(oneshot::Sender<Result<(), Error>>),
    Blocking(std::sync::mpsc::SyncSender<Result<(), Error>>),
    /// A `Completion` plus an [`Applied`] flag readable without waiting.
    Tracked(oneshot::Sender<Result<(), Error>>, Applied),
}

const PENDING: u8 = 0;
const APPLIED: u8 = 1;
const FAILED: u8 = 2;

/// Whether one write has been applied, checked without waiting (for code
/// that holds a lock and cannot await, such as a queue deciding whether a
/// message's body can be dropped from RAM because storage now has it).
#[derive(Clone, Debug, Default)]
pub struct Applied(std::sync::Arc<std::sync::atomic::AtomicU8>);

impl Applied {
    /// The write is applied: reads see it.
    pub fn is_applied(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) == APPLIED
    }
    /// The write was answered, successfully or not.
    pub fn is_settled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire) != PENDING
    }
    pub(crate) fn set(&self, ok: bool) {
        self.0.store(if ok { APPLIED } else { FAILED }, std::sync::atomic::Ordering::Release);
    }
}

impl Responder {
    /// Delivers the result; a waiter that went away is not an error.
    pub(crate) fn send(self, result: Result<(), Error>) {
        match self {
            Responder::Async(tx) => {
                let _ = tx.send(result);
            }
            Responder::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Responder::Tracked(tx, applied) => {
                applied.set(result.is_ok());
                let _ = tx.send(result);
            }
        }
    }
}

/// Resolves when the operations of one `Store::write` are applied (and, for
/// a durable write, fsynced).
///
/// Await it from async code, or call [`Completion::wait_blocking`] from a
/// plain thread. Dropping it does not cancel the write.
#[must_use = "a Completion reports whether the write succeeded"]
#[derive(Debug)]
pub struct Completion {
    state: State,
}

#[derive(Debug)]
enum State {
    Pending(oneshot::Receiver<Result<(), Error>>),
    /// Known at submission time (invalid op, store closed or poisoned).
    Ready(Option<Result<(), Error>>),
}

impl Completion {
    pub(crate) fn pending() -> (Completion, oneshot::Sender<Result<(), Error>>) {
        let (tx, rx) = oneshot::channel();
        (Completion { state: State::Pending(rx) }, tx)
    }

    pub(crate) fn ready(result: Result<(), Error>) -> Completion {
        Completion { state: State::Ready(Some(result)) }
    }

    /// Blocks the current thread until the write is resolved.
    ///
    /// Must not be called from inside an async runtime thread (tokio
    /// panics on `blocking_recv` there); use `.await` instead.
    pub fn wait_blocking(self) -> Result<(), Error> {
        match self.state {
            State::Pending(rx) => rx.blocking_recv().unwrap_or(Err(Error::Closed)),
            State::Ready(r) => r.unwrap_or(Err(Error::Closed)),
        }
    }
}

impl Future for Completion {
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match &mut this.state {
            // The writer drops the sender only if it died without answering.
            State::Pending(rx) => Pin::new(rx).poll(cx).map(|r| r.unwrap_or(Err(Error::Closed))),
            State::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(Error::Closed))),
        }
    }
}
