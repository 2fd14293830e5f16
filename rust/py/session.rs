//! `svq._native.Session`: a session with its in-process guest driver, injection, hooks and
//! the virtio-net state as dicts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::PyTraverseError;

use super::aio::InjectBatch;
use super::args::{timeout, wait_all_interruptibly, wait_interruptibly, U16, U32, U64};
use super::device::Device;
use super::driver::Driver;
use super::errors::{inject_err, to_py};
use super::lock;
use super::state::{state_from_dict, state_to_dict, SavedState};
use crate::bounce::Strategy;
use crate::front::driver::DriverError;
use crate::front::external::{ExternalGuest, ExternalMemory, ExternalQueue};
use crate::mem::FileRegion;

use crate::session::{Mode, SaveFailed, Session as RustSession, SessionConfig, SessionError};
use crate::shadow::{QueueHook, Verdict};

pub(super) fn parse_strategy(s: &str) -> PyResult<Strategy> {
    match s {
        "pool" => Ok(Strategy::Pool),
        "per-element" => Ok(Strategy::PerElement),
        s => Err(PyValueError::new_err(format!("unknown copy strategy {s:?}: use pool or per-element"))),
    }
}

pub(super) fn parse_mode(m: &str) -> PyResult<Mode> {
    match m {
        "translate" => Ok(Mode::Translate),
        "copy" => Ok(Mode::Copy),
        "passthrough" => Ok(Mode::Passthrough),
        m => Err(PyValueError::new_err(format!("unknown mode {m:?}: use translate, copy or passthrough"))),
    }
}

/// The callables of one Python hook. The session's Python object owns them (and shows
/// them to the garbage collector, so a hook that refers to its own session forms a cycle
/// Python can collect); the engine's hook only borrows them for each call.
type HookFns = Arc<Mutex<(Option<Py<PyAny>>, Option<Py<PyAny>>)>>;

/// Python policy on a queue. Runs on the engine thread, which takes the interpreter for
/// each call; an exception in the hook is reported as unraisable and the element is
/// forwarded unchanged.
struct PyHook {
    fns: HookFns,
}

impl PyHook {
    fn callable(&self, py: Python<'_>, used: bool) -> Option<Py<PyAny>> {
        let fns = lock(&self.fns);
        let f = if used { &fns.1 } else { &fns.0 };
        f.as_ref().map(|f| f.clone_ref(py))
    }
}

impl QueueHook for PyHook {
    fn avail(&mut self, out: &[u8], in_len: u32) -> Verdict {
        Python::attach(|py| {
            let Some(f) = self.callable(py, false) else { return Verdict::Forward };
            match f.call1(py, (PyBytes::new(py, out), in_len)) {
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
            }
        })
    }

    fn used(&mut self, out: &[u8], written: &[u8]) {
        Python::attach(|py| {
            let Some(f) = self.callable(py, true) else { return };
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
    /// The Python hooks' callables (see [`HookFns`]).
    hooks: Mutex<Vec<HookFns>>,
    /// The dirty log attached last: its final round is read after a save stopped the
    /// session.
    log: Mutex<Option<Arc<crate::dirty::DirtyLog>>>,
    /// The capture started last: its final counts are read after the session closed.
    capture: Mutex<Option<Arc<crate::capture::Capture>>>,
}

impl Session {
    pub(super) fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut RustSession) -> Result<T, SessionError> + Send) -> PyResult<T> {
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

/// The engine's poll window in seconds: 0 (never poll) up to 10 ms.
pub(super) fn busy_poll_window(s: f64) -> PyResult<Duration> {
    if !(s.is_finite() && (0.0..=0.01).contains(&s)) {
        return Err(PyValueError::new_err(format!("busy_poll must be within 0..=0.01 seconds, got {s}")));
    }
    Ok(Duration::from_secs_f64(s))
}

/// An external guest as the Python layer passes it: memory regions (guest address, size,
/// fd, file offset), queues (index, size, desc, avail, used, kick fd, call fd, base) and
/// the features its driver negotiated.
type ExternalArg = (Vec<(U64, U64, i32, U64)>, Vec<(U32, U16, U64, U64, U64, i32, i32, U16)>, U64);

/// svq's own duplicate of a descriptor the caller keeps (close-on-exec).
fn dup_fd(fd: i32, what: &str) -> PyResult<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0))
        .map_err(|e| PyValueError::new_err(format!("{what} {fd} is not an open file descriptor ({e})")))?;
    // SAFETY: `new` is a descriptor fcntl just created for us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

fn external_guest((memory, queues, features): ExternalArg) -> PyResult<ExternalGuest> {
    let memory = memory
        .into_iter()
        .map(|(gpa, size, fd, offset)| Ok(FileRegion { gpa: gpa.0, size: size.0, fd: dup_fd(fd, "memory fd")?, offset: offset.0 }))
        .collect::<PyResult<_>>()?;
    let queues = queues
        .into_iter()
        .map(|(index, size, desc, avail, used, kick, call, base)| {
            Ok(ExternalQueue {
                index: index.0,
                size: size.0,
                desc: desc.0,
                avail: avail.0,
                used: used.0,
                kick: dup_fd(kick, "kick fd")?,
                call: dup_fd(call, "call fd")?,
                base: base.0,
            })
        })
        .collect::<PyResult<_>>()?;
    Ok(ExternalGuest { memory: ExternalMemory::Files(memory), queues, features: features.0 })
}

#[pymethods]
impl Session {
    /// Starts a session. `mode` ("translate", "copy" or "passthrough") applies to every
    /// queue not in `queue_modes`; `memory` lists (guest address, size) regions;
    /// `copy_strategy` is "pool" or "per-element"; `restore` a state dict as returned by
    /// `net_state()`.
    #[new]
    #[pyo3(signature = (device, *, mode, queue_size, memory, event_idx, indirect, queue_modes, copy_strategy, isolate_cvq, track_net_state, restore, restore_timeout, busy_poll = 200e-6, external = None, resume = None, workers = 0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: &Device,
        mode: &str,
        queue_size: U16,
        memory: Vec<(U64, U64)>,
        event_idx: bool,
        indirect: bool,
        queue_modes: Vec<(U32, String)>,
        copy_strategy: &str,
        isolate_cvq: bool,
        track_net_state: bool,
        restore: Option<Bound<'_, PyDict>>,
        restore_timeout: f64,
        busy_poll: f64,
        external: Option<ExternalArg>,
        resume: Option<Py<SavedState>>,
        workers: usize,
    ) -> PyResult<Self> {
        let queue_size = queue_size.0;
        if queue_size == 0 || !queue_size.is_power_of_two() {
            return Err(PyValueError::new_err(format!("queue_size must be a power of two, got {queue_size}")));
        }
        let copy_strategy = parse_strategy(copy_strategy)?;
        let cfg = SessionConfig {
            mode: parse_mode(mode)?,
            queue_modes: queue_modes.iter().map(|(q, m)| Ok((q.0, parse_mode(m)?))).collect::<PyResult<_>>()?,
            copy_strategy,
            queue_size,
            memory: memory.into_iter().map(|(a, b)| (a.0, b.0)).collect(),
            event_idx,
            indirect,
            isolate_cvq,
            track_net_state,
            restore: restore.map(|d| state_from_dict(&d)).transpose()?,
            restore_timeout: timeout(restore_timeout)?,
            busy_poll: busy_poll_window(busy_poll)?,
            resume: None,
            workers,
        };
        let dev = device.backend()?.dyn_device();
        let guest = external.map(external_guest).transpose()?;
        let s = match (guest, resume) {
            (Some(g), resume) => {
                if resume.as_ref().is_some_and(|r| r.get().has_guest()) {
                    return Err(PyValueError::new_err("this state carries svq's own guest: resume it without guest="));
                }
                let cfg = SessionConfig { resume: resume.map(|r| r.get().device_state()), ..cfg };
                py.detach(|| RustSession::start_external(dev, &cfg, g)).map_err(to_py)?
            }
            (None, Some(resume)) => {
                let saved = resume.get().take_guest().map_err(to_py)?;
                py.detach(|| RustSession::resume_saved(dev, &cfg, saved)).map_err(|f| {
                    if let Some(saved) = f.saved {
                        resume.get().put_back(saved);
                    }
                    to_py(f.error)
                })?
            }
            (None, None) => py.detach(|| RustSession::start(dev, &cfg)).map_err(to_py)?,
        };
        Ok(Session { inner: Mutex::new(Some(s)), hooks: Mutex::new(Vec::new()), log: Mutex::new(None), capture: Mutex::new(None) })
    }

    /// The queues served and their modes, as (index, mode name).
    fn modes(&self, py: Python<'_>) -> PyResult<Vec<(u32, &'static str)>> {
        self.with(py, |s| Ok(s.modes().iter().map(|(q, m)| (*q, m.name())).collect()))
    }

    /// Where the control queue is: dict(queue, mode, isolated, asid, fallback, commands,
    /// acked, answered_locally), or None without one.
    fn cvq_info<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some((info, counts)) = self.with(py, |s| Ok(s.cvq().cloned().map(|c| (c, s.cvq_counts()))))? else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("queue", info.queue)?;
        d.set_item("mode", info.mode.name())?;
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
    /// flight at once, and waits for all of them with one deadline, `timeout_s` from now:
    /// a list of (length, bytes). The first failure raises once every element ended.
    #[pyo3(signature = (q, elements, timeout_s = 10.0))]
    fn inject<'py>(
        &self,
        py: Python<'py>,
        q: U32,
        elements: Vec<(Vec<u8>, U32)>,
        timeout_s: f64,
    ) -> PyResult<Vec<(u32, Bound<'py, PyBytes>)>> {
        let (q, t) = (q.0, timeout(timeout_s)?);
        let elements: Vec<(Vec<u8>, u32)> = elements.into_iter().map(|(out, n)| (out, n.0)).collect();
        let slots = self.with(py, |s| s.inject_many(q, elements))?;
        let results = wait_all_interruptibly(py, q, &slots, t)?;
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            let (len, data) = r.map_err(inject_err)?;
            out.push((len, PyBytes::new(py, &data)));
        }
        Ok(out)
    }

    /// Injects elements like `inject` and returns at once: the batch's eventfd is
    /// signalled as they complete, and its `poll()` gives the outcome.
    fn inject_batch(&self, py: Python<'_>, q: U32, elements: Vec<(Vec<u8>, U32)>) -> PyResult<InjectBatch> {
        let q = q.0;
        let elements: Vec<(Vec<u8>, u32)> = elements.into_iter().map(|(out, n)| (out, n.0)).collect();
        let batch = self.with(py, |s| s.inject_batch(q, elements))?;
        Ok(InjectBatch::new(q, batch))
    }

    /// Attaches Python policy to shadowed queue `q` (meant for low-rate queues such as the
    /// control queue): `avail(out: bytes, in_size: int)` returns None to forward, bytes to
    /// answer the element with, or False to refuse it; `used(out: bytes, written: bytes)`
    /// sees each completion.
    #[pyo3(signature = (q, avail = None, used = None))]
    fn add_hook(&self, py: Python<'_>, q: U32, avail: Option<Py<PyAny>>, used: Option<Py<PyAny>>) -> PyResult<()> {
        let q = q.0;
        let fns: HookFns = Arc::new(Mutex::new((avail, used)));
        let hook = Box::new(PyHook { fns: fns.clone() });
        let done = self.with(py, move |s| s.add_hook(q, hook))?;
        lock(&self.hooks).push(fns);
        // Wait with neither the session lock nor the interpreter held: the engine may be
        // inside another hook, waiting for the interpreter.
        let deadline = Instant::now() + Duration::from_secs(10);
        match wait_interruptibly(py, deadline, |until| done.wait_until(until))? {
            Some(r) => r.map(drop).map_err(inject_err),
            None => Err(to_py(SessionError::Timeout { queue: q, pending: 1, timeout: Duration::from_secs(10) })),
        }
    }

    /// (maps, unmaps) sent to the device so far.
    fn map_counts(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        self.with(py, |s| Ok(s.map_counts()))
    }

    /// Number of queues the device has.
    #[getter]
    fn num_queues(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |s| Ok(s.device_queues()))
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

    /// The in-process guest's driver (a session serving an external guest has none).
    fn driver(slf: Bound<'_, Self>) -> PyResult<Driver> {
        let has = slf.get().with(slf.py(), |s| s.driver().map(drop));
        has.map(|()| Driver::of_session(slf.unbind()))
    }

    /// The fault that broke queue `q`: dict(queue, kind, rule, message), or None.
    fn queue_fault<'py>(&self, py: Python<'py>, q: U32) -> PyResult<Option<Bound<'py, PyDict>>> {
        let fault = self.with(py, |s| {
            let g = s.guest_queues().iter().find(|g| g.index == q.0).ok_or(SessionError::Driver(DriverError::NoQueue(q.0)))?;
            Ok(g.health.fault())
        })?;
        let Some(f) = fault else { return Ok(None) };
        let d = PyDict::new(py);
        d.set_item("queue", f.queue)?;
        d.set_item("kind", f.kind().name())?;
        d.set_item("rule", f.rule())?;
        d.set_item("message", f.to_string())?;
        Ok(Some(d))
    }

    /// Counters of queue `q`.
    fn stats<'py>(&self, py: Python<'py>, q: U32) -> PyResult<Bound<'py, PyDict>> {
        let snap = self.with(py, |s| s.stats(q.0).ok_or(SessionError::Driver(DriverError::NoQueue(q.0))))?;
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

    /// `VHOST_VDPA_SUSPEND`.
    fn suspend(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.suspend())
    }

    /// `VHOST_VDPA_RESUME`.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.resume())
    }

    /// `VHOST_GET_VRING_BASE` of queue `q`.
    fn vring_base(&self, py: Python<'_>, q: U32) -> PyResult<u16> {
        self.with(py, |s| s.vring_base(q.0))
    }

    /// Switches `queues` to `mode` while the device runs: dict(queues=[(q, position)],
    /// suspended_s).
    fn switch<'py>(&self, py: Python<'py>, queues: Vec<U32>, mode: &str) -> PyResult<Bound<'py, PyDict>> {
        let mode = parse_mode(mode)?;
        let queues: Vec<u32> = queues.into_iter().map(|q| q.0).collect();
        let r = self.with(py, |s| s.switch(&queues, mode))?;
        let d = PyDict::new(py);
        d.set_item("queues", r.queues)?;
        d.set_item("suspended_s", r.suspended.as_secs_f64())?;
        Ok(d)
    }

    /// Attaches a dirty log of svq's own covering all of guest memory (or detaches it
    /// with `on=False`).
    fn dirty_log(&self, py: Python<'_>, on: bool) -> PyResult<()> {
        let log = self.with(py, |s| {
            let log = if on { Some(Arc::new(crate::dirty::DirtyLog::new(s.guest_end())?)) } else { None };
            s.set_dirty_log(log.clone())?;
            Ok(log)
        })?;
        *lock(&self.log) = log;
        Ok(())
    }

    /// The guest pages written since the last call (one dirty round), and clears them.
    /// After a save, one more call gives the pages written while the session stopped.
    fn dirty_pages(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        let log = lock(&self.log).clone();
        match log {
            Some(log) => Ok(py.detach(|| log.fetch_and_clear())),
            None => Err(PyValueError::new_err("no dirty log is attached: call dirty_log(True) first")),
        }
    }

    /// Stops the session to hand its guest rings over (see the Rust
    /// `Session::stop_saving`): a list of dict(queue, avail, used), one per served queue.
    fn stop_saving<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let positions = py
            .detach(|| {
                let mut g = lock(&self.inner);
                let s = g.as_mut().ok_or(SessionError::Closed)?;
                let r = s.stop_saving();
                g.take();
                r
            })
            .map_err(to_py)?;
        positions
            .into_iter()
            .map(|p| {
                let d = PyDict::new(py);
                d.set_item("queue", p.queue)?;
                d.set_item("avail", p.avail)?;
                d.set_item("used", p.used)?;
                Ok(d)
            })
            .collect()
    }

    /// Stops the session and returns its device state (see the Rust `Session::save`),
    /// carrying svq's own guest when the session played it. A failure after the device
    /// stopped carries the state, when it could be kept, as the exception's `saved`.
    fn save(&self, py: Python<'_>) -> PyResult<SavedState> {
        let r = py.detach(|| {
            let mut g = lock(&self.inner);
            let s = g.as_mut().ok_or_else(|| Box::new(SaveFailed { error: SessionError::Closed, saved: None }))?;
            let r = s.save();
            // A save that failed early leaves the session running; otherwise it is closed.
            if r.is_ok() || s.is_closed() {
                g.take();
            }
            r
        });
        match r {
            Ok(saved) => Ok(SavedState::new(saved)),
            Err(f) => {
                let e = to_py(f.error);
                if let Some(saved) = f.saved {
                    e.value(py).setattr("saved", Py::new(py, SavedState::new(saved))?)?;
                }
                Err(e)
            }
        }
    }

    /// Stops the engine, resets the device, unmaps everything and wakes every waiter.
    /// Idempotent, and safe from any thread, a hook of this session's included.
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

    /// Number of engine threads serving the shadow queues (zero once closed).
    #[getter]
    fn workers(&self, py: Python<'_>) -> usize {
        py.detach(|| lock(&self.inner).as_ref().map_or(0, |s| s.workers()))
    }

    /// Captures the frames of shadowed data queues `queues` (None: all of them) into a new
    /// pcapng file at `path`, `snaplen` bytes of each at most, the file at most `limit`
    /// bytes; returns the interfaces' names. Frames flow into the file once this returns.
    #[pyo3(signature = (path, queues = None, snaplen = U32(crate::capture::DEFAULT_SNAPLEN), limit = None))]
    fn start_capture(
        &self,
        py: Python<'_>,
        path: std::path::PathBuf,
        queues: Option<Vec<U32>>,
        snaplen: U32,
        limit: Option<U64>,
    ) -> PyResult<Vec<String>> {
        let cfg = super::capture::config(snaplen, limit);
        let queues: Option<Vec<u32>> = queues.map(|qs| qs.into_iter().map(|q| q.0).collect());
        let (slots, capture) = self.with(py, |s| {
            let slots = s.start_capture(&path, queues.as_deref(), cfg)?;
            Ok((slots, s.capture().cloned()))
        })?;
        let names = capture.as_ref().map(|c| c.interfaces().to_vec()).unwrap_or_default();
        *lock(&self.capture) = capture;
        // Waited for without the session's lock: a hook on the engine thread may need it.
        if let Err(e) = super::capture::wait_attached(py, &slots) {
            let _ = self.with(py, |s| s.stop_capture());
            return Err(e);
        }
        Ok(names)
    }

    /// Stops the capture and completes its file: dict(path, packets, dropped,
    /// dropped_limit, dropped_busy, bytes, finished, error, interfaces). After the session
    /// closed (which completed the file), the final counts.
    fn stop_capture<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let running = py.detach(|| {
            let mut g = lock(&self.inner);
            g.as_mut().filter(|s| s.capture().is_some()).map(|s| s.stop_capture()).transpose()
        });
        let capture = lock(&self.capture).take();
        let report = match (running.map_err(to_py)?, capture) {
            (Some(r), _) => r,
            (None, Some(c)) => py.detach(|| c.finish()),
            (None, None) => return Err(PyValueError::new_err("no capture is running on this session")),
        };
        super::capture::report_dict(py, &report)
    }

    /// Whether the session was closed.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        py.detach(|| lock(&self.inner).is_none())
    }

    /// Shows the hooks' callables to the garbage collector.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // Never block here: a hook being installed or called holds the locks briefly, and
        // skipping a round only delays a collection.
        let Ok(hooks) = self.hooks.try_lock() else { return Ok(()) };
        for fns in hooks.iter() {
            if let Ok(fns) = fns.try_lock() {
                visit.call(&fns.0)?;
                visit.call(&fns.1)?;
            }
        }
        Ok(())
    }

    /// Breaks a cycle through the hooks: the session is closed (from whatever thread the
    /// collector runs on, the engine's included) and the callables are dropped.
    fn __clear__(&self) {
        let inner = lock(&self.inner).take();
        if let Some(mut s) = inner {
            Python::attach(|py| py.detach(move || drop(s.close())));
        }
        let hooks = std::mem::take(&mut *lock(&self.hooks));
        let fns: Vec<_> = hooks.iter().map(|h| std::mem::take(&mut *lock(h))).collect();
        drop(fns);
    }
}
