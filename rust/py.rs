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
use crate::device::faulty::{FaultInjector, FaultPoint};
use crate::device::vdpa::VhostVdpa;
use crate::device::{Device as DeviceTrait, DeviceError};
use crate::driver::DriverError;
use crate::live;
use crate::bounce::Strategy;
use crate::net::{NetState, RxMode};
use crate::session::{Mode, Session as RustSession, SessionConfig, SessionError};
use crate::shadow::{QueueHook, Verdict};
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
create_exception!(svq, InjectError, SvqError, "An injected element failed (the queue broke or stopped, or a map failed).");
create_exception!(svq, RestoreError, SvqError, "A command restoring a saved state was refused or failed.");

/// The one place where Rust errors become Python exceptions.
fn to_py(e: SessionError) -> PyErr {
    match e {
        SessionError::Device(d) => device_err(d),
        SessionError::Driver(d) => driver_err(d),
        SessionError::Dma(crate::dma::DmaError::Device(d)) => device_err(d),
        SessionError::Dma(e) => GuestMemoryError::new_err(e.to_string()),
        SessionError::Bounce(crate::bounce::BounceError::Dma(crate::dma::DmaError::Device(d))) => device_err(d),
        SessionError::Bounce(crate::bounce::BounceError::Mem(m)) => mem_err(m),
        SessionError::Bounce(e) => GuestMemoryError::new_err(e.to_string()),
        SessionError::Invalid(m) => PyValueError::new_err(m),
        e @ SessionError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        e @ SessionError::Injected { .. } => InjectError::new_err(e.to_string()),
        e @ SessionError::Restore { .. } => RestoreError::new_err(e.to_string()),
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

/// An open device, always behind a fault injector (disarmed unless a test arms it); the
/// embedded device is also kept by its own type for what only it can report.
#[derive(Debug, Clone)]
struct Backend {
    device: Arc<FaultInjector>,
    sim: Option<Arc<SimDevice>>,
}

impl Backend {
    fn sim(d: SimDevice) -> Self {
        let d = Arc::new(d);
        Backend { device: Arc::new(FaultInjector::new(d.clone())), sim: Some(d) }
    }

    fn vdpa(d: VhostVdpa) -> Self {
        Backend { device: Arc::new(FaultInjector::new(Arc::new(d))), sim: None }
    }

    /// The device as sessions use it.
    fn dyn_device(&self) -> Arc<dyn DeviceTrait> {
        self.device.clone()
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
            Backend::sim(dev)
        } else {
            let dev = py.detach(|| VhostVdpa::open(&spec)).map_err(device_err)?;
            Backend::vdpa(dev)
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
        Ok(self.backend()?.sim.is_some())
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

    /// Makes the embedded device break the virtio protocol on `queue` (tests): one of
    /// "used_id_out_of_range", "used_id_not_in_flight", "duplicate_completion",
    /// "used_idx_jump", "used_idx_backwards", "len_too_large", "never_complete",
    /// "needs_reset"; None to behave again.
    #[pyo3(signature = (queue, how))]
    fn misbehave(&self, queue: u32, how: Option<&str>) -> PyResult<()> {
        use crate::device::sim::Misbehaviour as M;
        let sim = self.backend()?.sim.ok_or_else(|| PyValueError::new_err("only the embedded device can misbehave on purpose"))?;
        let how = match how {
            None => None,
            Some("used_id_out_of_range") => Some(M::UsedIdOutOfRange),
            Some("used_id_not_in_flight") => Some(M::UsedIdNotInFlight),
            Some("duplicate_completion") => Some(M::DuplicateCompletion),
            Some("used_idx_jump") => Some(M::UsedIdxJump),
            Some("used_idx_backwards") => Some(M::UsedIdxBackwards),
            Some("len_too_large") => Some(M::LenTooLarge),
            Some("never_complete") => Some(M::NeverComplete),
            Some("needs_reset") => Some(M::NeedsReset),
            Some(h) => return Err(PyValueError::new_err(format!("unknown misbehaviour {h:?}"))),
        };
        sim.misbehave(queue, how).map_err(device_err)
    }

    /// Fault injection for any backend: the `n`-th call at `point` from now fails (0
    /// disarms). `point` is "map" (IOTLB updates, ENOMEM), "unmap" (IOTLB invalidations,
    /// EIO) or "ioctl" (every other device call, EIO).
    #[pyo3(signature = (point, n))]
    fn fail_at(&self, point: &str, n: u64) -> PyResult<()> {
        self.backend()?.device.fail_at(fault_point(point)?, n);
        Ok(())
    }

    /// Calls seen at `point` since it was last armed.
    fn calls_seen(&self, point: &str) -> PyResult<u64> {
        Ok(self.backend()?.device.seen(fault_point(point)?))
    }

    /// Accesses the embedded device refused (empty for kernel devices).
    fn faults(&self) -> PyResult<Vec<String>> {
        Ok(self.backend()?.sim.map(|d| d.faults()).unwrap_or_default())
    }

    /// What the embedded device did (None for kernel devices).
    fn sim_stats<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(d) = self.backend()?.sim else { return Ok(None) };
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

fn fault_point(p: &str) -> PyResult<FaultPoint> {
    match p {
        "map" => Ok(FaultPoint::Map),
        "unmap" => Ok(FaultPoint::Unmap),
        "ioctl" => Ok(FaultPoint::Ioctl),
        p => Err(PyValueError::new_err(format!("unknown fault point {p:?}: use map, unmap or ioctl"))),
    }
}

fn parse_mode(m: &str) -> PyResult<Mode> {
    match m {
        "translate" => Ok(Mode::Translate),
        "copy" => Ok(Mode::Copy),
        "passthrough" => Ok(Mode::Passthrough),
        m => Err(PyValueError::new_err(format!("unknown mode {m:?}: use translate, copy or passthrough"))),
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Translate => "translate",
        Mode::Copy => "copy",
        Mode::Passthrough => "passthrough",
    }
}

const RX_NAMES: [&str; 6] = ["promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"];

fn state_to_dict<'py>(py: Python<'py>, st: &NetState) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mac", st.mac.map(|m| m.to_vec()))?;
    d.set_item("unicast", st.unicast.iter().map(|m| m.to_vec()).collect::<Vec<_>>())?;
    d.set_item("multicast", st.multicast.iter().map(|m| m.to_vec()).collect::<Vec<_>>())?;
    d.set_item("mq_pairs", st.mq_pairs)?;
    d.set_item("rss", st.rss.as_ref().map(|b| PyBytes::new(py, b)))?;
    d.set_item("hash", st.hash.as_ref().map(|b| PyBytes::new(py, b)))?;
    d.set_item("offloads", st.offloads)?;
    let rx = PyDict::new(py);
    for (name, on) in RX_NAMES.iter().zip(st.rx) {
        rx.set_item(name, on)?;
    }
    d.set_item("rx", rx)?;
    d.set_item("vlans", st.vlans.iter().copied().collect::<Vec<_>>())?;
    Ok(d)
}

fn mac6(v: Vec<u8>) -> PyResult<[u8; 6]> {
    <[u8; 6]>::try_from(v.as_slice()).map_err(|_| PyValueError::new_err(format!("a MAC address is 6 bytes, got {}", v.len())))
}

fn state_from_dict(d: &Bound<'_, PyDict>) -> PyResult<NetState> {
    let mut st = NetState::default();
    let get = |k: &str| d.get_item(k).ok().flatten().filter(|v| !v.is_none());
    if let Some(v) = get("mac") {
        st.mac = Some(mac6(v.extract()?)?);
    }
    if let Some(v) = get("unicast") {
        st.unicast = v.extract::<Vec<Vec<u8>>>()?.into_iter().map(mac6).collect::<PyResult<_>>()?;
    }
    if let Some(v) = get("multicast") {
        st.multicast = v.extract::<Vec<Vec<u8>>>()?.into_iter().map(mac6).collect::<PyResult<_>>()?;
    }
    if let Some(v) = get("mq_pairs") {
        st.mq_pairs = v.extract()?;
    }
    if let Some(v) = get("rss") {
        st.rss = Some(v.extract()?);
    }
    if let Some(v) = get("hash") {
        st.hash = Some(v.extract()?);
    }
    if let Some(v) = get("offloads") {
        st.offloads = Some(v.extract()?);
    }
    if let Some(v) = get("rx") {
        let rx = v.cast::<PyDict>().map_err(|_| PyValueError::new_err("rx must be a dict of mode name to bool"))?;
        for (k, on) in rx.iter() {
            let k: String = k.extract()?;
            let i = RX_NAMES.iter().position(|n| *n == k).ok_or_else(|| PyValueError::new_err(format!("unknown RX mode {k:?}")))?;
            st.rx[RxMode::ALL[i] as usize] = on.extract()?;
        }
    }
    if let Some(v) = get("vlans") {
        for id in v.extract::<Vec<u16>>()? {
            if id > crate::net::MAX_VLAN {
                return Err(PyValueError::new_err(format!("VLAN id {id} > {}", crate::net::MAX_VLAN)));
            }
            st.vlans.insert(id);
        }
    }
    for k in d.keys() {
        let k: String = k.extract()?;
        if !["mac", "unicast", "multicast", "mq_pairs", "rss", "hash", "offloads", "rx", "vlans"].contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!("unknown net state field {k:?}")));
        }
    }
    Ok(st)
}

/// Python policy on a queue. Runs on the engine thread, which takes the interpreter for
/// each call; an exception in the hook is reported as unraisable and the element is
/// forwarded unchanged.
struct PyHook {
    avail: Option<Py<PyAny>>,
    used: Option<Py<PyAny>>,
}

impl QueueHook for PyHook {
    fn avail(&mut self, out: &[u8], in_len: u32) -> Verdict {
        let Some(f) = &self.avail else { return Verdict::Forward };
        Python::attach(|py| match f.call1(py, (PyBytes::new(py, out), in_len)) {
            Ok(r) if r.is_none(py) => Verdict::Forward,
            Ok(r) => match r.extract::<bool>(py) {
                Ok(false) => Verdict::Refuse,
                Ok(true) => Verdict::Forward,
                Err(_) => match r.extract::<Vec<u8>>(py) {
                    Ok(bytes) => Verdict::Answer(bytes),
                    Err(e) => {
                        e.write_unraisable(py, Some(f.bind(py)));
                        Verdict::Forward
                    }
                },
            },
            Err(e) => {
                e.write_unraisable(py, Some(f.bind(py)));
                Verdict::Forward
            }
        })
    }

    fn used(&mut self, out: &[u8], written: &[u8]) {
        let Some(f) = &self.used else { return };
        Python::attach(|py| {
            if let Err(e) = f.call1(py, (PyBytes::new(py, out), PyBytes::new(py, written))) {
                e.write_unraisable(py, Some(f.bind(py)));
            }
        })
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
    /// Starts a session. `mode` ("translate", "copy" or "passthrough") applies to every
    /// queue not in `queue_modes`; `memory` lists (guest address, size) regions;
    /// `copy_strategy` is "pool" or "per-element"; `restore` a state dict as returned by
    /// `net_state()`.
    #[new]
    #[pyo3(signature = (device, *, mode, queue_size, memory, event_idx, indirect, queue_modes, copy_strategy, isolate_cvq, track_net_state, restore, restore_timeout))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: &Device,
        mode: &str,
        queue_size: u16,
        memory: Vec<(u64, u64)>,
        event_idx: bool,
        indirect: bool,
        queue_modes: Vec<(u32, String)>,
        copy_strategy: &str,
        isolate_cvq: bool,
        track_net_state: bool,
        restore: Option<Bound<'_, PyDict>>,
        restore_timeout: f64,
    ) -> PyResult<Self> {
        if queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(PyValueError::new_err(format!("queue_size must be a power of two, got {queue_size}")));
        }
        let copy_strategy = match copy_strategy {
            "pool" => Strategy::Pool,
            "per-element" => Strategy::PerElement,
            s => return Err(PyValueError::new_err(format!("unknown copy strategy {s:?}: use pool or per-element"))),
        };
        let cfg = SessionConfig {
            mode: parse_mode(mode)?,
            queue_modes: queue_modes.iter().map(|(q, m)| Ok((*q, parse_mode(m)?))).collect::<PyResult<_>>()?,
            copy_strategy,
            queue_size,
            memory,
            event_idx,
            indirect,
            isolate_cvq,
            track_net_state,
            restore: restore.map(|d| state_from_dict(&d)).transpose()?,
            restore_timeout: timeout(restore_timeout)?,
        };
        let dev = device.backend()?.dyn_device();
        let s = py.detach(|| RustSession::start(dev, &cfg)).map_err(to_py)?;
        Ok(Session { inner: Mutex::new(Some(s)) })
    }

    /// Each queue's mode.
    fn modes(&self, py: Python<'_>) -> PyResult<Vec<&'static str>> {
        self.with(py, |s| Ok(s.modes().iter().map(|m| mode_name(*m)).collect()))
    }

    /// Where the control queue is: dict(queue, mode, isolated, asid, fallback, commands,
    /// acked, answered_locally), or None without one.
    fn cvq_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some((info, counts)) = self.with(py, |s| Ok(s.cvq().cloned().map(|c| (c, s.cvq_counts()))))? else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("queue", info.queue)?;
        d.set_item("mode", mode_name(info.mode))?;
        d.set_item("isolated", info.isolated)?;
        d.set_item("asid", info.asid)?;
        d.set_item("fallback", info.fallback)?;
        let (commands, acked, local) = counts.unwrap_or_default();
        d.set_item("commands", commands)?;
        d.set_item("acked", acked)?;
        d.set_item("answered_locally", local)?;
        Ok(Some(d))
    }

    /// The tracked virtio-net control-plane state as a dict, or None when the control
    /// queue is not shadowed.
    fn net_state<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let state = self.with(py, |s| Ok(s.net_state()))?;
        state.map(|st| state_to_dict(py, &st)).transpose()
    }

    /// Injects elements (readable bytes, writable size) on shadowed queue `q`, all in
    /// flight at once, and waits up to `timeout_s` for each: a list of (length, bytes).
    /// The first failure raises after every element was waited for.
    #[pyo3(signature = (q, elements, timeout_s = 10.0))]
    fn inject<'py>(&self, py: Python<'py>, q: u32, elements: Vec<(Vec<u8>, u32)>, timeout_s: f64) -> PyResult<Vec<(u32, Bound<'py, PyBytes>)>> {
        let t = timeout(timeout_s)?;
        let slots = self.with(py, |s| s.inject_many(q, elements))?;
        let results: Vec<Result<(u32, Vec<u8>), SessionError>> =
            py.detach(|| slots.iter().map(|slot| RustSession::wait_injected(q, slot, t)).collect());
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let (len, data) = r.map_err(to_py)?;
            out.push((len, PyBytes::new(py, &data)));
        }
        Ok(out)
    }

    /// Attaches Python policy to shadowed queue `q` (meant for low-rate queues such as the
    /// control queue): `avail(out: bytes, in_size: int)` returns None to forward, bytes to
    /// answer the element with, or False to refuse it; `used(out: bytes, written: bytes)`
    /// sees each completion.
    #[pyo3(signature = (q, avail = None, used = None))]
    fn add_hook(&self, py: Python<'_>, q: u32, avail: Option<Py<PyAny>>, used: Option<Py<PyAny>>) -> PyResult<()> {
        let hook = Box::new(PyHook { avail, used });
        self.with(py, move |s| s.add_hook(q, hook))
    }

    /// (maps, unmaps) sent to the device so far.
    fn map_counts(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        self.with(py, |s| Ok(s.map_counts()))
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
        let deadline = std::time::Instant::now() + t;
        let mut done = Vec::with_capacity(count);
        // The session is locked only while the ring is read, never while sleeping.
        while let Some(call) = self.with(py, |s| Ok(s.driver()?.wait_step(q, count, whole, &mut done)?))? {
            let now = std::time::Instant::now();
            if now >= deadline {
                // What did complete is not lost: it rides on the exception.
                let e = driver_err(DriverError::Timeout { queue: q, got: done.len(), want: count, waited: t });
                let got: Vec<CompletionTuple> = done.into_iter().map(|c| (c.head, c.len, PyBytes::new(py, &c.data).unbind())).collect();
                e.value(py).setattr("completions", got)?;
                return Err(e);
            }
            py.detach(|| call.wait(deadline - now));
        }
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

/// Live resources svq holds: {"eventfds": n, "threads": n, "bounce_buffers": n}.
#[pyfunction]
fn live_resources<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("eventfds", live::eventfds())?;
    d.set_item("threads", live::threads())?;
    d.set_item("bounce_buffers", crate::bounce::live_buffers())?;
    Ok(d)
}

/// Fault injection: the `n`-th eventfd svq creates from now fails with EMFILE (0
/// disarms).
#[pyfunction]
fn fail_eventfd_at(n: u64) {
    crate::eventfd::fail_creation_at(n);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Device>()?;
    m.add_class::<Session>()?;
    m.add_function(wrap_pyfunction!(live_resources, m)?)?;
    m.add_function(wrap_pyfunction!(fail_eventfd_at, m)?)?;
    crate::bench::register(m)?;
    m.add("SvqError", py.get_type::<SvqError>())?;
    m.add("NegotiationError", py.get_type::<NegotiationError>())?;
    m.add("SessionClosedError", py.get_type::<SessionClosedError>())?;
    m.add("GuestMemoryError", py.get_type::<GuestMemoryError>())?;
    m.add("QueueBrokenError", py.get_type::<QueueBrokenError>())?;
    m.add("GuestProtocolError", py.get_type::<GuestProtocolError>())?;
    m.add("DeviceProtocolError", py.get_type::<DeviceProtocolError>())?;
    m.add("DeviceNeedsResetError", py.get_type::<DeviceNeedsResetError>())?;
    m.add("ElementTooLargeError", py.get_type::<ElementTooLargeError>())?;
    m.add("InjectError", py.get_type::<InjectError>())?;
    m.add("RestoreError", py.get_type::<RestoreError>())?;
    Ok(())
}
