//! What the embedded device can reach: memory through one address space of its IOTLB.

use std::ptr::NonNull;

use crate::device::iotlb::{AddressSpace, Fault};
use crate::ring::layout::RingLayout;
use crate::ring::{BufferSpace, Descriptor, Segment, Vring};

/// One address space, seen by the device while it processes a queue.
#[derive(Debug, Clone, Copy)]
pub struct DeviceView<'a> {
    /// The address space.
    pub space: &'a AddressSpace,
    /// Its id.
    pub asid: u32,
}

impl DeviceView<'_> {
    /// The ring at the given IOVAs, if all three parts are mapped with the access the
    /// device needs (descriptors and avail readable, used writable) and each is contiguous.
    pub fn ring(&self, layout: RingLayout, desc: u64, avail: u64, used: u64) -> Result<Vring, Fault> {
        let d = self.space.contiguous(self.asid, desc, layout.desc_bytes(), false)?;
        let a = self.space.contiguous(self.asid, avail, layout.avail_bytes(), false)?;
        // The device writes the used ring and reads its avail_event... both need RW.
        let u = self.space.contiguous(self.asid, used, layout.used_bytes(), true)?;
        let nn = |h: u64, iova| NonNull::new(h as *mut u8).ok_or(Fault::Unmapped { asid: self.asid, iova });
        if d % 16 != 0 || a % 2 != 0 || u % 4 != 0 {
            return Err(Fault::Unmapped { asid: self.asid, iova: desc });
        }
        // SAFETY: each part was translated as one contiguous host range of its full size
        // with the needed permission; the mapping's owner keeps it alive while it is in the
        // IOTLB, and the device translates again after any change of its IOTLB.
        Ok(unsafe { Vring::new(nn(d, desc)?, nn(a, avail)?, nn(u, used)?, layout) })
    }

    /// Copies the bytes of `segs` (device-readable) into `out`, at most `max` bytes.
    pub fn gather(&self, segs: &[Segment], max: usize, out: &mut Vec<u8>) -> Result<(), Fault> {
        out.clear();
        for s in segs {
            let want = (s.len as usize).min(max - out.len());
            if want == 0 {
                break;
            }
            self.space.translate(self.asid, s.addr, want as u64, false, |h, n| {
                let at = out.len();
                out.resize(at + n as usize, 0);
                // SAFETY: the IOTLB gave `h` as valid for n readable bytes.
                unsafe { std::ptr::copy_nonoverlapping(h as *const u8, out.as_mut_ptr().add(at), n as usize) };
            })?;
        }
        Ok(())
    }

    /// Copies `data` into the device-writable `segs`; returns bytes written.
    pub fn scatter(&self, segs: &[Segment], data: &[u8]) -> Result<usize, Fault> {
        self.scatter_at(segs, 0, data)
    }

    /// Copies `data` into the device-writable `segs` from byte `offset` of them; returns
    /// bytes written.
    pub fn scatter_at(&self, segs: &[Segment], mut offset: u64, data: &[u8]) -> Result<usize, Fault> {
        let mut done = 0usize;
        for s in segs {
            if offset >= s.len as u64 {
                offset -= s.len as u64;
                continue;
            }
            let want = ((s.len as u64 - offset) as usize).min(data.len() - done);
            if want == 0 {
                break;
            }
            self.space.translate(self.asid, s.addr + offset, want as u64, true, |h, n| {
                // SAFETY: the IOTLB gave `h` as valid for n writable bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr().add(done), h as *mut u8, n as usize) };
                done += n as usize;
            })?;
            offset = 0;
        }
        Ok(done)
    }
}

impl BufferSpace for DeviceView<'_> {
    const NAME: &'static str = "the device's IOTLB";

    fn check(&self, addr: u64, len: u64, write: bool) -> bool {
        self.space.translate(self.asid, addr, len, write, |_, _| ()).is_ok()
    }

    fn read_desc(&self, table: u64, i: u32) -> Option<Descriptor> {
        let h = self.space.contiguous(self.asid, table + 16 * i as u64, 16, false).ok()?;
        // SAFETY: 16 readable bytes per the IOTLB; volatile since the driver may write them.
        Some(unsafe { std::ptr::read_unaligned(h as *const Descriptor) })
    }
}
