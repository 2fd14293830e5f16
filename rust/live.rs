//! Counters of live OS resources (eventfds, worker threads), so that tests and users can
//! check that closing a session leaves nothing behind.

use std::sync::atomic::{AtomicI64, Ordering};

static EVENTFDS: AtomicI64 = AtomicI64::new(0);
static THREADS: AtomicI64 = AtomicI64::new(0);

/// Live eventfds created by svq.
pub fn eventfds() -> i64 {
    EVENTFDS.load(Ordering::SeqCst)
}

/// Live worker threads started by svq (engines and embedded devices).
pub fn threads() -> i64 {
    THREADS.load(Ordering::SeqCst)
}

pub(crate) fn eventfd_opened() {
    EVENTFDS.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn eventfd_closed() {
    EVENTFDS.fetch_sub(1, Ordering::SeqCst);
}

/// Held by a worker thread for its whole life; the count drops when the thread returns.
#[derive(Debug)]
pub struct ThreadToken(());

impl ThreadToken {
    /// Counts one more live thread.
    pub fn new() -> Self {
        THREADS.fetch_add(1, Ordering::SeqCst);
        ThreadToken(())
    }
}

impl Default for ThreadToken {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ThreadToken {
    fn drop(&mut self) {
        THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}
