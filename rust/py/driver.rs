//! `svq._native.Driver`: the guest svq plays itself, as a batch API (never a call per
//! descriptor). It belongs to a session: the guest moves to another session through a
//! saved state, and its driver is then that session's.

use std::time::Instant;

use pyo3::exceptions::PyValueError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::PyTraverseError;

use super::aio::Notifier;
use super::args::{timeout, wait_interruptibly, Usize, U32, U64};
use super::errors::driver_err;
use super::session::Session;
use crate::front::driver::{Completion, Driver as RustDriver, DriverError};

/// The in-process guest's driver; unusable once its session is closed.
#[pyclass(frozen, module = "svq._native")]
pub(super) struct Driver {
    session: Py<Session>,
}

type CompletionTuple = (u16, u32, Py<PyBytes>);

fn tuples(py: Python<'_>, done: Vec<Completion>) -> Vec<CompletionTuple> {
    done.into_iter().map(|c| (c.head, c.len, PyBytes::new(py, &c.data).unbind())).collect()
}

/// `e` with what did complete riding on it as `completions` (nothing is lost on a timeout,
/// a close, a broken queue or Ctrl-C).
fn with_completions(py: Python<'_>, e: PyErr, done: Vec<Completion>) -> PyErr {
    match e.value(py).setattr("completions", tuples(py, done)) {
        Ok(()) => e,
        Err(set) => set,
    }
}

impl Driver {
    pub(super) fn of_session(session: Py<Session>) -> Self {
        Driver { session }
    }

    /// Runs `f` on the driver with the interpreter released and the session's lock held
    /// only meanwhile.
    fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut RustDriver) -> Result<T, DriverError> + Send) -> PyResult<T> {
        self.session.get().with(py, |s| Ok(f(s.driver()?)?))
    }
}

#[pymethods]
impl Driver {
    /// Posts one device-readable chain per buffer on queue `q` (each split into
    /// `segments` descriptors) and kicks once.
    #[pyo3(signature = (q, buffers, segments = Usize(1), indirect = false), text_signature = "($self, q, buffers, segments=1, indirect=False)")]
    fn send(&self, py: Python<'_>, q: U32, buffers: Vec<Vec<u8>>, segments: Usize, indirect: bool) -> PyResult<Vec<u16>> {
        let (q, segments) = (q.0, segments.0);
        if segments == 0 {
            return Err(PyValueError::new_err("segments must be >= 1"));
        }
        if buffers.iter().any(Vec::is_empty) {
            return Err(PyValueError::new_err("a buffer of 0 bytes cannot be sent: virtio forbids zero-length descriptors"));
        }
        self.with(py, |d| {
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
    fn post_receive(&self, py: Python<'_>, q: U32, count: Usize, size: U32) -> PyResult<()> {
        let (q, count, size) = (q.0, count.0, size.0);
        if size == 0 {
            return Err(PyValueError::new_err("size must be >= 1: virtio forbids zero-length descriptors"));
        }
        self.with(py, |d| {
            let added = (0..count).try_for_each(|_| d.add(q, &[], &[size]).map(drop));
            // What was added before a failure is published, not lost.
            d.kick(q)?;
            added
        })
    }

    /// Posts one chain (readable parts, then writable buffers of the given sizes) and
    /// kicks; returns its head.
    fn submit(&self, py: Python<'_>, q: U32, out: Vec<Vec<u8>>, in_sizes: Vec<U32>) -> PyResult<u16> {
        let q = q.0;
        let in_sizes: Vec<u32> = in_sizes.into_iter().map(|n| n.0).collect();
        self.with(py, |d| {
            let parts: Vec<&[u8]> = out.iter().map(|v| v.as_slice()).collect();
            let head = d.add(q, &parts, &in_sizes)?;
            d.kick(q)?;
            Ok(head)
        })
    }

    /// Waits for `count` completions on queue `q`: a list of (head, length, bytes), the
    /// bytes being the first `length` written ones, or every writable byte with `whole`.
    /// Ctrl-C interrupts it; closing the session from another thread wakes it with
    /// `SessionClosedError`. Any exception carries what did complete as `completions`.
    #[pyo3(signature = (q, count, timeout_s = 10.0, whole = false))]
    fn wait(&self, py: Python<'_>, q: U32, count: Usize, timeout_s: f64, whole: bool) -> PyResult<Vec<CompletionTuple>> {
        let (q, count, t) = (q.0, count.0, timeout(timeout_s)?);
        let deadline = Instant::now() + t;
        let mut done = Vec::with_capacity(count.min(1 << 16));
        let fail = |e: PyErr, done: Vec<Completion>| -> PyResult<Vec<CompletionTuple>> { Err(with_completions(py, e, done)) };
        // The driver is locked only while the ring is read, never while sleeping.
        loop {
            let call = match self.with(py, |d| d.wait_step(q, count, whole, &mut done)) {
                Ok(Some(call)) => call,
                Ok(None) => break,
                Err(e) => return fail(e, done),
            };
            match wait_interruptibly(py, deadline, |until| call.wait(until.saturating_duration_since(Instant::now())).then_some(())) {
                Ok(Some(())) => {}
                Ok(None) => return fail(driver_err(DriverError::Timeout { queue: q, got: done.len(), want: count, waited: t }), done),
                Err(e) => return fail(e, done),
            }
        }
        Ok(tuples(py, done))
    }

    /// One step of an asynchronous wait for `count` completions on queue `q`: the
    /// completions once `count` are there (taken from the driver only then: a waiter may
    /// give up between steps and lose nothing), else a `Notifier` of the queue's call
    /// eventfd to sleep on before the next step. With `expired_s` (the timeout that
    /// passed) it raises `TimeoutError` instead. Any exception carries what did complete
    /// as `completions`.
    #[pyo3(signature = (q, count, whole = false, expired_s = None))]
    fn wait_ready(&self, py: Python<'_>, q: U32, count: Usize, whole: bool, expired_s: Option<f64>) -> PyResult<Py<PyAny>> {
        let (q, count) = (q.0, count.0);
        let expired = expired_s.map(timeout).transpose()?;
        let mut done = Vec::new();
        let step = self.with(py, |d| {
            let ready = d.try_complete(q, count, whole, &mut done)?;
            if !ready && expired.is_some() {
                d.poll(q, count, whole, &mut done)?;
            }
            Ok(if ready || expired.is_some() { None } else { Some(d.call(q)?) })
        });
        let fail = |e: PyErr, done: Vec<Completion>| -> PyResult<Py<PyAny>> { Err(with_completions(py, e, done)) };
        match (step, expired) {
            (Err(e), _) => fail(e, done),
            (Ok(Some(call)), _) => Ok(Py::new(py, Notifier::new(call))?.into_any()),
            (Ok(None), Some(t)) if done.len() < count => {
                fail(driver_err(DriverError::Timeout { queue: q, got: done.len(), want: count, waited: t }), done)
            }
            (Ok(None), _) => Ok(tuples(py, done).into_pyobject(py)?.into_any().unbind()),
        }
    }

    /// Chains the guest has in flight on queue `q`.
    fn in_flight(&self, py: Python<'_>, q: U32) -> PyResult<usize> {
        self.with(py, |d| {
            d.queue_exists(q.0)?;
            Ok(d.in_flight(q.0))
        })
    }

    /// Guest ring addresses of queue `q`: dict(desc, avail, used, size).
    fn guest_ring<'py>(&self, py: Python<'py>, q: U32) -> PyResult<Bound<'py, PyDict>> {
        let g = self.with(py, |d| d.guest_queues().into_iter().find(|g| g.index == q.0).ok_or(DriverError::NoQueue(q.0)))?;
        let d = PyDict::new(py);
        d.set_item("desc", g.desc)?;
        d.set_item("avail", g.avail)?;
        d.set_item("used", g.used)?;
        d.set_item("size", g.layout.size())?;
        Ok(d)
    }

    /// Writes raw bytes into guest memory (for tests that play a hostile guest).
    fn write_guest(&self, py: Python<'_>, addr: U64, data: Vec<u8>) -> PyResult<()> {
        self.with(py, |d| Ok(d.memory().write(addr.0, &data)?))
    }

    /// Reads raw bytes of guest memory.
    fn read_guest<'py>(&self, py: Python<'py>, addr: U64, length: Usize) -> PyResult<Bound<'py, PyBytes>> {
        if length.0 > 1 << 30 {
            return Err(PyValueError::new_err(format!("length {} is larger than 1 GiB", length.0)));
        }
        let mut buf = vec![0u8; length.0];
        self.with(py, |d| Ok(d.memory().read(addr.0, &mut buf)?))?;
        Ok(PyBytes::new(py, &buf))
    }

    /// Signals queue `q`'s kick eventfd unconditionally (a raw guest kick).
    fn notify(&self, py: Python<'_>, q: U32) -> PyResult<()> {
        self.with(py, |d| {
            let g = d.guest_queues().into_iter().find(|g| g.index == q.0).ok_or(DriverError::NoQueue(q.0))?;
            g.kick.signal();
            Ok(())
        })
    }

    /// Live guest buffers (rings included) in guest memory.
    fn live_guest_buffers(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |d| Ok(d.live_buffers()))
    }

    /// Shows the session to the garbage collector: a session whose hook refers back to
    /// it (through its Python wrapper, which holds this driver) forms a cycle it must see
    /// whole to collect (the session's own `__clear__` breaks it).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.session)
    }
}
