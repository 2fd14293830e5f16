//! What a vDPA device offers, as one trait with two implementations: the kernel's
//! `/dev/vhost-vdpa-N` ([`vdpa`]) and the embedded userspace device ([`sim`]).
//!
//! The trait mirrors the vhost-vdpa ioctls one to one so that the session code is the same
//! for both, and the embedded device reports failures with the errno the kernel would use.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;

pub mod faulty;
pub mod iotlb;
pub mod sim;
pub mod vdpa;

/// One change of a device's IOTLB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbOp {
    /// Map `size` bytes at `iova` to the host virtual address `uaddr`.
    Update {
        /// First IOVA of the mapping.
        iova: u64,
        /// Length in bytes (not length - 1).
        size: u64,
        /// Host virtual address backing `iova`.
        uaddr: u64,
        /// What the device may do through the mapping.
        perm: Perm,
    },
    /// Unmap `size` bytes at `iova`.
    Invalidate {
        /// First IOVA of the range.
        iova: u64,
        /// Length in bytes.
        size: u64,
    },
}

/// A failed device operation. `Os` keeps the errno so that Python sees the matching
/// `OSError` subclass (EEXIST → `FileExistsError`, ENOENT → `FileNotFoundError`, ...).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device (kernel or embedded) refused an operation with an errno.
    #[error("{op}: {errno}")]
    Os {
        /// What was being done, e.g. `"VHOST_SET_FEATURES"` or `"map 0x1000+0x2000 in ASID 1"`.
        op: String,
        /// The errno the device answered with.
        #[source]
        errno: Errno,
    },
    /// The device does not offer something svq needs.
    #[error("device does not support {0}")]
    Unsupported(String),
    /// The file opened is not a vhost-vdpa device.
    #[error("{path} is not a vhost-vdpa device: {reason}")]
    NotVhostVdpa {
        /// The path that was opened.
        path: String,
        /// Why it was rejected.
        reason: String,
    },
}

impl DeviceError {
    /// An `Os` error for `op` with `errno`.
    pub fn os(op: impl Into<String>, errno: Errno) -> Self {
        DeviceError::Os { op: op.into(), errno }
    }

    /// The errno, when the failure carries one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            DeviceError::Os { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Result of a device operation.
pub type DeviceResult<T> = Result<T, DeviceError>;

use crate::virtio::Perm;

/// Everything svq asks of a vDPA device. Each method is one vhost-vdpa ioctl (or one
/// batch of IOTLB messages); the embedded device answers with the same errnos.
pub trait Device: Send + Sync + std::fmt::Debug {
    /// `VHOST_VDPA_GET_DEVICE_ID`.
    fn device_id(&self) -> DeviceResult<u32>;
    /// `VHOST_GET_FEATURES`: the virtio features the device offers.
    fn features(&self) -> DeviceResult<u64>;
    /// `VHOST_SET_FEATURES`.
    fn set_features(&self, features: u64) -> DeviceResult<()>;
    /// `VHOST_GET_BACKEND_FEATURES`.
    fn backend_features(&self) -> DeviceResult<u64>;
    /// `VHOST_SET_BACKEND_FEATURES`.
    fn set_backend_features(&self, features: u64) -> DeviceResult<()>;
    /// `VHOST_VDPA_GET_CONFIG_SIZE`.
    fn config_size(&self) -> DeviceResult<u32>;
    /// `VHOST_VDPA_GET_CONFIG`: fills `buf` from config space at `offset`.
    fn config(&self, offset: u32, buf: &mut [u8]) -> DeviceResult<()>;
    /// `VHOST_VDPA_SET_CONFIG`.
    fn set_config(&self, offset: u32, data: &[u8]) -> DeviceResult<()>;
    /// `VHOST_VDPA_GET_VQS_COUNT`.
    fn num_queues(&self) -> DeviceResult<u32>;
    /// `VHOST_VDPA_GET_VRING_NUM`: the largest queue size.
    fn max_queue_size(&self) -> DeviceResult<u16>;
    /// `VHOST_VDPA_GET_GROUP_NUM`.
    fn num_groups(&self) -> DeviceResult<u32>;
    /// `VHOST_VDPA_GET_AS_NUM`.
    fn num_address_spaces(&self) -> DeviceResult<u32>;
    /// `VHOST_VDPA_GET_VRING_GROUP`: the group of queue `queue`.
    fn queue_group(&self, queue: u32) -> DeviceResult<u32>;
    /// `VHOST_VDPA_SET_GROUP_ASID`.
    fn set_group_asid(&self, group: u32, asid: u32) -> DeviceResult<()>;
    /// `VHOST_VDPA_GET_IOVA_RANGE`: the inclusive range `(first, last)`.
    fn iova_range(&self) -> DeviceResult<(u64, u64)>;
    /// `VHOST_SET_VRING_NUM`.
    fn set_vring_num(&self, queue: u32, num: u16) -> DeviceResult<()>;
    /// `VHOST_SET_VRING_ADDR`: the IOVAs of the descriptor table, avail and used rings.
    fn set_vring_addr(&self, queue: u32, desc: u64, avail: u64, used: u64) -> DeviceResult<()>;
    /// `VHOST_SET_VRING_BASE`: the next avail index the device reads.
    fn set_vring_base(&self, queue: u32, base: u16) -> DeviceResult<()>;
    /// `VHOST_GET_VRING_BASE`: the next avail index the device would read.
    fn vring_base(&self, queue: u32) -> DeviceResult<u16>;
    /// `VHOST_SET_VRING_KICK`; `None` unbinds.
    fn set_vring_kick(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
    /// `VHOST_SET_VRING_CALL`; `None` unbinds.
    fn set_vring_call(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
    /// `VHOST_VDPA_SET_CONFIG_CALL`; `None` unbinds.
    fn set_config_call(&self, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
    /// `VHOST_VDPA_SET_VRING_ENABLE`.
    fn set_vring_enable(&self, queue: u32, enable: bool) -> DeviceResult<()>;
    /// `VHOST_VDPA_GET_STATUS`.
    fn status(&self) -> DeviceResult<u8>;
    /// `VHOST_VDPA_SET_STATUS`; 0 resets the device.
    fn set_status(&self, status: u8) -> DeviceResult<()>;
    /// `VHOST_VDPA_SUSPEND`.
    fn suspend(&self) -> DeviceResult<()>;
    /// `VHOST_VDPA_RESUME`.
    fn resume(&self) -> DeviceResult<()>;
    /// Applies IOTLB changes in address space `asid`, as one batch when the device offers
    /// IOTLB_BATCH. Stops at the first refused message and reports it.
    fn iotlb(&self, asid: u32, ops: &[IotlbOp]) -> DeviceResult<()>;
    /// Live IOTLB mappings over all address spaces, when the backend can count them (the
    /// embedded device can; the kernel does not say).
    fn live_mappings(&self) -> Option<usize>;

    /// What identifies the device behind any wrappers (a session owns one device at a
    /// time): by default the address of this value; wrappers answer their inner device's.
    fn identity(&self) -> usize {
        self as *const Self as *const () as usize
    }
}
