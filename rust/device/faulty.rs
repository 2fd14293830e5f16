//! A device wrapper that makes the n-th IOTLB map fail (ENOMEM), to show that every
//! failure path unwinds what it took. It forwards everything else unchanged.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nix::errno::Errno;

use super::{Device, DeviceError, DeviceResult, IotlbOp};

/// Wraps a device; [`FaultInjector::fail_map_at`] arms a failure.
#[derive(Debug)]
pub struct FaultInjector {
    inner: Arc<dyn Device>,
    /// IOTLB updates seen so far.
    maps: AtomicU64,
    /// The update number that fails (1-based; 0: none).
    fail_at: AtomicU64,
}

impl FaultInjector {
    /// Wraps `inner` with no failure armed.
    pub fn new(inner: Arc<dyn Device>) -> Self {
        FaultInjector { inner, maps: AtomicU64::new(0), fail_at: AtomicU64::new(0) }
    }

    /// Makes the `n`-th IOTLB update from now fail (0 disarms). The call that carries it
    /// is refused as a whole, as a batch the device rejects.
    pub fn fail_map_at(&self, n: u64) {
        self.maps.store(0, Ordering::SeqCst);
        self.fail_at.store(n, Ordering::SeqCst);
    }

    /// IOTLB updates seen since the last [`FaultInjector::fail_map_at`].
    pub fn maps(&self) -> u64 {
        self.maps.load(Ordering::SeqCst)
    }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $t:ty),*) -> $r:ty;)*) => {
        $(fn $name(&self, $($arg: $t),*) -> $r { self.inner.$name($($arg),*) })*
    };
}

impl Device for FaultInjector {
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
        let before = self.maps.fetch_add(updates, Ordering::SeqCst);
        let at = self.fail_at.load(Ordering::SeqCst);
        if at != 0 && before < at && at <= before + updates {
            self.fail_at.store(0, Ordering::SeqCst);
            return Err(DeviceError::os(format!("IOTLB update #{at} in ASID {asid} (injected failure)"), Errno::ENOMEM));
        }
        self.inner.iotlb(asid, ops)
    }

    fn live_mappings(&self) -> Option<usize> {
        self.inner.live_mappings()
    }
}
