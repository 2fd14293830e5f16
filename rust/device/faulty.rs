//! A device wrapper that makes the n-th map, unmap or other device call fail, to show
//! that every failure path unwinds what it took and keeps the cause. It forwards
//! everything else unchanged.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;

use super::{Device, DeviceError, DeviceResult, IotlbOp};

/// Which kind of device call a failure is armed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// IOTLB updates (counted per update message), failing with ENOMEM.
    Map = 0,
    /// IOTLB invalidations (counted per message), failing with EIO.
    Unmap = 1,
    /// Every other device call (one per ioctl), failing with EIO.
    Ioctl = 2,
}

/// Wraps a device; [`FaultInjector::fail_at`] arms a failure.
#[derive(Debug)]
pub struct FaultInjector {
    inner: Arc<dyn Device>,
    /// Calls seen per fault point since it was last armed.
    seen: [AtomicU64; 3],
    /// The call number that fails, per fault point (1-based; 0: none).
    armed: [AtomicU64; 3],
}

impl FaultInjector {
    /// Wraps `inner` with no failure armed.
    pub fn new(inner: Arc<dyn Device>) -> Self {
        FaultInjector { inner, seen: Default::default(), armed: Default::default() }
    }

    /// Makes the `n`-th call at `point` from now fail (0 disarms). A call that carries
    /// several messages is refused as a whole, as a batch the device rejects.
    pub fn fail_at(&self, point: FaultPoint, n: u64) {
        self.seen[point as usize].store(0, Ordering::SeqCst);
        self.armed[point as usize].store(n, Ordering::SeqCst);
    }

    /// Makes the `n`-th IOTLB map from now fail (see [`FaultInjector::fail_at`]).
    pub fn fail_map_at(&self, n: u64) {
        self.fail_at(FaultPoint::Map, n)
    }

    /// Calls seen at `point` since it was last armed.
    pub fn seen(&self, point: FaultPoint) -> u64 {
        self.seen[point as usize].load(Ordering::SeqCst)
    }

    /// IOTLB updates seen since the last [`FaultInjector::fail_map_at`].
    pub fn maps(&self) -> u64 {
        self.seen(FaultPoint::Map)
    }

    /// Counts `n` calls at `point`; true when the armed one is among them (then disarms).
    fn trips(&self, point: FaultPoint, n: u64) -> bool {
        let i = point as usize;
        let before = self.seen[i].fetch_add(n, Ordering::SeqCst);
        let at = self.armed[i].load(Ordering::SeqCst);
        let hit = at != 0 && before < at && at <= before + n;
        if hit {
            self.armed[i].store(0, Ordering::SeqCst);
        }
        hit
    }

    fn ioctl(&self, what: &str) -> DeviceResult<()> {
        if self.trips(FaultPoint::Ioctl, 1) {
            return Err(DeviceError::os(format!("{what} (injected failure)"), Errno::EIO));
        }
        Ok(())
    }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $t:ty),*) -> $r:ty;)*) => {
        $(fn $name(&self, $($arg: $t),*) -> $r {
            self.ioctl(stringify!($name))?;
            self.inner.$name($($arg),*)
        })*
    };
}

impl Device for FaultInjector {
    fn identity(&self) -> usize {
        self.inner.identity()
    }

    forward! {
        device_id() -> DeviceResult<u32>;
        features() -> DeviceResult<u64>;
        set_features(f: u64) -> DeviceResult<()>;
        backend_features() -> DeviceResult<u64>;
        set_backend_features(f: u64) -> DeviceResult<()>;
        config_size() -> DeviceResult<u32>;
        config(offset: u32, buf: &mut [u8]) -> DeviceResult<()>;
        set_config(offset: u32, data: &[u8]) -> DeviceResult<()>;
        num_queues() -> DeviceResult<u32>;
        max_queue_size() -> DeviceResult<u16>;
        num_groups() -> DeviceResult<u32>;
        num_address_spaces() -> DeviceResult<u32>;
        queue_group(q: u32) -> DeviceResult<u32>;
        set_group_asid(group: u32, asid: u32) -> DeviceResult<()>;
        iova_range() -> DeviceResult<(u64, u64)>;
        set_vring_num(q: u32, num: u16) -> DeviceResult<()>;
        set_vring_addr(q: u32, desc: u64, avail: u64, used: u64) -> DeviceResult<()>;
        set_vring_base(q: u32, base: u16) -> DeviceResult<()>;
        vring_base(q: u32) -> DeviceResult<u16>;
        set_vring_kick(q: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
        set_vring_call(q: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
        set_config_call(fd: Option<BorrowedFd<'_>>) -> DeviceResult<()>;
        set_vring_enable(q: u32, enable: bool) -> DeviceResult<()>;
        status() -> DeviceResult<u8>;
        set_status(s: u8) -> DeviceResult<()>;
        suspend() -> DeviceResult<()>;
        resume() -> DeviceResult<()>;
    }

    fn iotlb(&self, asid: u32, ops: &[IotlbOp]) -> DeviceResult<()> {
        let updates = ops.iter().filter(|o| matches!(o, IotlbOp::Update { .. })).count() as u64;
        if self.trips(FaultPoint::Map, updates) {
            return Err(DeviceError::os(format!("IOTLB update in ASID {asid} (injected failure)"), Errno::ENOMEM));
        }
        if self.trips(FaultPoint::Unmap, ops.len() as u64 - updates) {
            return Err(DeviceError::os(format!("IOTLB invalidate in ASID {asid} (injected failure)"), Errno::EIO));
        }
        self.inner.iotlb(asid, ops)
    }

    fn live_mappings(&self) -> Option<usize> {
        self.inner.live_mappings()
    }
}
