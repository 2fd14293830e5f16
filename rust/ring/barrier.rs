//! Every memory barrier of the split-ring protocol, in one place. Each function names the
//! virtio rule it satisfies; call sites say which step of the protocol they are at.

use std::sync::atomic::{fence, Ordering};

/// Before a new avail/used index becomes visible: the descriptors and ring entries it
/// covers must be visible first (virtio 2.7.13 step 3, 2.7.8). Pairs with [`after_index_read`].
#[inline]
pub fn publish() {
    fence(Ordering::Release);
}

/// After reading the peer's index and before reading the entries it covers (2.7.13.1).
#[inline]
pub fn after_index_read() {
    fence(Ordering::Acquire);
}

/// Between publishing an index and reading the peer's suppression word (flags or
/// `*_event`), and between re-arming notifications and re-checking for work: a store
/// followed by a load needs a full fence (2.7.13.4, 2.7.7.2).
#[inline]
pub fn full() {
    fence(Ordering::SeqCst);
}
