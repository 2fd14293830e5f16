//! The pyo3 bindings (`svq._native`), and nothing else: every method converts arguments,
//! releases the interpreter around device work and waits, and maps errors in one place
//! ([`to_py`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::device::sim::SimDevice;
use crate::device::vdpa::VhostVdpa;
use crate::device::{Device as DeviceTrait, DeviceError};
use crate::driver::DriverError;
use crate::live;
use crate::session::{Mode, Session as RustSession, SessionConfig, SessionError};
use crate::shadow::FaultKind;

create_exception!(svq, SvqError, PyException, "Base class of svq's own errors.");
create_exception!(svq, NegotiationError, SvqError, "The device lacks or refused what svq needs.");
create_exception!(svq, SessionClosedError, SvqError, "The session was closed.");
create_exception!(svq, GuestMemoryError, SvqError, "Guest memory is exhausted or an access is outside it.");
create_exception!(svq, QueueBrokenError, SvqError, "A queue stopped because a peer broke the virtio protocol.");
create_exception!(svq, GuestProtocolError, QueueBrokenError, "The guest wrote an invalid chain or index.");
create_exception!(svq, DeviceProtocolError, QueueBrokenError, "The device wrote an invalid used entry.");
create_exception!(svq, DeviceNeedsResetError, QueueBrokenError, "The device entered NEEDS_RESET.");
create_exception!(svq, ElementTooLargeError, QueueBrokenError, "An element can never fit the shadow ring.");

/// The one place where Rust errors become Python exceptions.
fn to_py(e: SessionError) -> PyErr {
    match e {
        SessionError::Device(d) => device_err(d),
        SessionError::Driver(d) => driver_err(d),
        SessionError::Iova(e) => GuestMemoryError::new_err(e.to_string()),
        SessionError::Mem(e) => mem_err(e),
        SessionError::Negotiation(m) => NegotiationError::new_err(m),
        SessionError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        SessionError::Closed => SessionClosedError::new_err("session is closed"),
    }
}

fn device_err(e: DeviceError) -> PyErr {
    match &e {
        // OSError(errno, msg) becomes the matching subclass (FileExistsError, ...).
        DeviceError::Os { errno, .. } => PyOSError::new_err((*errno as i32, e.to_string())),
        DeviceError::Unsupported(_) => NegotiationError::new_err(e.to_string()),
        DeviceError::NotVhostVdpa { .. } => PyValueError::new_err(e.to_string()),
    }
}

fn mem_err(e: crate::mem::MemError) -> PyErr {
    match e {
        crate::mem::MemError::Layout(m) => PyValueError::new_err(m),
        crate::mem::MemError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        e @ crate::mem::MemError::OutOfBounds { .. } => GuestMemoryError::new_err(e.to_string()),
    }
}

fn driver_err(e: DriverError) -> PyErr {
    match e {
        DriverError::Broken(f) => match f.kind {
            FaultKind::Guest => GuestProtocolError::new_err(f.message),
            FaultKind::DeviceProtocol => DeviceProtocolError::new_err(f.message),
            FaultKind::DeviceNeedsReset => DeviceNeedsResetError::new_err(f.message),
            FaultKind::TooLarge => ElementTooLargeError::new_err(f.message),
        },
        e @ DriverError::Used { .. } => DeviceProtocolError::new_err(e.to_string()),
        e @ DriverError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        e @ (DriverError::NoQueue(_) | DriverError::TooLong(_)) => PyValueError::new_err(e.to_string()),
        e @ (DriverError::NoMemory(_) | DriverError::RingFull(_)) => GuestMemoryError::new_err(e.to_string()),
        DriverError::Mem(m) => mem_err(m),
    }
}

#[derive(Debug, Clone)]
enum Backend {
    Sim(Arc<SimDevice>),
    Vdpa(Arc<VhostVdpa>),
}

impl Backend {
    fn dyn_device(&self) -> Arc<dyn DeviceTrait> {
        match self {
            Backend::Sim(d) => d.clone(),
            Backend::Vdpa(d) => d.clone(),
        }
    }
}

/// An open device: the embedded one (`sim:net`, `sim:blk`) or a vhost-vdpa character
/// device (a path, or a vdpa device name).
#[pyclass(frozen, module = "svq._native")]
struct Device {
    spec: String,
    backend: Mutex<Option<Backend>>,
}

impl Device {
    fn backend(&self) -> PyResult<Backend> {
        lock(&self.backend).clone().ok_or_else(|| SessionClosedError::new_err(format!("device {} is closed", self.spec)))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_mac(s: &str) -> PyResult<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || PyValueError::new_err(format!("bad MAC address {s:?}"));
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

#[pymethods]
impl Device {
    /// Opens `spec`: "sim:net", "sim:blk", a path such as /dev/vhost-vdpa-0, or a vdpa
    /// device name such as "vdpa0". The embedded net device takes options:
    /// "sim:net,mac=52:54:00:12:34:56,mtu=1500"; blk takes "sim:blk,sectors=N".
    #[new]
    #[pyo3(signature = (spec))]
    fn new(py: Python<'_>, spec: String) -> PyResult<Self> {
        let backend = if let Some(rest) = spec.strip_prefix("sim:") {
            let mut parts = rest.split(',');
            let kind = parts.next().unwrap_or("");
            let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
            let mut mtu = 1500u16;
            let mut sectors = 262_144u64;
            for opt in parts {
                let (k, v) = opt.split_once('=').ok_or_else(|| PyValueError::new_err(format!("bad option {opt:?} in {spec:?}")))?;
                let num = |v: &str| v.parse::<u64>().map_err(|_| PyValueError::new_err(format!("bad number {v:?} in {spec:?}")));
                match (kind, k) {
                    ("net", "mac") => mac = parse_mac(v)?,
                    ("net", "mtu") => mtu = u16::try_from(num(v)?).map_err(|_| PyValueError::new_err("mtu must fit 16 bits"))?,
                    ("blk", "sectors") if num(v)? > 0 && num(v)? <= (1 << 24) => sectors = num(v)?,
                    _ => return Err(PyValueError::new_err(format!("unknown or invalid option {opt:?} for sim:{kind}"))),
                }
            }
            let dev = match kind {
                "net" => py.detach(|| SimDevice::net(mac, mtu)),
                "blk" => py.detach(|| SimDevice::blk(sectors)),
                _ => return Err(PyValueError::new_err(format!("unknown embedded device {spec:?}: use sim:net or sim:blk"))),
            }
            .map_err(device_err)?;
            Backend::Sim(Arc::new(dev))
        } else {
            let dev = py.detach(|| VhostVdpa::open(&spec)).map_err(device_err)?;
            Backend::Vdpa(Arc::new(dev))
        };
        Ok(Device { spec, backend: Mutex::new(Some(backend)) })
    }

    /// The spec it was opened with.
    #[getter]
    fn spec(&self) -> String {
        self.spec.clone()
    }

    /// Whether this is the embedded device.
    #[getter]
    fn embedded(&self) -> PyResult<bool> {
        Ok(matches!(self.backend()?, Backend::Sim(_)))
    }

    /// Raw facts for `svq info`: numbers and config bytes (decoded in Python).
    fn probe<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dev = self.backend()?.dyn_device();
        let raw = py
            .detach(|| -> Result<_, DeviceError> {
                let nq = dev.num_queues()?;
                let groups: Result<Vec<u32>, _> = (0..nq).map(|q| dev.queue_group(q)).collect();
                let size = dev.config_size()?;
                let mut config = vec![0u8; size as usize];
                if size > 0 {
                    dev.config(0, &mut config)?;
                }
                Ok((
                    dev.device_id()?,
                    dev.features()?,
                    dev.backend_features()?,
                    nq,
                    dev.max_queue_size()?,
                    dev.num_groups()?,
                    dev.num_address_spaces()?,
                    groups?,
                    dev.iova_range()?,
                    config,
                ))
            })
            .map_err(device_err)?;
        let d = PyDict::new(py);
        d.set_item("device_id", raw.0)?;
        d.set_item("features", raw.1)?;
        d.set_item("backend_features", raw.2)?;
        d.set_item("num_queues", raw.3)?;
        d.set_item("max_queue_size", raw.4)?;
        d.set_item("groups", raw.5)?;
        d.set_item("address_spaces", raw.6)?;
        d.set_item("vq_groups", raw.7)?;
        d.set_item("iova_range", raw.8)?;
        d.set_item("config", PyBytes::new(py, &raw.9))?;
        Ok(d)
    }

    /// Reads `length` bytes of config space at `offset`.
    fn config<'py>(&self, py: Python<'py>, offset: u32, length: u32) -> PyResult<Bound<'py, PyBytes>> {
        let dev = self.backend()?.dyn_device();
        let mut buf = vec![0u8; length as usize];
        py.detach(|| dev.config(offset, &mut buf)).map_err(device_err)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Device status byte.
    fn status(&self, py: Python<'_>) -> PyResult<u8> {
        let dev = self.backend()?.dyn_device();
        py.detach(|| dev.status()).map_err(device_err)
    }

    /// Live IOTLB mappings over all address spaces (None when the backend cannot count).
    fn live_mappings(&self) -> PyResult<Option<usize>> {
        Ok(self.backend()?.dyn_device().live_mappings())
    }

    /// Maps `size` bytes of fresh host memory at `iova` in `asid` and unmaps it again:
    /// returns None on success or raises the device's error (EEXIST on overlap).
    fn probe_map(&self, py: Python<'_>, asid: u32, iova: u64, size: u64) -> PyResult<()> {
        use crate::device::{IotlbOp, Perm};
        let dev = self.backend()?.dyn_device();
        let mem = crate::mem::GuestMemory::new(&[(0, size)]).map_err(mem_err)?;
        let uaddr = mem.regions()[0].host_addr();
        py.detach(|| {
            dev.iotlb(asid, &[IotlbOp::Update { iova, size, uaddr, perm: Perm::ReadWrite }])?;
            dev.iotlb(asid, &[IotlbOp::Invalidate { iova, size }])
        })
        .map_err(device_err)
    }

    /// Unmaps `[iova, iova+size)` in `asid` behind the back of any session (for tests that
    /// take memory away from a running device).
    fn unmap(&self, py: Python<'_>, asid: u32, iova: u64, size: u64) -> PyResult<()> {
        let dev = self.backend()?.dyn_device();
        py.detach(|| dev.iotlb(asid, &[crate::device::IotlbOp::Invalidate { iova, size }])).map_err(device_err)
    }

    /// Accesses the embedded device refused (empty for kernel devices).
    fn faults(&self) -> PyResult<Vec<String>> {
        Ok(match self.backend()? {
            Backend::Sim(d) => d.faults(),
            Backend::Vdpa(_) => Vec::new(),
        })
    }

    /// What the embedded device did (None for kernel devices).
    fn sim_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Backend::Sim(d) = self.backend()? else { return Ok(None) };
        let s = d.stats();
        let out = PyDict::new(py);
        out.set_item("tx_packets", s.tx_packets)?;
        out.set_item("rx_packets", s.rx_packets)?;
        out.set_item("rx_drops", s.rx_drops)?;
        out.set_item("rx_overruns", s.rx_overruns)?;
        out.set_item("ctrl_commands", s.ctrl_commands)?;
        out.set_item("blk_requests", s.blk_requests)?;
        Ok(Some(out))
    }

    /// Closes the device (idempotent). Sessions on it keep their own reference.
    fn close(&self, py: Python<'_>) {
        let b = lock(&self.backend).take();
        py.detach(move || drop(b));
    }
}

/// A session on a device, with the in-process guest driver.
#[pyclass(frozen, module = "svq._native")]
struct Session {
    inner: Mutex<Option<RustSession>>,
}

impl Session {
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut RustSession) -> Result<T, SessionError> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut g = lock(&self.inner);
            let s = g.as_mut().ok_or(SessionError::Closed)?;
            f(s)
        })
        .map_err(to_py)
    }
}

fn timeout(t: f64) -> PyResult<Duration> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(PyValueError::new_err(format!("timeout must be a finite number of seconds >= 0, got {t}")));
    }
    Ok(Duration::from_secs_f64(t))
}

type CompletionTuple = (u16, u32, Py<PyBytes>);

#[pymethods]
impl Session {
    /// Starts a session. `mode` is "translate" or "passthrough"; `memory` a list of
    /// (guest address, size) regions.
    #[new]
    #[pyo3(signature = (device, *, mode, queue_size, memory, event_idx, indirect))]
    fn new(
        py: Python<'_>,
        device: &Device,
        mode: &str,
        queue_size: u16,
        memory: Vec<(u64, u64)>,
        event_idx: bool,
        indirect: bool,
    ) -> PyResult<Self> {
        let mode = match mode {
            "translate" => Mode::Translate,
            "passthrough" => Mode::Passthrough,
            m => return Err(PyValueError::new_err(format!("unknown mode {m:?}"))),
        };
        if queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(PyValueError::new_err(format!("queue_size must be a power of two, got {queue_size}")));
        }
        let cfg = SessionConfig { mode, queue_size, memory, event_idx, indirect };
        let dev = device.backend()?.dyn_device();
        let s = py.detach(|| RustSession::start(dev, &cfg)).map_err(to_py)?;
        Ok(Session { inner: Mutex::new(Some(s)) })
    }

    /// Number of queues.
    #[getter]
    fn num_queues(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |s| Ok(s.num_queues()))
    }

    /// Negotiated virtio features.
    #[getter]
    fn features(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |s| Ok(s.features()))
    }

    /// Acked backend features.
    #[getter]
    fn backend_features(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |s| Ok(s.backend_features()))
    }

    /// Posts one device-readable chain per buffer on queue `q` (each split into
    /// `segments` descriptors) and kicks once.
    #[pyo3(signature = (q, buffers, segments = 1, indirect = false))]
    fn send(&self, py: Python<'_>, q: u32, buffers: Vec<Vec<u8>>, segments: usize, indirect: bool) -> PyResult<Vec<u16>> {
        if segments == 0 {
            return Err(PyValueError::new_err("segments must be >= 1"));
        }
        self.with(py, |s| {
            let d = s.driver()?;
            let mut heads = Vec::with_capacity(buffers.len());
            let added = buffers.iter().try_for_each(|b| {
                let per = b.len().div_ceil(segments).max(1);
                let parts: Vec<&[u8]> = b.chunks(per).collect();
                heads.push(if indirect { d.add_indirect(q, &parts, &[])? } else { d.add(q, &parts, &[])? });
                Ok::<_, DriverError>(())
            });
            // What was added before a failure is published, not lost.
            d.kick(q)?;
            added?;
            Ok(heads)
        })
    }

    /// Posts `count` device-writable buffers of `size` bytes on queue `q` and kicks.
    fn post_receive(&self, py: Python<'_>, q: u32, count: usize, size: u32) -> PyResult<()> {
        self.with(py, |s| {
            let d = s.driver()?;
            let added = (0..count).try_for_each(|_| d.add(q, &[], &[size]).map(drop));
            // What was added before a failure is published, not lost.
            d.kick(q)?;
            Ok(added?)
        })
    }

    /// Posts one chain (readable parts, then writable buffers of the given sizes) and
    /// kicks; returns its head.
    fn submit(&self, py: Python<'_>, q: u32, out: Vec<Vec<u8>>, in_sizes: Vec<u32>) -> PyResult<u16> {
        self.with(py, |s| {
            let d = s.driver()?;
            let parts: Vec<&[u8]> = out.iter().map(|v| v.as_slice()).collect();
            let head = d.add(q, &parts, &in_sizes)?;
            d.kick(q)?;
            Ok(head)
        })
    }

    /// Waits for `count` completions on queue `q`: a list of (head, length, bytes), the
    /// bytes being the first `length` written ones, or every writable byte with `whole`.
    #[pyo3(signature = (q, count, timeout_s = 10.0, whole = false))]
    fn wait(&self, py: Python<'_>, q: u32, count: usize, timeout_s: f64, whole: bool) -> PyResult<Vec<CompletionTuple>> {
        let t = timeout(timeout_s)?;
        let done = self.with(py, |s| Ok(s.driver()?.wait(q, count, whole, t)?))?;
        Ok(done.into_iter().map(|c| (c.head, c.len, PyBytes::new(py, &c.data).unbind())).collect())
    }

    /// Chains the guest has in flight on queue `q`.
    fn in_flight(&self, py: Python<'_>, q: u32) -> PyResult<usize> {
        self.with(py, |s| Ok(s.driver()?.in_flight(q)))
    }

    /// Guest ring addresses of queue `q`: dict(desc, avail, used, size).
    fn guest_ring<'py>(&self, py: Python<'py>, q: u32) -> PyResult<Bound<'py, PyDict>> {
        let g = self.with(py, |s| {
            let qs = s.driver()?.guest_queues();
            qs.into_iter().find(|g| g.index == q).ok_or(SessionError::Driver(DriverError::NoQueue(q)))
        })?;
        let d = PyDict::new(py);
        d.set_item("desc", g.desc)?;
        d.set_item("avail", g.avail)?;
        d.set_item("used", g.used)?;
        d.set_item("size", g.layout.size)?;
        Ok(d)
    }

    /// Writes raw bytes into guest memory (for tests that play a hostile guest).
    fn write_guest(&self, py: Python<'_>, addr: u64, data: Vec<u8>) -> PyResult<()> {
        self.with(py, |s| Ok(s.driver()?.memory().write(addr, &data)?))
    }

    /// Reads raw bytes of guest memory.
    fn read_guest<'py>(&self, py: Python<'py>, addr: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut buf = vec![0u8; length];
        self.with(py, |s| Ok(s.driver()?.memory().read(addr, &mut buf)?))?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Signals queue `q`'s kick eventfd unconditionally (a raw guest kick).
    fn notify(&self, py: Python<'_>, q: u32) -> PyResult<()> {
        self.with(py, |s| {
            let qs = s.driver()?.guest_queues();
            let g = qs.iter().find(|g| g.index == q).ok_or(SessionError::Driver(DriverError::NoQueue(q)))?;
            g.kick.signal();
            Ok(())
        })
    }

    /// The fault that broke queue `q`: (kind, message), or None.
    fn queue_fault(&self, py: Python<'_>, q: u32) -> PyResult<Option<(String, String)>> {
        self.with(py, |s| {
            let qs = s.driver()?.guest_queues();
            let g = qs.iter().find(|g| g.index == q).ok_or(SessionError::Driver(DriverError::NoQueue(q)))?;
            Ok(g.health.fault().map(|f| (format!("{:?}", f.kind), f.message)))
        })
    }

    /// Counters of queue `q`.
    fn stats<'py>(&self, py: Python<'py>, q: u32) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.with(py, |s| s.stats(q).ok_or(SessionError::Driver(DriverError::NoQueue(q))))?;
        let d = PyDict::new(py);
        for (k, v) in snap {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Mappings svq holds on the device.
    fn live_mappings(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.live_mappings()))
    }

    /// svq's live mappings: a list of dicts (asid, iova, size, guest_addr, perm).
    fn mappings<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let maps = self.with(py, |s| Ok(s.mappings().to_vec()))?;
        maps.into_iter()
            .map(|(asid, m)| {
                let d = PyDict::new(py);
                d.set_item("asid", asid)?;
                d.set_item("iova", m.iova)?;
                d.set_item("size", m.size)?;
                d.set_item("guest_addr", m.guest_addr)?;
                d.set_item("perm", format!("{:?}", m.perm))?;
                Ok(d)
            })
            .collect()
    }

    /// Live guest buffers (rings included) in guest memory.
    fn live_guest_buffers(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |s| Ok(s.driver()?.live_buffers()))
    }

    /// `VHOST_VDPA_SUSPEND`.
    fn suspend(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.suspend())
    }

    /// `VHOST_VDPA_RESUME`.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.resume())
    }

    /// `VHOST_GET_VRING_BASE` of queue `q`.
    fn vring_base(&self, py: Python<'_>, q: u32) -> PyResult<u16> {
        self.with(py, |s| s.vring_base(q))
    }

    /// Stops the engine, resets the device, unmaps everything. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let s = lock(&self.inner).take();
            match s {
                Some(mut s) => s.close(),
                None => Ok(()),
            }
        })
        .map_err(to_py)
    }

    /// Whether the session was closed.
    #[getter]
    fn closed(&self) -> bool {
        lock(&self.inner).is_none()
    }
}

/// Live OS resources svq holds: {"eventfds": n, "threads": n}.
#[pyfunction]
fn live_resources<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("eventfds", live::eventfds())?;
    d.set_item("threads", live::threads())?;
    Ok(d)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Device>()?;
    m.add_class::<Session>()?;
    m.add_function(wrap_pyfunction!(live_resources, m)?)?;
    m.add("SvqError", py.get_type::<SvqError>())?;
    m.add("NegotiationError", py.get_type::<NegotiationError>())?;
    m.add("SessionClosedError", py.get_type::<SessionClosedError>())?;
    m.add("GuestMemoryError", py.get_type::<GuestMemoryError>())?;
    m.add("QueueBrokenError", py.get_type::<QueueBrokenError>())?;
    m.add("GuestProtocolError", py.get_type::<GuestProtocolError>())?;
    m.add("DeviceProtocolError", py.get_type::<DeviceProtocolError>())?;
    m.add("DeviceNeedsResetError", py.get_type::<DeviceNeedsResetError>())?;
    m.add("ElementTooLargeError", py.get_type::<ElementTooLargeError>())?;
    Ok(())
}
