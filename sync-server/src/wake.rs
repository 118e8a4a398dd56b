//! A wake-up for the one task that drains a queue: a connection's outbox, a document actor's
//! inbox.
//!
//! Written by hand instead of tokio's `Notify`: a task waits on `Notify` through a `Notified`
//! future of 64 bytes, stored in its task for as long as it waits, which for an idle connection
//! or document is its whole life. The future here is one pointer. What it gives up is what a
//! single consumer does not need: more than one waiter. Like `notify_one`, a wake-up given while
//! nobody waits is kept (one permit) and completes the next wait at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// One waiter's wake-up, with a permit kept while it is not waiting.
#[derive(Default)]
pub(crate) struct WakeOne {
    waker: AtomicWaker,
    permit: AtomicBool,
}

impl WakeOne {
    /// Wakes the waiter, or lets its next [`wait`](Self::wait) complete at once.
    pub(crate) fn notify(&self) {
        self.permit.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Completes once [`notify`](Self::notify) was called since the last wait completed (taking
    /// the permit). Only one task may wait at a time (the one that drains the queue): a second
    /// waiter would take the first one's registration. Cancel-safe: a dropped wait takes nothing.
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait(self)
    }

    /// [`wait`](Self::wait) as a poll, for a consumer that writes its own future: ready when
    /// the permit was there (taking it), else registers `cx`'s waker.
    pub(crate) fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        // Registered before the second look: a notify between the two is not missed.
        self.waker.register(cx.waker());
        if self.permit.swap(false, Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// The future of [`WakeOne::wait`].
pub(crate) struct Wait<'a>(&'a WakeOne);

impl Future for Wait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_wait(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_notify_given_before_the_wait_is_kept_once() {
        let wake = WakeOne::default();
        wake.notify();
        wake.notify();
        tokio::time::timeout(Duration::from_secs(5), wake.wait())
            .await
            .expect("the permit completes the wait");
        // One permit, however many notifies: the next wait waits.
        let waited = tokio::time::timeout(Duration::from_millis(20), wake.wait()).await;
        assert!(waited.is_err(), "a second wait completed without a notify");
    }

    #[tokio::test]
    async fn a_notify_wakes_the_waiting_task() {
        let wake = Arc::new(WakeOne::default());
        let waiter = tokio::spawn({
            let wake = wake.clone();
            async move { wake.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        wake.notify();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("the waiter ran");
    }

    #[test]
    fn the_wait_is_one_pointer() {
        let wake = WakeOne::default();
        assert_eq!(
            std::mem::size_of_val(&wake.wait()),
            std::mem::size_of::<usize>()
        );
    }
}
