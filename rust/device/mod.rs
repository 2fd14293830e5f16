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

/// Access rights of an IOTLB mapping, from the device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perm {
    /// The device may read (`VHOST_ACCESS_RO`).
    ReadOnly,
    /// The device may write (`VHOST_ACCESS_WO`).
    WriteOnly,
    /// The device may read and write (`VHOST_ACCESS_RW`).
    ReadWrite,
}

impl Perm {
    /// The `perm` byte of a `vhost_iotlb_msg`.
    pub fn to_uapi(self) -> u8 {
        match self {
            Perm::ReadOnly => 1,
            Perm::WriteOnly => 2,
            Perm::ReadWrite => 3,
        }
    }

    /// Whether the device may read through a mapping with this permission.
    pub fn readable(self) -> bool {
        matches!(self, Perm::ReadOnly | Perm::ReadWrite)
    }

    /// Whether the device may write through a mapping with this permission.
    pub fn writable(self) -> bool {
        matches!(self, Perm::WriteOnly | Perm::ReadWrite)
    }
}

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

/// Device status bits (virtio spec 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and the device may run.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Virtio device ids (virtio spec 5).
pub mod device_id {
    /// virtio-net.
    pub const NET: u32 = 1;
    /// virtio-blk.
    pub const BLOCK: u32 = 2;
}

/// Backend (vhost) feature bits, as bit numbers.
pub mod backend_feature {
    /// `vhost_msg_v2` IOTLB messages.
    pub const IOTLB_MSG_V2: u32 = 1;
    /// BATCH_BEGIN/BATCH_END around IOTLB updates.
    pub const IOTLB_BATCH: u32 = 2;
    /// The `asid` field of `vhost_msg_v2`.
    pub const IOTLB_ASID: u32 = 3;
    /// VHOST_VDPA_SUSPEND.
    pub const SUSPEND: u32 = 4;
    /// VHOST_VDPA_RESUME.
    pub const RESUME: u32 = 5;
    /// Queues may be enabled after DRIVER_OK.
    pub const ENABLE_AFTER_DRIVER_OK: u32 = 6;
    /// Descriptor tables in their own group.
    pub const DESC_ASID: u32 = 7;
    /// Mappings survive a reset.
    pub const IOTLB_PERSIST: u32 = 8;

    /// Names by bit, for `svq info`.
    pub const NAMES: &[(u32, &str)] = &[
        (IOTLB_MSG_V2, "IOTLB_MSG_V2"),
        (IOTLB_BATCH, "IOTLB_BATCH"),
        (IOTLB_ASID, "IOTLB_ASID"),
        (SUSPEND, "SUSPEND"),
        (RESUME, "RESUME"),
        (ENABLE_AFTER_DRIVER_OK, "ENABLE_AFTER_DRIVER_OK"),
        (DESC_ASID, "DESC_ASID"),
        (IOTLB_PERSIST, "IOTLB_PERSIST"),
    ];
}

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
}
