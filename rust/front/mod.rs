//! Guest fronts: who supplies the guest side of a session, i.e. guest memory, the guest's
//! rings (addresses in that memory) and the guest's notifiers. The shadow queues and the
//! device do not know which front they serve.
//!
//! - [`driver`]: svq allocates the memory and plays the guest itself (demo, tests,
//!   benchmarks);
//! - [`external`]: orchestration code hands over a VM's memory files, ring addresses and
//!   eventfds.

pub mod driver;
pub mod external;

use std::sync::Arc;

use crate::eventfd::EventFd;
use crate::fault::QueueHealth;
use crate::mem::GuestMemory;
use crate::ring::RingLayout;

/// The guest side a front hands to a session.
#[derive(Debug)]
pub struct Guest {
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
    /// The queues to serve, by index.
    pub queues: Vec<GuestQueue>,
    /// The virtio features the guest's driver negotiated.
    pub features: u64,
}

/// Where a guest queue lives and how it is notified: what a front hands to a session.
#[derive(Debug, Clone)]
pub struct GuestQueue {
    /// Queue index (on the device).
    pub index: u32,
    /// Ring layout (size).
    pub layout: RingLayout,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// The avail index of the next chain to pop.
    pub base: u16,
    /// The used index the guest saw last: `base` for a ring with nothing in flight, less
    /// for one handed over with chains in flight (submitted again by the session).
    pub used_base: u16,
    /// The guest kicks this.
    pub kick: Arc<EventFd>,
    /// The guest is called through this.
    pub call: Arc<EventFd>,
    /// `RING_EVENT_IDX` on this ring.
    pub event_idx: bool,
    /// `RING_INDIRECT_DESC` on this ring.
    pub indirect: bool,
    /// Set when the queue breaks, by whoever serves the ring.
    pub health: Arc<QueueHealth>,
}
