//! Counters of live OS resources (eventfds, worker threads) and of memory kept because a
//! device may still reach it, so that tests and users can check that closing a session
//! leaves nothing behind.

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

/// Memory kept on purpose because a device may still reach it: its reset was not
/// acknowledged or its mappings could not be removed. Freeing it would let the device
/// write into whatever reuses the pages, so it stays until the process ends.
static QUARANTINE: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> = std::sync::Mutex::new(Vec::new());
static QUARANTINED_BYTES: AtomicI64 = AtomicI64::new(0);

/// Keeps `what` (memory of `bytes` bytes) alive for the rest of the process.
pub fn quarantine<T: Send + 'static>(what: T, bytes: u64) {
    QUARANTINED_BYTES.fetch_add(bytes as i64, Ordering::SeqCst);
    QUARANTINE.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(what));
}

/// Bytes kept by [`quarantine`].
pub fn quarantined_bytes() -> i64 {
    QUARANTINED_BYTES.load(Ordering::SeqCst)
}
