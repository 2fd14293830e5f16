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

#[cfg(test)]
mod tests {
    use nix::errno::Errno;

    use super::*;
    use crate::device::faulty::{FaultInjector, FaultPoint};
    use crate::device::sim::{SimDevice, BACKEND_FEATURES};
    use crate::mem::GuestMemory;
    use crate::virtio::PAGE_SIZE;

    const PAGE: u64 = PAGE_SIZE;

    /// An IOVA space over the embedded net device (two address spaces), failures armable.
    fn setup() -> (Arc<SimDevice>, Arc<FaultInjector>, Dma, GuestMemory) {
        let sim = Arc::new(SimDevice::net([2, 0, 0, 0, 0, 1], 1500).unwrap());
        sim.set_backend_features(BACKEND_FEATURES).unwrap();
        let faults = Arc::new(FaultInjector::new(sim.clone()));
        let dma = Dma::new(faults.clone()).unwrap();
        (sim, faults, dma, GuestMemory::new(&[(0, 16 * PAGE)]).unwrap())
    }

    /// A request for `len` bytes of `mem` from its page `page`.
    fn req(mem: &GuestMemory, page: u64, len: u64, at: Option<u64>) -> MapRequest {
        MapRequest { size: len, host: mem.regions()[0].host_addr() + page * PAGE, guest: None, perm: Perm::ReadWrite, at }
    }

    #[test]
    fn a_batch_reaches_the_device_iotlb_and_unmapping_takes_it_back() {
        let (sim, _, dma, mem) = setup();
        let mut maps =
            dma.map(0, &[req(&mem, 0, 2 * PAGE, None), req(&mem, 2, 100, Some(0x40_0000)), req(&mem, 3, 3 * PAGE - 1, None)]).unwrap();
        assert_eq!(maps.iter().map(|m| m.size).collect::<Vec<_>>(), [2 * PAGE, PAGE, 3 * PAGE], "whole pages");
        assert_eq!(maps[1].iova, 0x40_0000);
        assert_eq!((dma.live(), sim.live_mappings()), (3, Some(3)));
        maps.sort_by_key(|m| m.iova);
        assert!(maps.windows(2).all(|w| w[0].last_iova() < w[1].iova), "apart: {maps:?}");
        assert_eq!(dma.mappings(), maps.iter().map(|m| (0, *m)).collect::<Vec<_>>());
        // Unknown IOVAs are passed over; the known ones leave the IOTLB.
        dma.unmap(&[maps[0].iova, maps[2].iova, 0xdead_0000]).unwrap();
        assert_eq!((dma.live(), sim.live_mappings()), (1, Some(1)));
        assert_eq!(dma.mappings(), [(0, maps[1])]);
        assert_eq!(dma.counts(), (3, 2));
    }

    #[test]
    fn a_refused_map_leaves_nothing_half_mapped() {
        let (sim, faults, dma, mem) = setup();
        let kept = dma.map_one(0, req(&mem, 0, PAGE, None)).unwrap();
        let batch = [req(&mem, 1, PAGE, None), req(&mem, 2, 2 * PAGE, None), req(&mem, 4, PAGE, Some(0x40_0000))];
        // The device refuses the batch at its second update: none of it stays, neither in
        // the IOTLB nor in the IOVA space.
        faults.fail_map_at(2);
        let e = dma.map(0, &batch).unwrap_err();
        assert!(matches!(&e, DmaError::Device(d) if d.errno() == Some(Errno::ENOMEM)), "{e}");
        assert_eq!((dma.live(), sim.live_mappings()), (1, Some(1)));
        assert_eq!(dma.mappings(), [(0, kept)]);
        assert_eq!(dma.counts(), (1, 0));
        // Its IOVAs are free again: the same batch now maps where it would have.
        let maps = dma.map(0, &batch).unwrap();
        assert_eq!((maps[0].iova, maps[2].iova), (kept.iova + kept.size, 0x40_0000));
        assert_eq!((dma.live(), sim.live_mappings()), (4, Some(4)));
        // A batch the IOVA space refuses (an IOVA taken) never reaches the device.
        let sent = faults.maps();
        let clash = [req(&mem, 5, PAGE, None), req(&mem, 6, PAGE, Some(kept.iova))];
        assert!(matches!(dma.map(0, &clash), Err(DmaError::Iova(_))));
        assert_eq!(faults.maps(), sent, "nothing was sent");
        assert_eq!((dma.live(), sim.live_mappings()), (4, Some(4)));
    }

    #[test]
    fn unmap_all_empties_every_address_space_even_past_a_refusal() {
        let (sim, faults, dma, mem) = setup();
        dma.map(0, &[req(&mem, 0, PAGE, None), req(&mem, 1, PAGE, None)]).unwrap();
        dma.map(1, &[req(&mem, 2, PAGE, None), req(&mem, 3, PAGE, None)]).unwrap();
        assert_eq!((dma.live(), sim.live_mappings()), (4, Some(4)));
        dma.unmap_all().unwrap();
        assert_eq!((dma.live(), sim.live_mappings(), dma.counts()), (0, Some(0), (4, 4)));
        // The device refuses ASID 0's batch: ASID 1's is still sent, and every IOVA is given up.
        dma.map_one(0, req(&mem, 0, PAGE, None)).unwrap();
        dma.map_one(1, req(&mem, 1, PAGE, None)).unwrap();
        faults.fail_at(FaultPoint::Unmap, 1);
        let e = dma.unmap_all().unwrap_err();
        assert!(matches!(&e, DmaError::Device(d) if d.errno() == Some(Errno::EIO)), "{e}");
        assert_eq!((dma.live(), sim.live_mappings()), (0, Some(1)), "only the refused mapping stays in the device");
    }

    #[test]
    fn mappings_stay_in_their_address_space() {
        let (sim, _, dma, mem) = setup();
        let a = dma.map_one(0, req(&mem, 0, PAGE, None)).unwrap();
        let b = dma.map_one(1, req(&mem, 0, PAGE, None)).unwrap();
        assert_eq!(dma.mappings(), [(0, a), (1, b)]);
        // The device holds each in its own space only: mapping the same IOVA again there
        // is refused, in the other space it is not.
        let probe = |asid: u32, iova: u64| {
            let r = sim.iotlb(asid, &[IotlbOp::Update { iova, size: PAGE, uaddr: a.host_addr, perm: Perm::ReadOnly }]);
            if r.is_ok() {
                sim.iotlb(asid, &[IotlbOp::Invalidate { iova, size: PAGE }]).unwrap();
            }
            r.map_err(|e| e.errno())
        };
        assert_eq!((probe(0, a.iova), probe(1, a.iova)), (Err(Some(Errno::EEXIST)), Ok(())));
        assert_eq!((probe(1, b.iova), probe(0, b.iova)), (Err(Some(Errno::EEXIST)), Ok(())));
        // An unmap reaches the space its mapping is in.
        dma.unmap(&[b.iova]).unwrap();
        assert_eq!(probe(1, b.iova), Ok(()));
        assert_eq!((dma.mappings(), sim.live_mappings()), (vec![(0, a)], Some(1)));
        // A space the device does not have is refused, with nothing left mapped.
        assert!(dma.map_one(2, req(&mem, 1, PAGE, None)).is_err());
        assert_eq!((dma.live(), sim.live_mappings()), (1, Some(1)));
    }
}
