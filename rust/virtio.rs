//! The ground floor: virtio and vhost constants (feature bits, status bits, device ids,
//! backend features) and the access rights of a mapping. Every other module may use this
//! one; it uses none of them.

/// Feature bits common to every device (virtio spec 6), as bit numbers.
pub mod feature {
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// virtio 1.x.
    pub const VERSION_1: u32 = 32;
    /// The device reaches memory through an IOMMU (IOVAs, not guest addresses).
    pub const ACCESS_PLATFORM: u32 = 33;
    /// vhost: the backend logs the pages it writes (`VHOST_F_LOG_ALL`).
    pub const VHOST_LOG_ALL: u32 = 26;
    /// vhost-user: protocol features are negotiated (`VHOST_USER_F_PROTOCOL_FEATURES`).
    pub const VHOST_USER_PROTOCOL_FEATURES: u32 = 30;
}

/// virtio-net feature bits (virtio spec 5.1.3), as bit numbers.
pub mod net_feature {
    /// The driver handles packets with partial checksum.
    pub const CSUM: u32 = 0;
    /// The device handles packets with partial checksum.
    pub const GUEST_CSUM: u32 = 1;
    /// Control of guest offloads through the control queue.
    pub const CTRL_GUEST_OFFLOADS: u32 = 2;
    /// The device reports its MTU.
    pub const MTU: u32 = 3;
    /// The device has a MAC in config space.
    pub const MAC: u32 = 5;
    /// Receive buffers may be merged (`num_buffers` in the header).
    pub const MRG_RXBUF: u32 = 15;
    /// Link status in config space.
    pub const STATUS: u32 = 16;
    /// A control queue.
    pub const CTRL_VQ: u32 = 17;
    /// RX modes PROMISC/ALLMULTI and the MAC table.
    pub const CTRL_RX: u32 = 18;
    /// VLAN filter.
    pub const CTRL_VLAN: u32 = 19;
    /// RX modes ALLUNI/NOMULTI/NOUNI/NOBCAST.
    pub const CTRL_RX_EXTRA: u32 = 20;
    /// Gratuitous announcement.
    pub const GUEST_ANNOUNCE: u32 = 21;
    /// Multiqueue.
    pub const MQ: u32 = 22;
    /// MAC_ADDR_SET through the control queue.
    pub const CTRL_MAC_ADDR: u32 = 23;
    /// Any framing of headers and data.
    pub const ANY_LAYOUT: u32 = 27;
}

/// virtio-blk feature bits (virtio spec 5.2.3), as bit numbers.
pub mod blk_feature {
    /// `size_max` in config space.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` in config space.
    pub const SEG_MAX: u32 = 2;
    /// `blk_size` in config space.
    pub const BLK_SIZE: u32 = 6;
    /// The FLUSH command.
    pub const FLUSH: u32 = 9;
}

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

    /// The class name of a device id ("net", "blk"), for messages.
    pub fn name(id: u32) -> &'static str {
        match id {
            NET => "net",
            BLOCK => "blk",
            _ => "unknown",
        }
    }
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

/// Whether bit `bit` is set in `features`.
#[inline]
pub fn has(features: u64, bit: u32) -> bool {
    bit < 64 && features & (1u64 << bit) != 0
}

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

/// Size of the pages the IOVA space, bounce buffers and the dirty log count in.
pub const PAGE_SIZE: u64 = 4096;
