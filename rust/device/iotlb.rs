//! An IOTLB address space: IOVA ranges mapped to host addresses with permissions, with the
//! semantics of vhost's IOTLB (overlap refused, invalidation removes every mapping it
//! touches). The embedded device reaches memory only through it; the kernel backend keeps
//! one as a mirror of what it wrote, since its fd is exclusive.

use std::collections::BTreeMap;

use nix::errno::Errno;

use crate::virtio::Perm;

#[derive(Debug, Clone, Copy)]
struct Entry {
    last: u64,
    uaddr: u64,
    perm: Perm,
}

/// Why the device could not reach an IOVA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// No mapping covers the address.
    #[error("IOVA {iova:#x} is not mapped in ASID {asid}")]
    Unmapped {
        /// Address space.
        asid: u32,
        /// First unmapped byte.
        iova: u64,
    },
    /// A mapping covers it without the needed permission.
    #[error("IOVA {iova:#x} in ASID {asid} is not {access}")]
    Permission {
        /// Address space.
        asid: u32,
        /// The address.
        iova: u64,
        /// "readable" or "writable".
        access: &'static str,
    },
}

/// One address space's mappings.
#[derive(Debug, Default, Clone)]
pub struct AddressSpace {
    map: BTreeMap<u64, Entry>,
}

impl AddressSpace {
    /// Adds a mapping; overlap → EEXIST, size 0 or wrap → EINVAL (as vhost-vdpa answers).
    pub fn update(&mut self, iova: u64, size: u64, uaddr: u64, perm: Perm) -> Result<(), Errno> {
        if size == 0 {
            return Err(Errno::EINVAL);
        }
        let last = iova.checked_add(size - 1).ok_or(Errno::EINVAL)?;
        if let Some((_, e)) = self.map.range(..=last).next_back() {
            if e.last >= iova {
                return Err(Errno::EEXIST);
            }
        }
        self.map.insert(iova, Entry { last, uaddr, perm });
        Ok(())
    }

    /// Removes every mapping that intersects `[iova, iova+size)`, as the kernel does.
    pub fn invalidate(&mut self, iova: u64, size: u64) {
        let last = iova.saturating_add(size.saturating_sub(1));
        let hit: Vec<u64> = self.map.range(..=last).rev().take_while(|(_, e)| e.last >= iova).map(|(k, _)| *k).collect();
        for k in hit {
            self.map.remove(&k);
        }
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Translates `[iova, iova+len)` for an access, calling `f(host_addr, n)` per
    /// contiguous piece. Stops at the first unmapped or forbidden byte.
    pub fn translate(&self, asid: u32, iova: u64, len: u64, write: bool, mut f: impl FnMut(u64, u64)) -> Result<(), Fault> {
        let mut cur = iova;
        let mut left = len;
        while left > 0 {
            let (start, e) =
                self.map.range(..=cur).next_back().filter(|(_, e)| e.last >= cur).ok_or(Fault::Unmapped { asid, iova: cur })?;
            let ok = if write { e.perm.writable() } else { e.perm.readable() };
            if !ok {
                return Err(Fault::Permission { asid, iova: cur, access: if write { "writable" } else { "readable" } });
            }
            let avail = e.last - cur;
            let n = if left - 1 <= avail { left } else { avail + 1 };
            f(e.uaddr + (cur - start), n);
            left -= n;
            cur = cur.wrapping_add(n);
        }
        Ok(())
    }

    /// The host address of `[iova, iova+len)` when it is one contiguous host range.
    pub fn contiguous(&self, asid: u32, iova: u64, len: u64, write: bool) -> Result<u64, Fault> {
        let mut first: Option<(u64, u64)> = None;
        let mut contiguous = true;
        self.translate(asid, iova, len, write, |h, n| match first {
            None => first = Some((h, n)),
            Some((h0, n0)) => {
                contiguous &= h0 + n0 == h;
                first = Some((h0, n0 + n));
            }
        })?;
        match first {
            Some((h, _)) if contiguous => Ok(h),
            _ => Err(Fault::Unmapped { asid, iova }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_range_and_permissions() {
        let mut a = AddressSpace::default();
        a.update(0x1000, 0x2000, 0x7000_0000, Perm::ReadOnly).unwrap();
        assert_eq!(a.update(0x2000, 0x1000, 0, Perm::ReadWrite), Err(Errno::EEXIST));
        assert_eq!(a.update(0, 0x1001, 0, Perm::ReadWrite), Err(Errno::EEXIST));
        assert_eq!(a.update(0x5000, 0, 0, Perm::ReadWrite), Err(Errno::EINVAL));
        assert_eq!(a.update(u64::MAX, 2, 0, Perm::ReadWrite), Err(Errno::EINVAL));
        a.update(0x3000, 0x1000, 0x7000_2000, Perm::WriteOnly).unwrap();
        // Contiguous in host memory across two mappings.
        assert_eq!(a.contiguous(0, 0x2ff0, 0x20, true).unwrap_err(), Fault::Permission { asid: 0, iova: 0x2ff0, access: "writable" });
        let mut pieces = vec![];
        a.translate(0, 0x2ff0, 0x20, false, |h, n| pieces.push((h, n))).unwrap_err();
        assert_eq!(a.translate(0, 0x4000, 1, false, |_, _| ()), Err(Fault::Unmapped { asid: 0, iova: 0x4000 }));
        a.invalidate(0x2800, 0x1000); // touches both
        assert!(a.is_empty());
    }

    #[test]
    fn translation_ends_at_the_last_byte_of_the_space() {
        let mut a = AddressSpace::default();
        a.update(u64::MAX - 0xfff, 0x1000, 0x1000, Perm::ReadWrite).unwrap();
        assert_eq!(a.contiguous(0, u64::MAX - 0xf, 0x10, true).unwrap(), 0x1ff0);
    }
}
