//! Why a queue broke, as one typed value carried from where it was detected (the ring
//! reader, the shadow queue, the engine) to whoever reports it (the guest front, the
//! bindings). Each fault names the rule that was broken with a stable identifier
//! ([`Fault::rule`]) that orchestration code can branch on; the message is made from the
//! value only where it is shown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::ring::{ChainError, UsedError};

/// Which party broke a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// The guest wrote an invalid chain or index.
    Guest,
    /// The device wrote an invalid used entry.
    DeviceProtocol,
    /// The device entered NEEDS_RESET (e.g. its IOTLB refused an access).
    DeviceNeedsReset,
    /// An element can never fit the shadow ring, or is too large to copy.
    TooLarge,
    /// svq itself failed (a panic on the engine thread, e.g. in a hook).
    Internal,
}

impl FaultKind {
    /// A stable name ("guest", "device_protocol", ...).
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Guest => "guest",
            FaultKind::DeviceProtocol => "device_protocol",
            FaultKind::DeviceNeedsReset => "device_needs_reset",
            FaultKind::TooLarge => "too_large",
            FaultKind::Internal => "internal",
        }
    }
}

/// The rule a peer (or svq) broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The guest's ring: a chain or index the reader refused.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A guest buffer outside every region mapped for the device.
    #[error("guest address {addr:#x} is not mapped for the device")]
    GuestAddressUnmapped {
        /// The first unmapped byte.
        addr: u64,
    },
    /// A guest buffer svq had to read or write is outside guest memory.
    #[error("guest buffer {addr:#x}+{len:#x} is outside guest memory")]
    GuestMemory {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The shadow ring's used ring: an entry the writer refused.
    #[error(transparent)]
    Used(#[from] UsedError),
    /// The device entered NEEDS_RESET.
    #[error("device entered NEEDS_RESET")]
    DeviceNeedsReset,
    /// An element needs more shadow descriptors than the shadow ring has.
    #[error("{what} needs {needed} shadow descriptors; the shadow ring has {size}")]
    TooManyDescriptors {
        /// The element ("chain 3", "an injected element").
        what: String,
        /// Descriptors it needs.
        needed: usize,
        /// Shadow ring size.
        size: u16,
    },
    /// An element has more bytes than svq copies per side.
    #[error("{what} has {out} readable and {inn} writable bytes; svq copies at most {max} per side")]
    TooManyBytes {
        /// The element.
        what: String,
        /// Readable bytes.
        out: u64,
        /// Writable bytes.
        inn: u64,
        /// The limit.
        max: u64,
    },
    /// svq failed (a panic on the engine thread).
    #[error("svq internal error: {0}")]
    Internal(String),
}

impl Fault {
    /// Who broke the queue.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Chain(_) | Fault::GuestAddressUnmapped { .. } | Fault::GuestMemory { .. } => FaultKind::Guest,
            Fault::Used(_) => FaultKind::DeviceProtocol,
            Fault::DeviceNeedsReset => FaultKind::DeviceNeedsReset,
            Fault::TooManyDescriptors { .. } | Fault::TooManyBytes { .. } => FaultKind::TooLarge,
            Fault::Internal(_) => FaultKind::Internal,
        }
    }

    /// The broken rule as a stable identifier (`"used_len_exceeds_writable"`, ...).
    pub fn rule(&self) -> &'static str {
        match self {
            Fault::Chain(e) => match e {
                ChainError::AvailIdxJump { .. } => "avail_idx_jump",
                ChainError::HeadOutOfRange { .. } => "head_out_of_range",
                ChainError::NextOutOfRange { .. } => "next_out_of_range",
                ChainError::ChainTooLong { .. } => "chain_too_long",
                ChainError::ZeroLength { .. } => "zero_length_descriptor",
                ChainError::BadAddress { .. } => "buffer_outside_memory",
                ChainError::ReadAfterWrite { .. } => "readable_after_writable",
                ChainError::IndirectNotNegotiated { .. } => "indirect_not_negotiated",
                ChainError::NestedIndirect { .. } => "nested_indirect",
                ChainError::IndirectLength { .. } => "indirect_length",
                ChainError::IndirectUnreadable { .. } => "indirect_unreadable",
            },
            Fault::GuestAddressUnmapped { .. } => "guest_address_unmapped",
            Fault::GuestMemory { .. } => "guest_memory_access",
            Fault::Used(e) => match e {
                UsedError::UsedIdxJump { .. } => "used_idx_jump",
                UsedError::IdOutOfRange { .. } => "used_id_out_of_range",
                UsedError::IdNotInFlight { .. } => "used_id_not_in_flight",
                UsedError::LenTooLarge { .. } => "used_len_exceeds_writable",
            },
            Fault::DeviceNeedsReset => "device_needs_reset",
            Fault::TooManyDescriptors { .. } => "too_many_descriptors",
            Fault::TooManyBytes { .. } => "too_many_bytes",
            Fault::Internal(_) => "internal_error",
        }
    }

    /// Every rule identifier, for documentation and tests.
    pub const RULES: &'static [&'static str] = &[
        "avail_idx_jump",
        "head_out_of_range",
        "next_out_of_range",
        "chain_too_long",
        "zero_length_descriptor",
        "buffer_outside_memory",
        "readable_after_writable",
        "indirect_not_negotiated",
        "nested_indirect",
        "indirect_length",
        "indirect_unreadable",
        "guest_address_unmapped",
        "guest_memory_access",
        "used_idx_jump",
        "used_id_out_of_range",
        "used_id_not_in_flight",
        "used_len_exceeds_writable",
        "device_needs_reset",
        "too_many_descriptors",
        "too_many_bytes",
        "internal_error",
    ];
}

/// The fault that broke one queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue {queue}: {fault}")]
pub struct QueueFault {
    /// The queue.
    pub queue: u32,
    /// What happened.
    pub fault: Fault,
}

impl QueueFault {
    /// Who broke it.
    pub fn kind(&self) -> FaultKind {
        self.fault.kind()
    }

    /// The broken rule (see [`Fault::rule`]).
    pub fn rule(&self) -> &'static str {
        self.fault.rule()
    }
}

/// Health of a queue, shared between whoever serves the queue and whoever waits on it.
#[derive(Debug, Default)]
pub struct QueueHealth {
    fault: Mutex<Option<QueueFault>>,
    /// Set (after `fault`) once the queue broke: the hot path's check, without the lock.
    broken: AtomicBool,
}

impl QueueHealth {
    /// The fault that broke the queue, if any.
    pub fn fault(&self) -> Option<QueueFault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the queue was broken (a lock-free check; [`QueueHealth::fault`] says why).
    #[inline]
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the queue broken; the first fault wins and is returned.
    pub fn set(&self, fault: QueueFault) -> QueueFault {
        let mut f = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let first = f.get_or_insert(fault).clone();
        self.broken.store(true, Ordering::Release);
        first
    }

    /// Forgets the fault (a queue set up again after a device reset).
    pub fn clear(&self) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.broken.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_is_listed_once_and_health_keeps_the_first_fault() {
        let mut rules = Fault::RULES.to_vec();
        rules.sort_unstable();
        rules.dedup();
        assert_eq!(rules.len(), Fault::RULES.len());
        let used = Fault::Used(UsedError::LenTooLarge { id: 1, len: 9, writable: 4 });
        assert!(Fault::RULES.contains(&used.rule()));
        assert_eq!((used.kind(), used.rule()), (FaultKind::DeviceProtocol, "used_len_exceeds_writable"));
        let h = QueueHealth::default();
        assert!(!h.is_broken());
        h.set(QueueFault { queue: 1, fault: used.clone() });
        let second = h.set(QueueFault { queue: 1, fault: Fault::DeviceNeedsReset });
        assert_eq!(second.fault, used, "the first fault wins");
        assert!(h.is_broken());
        assert_eq!(h.fault().unwrap().to_string(), "queue 1: device reported 9 bytes written to chain 1, which has only 4 writable bytes");
    }
}
