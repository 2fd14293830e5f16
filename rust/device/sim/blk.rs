//! virtio-blk behaviour of the embedded device over a RAM disk: IN, OUT, FLUSH and GET_ID;
//! I/O outside the disk gets IOERR, unknown requests UNSUPP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use super::{SimKind, SimState};
use crate::ring::Chain;

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

/// A RAM disk, shareable between devices (as hosts share a storage network): a blk
/// device migrated to another device finds the same data.
#[derive(Debug, Clone)]
pub struct Disk {
    bytes: Arc<Mutex<Vec<u8>>>,
    sectors: u64,
}

impl Disk {
    /// A zeroed disk of `sectors` 512-byte sectors.
    pub fn new(sectors: u64) -> Self {
        Disk { bytes: Arc::new(Mutex::new(vec![0u8; (sectors * SECTOR) as usize])), sectors }
    }

    /// The disk named `name` in this process while a device holds it (made with
    /// `sectors` sectors when new; a disk that exists keeps its size). The last device
    /// holding a disk frees it.
    pub fn named(name: &str, sectors: u64) -> Self {
        type Registry = HashMap<String, (Weak<Mutex<Vec<u8>>>, u64)>;
        static DISKS: Mutex<Option<Registry>> = Mutex::new(None);
        let mut disks = DISKS.lock().unwrap_or_else(|p| p.into_inner());
        let disks = disks.get_or_insert_with(HashMap::new);
        disks.retain(|_, (bytes, _)| bytes.strong_count() > 0);
        if let Some(disk) = disks.get(name).and_then(|(bytes, sectors)| Some(Disk { bytes: bytes.upgrade()?, sectors: *sectors })) {
            return disk;
        }
        let disk = Disk::new(sectors);
        disks.insert(name.to_owned(), (Arc::downgrade(&disk.bytes), sectors));
        disk
    }

    /// Its size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request the device took and will complete when it is due.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) due: Instant,
    head: u16,
    chain: Chain,
    request: Vec<u8>,
}

/// Runs one request against the disk: (status, the data it returns).
fn execute(disk: &Disk, request: &[u8], data_in: u64) -> (u8, Vec<u8>) {
    if request.len() < 16 || request.len() as u64 > 16 + MAX_REQUEST {
        return (S_IOERR, Vec::new());
    }
    let kind = u32::from_le_bytes([request[0], request[1], request[2], request[3]]);
    let sector = u64::from_le_bytes(request[8..16].try_into().unwrap_or_default());
    let in_range = |bytes: u64| {
        bytes.is_multiple_of(SECTOR) && bytes <= MAX_REQUEST && sector.checked_add(bytes / SECTOR).is_some_and(|end| end <= disk.sectors)
    };
    let at = sector.saturating_mul(SECTOR) as usize;
    match kind {
        REQ_IN if in_range(data_in) => (S_OK, disk.bytes()[at..at + data_in as usize].to_vec()),
        REQ_OUT if in_range(request.len() as u64 - 16) => {
            disk.bytes()[at..at + request.len() - 16].copy_from_slice(&request[16..]);
            (S_OK, Vec::new())
        }
        REQ_IN | REQ_OUT => (S_IOERR, Vec::new()),
        REQ_FLUSH => (S_OK, Vec::new()),
        REQ_GET_ID => (S_OK, BLK_ID[..(data_in.min(BLK_ID.len() as u64)) as usize].to_vec()),
        _ => (S_UNSUPP, Vec::new()),
    }
}

/// Takes every available request; with a latency each is held until due, and the due
/// ones complete (in the order they fall due, not the order they came).
pub(super) fn process(st: &mut SimState) {
    let (SimKind::Blk { latency, .. }, Some(disk)) = (&st.kind, st.disk.clone()) else { return };
    let latency = *latency;
    loop {
        let now = Instant::now();
        let taken = st.with_ring(0, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            stats.blk_requests += 1;
            // No request moves more than size_max * seg_max bytes (as the kernel simulator).
            buf.clear();
            if chain.out_len >= 16 && chain.out_len <= 16 + MAX_REQUEST {
                view.gather(&chain.out, chain.out_len as usize, buf).map_err(|e| e.to_string())?;
            }
            // Later heads of a burst take longer: completions come out of order.
            let spread = latency * u32::from(chain.head % 4 + 1) / 2;
            Ok(Some(Pending { due: now + spread, head: chain.head, chain: chain.clone(), request: buf.clone() }))
        });
        match taken {
            Some(Some(p)) => st.pending.push(p),
            _ => break,
        }
    }
    let now = Instant::now();
    let (due, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut st.pending).into_iter().partition(|p| p.due <= now);
    st.pending = later;
    let mut completed = false;
    for p in due {
        let ok = st.with_ring(0, |r, view, _, _, _| {
            if p.chain.in_len == 0 {
                // Nowhere to put a status: complete with nothing written.
                r.push_used(p.head, 0);
                return Ok(());
            }
            // The last writable byte is the status; everything before it is data.
            let data_in = p.chain.in_len - 1;
            let (status, data) = execute(&disk, &p.request, data_in);
            // The data the request returns, then the status byte at the very end of the
            // writable area; nothing else is touched.
            let written = view.scatter(&p.chain.inn, &data).map_err(|e| e.to_string())?;
            view.scatter_at(&p.chain.inn, data_in, &[status]).map_err(|e| e.to_string())?;
            r.push_used(p.head, (written + 1) as u32);
            Ok(())
        });
        if ok.is_none() {
            break;
        }
        completed = true;
    }
    if completed {
        st.complete(0);
    }
}
