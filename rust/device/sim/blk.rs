//! virtio-blk behaviour of the embedded device over a RAM disk: IN, OUT, FLUSH and GET_ID;
//! I/O outside the disk gets IOERR, unknown requests UNSUPP.

use super::{SimKind, SimState};

/// virtio-blk feature bits (virtio spec 5.2.3).
pub mod feature {
    /// `size_max` in config.
    pub const SIZE_MAX: u32 = 1;
    /// `seg_max` in config.
    pub const SEG_MAX: u32 = 2;
    /// `blk_size` in config.
    pub const BLK_SIZE: u32 = 6;
    /// FLUSH requests.
    pub const FLUSH: u32 = 9;
}

pub(super) const FEATURES: u64 =
    (1 << feature::SIZE_MAX) | (1 << feature::SEG_MAX) | (1 << feature::BLK_SIZE) | (1 << feature::FLUSH);

const SECTOR: u64 = 512;
const SIZE_MAX: u32 = 4096;
const SEG_MAX: u32 = 32;
const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;
const REQ_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The serial GET_ID returns (VIRTIO_BLK_ID_BYTES = 20).
pub const BLK_ID: &[u8; 20] = b"svq_blk_sim\0\0\0\0\0\0\0\0\0";

/// Config: capacity u64, size_max u32, seg_max u32, geometry u32, blk_size u32.
pub(super) fn config(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    c
}

pub(super) fn process(st: &mut SimState) {
    let capacity = match st.kind {
        SimKind::Blk { capacity } => capacity,
        SimKind::Net { .. } => return,
    };
    let mut disk = std::mem::take(&mut st.disk);
    loop {
        let done = st.with_ring(0, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(false);
            }
            stats.blk_requests += 1;
            view.gather(&chain.out, usize::MAX, buf).map_err(|e| e.to_string())?;
            // The last writable byte is the status; everything before it is data.
            let data_in = chain.in_len.saturating_sub(1);
            let (status, data) = if buf.len() < 16 || chain.in_len == 0 {
                (S_IOERR, Vec::new())
            } else {
                let kind = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let sector = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
                let in_range = |bytes: u64| {
                    bytes % SECTOR == 0
                        && sector.checked_add(bytes / SECTOR).is_some_and(|end| end <= capacity)
                };
                match kind {
                    REQ_IN if in_range(data_in) => {
                        let at = (sector * SECTOR) as usize;
                        (S_OK, disk[at..at + data_in as usize].to_vec())
                    }
                    REQ_OUT if in_range(buf.len() as u64 - 16) => {
                        let at = (sector * SECTOR) as usize;
                        disk[at..at + buf.len() - 16].copy_from_slice(&buf[16..]);
                        (S_OK, Vec::new())
                    }
                    REQ_IN | REQ_OUT => (S_IOERR, Vec::new()),
                    REQ_FLUSH => (S_OK, Vec::new()),
                    REQ_GET_ID => (S_OK, BLK_ID[..(data_in as usize).min(BLK_ID.len())].to_vec()),
                    _ => (S_UNSUPP, Vec::new()),
                }
            };
            // Data first, then the status byte at the very end of the writable area.
            let mut reply = data;
            reply.resize(data_in as usize, 0);
            let written_data = if status == S_OK { reply.len() } else { 0 };
            reply.push(status);
            let wrote = view.scatter(&chain.inn, &reply).map_err(|e| e.to_string())?;
            debug_assert_eq!(wrote, reply.len());
            r.push_used(chain.head, (written_data + 1) as u32);
            Ok(true)
        });
        if done != Some(true) {
            break;
        }
        st.complete(0);
    }
    st.disk = disk;
}
