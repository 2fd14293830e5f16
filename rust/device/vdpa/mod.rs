//! The kernel backend: a `/dev/vhost-vdpa-N` character device.
//!
//! [`VhostVdpa`] wraps one open vhost-vdpa fd. Each [`Device`] method is one ioctl (see
//! [`sys`]); IOTLB changes are `vhost_msg_v2` messages written to the fd, batched with
//! BATCH_BEGIN/BATCH_END when the backend feature IOTLB_BATCH was acked.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::errno::Errno;

use super::iotlb::AddressSpace;
use super::{Device, DeviceError, DeviceResult, IotlbOp};
use crate::virtio::backend_feature;

pub mod sys;

/// Where the kernel lists vdpa devices by name.
const SYSFS_VDPA_DEVICES: &str = "/sys/bus/vdpa/devices";
/// Where their vhost-vdpa character devices appear.
const DEV_ROOT: &str = "/dev";

/// An open vhost-vdpa character device, owned by this process (`VHOST_SET_OWNER`).
///
/// The kernel allows one open of a vhost-vdpa device at a time (a second `open` answers
/// EBUSY); closing the fd (dropping this value) resets the device.
#[derive(Debug)]
pub struct VhostVdpa {
    fd: OwnedFd,
    path: String,
    /// Backend features acked with `VHOST_SET_BACKEND_FEATURES` (0 until then).
    backend_features: AtomicU64,
    /// What this fd mapped, per ASID. The fd is exclusive (a second open is EBUSY), so
    /// the mirror is exact; it lets svq refuse an overlap with EEXIST before the kernel
    /// (whose write(2) reports every refused message as EFAULT) and count live mappings.
    mirror: Mutex<Vec<AddressSpace>>,
}

fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// Finds the `/dev/vhost-vdpa-N` of the vdpa device `name`: the `vhost-vdpa-N` entry of
/// `<sysfs_devices>/<name>/`, as `<dev_root>/vhost-vdpa-N`. The sysfs and dev roots are
/// parameters so that tests can fake them.
fn resolve_name_in(sysfs_devices: &Path, dev_root: &Path, name: &str) -> DeviceResult<PathBuf> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(DeviceError::os(format!("resolve vdpa device name {name:?}"), Errno::EINVAL));
    }
    let dir = sysfs_devices.join(name);
    let entries =
        std::fs::read_dir(&dir).map_err(|e| DeviceError::os(format!("resolve vdpa device {name:?}: {}", dir.display()), errno_of(&e)))?;
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.strip_prefix("vhost-vdpa-").is_some_and(|minor| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit())))
        .collect();
    found.sort();
    match found.first() {
        Some(chardev) => Ok(dev_root.join(chardev)),
        None => {
            let driver = std::fs::read_link(dir.join("driver")).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            Err(DeviceError::NotVhostVdpa {
                path: dir.display().to_string(),
                reason: match driver {
                    Some(d) => format!("vdpa device {name} is bound to {d}, not vhost_vdpa"),
                    None => format!("vdpa device {name} is not bound to vhost_vdpa"),
                },
            })
        }
    }
}

/// The path to open for `path_or_name`: a path (anything with a '/') as is, a bare name
/// through sysfs.
fn resolve(path_or_name: &str) -> DeviceResult<PathBuf> {
    if path_or_name.contains('/') {
        Ok(PathBuf::from(path_or_name))
    } else {
        resolve_name_in(Path::new(SYSFS_VDPA_DEVICES), Path::new(DEV_ROOT), path_or_name)
    }
}

/// Describes one IOTLB op for error messages.
fn describe(op: &IotlbOp, asid: u32) -> String {
    match op {
        IotlbOp::Update { iova, size, uaddr, perm } => {
            format!("IOTLB update iova={iova:#x} size={size:#x} uaddr={uaddr:#x} perm={perm:?} asid={asid}")
        }
        IotlbOp::Invalidate { iova, size } => {
            format!("IOTLB invalidate iova={iova:#x} size={size:#x} asid={asid}")
        }
    }
}

impl VhostVdpa {
    /// Opens a vhost-vdpa device and becomes its owner (`VHOST_SET_OWNER`).
    ///
    /// `path_or_name` is either a path (`/dev/vhost-vdpa-0`) or the name of a vdpa device
    /// (`vdpa0`, as given to `vdpa dev add`), which is looked up in
    /// `/sys/bus/vdpa/devices/<name>/vhost-vdpa-N`.
    ///
    /// Errors: a missing device → `Os` with ENOENT; no permission → EACCES; a device
    /// already open elsewhere → EBUSY; a file that is not a vhost-vdpa device (its first
    /// ioctl answers ENOTTY) or a vdpa device bound to another driver → `NotVhostVdpa`.
    pub fn open(path_or_name: &str) -> DeviceResult<Self> {
        let path = resolve(path_or_name)?;
        let shown = path.display().to_string();
        // std opens with O_CLOEXEC.
        let file =
            OpenOptions::new().read(true).write(true).open(&path).map_err(|e| DeviceError::os(format!("open {shown}"), errno_of(&e)))?;
        let dev = VhostVdpa { fd: OwnedFd::from(file), path: shown, backend_features: AtomicU64::new(0), mirror: Mutex::new(Vec::new()) };
        // SAFETY: the fd is open and owned by `dev`; VHOST_SET_OWNER takes no argument.
        match unsafe { sys::vhost_set_owner(dev.raw()) } {
            Ok(_) => Ok(dev),
            Err(e @ (Errno::ENOTTY | Errno::EINVAL | Errno::ENOSYS)) => {
                Err(DeviceError::NotVhostVdpa { path: dev.path.clone(), reason: format!("VHOST_SET_OWNER answered {e}") })
            }
            Err(e) => Err(DeviceError::os(format!("VHOST_SET_OWNER on {}", dev.path), e)),
        }
    }

    /// The path of the character device.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The backend features acked so far (0 before `set_backend_features`).
    pub fn acked_backend_features(&self) -> u64 {
        self.backend_features.load(Ordering::Acquire)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn err(&self, op: impl std::fmt::Display, errno: Errno) -> DeviceError {
        DeviceError::os(format!("{op} on {}", self.path), errno)
    }

    fn acked(&self, bit: u32) -> bool {
        self.acked_backend_features() & (1u64 << bit) != 0
    }

    /// Writes one `vhost_msg_v2`; a short write is reported as EIO.
    fn write_msg(&self, asid: u32, msg: &sys::vhost_iotlb_msg, what: &dyn Fn() -> String) -> DeviceResult<()> {
        let bytes = sys::encode_msg_v2(asid, msg);
        loop {
            match nix::unistd::write(&self.fd, &bytes) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => return Err(self.err(format_args!("{} (short write: {n} of {} bytes)", what(), bytes.len()), Errno::EIO)),
                Err(Errno::EINTR) => continue,
                // vhost_chr_write_iter() turns every error of the message handler into
                // EFAULT; say so, since the errno alone hides the reason.
                Err(Errno::EFAULT) => {
                    return Err(self.err(
                        format_args!(
                            "{} (refused by the kernel: overlap with a mapping, IOVA outside \
                             the device range, unknown or mid-batch ASID, or unmappable memory)",
                            what()
                        ),
                        Errno::EFAULT,
                    ))
                }
                Err(e) => return Err(self.err(what(), e)),
            }
        }
    }

    fn get_u32(&self, name: &str, f: unsafe fn(libc::c_int, *mut u32) -> nix::Result<libc::c_int>) -> DeviceResult<u32> {
        let mut v = 0u32;
        // SAFETY: `f` is one of the sys wrappers of an `_IOR(.., u32)` ioctl; the kernel
        // writes 4 bytes through a pointer to a live, aligned u32.
        unsafe { f(self.raw(), &mut v) }.map_err(|e| self.err(name, e))?;
        Ok(v)
    }

    fn vring_state_rw(
        &self,
        name: &str,
        index: u32,
        f: unsafe fn(libc::c_int, *mut sys::vhost_vring_state) -> nix::Result<libc::c_int>,
    ) -> DeviceResult<u32> {
        let mut st = sys::vhost_vring_state { index, num: 0 };
        // SAFETY: `f` is one of the sys wrappers of an `_IOWR(.., vhost_vring_state)` ioctl;
        // the kernel reads and writes 8 bytes of a live, aligned vhost_vring_state.
        unsafe { f(self.raw(), &mut st) }.map_err(|e| self.err(format_args!("{name} index={index}"), e))?;
        Ok(st.num)
    }

    fn vring_state_w(
        &self,
        name: &str,
        index: u32,
        num: u32,
        f: unsafe fn(libc::c_int, *const sys::vhost_vring_state) -> nix::Result<libc::c_int>,
    ) -> DeviceResult<()> {
        let st = sys::vhost_vring_state { index, num };
        // SAFETY: `f` is one of the sys wrappers of an `_IOW(.., vhost_vring_state)` ioctl;
        // the kernel reads 8 bytes of a live vhost_vring_state.
        unsafe { f(self.raw(), &st) }.map_err(|e| self.err(format_args!("{name} index={index} num={num}"), e))?;
        Ok(())
    }

    fn vring_file(
        &self,
        name: &str,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
        f: unsafe fn(libc::c_int, *const sys::vhost_vring_file) -> nix::Result<libc::c_int>,
    ) -> DeviceResult<()> {
        let file = sys::vhost_vring_file { index, fd: fd.map_or(-1, |f| f.as_raw_fd()) };
        // SAFETY: `f` is VHOST_SET_VRING_KICK or _CALL; the kernel reads 8 bytes of a live
        // vhost_vring_file and takes its own reference on the eventfd (or unbinds for -1).
        unsafe { f(self.raw(), &file) }.map_err(|e| self.err(format_args!("{name} index={index} fd={}", file.fd), e))?;
        Ok(())
    }
}

impl AsFd for VhostVdpa {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Device for VhostVdpa {
    fn device_id(&self) -> DeviceResult<u32> {
        self.get_u32("VHOST_VDPA_GET_DEVICE_ID", sys::vhost_vdpa_get_device_id)
    }

    fn features(&self) -> DeviceResult<u64> {
        let mut v = 0u64;
        // SAFETY: VHOST_GET_FEATURES writes one u64 through a pointer to a live u64.
        unsafe { sys::vhost_get_features(self.raw(), &mut v) }.map_err(|e| self.err("VHOST_GET_FEATURES", e))?;
        Ok(v)
    }

    fn set_features(&self, features: u64) -> DeviceResult<()> {
        // SAFETY: VHOST_SET_FEATURES reads one u64 from a live u64.
        unsafe { sys::vhost_set_features(self.raw(), &features) }
            .map_err(|e| self.err(format_args!("VHOST_SET_FEATURES {features:#x}"), e))?;
        Ok(())
    }

    fn backend_features(&self) -> DeviceResult<u64> {
        let mut v = 0u64;
        // SAFETY: VHOST_GET_BACKEND_FEATURES writes one u64 through a pointer to a live u64.
        unsafe { sys::vhost_get_backend_features(self.raw(), &mut v) }.map_err(|e| self.err("VHOST_GET_BACKEND_FEATURES", e))?;
        Ok(v)
    }

    fn set_backend_features(&self, features: u64) -> DeviceResult<()> {
        // SAFETY: VHOST_SET_BACKEND_FEATURES reads one u64 from a live u64.
        unsafe { sys::vhost_set_backend_features(self.raw(), &features) }
            .map_err(|e| self.err(format_args!("VHOST_SET_BACKEND_FEATURES {features:#x}"), e))?;
        self.backend_features.store(features, Ordering::Release);
        Ok(())
    }

    fn config_size(&self) -> DeviceResult<u32> {
        self.get_u32("VHOST_VDPA_GET_CONFIG_SIZE", sys::vhost_vdpa_get_config_size)
    }

    fn config(&self, offset: u32, buf: &mut [u8]) -> DeviceResult<()> {
        let what = || format!("VHOST_VDPA_GET_CONFIG off={offset} len={}", buf.len());
        let len = u32::try_from(buf.len()).map_err(|_| self.err(what(), Errno::EINVAL))?;
        let hdr = std::mem::size_of::<sys::vhost_vdpa_config>();
        // Header + data in one buffer, as the kernel expects.
        let mut raw = vec![0u8; hdr + buf.len()];
        raw[0..4].copy_from_slice(&offset.to_ne_bytes());
        raw[4..8].copy_from_slice(&len.to_ne_bytes());
        // SAFETY: `raw` holds the 8-byte header followed by `len` writable bytes, which is
        // exactly what the kernel reads (header) and writes (data) with copy_{from,to}_user;
        // the pointer is only handed to the kernel, never dereferenced here, so its byte
        // alignment does not matter.
        unsafe { sys::vhost_vdpa_get_config(self.raw(), raw.as_mut_ptr().cast()) }.map_err(|e| self.err(what(), e))?;
        buf.copy_from_slice(&raw[hdr..]);
        Ok(())
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> DeviceResult<()> {
        let what = || format!("VHOST_VDPA_SET_CONFIG off={offset} len={}", data.len());
        let len = u32::try_from(data.len()).map_err(|_| self.err(what(), Errno::EINVAL))?;
        let mut raw = Vec::with_capacity(8 + data.len());
        raw.extend_from_slice(&offset.to_ne_bytes());
        raw.extend_from_slice(&len.to_ne_bytes());
        raw.extend_from_slice(data);
        // SAFETY: `raw` holds the 8-byte header followed by `len` bytes, all of which the
        // kernel only reads; the pointer is never dereferenced on our side.
        unsafe { sys::vhost_vdpa_set_config(self.raw(), raw.as_ptr().cast()) }.map_err(|e| self.err(what(), e))?;
        Ok(())
    }

    fn num_queues(&self) -> DeviceResult<u32> {
        self.get_u32("VHOST_VDPA_GET_VQS_COUNT", sys::vhost_vdpa_get_vqs_count)
    }

    fn max_queue_size(&self) -> DeviceResult<u16> {
        let mut v = 0u16;
        // SAFETY: VHOST_VDPA_GET_VRING_NUM writes one u16 through a pointer to a live u16.
        unsafe { sys::vhost_vdpa_get_vring_num(self.raw(), &mut v) }.map_err(|e| self.err("VHOST_VDPA_GET_VRING_NUM", e))?;
        Ok(v)
    }

    fn num_groups(&self) -> DeviceResult<u32> {
        self.get_u32("VHOST_VDPA_GET_GROUP_NUM", sys::vhost_vdpa_get_group_num)
    }

    fn num_address_spaces(&self) -> DeviceResult<u32> {
        self.get_u32("VHOST_VDPA_GET_AS_NUM", sys::vhost_vdpa_get_as_num)
    }

    fn queue_group(&self, queue: u32) -> DeviceResult<u32> {
        self.vring_state_rw("VHOST_VDPA_GET_VRING_GROUP", queue, sys::vhost_vdpa_get_vring_group)
    }

    fn set_group_asid(&self, group: u32, asid: u32) -> DeviceResult<()> {
        self.vring_state_w("VHOST_VDPA_SET_GROUP_ASID", group, asid, sys::vhost_vdpa_set_group_asid)
    }

    fn iova_range(&self) -> DeviceResult<(u64, u64)> {
        let mut r = sys::vhost_vdpa_iova_range::default();
        // SAFETY: VHOST_VDPA_GET_IOVA_RANGE writes 16 bytes into a live vhost_vdpa_iova_range.
        unsafe { sys::vhost_vdpa_get_iova_range(self.raw(), &mut r) }.map_err(|e| self.err("VHOST_VDPA_GET_IOVA_RANGE", e))?;
        Ok((r.first, r.last))
    }

    fn set_vring_num(&self, queue: u32, num: u16) -> DeviceResult<()> {
        self.vring_state_w("VHOST_SET_VRING_NUM", queue, num.into(), sys::vhost_set_vring_num)
    }

    fn set_vring_addr(&self, queue: u32, desc: u64, avail: u64, used: u64) -> DeviceResult<()> {
        let addr = sys::vhost_vring_addr {
            index: queue,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: used,
            avail_user_addr: avail,
            log_guest_addr: 0,
        };
        // SAFETY: VHOST_SET_VRING_ADDR reads 40 bytes of a live vhost_vring_addr.
        unsafe { sys::vhost_set_vring_addr(self.raw(), &addr) }
            .map_err(|e| self.err(format_args!("VHOST_SET_VRING_ADDR index={queue} desc={desc:#x} avail={avail:#x} used={used:#x}"), e))?;
        Ok(())
    }

    fn set_vring_base(&self, queue: u32, base: u16) -> DeviceResult<()> {
        self.vring_state_w("VHOST_SET_VRING_BASE", queue, base.into(), sys::vhost_set_vring_base)
    }

    fn vring_base(&self, queue: u32) -> DeviceResult<u16> {
        let num = self.vring_state_rw("VHOST_GET_VRING_BASE", queue, sys::vhost_get_vring_base)?;
        // Split rings: the low 16 bits are the avail index (packed rings add wrap counters
        // above them).
        Ok((num & 0xffff) as u16)
    }

    fn set_vring_kick(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        self.vring_file("VHOST_SET_VRING_KICK", queue, fd, sys::vhost_set_vring_kick)
    }

    fn set_vring_call(&self, queue: u32, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        self.vring_file("VHOST_SET_VRING_CALL", queue, fd, sys::vhost_set_vring_call)
    }

    fn set_config_call(&self, fd: Option<BorrowedFd<'_>>) -> DeviceResult<()> {
        let raw: libc::c_int = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: VHOST_VDPA_SET_CONFIG_CALL reads one int from a live c_int; the kernel
        // takes its own reference on the eventfd (or unbinds for -1).
        unsafe { sys::vhost_vdpa_set_config_call(self.raw(), &raw) }
            .map_err(|e| self.err(format_args!("VHOST_VDPA_SET_CONFIG_CALL fd={raw}"), e))?;
        Ok(())
    }

    fn set_vring_enable(&self, queue: u32, enable: bool) -> DeviceResult<()> {
        self.vring_state_w("VHOST_VDPA_SET_VRING_ENABLE", queue, enable.into(), sys::vhost_vdpa_set_vring_enable)
    }

    fn status(&self) -> DeviceResult<u8> {
        let mut v = 0u8;
        // SAFETY: VHOST_VDPA_GET_STATUS writes one byte through a pointer to a live u8.
        unsafe { sys::vhost_vdpa_get_status(self.raw(), &mut v) }.map_err(|e| self.err("VHOST_VDPA_GET_STATUS", e))?;
        Ok(v)
    }

    fn set_status(&self, status: u8) -> DeviceResult<()> {
        // SAFETY: VHOST_VDPA_SET_STATUS reads one byte from a live u8.
        unsafe { sys::vhost_vdpa_set_status(self.raw(), &status) }
            .map_err(|e| self.err(format_args!("VHOST_VDPA_SET_STATUS {status:#x}"), e))?;
        Ok(())
    }

    fn suspend(&self) -> DeviceResult<()> {
        // SAFETY: VHOST_VDPA_SUSPEND takes no argument.
        unsafe { sys::vhost_vdpa_suspend(self.raw()) }.map_err(|e| self.err("VHOST_VDPA_SUSPEND", e))?;
        Ok(())
    }

    fn resume(&self) -> DeviceResult<()> {
        // SAFETY: VHOST_VDPA_RESUME takes no argument.
        unsafe { sys::vhost_vdpa_resume(self.raw()) }.map_err(|e| self.err("VHOST_VDPA_RESUME", e))?;
        Ok(())
    }

    fn iotlb(&self, asid: u32, ops: &[IotlbOp]) -> DeviceResult<()> {
        let has_asid = self.acked(backend_feature::IOTLB_ASID);
        if asid != 0 && !has_asid {
            return Err(self.err(format_args!("IOTLB asid={asid}: backend feature IOTLB_ASID is not acked"), Errno::EINVAL));
        }
        if ops.is_empty() {
            return Ok(());
        }
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        if mirror.len() <= asid as usize {
            mirror.resize_with(asid as usize + 1, AddressSpace::default);
        }
        // Check the whole change against the mirror first: an overlap is refused with
        // EEXIST (the uapi's meaning) before anything reaches the kernel.
        let mut after = mirror[asid as usize].clone();
        for op in ops {
            match *op {
                IotlbOp::Update { iova, size, uaddr, perm } => {
                    after.update(iova, size, uaddr, perm).map_err(|e| self.err(describe(op, asid), e))?
                }
                IotlbOp::Invalidate { iova, size } => after.invalidate(iova, size),
            }
        }
        let mut applied = 0;
        let written = self.write_ops(asid, ops, &mut applied);
        if written.is_ok() {
            mirror[asid as usize] = after;
        } else {
            // The kernel applies messages one by one and nothing is sent after a refusal:
            // the mirror takes exactly the messages the kernel accepted.
            for op in &ops[..applied] {
                let space = &mut mirror[asid as usize];
                match *op {
                    IotlbOp::Update { iova, size, uaddr, perm } => {
                        let _ = space.update(iova, size, uaddr, perm);
                    }
                    IotlbOp::Invalidate { iova, size } => space.invalidate(iova, size),
                }
            }
        }
        written
    }

    fn live_mappings(&self) -> Option<usize> {
        Some(self.mirror.lock().unwrap_or_else(|p| p.into_inner()).iter().map(AddressSpace::len).sum())
    }
}

impl VhostVdpa {
    /// Writes `ops` as `vhost_msg_v2` messages, in one batch when IOTLB_BATCH is acked;
    /// `applied` counts the messages the kernel accepted.
    fn write_ops(&self, asid: u32, ops: &[IotlbOp], applied: &mut usize) -> DeviceResult<()> {
        let has_asid = self.acked(backend_feature::IOTLB_ASID);
        // Without IOTLB_ASID the kernel ignores the field; write 0 as the uapi asks.
        let wire_asid = if has_asid { asid } else { 0 };
        let batch = ops.len() > 1 && self.acked(backend_feature::IOTLB_BATCH);
        let control = |type_: u8| sys::vhost_iotlb_msg { type_, ..Default::default() };

        if batch {
            self.write_msg(wire_asid, &control(sys::VHOST_IOTLB_BATCH_BEGIN), &|| {
                format!("IOTLB batch begin asid={asid} ({} ops)", ops.len())
            })?;
        }
        let mut result = Ok(());
        for (i, op) in ops.iter().enumerate() {
            let msg = match *op {
                IotlbOp::Update { iova, size, uaddr, perm } => {
                    sys::vhost_iotlb_msg { iova, size, uaddr, perm: perm.to_uapi(), type_: sys::VHOST_IOTLB_UPDATE }
                }
                IotlbOp::Invalidate { iova, size } => {
                    sys::vhost_iotlb_msg { iova, size, type_: sys::VHOST_IOTLB_INVALIDATE, ..Default::default() }
                }
            };
            let what = || {
                if batch {
                    format!("{} (op {} of {} in a batch)", describe(op, asid), i + 1, ops.len())
                } else {
                    describe(op, asid)
                }
            };
            if let Err(e) = self.write_msg(wire_asid, &msg, &what) {
                result = Err(e);
                break;
            }
            *applied += 1;
        }
        if batch {
            // Always close the batch, even after a refused message, so the device is not
            // left mid-batch. Parents with set_map apply the batch here and may refuse it.
            let end = self.write_msg(wire_asid, &control(sys::VHOST_IOTLB_BATCH_END), &|| {
                let first = ops.first().map(|op| describe(op, asid)).unwrap_or_default();
                format!("IOTLB batch end asid={asid} ({} ops, first: {first})", ops.len())
            });
            if result.is_ok() {
                result = end;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("svq-vdpa-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn name_resolves_through_sysfs() {
        let root = tmpdir("resolve");
        let sys = root.join("sys");
        fs::create_dir_all(sys.join("vdpa0/vhost-vdpa-3")).unwrap();
        fs::create_dir_all(sys.join("vdpa0/power")).unwrap();
        fs::write(sys.join("vdpa0/uevent"), "").unwrap();
        let got = resolve_name_in(&sys, Path::new("/dev"), "vdpa0").unwrap();
        assert_eq!(got, PathBuf::from("/dev/vhost-vdpa-3"));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn missing_name_is_enoent() {
        let root = tmpdir("missing");
        let err = resolve_name_in(&root, Path::new("/dev"), "nope").unwrap_err();
        assert_eq!(err.errno(), Some(Errno::ENOENT), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn name_bound_elsewhere_is_not_vhost_vdpa() {
        let root = tmpdir("bound");
        let sys = root.join("sys");
        fs::create_dir_all(sys.join("vdpa0")).unwrap();
        fs::create_dir_all(root.join("drivers/virtio_vdpa")).unwrap();
        std::os::unix::fs::symlink(root.join("drivers/virtio_vdpa"), sys.join("vdpa0/driver")).unwrap();
        let err = resolve_name_in(&sys, Path::new("/dev"), "vdpa0").unwrap_err();
        match &err {
            DeviceError::NotVhostVdpa { reason, .. } => {
                assert!(reason.contains("virtio_vdpa"), "{reason}")
            }
            other => panic!("unexpected {other:?}"),
        }
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", ".", ".."] {
            let err = resolve_name_in(Path::new("/nonexistent"), Path::new("/dev"), name).unwrap_err();
            assert_eq!(err.errno(), Some(Errno::EINVAL));
        }
    }

    #[test]
    fn open_missing_path_keeps_enoent() {
        let err = VhostVdpa::open("/nonexistent/vhost-vdpa-99").unwrap_err();
        assert_eq!(err.errno(), Some(Errno::ENOENT), "{err}");
    }

    #[test]
    fn open_missing_name_keeps_enoent() {
        let err = VhostVdpa::open("svq-no-such-vdpa-device").unwrap_err();
        assert_eq!(err.errno(), Some(Errno::ENOENT), "{err}");
    }

    #[test]
    fn open_dev_null_is_not_vhost_vdpa() {
        match VhostVdpa::open("/dev/null") {
            Err(DeviceError::NotVhostVdpa { path, reason }) => {
                assert_eq!(path, "/dev/null");
                assert!(reason.contains("ENOTTY"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn open_regular_file_is_not_vhost_vdpa() {
        let root = tmpdir("regular");
        let f = root.join("file");
        fs::write(&f, b"x").unwrap();
        let err = VhostVdpa::open(f.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, DeviceError::NotVhostVdpa { .. }), "{err:?}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn open_without_permission_keeps_eacces() {
        // Root bypasses file permissions: only meaningful as an unprivileged user.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("running as root: EACCES check skipped");
            return;
        }
        let root = tmpdir("perm");
        let f = root.join("file");
        fs::write(&f, b"x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
        let err = VhostVdpa::open(f.to_str().unwrap()).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EACCES), "{err}");
        let _ = fs::remove_dir_all(&root);
    }
}

/// Checks against the kernel's vDPA simulator. They run only where `SVQ_KERNEL_NET` (and
/// for blk `SVQ_KERNEL_BLK`) names a device, i.e. inside the kernel tier's guest
/// (`tests/kernel/run`), and print a skip note elsewhere.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use crate::virtio::{device_id, feature, Perm};
    use std::num::NonZeroUsize;
    use std::sync::Mutex;

    /// vhost-vdpa devices open exclusively: one test at a time.
    static DEVICE_LOCK: Mutex<()> = Mutex::new(());

    fn device(var: &str) -> Option<String> {
        match std::env::var(var) {
            Ok(name) if !name.is_empty() => Some(name),
            _ => {
                eprintln!("{var} not set (no /dev/vhost-vdpa-*): skipped");
                None
            }
        }
    }

    /// One page of memfd memory mapped MAP_SHARED (what vdpa_sim's VA mode can map).
    struct SharedPage {
        _fd: OwnedFd,
        ptr: std::ptr::NonNull<libc::c_void>,
        len: usize,
    }

    impl SharedPage {
        fn new() -> SharedPage {
            use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
            use nix::sys::mman::{mmap, MapFlags, ProtFlags};
            let len = 4096usize;
            let fd = memfd_create(c"svq-kernel-test", MemFdCreateFlag::MFD_CLOEXEC).unwrap();
            nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
            // SAFETY: a fresh shared mapping of our own memfd, at an address the kernel picks;
            // it does not alias any Rust object.
            let ptr = unsafe {
                mmap(None, NonZeroUsize::new(len).unwrap(), ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)
            }
            .unwrap();
            SharedPage { _fd: fd, ptr, len }
        }

        fn addr(&self) -> u64 {
            self.ptr.as_ptr() as u64
        }
    }

    impl Drop for SharedPage {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made in `new`, which nothing borrows.
            let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
        }
    }

    #[test]
    fn kernel_net_device() {
        let Some(name) = device("SVQ_KERNEL_NET") else {
            return;
        };
        let _guard = DEVICE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dev = VhostVdpa::open(&name).unwrap();
        assert!(dev.path().starts_with("/dev/vhost-vdpa-"), "{}", dev.path());

        assert_eq!(dev.device_id().unwrap(), device_id::NET);
        let features = dev.features().unwrap();
        assert_ne!(features & (1 << feature::VERSION_1), 0, "{features:#x}");
        assert_ne!(features & (1 << feature::ACCESS_PLATFORM), 0, "{features:#x}");
        let (first, last) = dev.iova_range().unwrap();
        assert!(first < last, "{first:#x}..{last:#x}");
        assert_eq!(dev.num_queues().unwrap(), 3);
        assert_eq!(dev.num_groups().unwrap(), 2);
        assert_eq!(dev.num_address_spaces().unwrap(), 2);
        assert_eq!(dev.queue_group(0).unwrap(), 0);
        assert_eq!(dev.queue_group(2).unwrap(), 1);
        assert!(dev.max_queue_size().unwrap() >= 64);
        assert_eq!(dev.status().unwrap(), 0);
        let cfg_size = dev.config_size().unwrap();
        assert!(cfg_size >= 8, "config size {cfg_size}");
        let mut mac = [0u8; 6];
        dev.config(0, &mut mac).unwrap();
        assert_eq!(mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        // mtu at offset 10 (mac 6, status 2, max_virtqueue_pairs 2)
        let mut mtu = [0u8; 2];
        dev.config(10, &mut mtu).unwrap();
        assert_eq!(u16::from_le_bytes(mtu), 1400);
        // len 0 → EINVAL, errno kept
        let err = dev.config(0, &mut []).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");

        let offered = dev.backend_features().unwrap();
        let ack = 0x17e & offered;
        assert_ne!(ack & (1 << backend_feature::IOTLB_MSG_V2), 0, "{offered:#x}");
        dev.set_backend_features(ack).unwrap();
        assert_eq!(dev.acked_backend_features(), ack);

        let page = SharedPage::new();
        let iova = 0x10_0000u64;
        let update = IotlbOp::Update { iova, size: 4096, uaddr: page.addr(), perm: Perm::ReadWrite };
        let inval = IotlbOp::Invalidate { iova, size: 4096 };
        dev.iotlb(0, &[update]).unwrap();
        assert_eq!(dev.live_mappings(), Some(1));
        // An overlap is refused with EEXIST from the mirror, before the kernel (whose
        // write(2) would report it as EFAULT).
        let err = dev.iotlb(0, &[update]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST), "{err}");
        assert!(err.to_string().contains("iova=0x100000"), "{err}");
        // A range that wraps past 2^64 is refused too.
        let wrap = IotlbOp::Update { iova: u64::MAX - 0xfff, size: 0x2000, uaddr: page.addr(), perm: Perm::ReadOnly };
        let err = dev.iotlb(0, &[wrap]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
        dev.iotlb(0, &[inval]).unwrap();
        dev.iotlb(0, &[update]).unwrap();

        // A batch: invalidate + update + a second page; then a batch with an overlap is
        // refused as a whole before anything is written, so its invalidate does not take
        // effect either.
        let update2 = IotlbOp::Update { iova: iova + 0x10000, size: 4096, uaddr: page.addr(), perm: Perm::ReadOnly };
        dev.iotlb(0, &[inval, update, update2]).unwrap();
        let err = dev.iotlb(0, &[IotlbOp::Invalidate { iova: iova + 0x10000, size: 4096 }, update]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST), "{err}");
        assert_eq!(dev.live_mappings(), Some(2));
        let err = dev.iotlb(0, &[update2]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EEXIST), "{err}");
        dev.iotlb(0, &[IotlbOp::Invalidate { iova: iova + 0x10000, size: 4096 }]).unwrap();

        // ASID 1 (the simulator has 2 address spaces); ASID 2 does not exist.
        if ack & (1 << backend_feature::IOTLB_ASID) != 0 {
            dev.iotlb(1, &[update]).unwrap();
            dev.iotlb(1, &[inval]).unwrap();
            let err = dev.iotlb(2, &[update]).unwrap_err();
            assert_eq!(err.errno(), Some(Errno::EFAULT), "{err}");
            dev.set_group_asid(1, 1).unwrap();
            let err = dev.set_group_asid(1, 2).unwrap_err();
            assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
        }
        // Bad ranges: size 0 → EINVAL.
        let err = dev.iotlb(0, &[IotlbOp::Update { iova: 0x20_0000, size: 0, uaddr: page.addr(), perm: Perm::ReadOnly }]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
        assert_eq!(dev.live_mappings(), Some(1));
        dev.iotlb(0, &[inval, IotlbOp::Invalidate { iova: iova + 0x10000, size: 4096 }]).unwrap();

        // Set-up ioctls that need no running device.
        dev.set_vring_num(0, 256).unwrap();
        dev.set_vring_base(0, 7).unwrap();
        assert_eq!(dev.vring_base(0).unwrap(), 7);
        dev.set_vring_addr(0, 0x1000, 0x2000, 0x3000).unwrap();
        let ev = nix::sys::eventfd::EventFd::new().unwrap();
        dev.set_vring_kick(0, Some(ev.as_fd())).unwrap();
        dev.set_vring_call(0, Some(ev.as_fd())).unwrap();
        dev.set_vring_call(0, None).unwrap();
        dev.set_config_call(Some(ev.as_fd())).unwrap();
        dev.set_config_call(None).unwrap();

        // Status: ACK|DRIVER, features, FEATURES_OK; then reset.
        use crate::virtio::status::*;
        dev.set_status(ACKNOWLEDGE | DRIVER).unwrap();
        let want = features & ((1 << feature::VERSION_1) | (1 << feature::ACCESS_PLATFORM));
        dev.set_features(want).unwrap();
        dev.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK).unwrap();
        assert_eq!(dev.status().unwrap(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        dev.set_status(0).unwrap();
        assert_eq!(dev.status().unwrap(), 0);

        // A second open of the same device is refused while this one is open.
        let err = VhostVdpa::open(&name).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EBUSY), "{err}");
    }

    #[test]
    fn kernel_net_asid_needs_ack() {
        let Some(name) = device("SVQ_KERNEL_NET") else {
            return;
        };
        let _guard = DEVICE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dev = VhostVdpa::open(&name).unwrap();
        let page = SharedPage::new();
        let update = IotlbOp::Update { iova: 0x40_0000, size: 4096, uaddr: page.addr(), perm: Perm::ReadWrite };
        // Nothing acked: asid 1 is refused before anything is written.
        let err = dev.iotlb(1, &[update]).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EINVAL), "{err}");
        // Only MSG_V2 acked (no batch, no asid): plain messages with asid 0 work.
        dev.set_backend_features(1 << backend_feature::IOTLB_MSG_V2).unwrap();
        dev.iotlb(0, &[update, IotlbOp::Invalidate { iova: 0x40_0000, size: 4096 }]).unwrap();
        // Unknown backend bits → EOPNOTSUPP, and the acked set is unchanged.
        let err = dev.set_backend_features(1 << 40).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EOPNOTSUPP), "{err}");
        assert_eq!(dev.acked_backend_features(), 1 << backend_feature::IOTLB_MSG_V2);
    }

    #[test]
    fn kernel_blk_device() {
        let Some(name) = device("SVQ_KERNEL_BLK") else {
            return;
        };
        let _guard = DEVICE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dev = VhostVdpa::open(&name).unwrap();
        assert_eq!(dev.device_id().unwrap(), device_id::BLOCK);
        assert_eq!(dev.num_queues().unwrap(), 1);
        assert_eq!(dev.num_groups().unwrap(), 1);
        assert_eq!(dev.num_address_spaces().unwrap(), 1);
        let mut cap = [0u8; 8];
        dev.config(0, &mut cap).unwrap();
        assert_eq!(u64::from_le_bytes(cap), 262144);
    }
}
