//! virtio-blk behaviour of the embedded device over a RAM disk: IN, OUT, FLUSH and GET_ID;
//! I/O outside the disk gets IOERR, unknown requests UNSUPP.

use super::{SimKind, SimState};

use crate::virtio::blk_feature as feature;

pub(super) const FEATURES: u64 = (1 << feature::SIZE_MAX) | (1 << feature::SEG_MAX) | (1 << feature::BLK_SIZE) | (1 << feature::FLUSH);

const SECTOR: u64 = 512;
const SIZE_MAX: u32 = 4096;
const SEG_MAX: u32 = 32;
/// The most data one request moves: size_max * seg_max.
const MAX_REQUEST: u64 = SIZE_MAX as u64 * SEG_MAX as u64;
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
            if chain.in_len == 0 {
                // Nowhere to put a status: complete with nothing written.
                r.push_used(chain.head, 0);
                return Ok(true);
            }
            // The last writable byte is the status; everything before it is data. No
            // request moves more than size_max * seg_max bytes (as the kernel simulator).
            let data_in = chain.in_len - 1;
            let (status, data) = if chain.out_len < 16 || chain.out_len > 16 + MAX_REQUEST {
                (S_IOERR, Vec::new())
            } else {
                view.gather(&chain.out, chain.out_len as usize, buf).map_err(|e| e.to_string())?;
                let kind = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let sector = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
                let in_range = |bytes: u64| {
                    bytes.is_multiple_of(SECTOR)
                        && bytes <= MAX_REQUEST
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
                    REQ_GET_ID => (S_OK, BLK_ID[..(data_in.min(BLK_ID.len() as u64)) as usize].to_vec()),
                    _ => (S_UNSUPP, Vec::new()),
                }
            };
            // The data the request returns, then the status byte at the very end of the
            // writable area; nothing else is touched.
            let written = view.scatter(&chain.inn, &data).map_err(|e| e.to_string())?;
            view.scatter_at(&chain.inn, data_in, &[status]).map_err(|e| e.to_string())?;
            r.push_used(chain.head, (written + 1) as u32);
            Ok(true)
        });
        if done != Some(true) {
            break;
        }
        st.complete(0);
    }
    st.disk = disk;
}
