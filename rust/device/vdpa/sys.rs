//! Raw vhost-vdpa kernel interface: the `#[repr(C)]` structs of `linux/vhost_types.h` and
//! one `nix` ioctl wrapper per ioctl of `linux/vhost.h` that svq uses.
//!
//! Request numbers are `_IOC(dir, VHOST_VIRTIO, nr, size)` exactly as the kernel builds
//! them; the tests below pin them to the numbers known to work against `vdpa_sim`.
//! Everything here is `unsafe` to call; the safe wrappers live in the parent module.

#![allow(non_camel_case_types)]

use std::mem::size_of;

/// The ioctl "type" (magic) of every vhost ioctl.
pub const VHOST_VIRTIO: u8 = 0xAF;

/// `vhost_msg_v2.type` of an IOTLB message.
pub const VHOST_IOTLB_MSG_V2: u32 = 2;

/// `vhost_iotlb_msg.type`: the device asks for a translation (device → us; unused).
pub const VHOST_IOTLB_MISS: u8 = 1;
/// `vhost_iotlb_msg.type`: add a mapping.
pub const VHOST_IOTLB_UPDATE: u8 = 2;
/// `vhost_iotlb_msg.type`: remove mappings.
pub const VHOST_IOTLB_INVALIDATE: u8 = 3;
/// `vhost_iotlb_msg.type`: an access through a mapping failed (device → us; unused).
pub const VHOST_IOTLB_ACCESS_FAIL: u8 = 4;
/// `vhost_iotlb_msg.type`: start of a batch of updates.
pub const VHOST_IOTLB_BATCH_BEGIN: u8 = 5;
/// `vhost_iotlb_msg.type`: end of a batch; parents with `set_map` apply the batch here.
pub const VHOST_IOTLB_BATCH_END: u8 = 6;

/// `struct vhost_vring_state`: a queue index and a number (size, base, enable, group...).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_vring_state {
    /// Queue index (or group index for `VHOST_VDPA_SET_GROUP_ASID`).
    pub index: u32,
    /// The value.
    pub num: u32,
}

/// `struct vhost_vring_file`: a queue index and an eventfd (-1 unbinds).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_vring_file {
    /// Queue index.
    pub index: u32,
    /// File descriptor, or -1.
    pub fd: i32,
}

/// `struct vhost_vring_addr`: where a split ring lives (IOVAs for vhost-vdpa).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_vring_addr {
    /// Queue index.
    pub index: u32,
    /// `VHOST_VRING_F_LOG` (unsupported by vhost-vdpa; always 0).
    pub flags: u32,
    /// Descriptor table.
    pub desc_user_addr: u64,
    /// Used ring.
    pub used_user_addr: u64,
    /// Available ring.
    pub avail_user_addr: u64,
    /// Dirty log address (unused).
    pub log_guest_addr: u64,
}

/// `struct vhost_vdpa_iova_range`: the inclusive IOVA range a device can map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_vdpa_iova_range {
    /// First usable IOVA.
    pub first: u64,
    /// Last usable IOVA (inclusive).
    pub last: u64,
}

/// `struct vhost_vdpa_config` header; `len` bytes of config data follow it in memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_vdpa_config {
    /// Offset into the device config space.
    pub off: u32,
    /// Number of bytes that follow the header.
    pub len: u32,
    /// The flexible array member `u8 buf[]`.
    pub buf: [u8; 0],
}

/// `struct vhost_iotlb_msg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct vhost_iotlb_msg {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address.
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub type_: u8,
}

/// The union in `struct vhost_msg_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vhost_msg_v2_payload {
    /// The IOTLB message.
    pub iotlb: vhost_iotlb_msg,
    /// Pads the union to 64 bytes.
    pub padding: [u8; 64],
}

/// `struct vhost_msg_v2`: what is written to (and read from) a vhost-vdpa fd.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vhost_msg_v2 {
    /// `VHOST_IOTLB_MSG_V2`.
    pub type_: u32,
    /// Address space id (meaningful only with backend feature IOTLB_ASID).
    pub asid: u32,
    /// The message.
    pub payload: vhost_msg_v2_payload,
}

/// Size of a `vhost_msg_v2` on the wire.
pub const VHOST_MSG_V2_SIZE: usize = size_of::<vhost_msg_v2>();

/// Serializes a `vhost_msg_v2` carrying `iotlb` into its wire form: every byte defined
/// (padding zeroed), fields at their C offsets in native byte order.
pub fn encode_msg_v2(asid: u32, iotlb: &vhost_iotlb_msg) -> [u8; VHOST_MSG_V2_SIZE] {
    use std::mem::offset_of;
    let mut out = [0u8; VHOST_MSG_V2_SIZE];
    let base = offset_of!(vhost_msg_v2, payload);
    let mut put = |off: usize, bytes: &[u8]| out[off..off + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(vhost_msg_v2, type_), &VHOST_IOTLB_MSG_V2.to_ne_bytes());
    put(offset_of!(vhost_msg_v2, asid), &asid.to_ne_bytes());
    put(base + offset_of!(vhost_iotlb_msg, iova), &iotlb.iova.to_ne_bytes());
    put(base + offset_of!(vhost_iotlb_msg, size), &iotlb.size.to_ne_bytes());
    put(base + offset_of!(vhost_iotlb_msg, uaddr), &iotlb.uaddr.to_ne_bytes());
    put(base + offset_of!(vhost_iotlb_msg, perm), &[iotlb.perm]);
    put(base + offset_of!(vhost_iotlb_msg, type_), &[iotlb.type_]);
    out
}

// ioctl numbers (`nr`), shared by the wrappers and the tests.
pub(crate) const NR_FEATURES: u8 = 0x00;
pub(crate) const NR_SET_OWNER: u8 = 0x01;
pub(crate) const NR_VRING_NUM: u8 = 0x10;
pub(crate) const NR_VRING_ADDR: u8 = 0x11;
pub(crate) const NR_VRING_BASE: u8 = 0x12;
pub(crate) const NR_VRING_KICK: u8 = 0x20;
pub(crate) const NR_VRING_CALL: u8 = 0x21;
pub(crate) const NR_SET_BACKEND_FEATURES: u8 = 0x25;
pub(crate) const NR_GET_BACKEND_FEATURES: u8 = 0x26;
pub(crate) const NR_GET_DEVICE_ID: u8 = 0x70;
pub(crate) const NR_GET_STATUS: u8 = 0x71;
pub(crate) const NR_SET_STATUS: u8 = 0x72;
pub(crate) const NR_GET_CONFIG: u8 = 0x73;
pub(crate) const NR_SET_CONFIG: u8 = 0x74;
pub(crate) const NR_SET_VRING_ENABLE: u8 = 0x75;
pub(crate) const NR_GET_VRING_NUM: u8 = 0x76;
pub(crate) const NR_SET_CONFIG_CALL: u8 = 0x77;
pub(crate) const NR_GET_IOVA_RANGE: u8 = 0x78;
pub(crate) const NR_GET_CONFIG_SIZE: u8 = 0x79;
pub(crate) const NR_GET_AS_NUM: u8 = 0x7A;
pub(crate) const NR_GET_VRING_GROUP: u8 = 0x7B;
pub(crate) const NR_SET_GROUP_ASID: u8 = 0x7C;
pub(crate) const NR_SUSPEND: u8 = 0x7D;
pub(crate) const NR_RESUME: u8 = 0x7E;
pub(crate) const NR_GET_VRING_DESC_GROUP: u8 = 0x7F;
pub(crate) const NR_GET_VQS_COUNT: u8 = 0x80;
pub(crate) const NR_GET_GROUP_NUM: u8 = 0x81;
pub(crate) const NR_GET_VRING_SIZE: u8 = 0x82;

/// `_IOR(VHOST_VIRTIO, 0x73, struct vhost_vdpa_config)`: the size is the header's (8),
/// whatever `len` follows it.
pub const VHOST_VDPA_GET_CONFIG: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_read!(VHOST_VIRTIO, NR_GET_CONFIG, size_of::<vhost_vdpa_config>()) as nix::sys::ioctl::ioctl_num_type;
/// `_IOW(VHOST_VIRTIO, 0x74, struct vhost_vdpa_config)`.
pub const VHOST_VDPA_SET_CONFIG: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(VHOST_VIRTIO, NR_SET_CONFIG, size_of::<vhost_vdpa_config>()) as nix::sys::ioctl::ioctl_num_type;

nix::ioctl_read!(
    /// `VHOST_GET_FEATURES`.
    vhost_get_features, VHOST_VIRTIO, NR_FEATURES, u64
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_FEATURES`.
    vhost_set_features, VHOST_VIRTIO, NR_FEATURES, u64
);
nix::ioctl_none!(
    /// `VHOST_SET_OWNER`.
    vhost_set_owner, VHOST_VIRTIO, NR_SET_OWNER
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_VRING_NUM`.
    vhost_set_vring_num, VHOST_VIRTIO, NR_VRING_NUM, vhost_vring_state
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_VRING_ADDR`.
    vhost_set_vring_addr, VHOST_VIRTIO, NR_VRING_ADDR, vhost_vring_addr
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_VRING_BASE`.
    vhost_set_vring_base, VHOST_VIRTIO, NR_VRING_BASE, vhost_vring_state
);
nix::ioctl_readwrite!(
    /// `VHOST_GET_VRING_BASE`.
    vhost_get_vring_base, VHOST_VIRTIO, NR_VRING_BASE, vhost_vring_state
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_VRING_KICK`.
    vhost_set_vring_kick, VHOST_VIRTIO, NR_VRING_KICK, vhost_vring_file
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_VRING_CALL`.
    vhost_set_vring_call, VHOST_VIRTIO, NR_VRING_CALL, vhost_vring_file
);
nix::ioctl_write_ptr!(
    /// `VHOST_SET_BACKEND_FEATURES`.
    vhost_set_backend_features, VHOST_VIRTIO, NR_SET_BACKEND_FEATURES, u64
);
nix::ioctl_read!(
    /// `VHOST_GET_BACKEND_FEATURES`.
    vhost_get_backend_features, VHOST_VIRTIO, NR_GET_BACKEND_FEATURES, u64
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_DEVICE_ID`.
    vhost_vdpa_get_device_id, VHOST_VIRTIO, NR_GET_DEVICE_ID, u32
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_STATUS`.
    vhost_vdpa_get_status, VHOST_VIRTIO, NR_GET_STATUS, u8
);
nix::ioctl_write_ptr!(
    /// `VHOST_VDPA_SET_STATUS`.
    vhost_vdpa_set_status, VHOST_VIRTIO, NR_SET_STATUS, u8
);
nix::ioctl_read_bad!(
    /// `VHOST_VDPA_GET_CONFIG`: the pointer must be followed by `len` writable bytes.
    vhost_vdpa_get_config, VHOST_VDPA_GET_CONFIG, vhost_vdpa_config
);
nix::ioctl_write_ptr_bad!(
    /// `VHOST_VDPA_SET_CONFIG`: the pointer must be followed by `len` readable bytes.
    vhost_vdpa_set_config, VHOST_VDPA_SET_CONFIG, vhost_vdpa_config
);
nix::ioctl_write_ptr!(
    /// `VHOST_VDPA_SET_VRING_ENABLE`.
    vhost_vdpa_set_vring_enable, VHOST_VIRTIO, NR_SET_VRING_ENABLE, vhost_vring_state
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_VRING_NUM`.
    vhost_vdpa_get_vring_num, VHOST_VIRTIO, NR_GET_VRING_NUM, u16
);
nix::ioctl_write_ptr!(
    /// `VHOST_VDPA_SET_CONFIG_CALL` (takes a pointer to an `int`).
    vhost_vdpa_set_config_call, VHOST_VIRTIO, NR_SET_CONFIG_CALL, libc::c_int
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_IOVA_RANGE`.
    vhost_vdpa_get_iova_range, VHOST_VIRTIO, NR_GET_IOVA_RANGE, vhost_vdpa_iova_range
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_CONFIG_SIZE`.
    vhost_vdpa_get_config_size, VHOST_VIRTIO, NR_GET_CONFIG_SIZE, u32
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_AS_NUM`.
    vhost_vdpa_get_as_num, VHOST_VIRTIO, NR_GET_AS_NUM, u32
);
nix::ioctl_readwrite!(
    /// `VHOST_VDPA_GET_VRING_GROUP`: `index` = queue in, `num` = group out.
    vhost_vdpa_get_vring_group, VHOST_VIRTIO, NR_GET_VRING_GROUP, vhost_vring_state
);
nix::ioctl_write_ptr!(
    /// `VHOST_VDPA_SET_GROUP_ASID`: `index` = group, `num` = asid.
    vhost_vdpa_set_group_asid, VHOST_VIRTIO, NR_SET_GROUP_ASID, vhost_vring_state
);
nix::ioctl_none!(
    /// `VHOST_VDPA_SUSPEND`.
    vhost_vdpa_suspend, VHOST_VIRTIO, NR_SUSPEND
);
nix::ioctl_none!(
    /// `VHOST_VDPA_RESUME`.
    vhost_vdpa_resume, VHOST_VIRTIO, NR_RESUME
);
nix::ioctl_readwrite!(
    /// `VHOST_VDPA_GET_VRING_DESC_GROUP`.
    vhost_vdpa_get_vring_desc_group, VHOST_VIRTIO, NR_GET_VRING_DESC_GROUP, vhost_vring_state
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_VQS_COUNT`.
    vhost_vdpa_get_vqs_count, VHOST_VIRTIO, NR_GET_VQS_COUNT, u32
);
nix::ioctl_read!(
    /// `VHOST_VDPA_GET_GROUP_NUM`.
    vhost_vdpa_get_group_num, VHOST_VIRTIO, NR_GET_GROUP_NUM, u32
);
nix::ioctl_readwrite!(
    /// `VHOST_VDPA_GET_VRING_SIZE`.
    vhost_vdpa_get_vring_size, VHOST_VIRTIO, NR_GET_VRING_SIZE, vhost_vring_state
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn struct_layouts_match_the_kernel() {
        assert_eq!(size_of::<vhost_vring_state>(), 8);
        assert_eq!(offset_of!(vhost_vring_state, num), 4);
        assert_eq!(size_of::<vhost_vring_file>(), 8);
        assert_eq!(offset_of!(vhost_vring_file, fd), 4);

        assert_eq!(size_of::<vhost_vring_addr>(), 40);
        assert_eq!(offset_of!(vhost_vring_addr, index), 0);
        assert_eq!(offset_of!(vhost_vring_addr, flags), 4);
        assert_eq!(offset_of!(vhost_vring_addr, desc_user_addr), 8);
        assert_eq!(offset_of!(vhost_vring_addr, used_user_addr), 16);
        assert_eq!(offset_of!(vhost_vring_addr, avail_user_addr), 24);
        assert_eq!(offset_of!(vhost_vring_addr, log_guest_addr), 32);

        assert_eq!(size_of::<vhost_vdpa_iova_range>(), 16);
        assert_eq!(offset_of!(vhost_vdpa_iova_range, last), 8);

        assert_eq!(size_of::<vhost_vdpa_config>(), 8);
        assert_eq!(offset_of!(vhost_vdpa_config, len), 4);
        assert_eq!(offset_of!(vhost_vdpa_config, buf), 8);

        assert_eq!(size_of::<vhost_iotlb_msg>(), 32);
        assert_eq!(offset_of!(vhost_iotlb_msg, size), 8);
        assert_eq!(offset_of!(vhost_iotlb_msg, uaddr), 16);
        assert_eq!(offset_of!(vhost_iotlb_msg, perm), 24);
        assert_eq!(offset_of!(vhost_iotlb_msg, type_), 25);

        assert_eq!(size_of::<vhost_msg_v2_payload>(), 64);
        assert_eq!(size_of::<vhost_msg_v2>(), 72);
        assert_eq!(VHOST_MSG_V2_SIZE, 72);
        assert_eq!(align_of::<vhost_msg_v2>(), 8);
        assert_eq!(offset_of!(vhost_msg_v2, type_), 0);
        assert_eq!(offset_of!(vhost_msg_v2, asid), 4);
        assert_eq!(offset_of!(vhost_msg_v2, payload), 8);
    }

    #[test]
    fn msg_v2_encoding() {
        let m = vhost_iotlb_msg { iova: 0x1000, size: 0x2000, uaddr: 0x7f00_dead_b000, perm: 3, type_: VHOST_IOTLB_UPDATE };
        let b = encode_msg_v2(1, &m);
        // Same layout as vdpa_probe.py: struct.pack("<IIQQQBB", 2, asid, iova, size, uaddr, perm, type)
        let mut want = Vec::new();
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&0x1000u64.to_le_bytes());
        want.extend_from_slice(&0x2000u64.to_le_bytes());
        want.extend_from_slice(&0x7f00_dead_b000u64.to_le_bytes());
        want.extend_from_slice(&[3, 2]);
        want.resize(72, 0);
        assert_eq!(&b[..], &want[..]);
    }

    /// The numbers the stdlib driver in the testbed uses against the 6.12 kernel.
    // `ioctl_num_type` is u64 on glibc but i32 on musl: the casts are not always no-ops.
    #[allow(clippy::unnecessary_cast)]
    #[test]
    fn request_codes_match_the_kernel() {
        use nix::{request_code_none as none, request_code_read as r};
        use nix::{request_code_readwrite as rw, request_code_write as w};
        let v = VHOST_VIRTIO;
        let st = size_of::<vhost_vring_state>();
        let cases: &[(&str, u64, u64)] = &[
            ("GET_FEATURES", r!(v, NR_FEATURES, 8) as u64, 0x8008af00),
            ("SET_FEATURES", w!(v, NR_FEATURES, 8) as u64, 0x4008af00),
            ("SET_OWNER", none!(v, NR_SET_OWNER) as u64, 0xaf01),
            ("SET_VRING_NUM", w!(v, NR_VRING_NUM, st) as u64, 0x4008af10),
            ("SET_VRING_ADDR", w!(v, NR_VRING_ADDR, size_of::<vhost_vring_addr>()) as u64, 0x4028af11),
            ("SET_VRING_BASE", w!(v, NR_VRING_BASE, st) as u64, 0x4008af12),
            ("GET_VRING_BASE", rw!(v, NR_VRING_BASE, st) as u64, 0xc008af12),
            ("SET_VRING_KICK", w!(v, NR_VRING_KICK, size_of::<vhost_vring_file>()) as u64, 0x4008af20),
            ("SET_VRING_CALL", w!(v, NR_VRING_CALL, size_of::<vhost_vring_file>()) as u64, 0x4008af21),
            ("SET_BACKEND_FEATURES", w!(v, NR_SET_BACKEND_FEATURES, 8) as u64, 0x4008af25),
            ("GET_BACKEND_FEATURES", r!(v, NR_GET_BACKEND_FEATURES, 8) as u64, 0x8008af26),
            ("GET_DEVICE_ID", r!(v, NR_GET_DEVICE_ID, 4) as u64, 0x8004af70),
            ("GET_STATUS", r!(v, NR_GET_STATUS, 1) as u64, 0x8001af71),
            ("SET_STATUS", w!(v, NR_SET_STATUS, 1) as u64, 0x4001af72),
            ("GET_CONFIG", VHOST_VDPA_GET_CONFIG as u64, 0x8008af73),
            ("SET_CONFIG", VHOST_VDPA_SET_CONFIG as u64, 0x4008af74),
            ("SET_VRING_ENABLE", w!(v, NR_SET_VRING_ENABLE, st) as u64, 0x4008af75),
            ("GET_VRING_NUM", r!(v, NR_GET_VRING_NUM, 2) as u64, 0x8002af76),
            ("SET_CONFIG_CALL", w!(v, NR_SET_CONFIG_CALL, size_of::<libc::c_int>()) as u64, 0x4004af77),
            ("GET_IOVA_RANGE", r!(v, NR_GET_IOVA_RANGE, size_of::<vhost_vdpa_iova_range>()) as u64, 0x8010af78),
            ("GET_CONFIG_SIZE", r!(v, NR_GET_CONFIG_SIZE, 4) as u64, 0x8004af79),
            ("GET_AS_NUM", r!(v, NR_GET_AS_NUM, 4) as u64, 0x8004af7a),
            ("GET_VRING_GROUP", rw!(v, NR_GET_VRING_GROUP, st) as u64, 0xc008af7b),
            ("SET_GROUP_ASID", w!(v, NR_SET_GROUP_ASID, st) as u64, 0x4008af7c),
            ("SUSPEND", none!(v, NR_SUSPEND) as u64, 0xaf7d),
            ("RESUME", none!(v, NR_RESUME) as u64, 0xaf7e),
            ("GET_VRING_DESC_GROUP", rw!(v, NR_GET_VRING_DESC_GROUP, st) as u64, 0xc008af7f),
            ("GET_VQS_COUNT", r!(v, NR_GET_VQS_COUNT, 4) as u64, 0x8004af80),
            ("GET_GROUP_NUM", r!(v, NR_GET_GROUP_NUM, 4) as u64, 0x8004af81),
            ("GET_VRING_SIZE", rw!(v, NR_GET_VRING_SIZE, st) as u64, 0xc008af82),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "VHOST_{name}: {got:#x} != {want:#x}");
        }
    }
}
