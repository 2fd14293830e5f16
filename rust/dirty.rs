//! The dirty log: which guest pages were written on the device's behalf, for live
//! migration. The vhost log format: one bit per 4 KiB page of guest-physical memory,
//! page `p` is bit `p % 8` of byte `p / 8`, bits set atomically. The log lives in svq's
//! own memory (orchestration code fetches and clears it per dirty round) or in memory a
//! VMM shares with svq (vhost-user `SET_LOG_BASE`), which the VMM reads and clears.

use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::mem::{seal_against_shrinking, GuestMemory, MemError, SharedSlice};
use crate::virtio::PAGE_SIZE;

/// Where a log's bytes live.
#[derive(Debug)]
enum Backing {
    /// svq's own memory (held so that the bitmap stays mapped).
    Own { _mem: GuestMemory },
    /// A mapping of the VMM's log file: (mapping, its length).
    File(NonNull<u8>, usize),
}

/// A dirty-page bitmap over guest-physical pages `[0, pages)`.
#[derive(Debug)]
pub struct DirtyLog {
    backing: Backing,
    bytes: SharedSlice,
    pages: u64,
}

// SAFETY: the log's memory is owned by the log (its own memfd or its own mapping of the
// VMM's file) and only accessed through atomics, from any thread.
unsafe impl Send for DirtyLog {}
// SAFETY: as above.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// A zeroed log of svq's own covering guest addresses below `guest_end`.
    pub fn new(guest_end: u64) -> Result<Self, MemError> {
        let pages = guest_end.div_ceil(PAGE_SIZE);
        let size = pages.div_ceil(8).max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let mem = GuestMemory::new(&[(0, size)])?;
        let bytes = mem.slice(0, pages.div_ceil(8).max(1))?;
        Ok(DirtyLog { backing: Backing::Own { _mem: mem }, bytes, pages })
    }

    /// The log a VMM shares: `size` bytes of `fd` from `offset`, mapped `MAP_SHARED`. The
    /// file must hold them (checked now) and cannot shrink later (sealed, like guest
    /// memory), so writing the log can never fault.
    pub fn from_file(fd: OwnedFd, size: u64, offset: u64) -> Result<Self, MemError> {
        let bad = |reason: String| MemError::File { gpa: 0, reason: format!("dirty log: {reason}") };
        let len = usize::try_from(size).ok().and_then(NonZeroUsize::new).ok_or_else(|| bad(format!("size {size:#x}")))?;
        let file_size = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|errno| MemError::Os { op: "fstat", errno })?.st_size as u64;
        if offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(bad(format!("its file has {file_size:#x} bytes, fewer than offset {offset:#x} + size {size:#x}")));
        }
        seal_against_shrinking(&fd).map_err(bad)?;
        let skew = (offset % PAGE_SIZE) as usize;
        let map_len = len.saturating_add(skew);
        let map_at = i64::try_from(offset - skew as u64).map_err(|_| bad(format!("offset {offset:#x}")))?;
        // SAFETY: a fresh shared mapping of the VMM's log file; no existing memory is affected.
        let map = unsafe { mmap(None, map_len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, map_at) }
            .map_err(|errno| MemError::Os { op: "mmap", errno })?
            .cast::<u8>();
        // SAFETY: the mapping holds `skew + size` bytes of the file, all inside it
        // (checked above, and sealed so it stays so), for as long as the log lives.
        let bytes = unsafe { SharedSlice::new(map.add(skew), size as usize) };
        Ok(DirtyLog { backing: Backing::File(map, map_len.get()), bytes, pages: size.saturating_mul(8) })
    }

    /// Guest pages the log covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of the bitmap.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    #[inline]
    fn byte(&self, i: usize) -> &AtomicU8 {
        debug_assert!(i < self.bytes.len());
        // SAFETY: i < the slice's length (callers stay below pages/8, which the slice
        // covers); the bytes are shared with a VMM that also accesses them atomically, and
        // an atomic is the sanctioned way to share a byte with another writer. The
        // mapping lives as long as `self`.
        unsafe { &*(self.bytes.as_ptr().add(i) as *const AtomicU8) }
    }

    /// Marks every page `[gpa, gpa + len)` touches (pages beyond the log are ignored: a
    /// VMM sizes its log for all of guest memory).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.set_pages(gpa / PAGE_SIZE, gpa.saturating_add(len - 1) / PAGE_SIZE);
    }

    /// Sets the bits of pages `first..=last` (those the log covers).
    fn set_pages(&self, first: u64, last: u64) {
        let last = last.min(self.pages.saturating_sub(1));
        let mut p = first;
        while p <= last && p < self.pages {
            let (i, bit) = ((p / 8) as usize, (p % 8) as u8);
            let span = (last - p + 1).min(8 - u64::from(bit));
            let bits = (((1u16 << span) - 1) << bit) as u8;
            // Release: the data written to these pages is visible before the bit is.
            self.byte(i).fetch_or(bits, Ordering::Release);
            p += span;
        }
    }

    /// Marks pages `first..=last` that a device wrote, once svq has read the used entry
    /// that reports the write (the data reached memory before the device published that
    /// entry, and svq read it with acquire ordering). Bits already set are only looked
    /// at: on a busy queue most writes land in pages already dirty in this round, and a
    /// locked read-modify-write per element costs more than the rest of the logging.
    /// Skipping is safe because a bit seen set has not been taken yet, so the round that
    /// takes it copies the page after the data arrived; a round that did take it left
    /// the bit clear, which this look sees, and then sets it. Not for svq's own writes
    /// (its stores may still be in flight when it looks): [`DirtyLog::mark`] those.
    #[inline]
    pub fn mark_device_pages(&self, first: u64, last: u64) {
        if last >= self.pages || first / 8 != last / 8 || first > last {
            return self.set_pages(first, last);
        }
        // Within one byte of the bitmap: the common case.
        let bits = (((1u16 << (last - first + 1)) - 1) << (first % 8)) as u8;
        let byte = self.byte((first / 8) as usize);
        if byte.load(Ordering::Relaxed) & bits != bits {
            byte.fetch_or(bits, Ordering::Release);
        }
    }

    /// Takes the dirty pages and clears their bits (one dirty round): the page numbers.
    pub fn fetch_and_clear(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..self.pages.div_ceil(8) as usize {
            if self.byte(i).load(Ordering::Relaxed) == 0 {
                continue;
            }
            let b = self.byte(i).swap(0, Ordering::Acquire);
            out.extend((0..8).filter(|k| b & (1 << k) != 0).map(|k| i as u64 * 8 + k));
        }
        out.retain(|&p| p < self.pages);
        out
    }

    /// Dirty pages now, without clearing them.
    pub fn count(&self) -> u64 {
        (0..self.pages.div_ceil(8) as usize).map(|i| u64::from(self.byte(i).load(Ordering::Relaxed).count_ones())).sum()
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if let Backing::File(map, len) = self.backing {
            // SAFETY: the mapping was made with exactly this length and nothing refers to
            // it once the log is gone (queues hold the log in an Arc).
            let _ = unsafe { munmap(map.cast(), len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_page_a_range_touches_in_the_vhost_layout() {
        let log = DirtyLog::new(64 << 20).unwrap();
        assert_eq!(log.pages(), 16384);
        log.mark(0x1fff, 2); // straddles pages 1 and 2
        log.mark(10 * 4096, 40 * 4096); // pages 10..=49
        log.mark(0, 0); // nothing
        log.mark(1 << 40, 4096); // past the log: ignored
        let pages = log.fetch_and_clear();
        let want: Vec<u64> = [1, 2].into_iter().chain(10..50).collect();
        assert_eq!(pages, want);
        assert_eq!(log.count(), 0, "cleared");
        // Byte/bit layout: page 9 is bit 1 of byte 1.
        log.mark(9 * 4096, 1);
        let mut b = [0u8; 2];
        log.bytes.read(0, &mut b);
        assert_eq!(b, [0, 0b10]);
    }

    #[test]
    fn device_writes_mark_the_same_pages() {
        let log = DirtyLog::new(64 << 20).unwrap();
        log.mark_device_pages(3, 3);
        log.mark_device_pages(3, 5); // partly set already
        log.mark_device_pages(6, 17); // across bytes
        log.mark_device_pages(20, 19); // empty
        log.mark_device_pages(16383, 1 << 30); // past the log: clamped
        let want: Vec<u64> = (3..18).chain([16383]).collect();
        assert_eq!(log.fetch_and_clear(), want);
        log.mark_device_pages(4, 4); // set again after the round took it
        assert_eq!(log.fetch_and_clear(), [4]);
    }

    #[test]
    fn a_shared_log_file_is_the_vmms_bitmap() {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let fd = memfd_create(c"log", MemFdCreateFlag::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, 0x8200).unwrap();
        let probe = std::fs::File::from(fd.try_clone().unwrap());
        assert!(DirtyLog::from_file(fd.try_clone().unwrap(), 0x8201, 0).is_err(), "larger than its file");
        // Not a multiple of the page size, as a VMM sizes it for its memory.
        let log = DirtyLog::from_file(fd, 0x8200, 0).unwrap();
        assert_eq!(log.pages(), 0x8200 * 8);
        log.mark(5 * 4096, 4096);
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_at(&probe, &mut b, 0).unwrap();
        assert_eq!(b[0], 1 << 5, "the VMM sees the bit in its own file");
    }
}
