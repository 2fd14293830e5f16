//! `svq._native.Session`: a session with its in-process guest driver, injection, hooks and
//! the virtio-net state as dicts.

use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::device::Device;
use super::errors::{driver_err, to_py};
use super::lock;
use crate::bounce::Strategy;
use crate::driver::DriverError;
use crate::net::{NetState, RxMode};
use crate::session::{Mode, Session as RustSession, SessionConfig, SessionError};
use crate::shadow::{QueueHook, Verdict};

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
pub(super) struct Session {
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

impl Drop for Session {
    /// A session Python frees without closing it is closed here, with the interpreter
    /// released: the engine thread being joined may be waiting for it inside a hook.
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut s) = inner {
            Python::attach(|py| py.detach(move || drop(s.close())));
        }
    }
}

fn timeout(t: f64) -> PyResult<Duration> {
    if !(t.is_finite() && t >= 0.0) {
        return Err(PyValueError::new_err(format!("timeout must be a finite number of seconds >= 0, got {t}")));
    }
    Ok(Duration::from_secs_f64(t))
}

type CompletionTuple = (u16, u32, Py<PyBytes>);

fn tuples(py: Python<'_>, done: Vec<crate::driver::Completion>) -> Vec<CompletionTuple> {
    done.into_iter().map(|c| (c.head, c.len, PyBytes::new(py, &c.data).unbind())).collect()
}

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
        let done = self.with(py, move |s| s.add_hook(q, hook))?;
        // Wait with neither the session lock nor the interpreter held: the engine may be
        // inside another hook, waiting for the interpreter.
        py.detach(|| RustSession::wait_injected(q, &done, Duration::from_secs(10))).map(drop).map_err(to_py)
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
                e.value(py).setattr("completions", tuples(py, done))?;
                return Err(e);
            }
            py.detach(|| call.wait(deadline - now));
        }
        Ok(tuples(py, done))
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
    fn closed(&self, py: Python<'_>) -> bool {
        py.detach(|| lock(&self.inner).is_none())
    }
}
