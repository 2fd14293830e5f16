//! The external front: orchestration code that owns a VM hands svq the guest's memory as
//! files (guest address, size, fd, offset), and per queue its ring addresses (guest
//! addresses), its kick and call eventfds and the avail index the guest will publish
//! next. svq maps the files `MAP_SHARED` (never copies them), checks every ring lies
//! inside the memory, and serves the rings as they are.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use super::{Guest, GuestQueue};
use crate::eventfd::EventFd;
use crate::fault::QueueHealth;
use crate::mem::{FileRegion, GuestMemory, MemError};
use crate::ring::RingLayout;
use crate::virtio::{feature, has};

/// A failed hand-over of a guest.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// The memory could not be mapped or is not safe to map.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// A queue description is invalid.
    #[error("queue {queue}: {reason}")]
    Queue {
        /// The queue index.
        queue: u32,
        /// What is wrong.
        reason: String,
    },
}

/// One queue of a guest svq does not own.
#[derive(Debug)]
pub struct ExternalQueue {
    /// Queue index on the device.
    pub index: u32,
    /// Queue size (a power of two).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// The eventfd the guest kicks.
    pub kick: OwnedFd,
    /// The eventfd svq signals to call the guest.
    pub call: OwnedFd,
    /// The avail index the guest publishes next (0 for a fresh ring; the saved position
    /// for a ring that ran before). The used index is the same: nothing is in flight.
    pub base: u16,
}

/// A guest's memory as a front hands it over.
#[derive(Debug)]
pub enum ExternalMemory {
    /// Files to map now.
    Files(Vec<FileRegion>),
    /// Memory the front already mapped (a vhost-user front maps the VMM's table once
    /// and serves it across device restarts).
    Mapped(Arc<GuestMemory>),
}

/// A guest svq does not own: its memory, its queues, and the virtio features its driver
/// negotiated (they decide the rings' format: EVENT_IDX, INDIRECT_DESC).
#[derive(Debug)]
pub struct ExternalGuest {
    /// Guest memory.
    pub memory: ExternalMemory,
    /// The queues to serve.
    pub queues: Vec<ExternalQueue>,
    /// The features the guest's driver negotiated.
    pub features: u64,
}

impl ExternalGuest {
    /// Maps the memory and checks every queue: a valid size, distinct indices, every ring
    /// part inside one memory region and aligned, and eventfds for kick and call.
    pub fn attach(self) -> Result<Guest, FrontError> {
        let memory = match self.memory {
            ExternalMemory::Files(files) => Arc::new(GuestMemory::from_files(files)?),
            ExternalMemory::Mapped(m) => m,
        };
        let event_idx = has(self.features, feature::RING_EVENT_IDX);
        let indirect = has(self.features, feature::RING_INDIRECT_DESC);
        let mut queues: Vec<GuestQueue> = Vec::with_capacity(self.queues.len());
        for q in self.queues {
            let bad = |reason: String| FrontError::Queue { queue: q.index, reason };
            if queues.iter().any(|g| g.index == q.index) {
                return Err(bad("given twice".into()));
            }
            let layout = RingLayout::new(q.size).ok_or_else(|| bad(format!("size {} is not a power of two in 1..=32768", q.size)))?;
            memory.vring(layout, q.desc, q.avail, q.used).map_err(|e| bad(format!("ring: {e}")))?;
            let kick = EventFd::adopt(q.kick, true).map_err(|e| bad(format!("kick fd is not an eventfd ({e})")))?;
            let call = EventFd::adopt(q.call, false).map_err(|e| bad(format!("call fd is not an eventfd ({e})")))?;
            queues.push(GuestQueue {
                index: q.index,
                layout,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                base: q.base,
                used_base: q.base,
                kick: Arc::new(kick),
                call: Arc::new(call),
                event_idx,
                indirect,
                health: Arc::new(QueueHealth::default()),
            });
        }
        queues.sort_by_key(|q| q.index);
        Ok(Guest { memory, queues, features: self.features })
    }
}
