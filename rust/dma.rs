//! The session's IOVA space and the device's IOTLB kept in step: every map allocates (or
//! reserves) an IOVA and sends the UPDATE, every unmap sends the INVALIDATE and frees the
//! IOVA. A failed UPDATE gives the IOVA back, so nothing is left half-mapped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::{Device, DeviceError, IotlbOp};
use crate::iova::{IovaAllocator, IovaError, Mapping};
use crate::virtio::Perm;

/// A failed map or unmap.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// No IOVA space.
    #[error(transparent)]
    Iova(#[from] IovaError),
    /// The device refused the IOTLB change.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// What to map: host memory of `size` bytes at `host`, optionally the guest address it
/// backs, with the device's permission.
#[derive(Debug, Clone, Copy)]
pub struct MapRequest {
    /// Bytes (rounded up to pages).
    pub size: u64,
    /// Host virtual address.
    pub host: u64,
    /// Guest address, for guest memory.
    pub guest: Option<u64>,
    /// Device permission.
    pub perm: Perm,
    /// A fixed IOVA (passthrough maps guest memory at IOVA = guest address).
    pub at: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    iova: IovaAllocator,
    live: BTreeMap<u64, u32>,
    maps: u64,
    unmaps: u64,
}

/// The IOVA space of one session, shared by the session and its engine thread.
#[derive(Debug)]
pub struct Dma {
    device: Arc<dyn Device>,
    inner: Mutex<Inner>,
}

impl Dma {
    /// An empty IOVA space over the device's range.
    pub fn new(device: Arc<dyn Device>) -> Result<Self, DmaError> {
        let (first, last) = device.iova_range()?;
        Ok(Dma { device, inner: Mutex::new(Inner { iova: IovaAllocator::new(first, last)?, live: BTreeMap::new(), maps: 0, unmaps: 0 }) })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps every request in address space `asid` with one IOTLB batch; all or nothing.
    pub fn map(&self, asid: u32, reqs: &[MapRequest]) -> Result<Vec<Mapping>, DmaError> {
        let mut inner = self.inner();
        let mut done: Vec<Mapping> = Vec::with_capacity(reqs.len());
        let placed = reqs.iter().try_for_each(|r| {
            let m = match r.at {
                Some(at) => inner.iova.insert(at, r.size, r.host, r.guest, r.perm)?,
                None => inner.iova.alloc(r.size, r.host, r.guest, r.perm)?,
            };
            done.push(m);
            Ok::<_, IovaError>(())
        });
        let ops: Vec<IotlbOp> =
            done.iter().map(|m| IotlbOp::Update { iova: m.iova, size: m.size, uaddr: m.host_addr, perm: m.perm }).collect();
        let sent = match placed {
            Ok(()) => self.device.iotlb(asid, &ops).map_err(DmaError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = sent {
            // A device may have applied the messages before the refused one: take them
            // back (best effort; an overlap was refused before anything was applied, and
            // invalidating then could remove a mapping that is not ours). Then give back
            // every IOVA this call took.
            let overlap = matches!(&e, DmaError::Device(d) if d.errno() == Some(nix::errno::Errno::EEXIST));
            if !done.is_empty() && !overlap && !matches!(e, DmaError::Iova(_)) {
                let undo: Vec<IotlbOp> = done.iter().map(|m| IotlbOp::Invalidate { iova: m.iova, size: m.size }).collect();
                let _ = self.device.iotlb(asid, &undo);
            }
            for m in &done {
                let _ = inner.iova.remove(m.iova);
            }
            return Err(e);
        }
        for m in &done {
            inner.live.insert(m.iova, asid);
        }
        inner.maps += done.len() as u64;
        Ok(done)
    }

    /// Maps one request.
    pub fn map_one(&self, asid: u32, req: MapRequest) -> Result<Mapping, DmaError> {
        Ok(self.map(asid, &[req])?.remove(0))
    }

    /// Unmaps mappings by IOVA (one batch per address space). Every IOVA is freed even if
    /// the device refuses; the first refusal is returned.
    pub fn unmap(&self, iovas: &[u64]) -> Result<(), DmaError> {
        let mut inner = self.inner();
        let mut by_asid: BTreeMap<u32, Vec<IotlbOp>> = BTreeMap::new();
        for &iova in iovas {
            let Some(asid) = inner.live.remove(&iova) else { continue };
            if let Ok(m) = inner.iova.remove(iova) {
                by_asid.entry(asid).or_default().push(IotlbOp::Invalidate { iova: m.iova, size: m.size });
            }
        }
        let mut first = None;
        for (asid, ops) in by_asid {
            inner.unmaps += ops.len() as u64;
            if let Err(e) = self.device.iotlb(asid, &ops) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Unmaps everything.
    pub fn unmap_all(&self) -> Result<(), DmaError> {
        let all: Vec<u64> = self.inner().live.keys().copied().collect();
        self.unmap(&all)
    }

    /// Live mappings with their address space, by IOVA.
    pub fn mappings(&self) -> Vec<(u32, Mapping)> {
        let inner = self.inner();
        inner.live.iter().filter_map(|(iova, asid)| inner.iova.find(*iova).map(|m| (*asid, *m))).collect()
    }

    /// Number of live mappings.
    pub fn live(&self) -> usize {
        self.inner().live.len()
    }

    /// (maps, unmaps) sent since the start.
    pub fn counts(&self) -> (u64, u64) {
        let i = self.inner();
        (i.maps, i.unmaps)
    }
}
