//! `svq._native.VhostUserServer`: svq as a VMM's vhost-user backend.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{U32, U64};
use super::device::Device;
use super::errors::to_py;
use super::session::{busy_poll_window, parse_mode, parse_strategy};
use crate::session::{SessionConfig, SessionError};
use crate::vhost_user::{ServeError, Server, Stopper};

fn serve_err(e: ServeError) -> PyErr {
    match e {
        ServeError::Device(e) => to_py(e),
        ServeError::Socket { path, source } => {
            pyo3::exceptions::PyOSError::new_err((source.raw_os_error().unwrap_or(0), format!("{}: {source}", path.display())))
        }
        ServeError::Os { op, errno } => to_py(SessionError::Os { op, errno }),
    }
}

/// A vhost-user backend on a unix socket, serving one VMM connection at a time.
#[pyclass(frozen, module = "svq._native")]
pub(super) struct VhostUserServer {
    server: Arc<Server>,
    stopper: Stopper,
}

#[pymethods]
impl VhostUserServer {
    /// Listens on `path` to serve `device` to a VMM with the given queue modes.
    #[new]
    #[pyo3(signature = (device, path, *, mode, queue_modes, copy_strategy, event_idx, busy_poll = 200e-6))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: &Device,
        path: std::path::PathBuf,
        mode: &str,
        queue_modes: Vec<(U32, String)>,
        copy_strategy: &str,
        event_idx: bool,
        busy_poll: f64,
    ) -> PyResult<Self> {
        let cfg = SessionConfig {
            mode: parse_mode(mode)?,
            queue_modes: queue_modes.iter().map(|(q, m)| Ok((q.0, parse_mode(m)?))).collect::<PyResult<_>>()?,
            copy_strategy: parse_strategy(copy_strategy)?,
            event_idx,
            busy_poll: busy_poll_window(busy_poll)?,
            ..SessionConfig::default()
        };
        let dev = device.backend()?.dyn_device();
        let server = py.detach(|| Server::bind(dev, &path, cfg)).map_err(serve_err)?;
        let stopper = server.stopper();
        Ok(VhostUserServer { server: Arc::new(server), stopper })
    }

    /// The socket's path.
    #[getter]
    fn path(&self) -> std::path::PathBuf {
        self.server.path().to_owned()
    }

    /// Serves connections until `stop()`; runs with the interpreter released (call it
    /// from a thread of its own).
    fn serve(&self, py: Python<'_>) -> PyResult<()> {
        let server = self.server.clone();
        py.detach(move || server.serve()).map_err(serve_err)
    }

    /// Stops serving: the connection is cut, the device stopped and reset.
    fn stop(&self) {
        self.stopper.stop();
    }

    /// Captures the frames on the shadowed data queues of every session from now on into
    /// a new pcapng file at `path` (one interface per queue), `snaplen` bytes of each at
    /// most, the file at most `limit` bytes.
    #[pyo3(signature = (path, snaplen = U32(crate::capture::DEFAULT_SNAPLEN), limit = None))]
    fn start_capture(&self, py: Python<'_>, path: std::path::PathBuf, snaplen: U32, limit: Option<U64>) -> PyResult<()> {
        let cfg = super::capture::config(snaplen, limit);
        let server = self.server.clone();
        py.detach(move || server.start_capture(&path, cfg)).map_err(to_py)
    }

    /// Completes the capture file; its report (see `Session.stop_capture`), or None when
    /// the server does not capture.
    fn finish_capture<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let server = self.server.clone();
        let report = py.detach(move || server.finish_capture());
        report.map(|r| super::capture::report_dict(py, &r)).transpose()
    }

    /// What the server is doing: dict(connected, connections, sessions_started, running,
    /// features, protocol_features, status, guest_memory_bytes, queues, events, capture).
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let server = self.server.clone();
        let r = py.detach(move || server.report());
        let d = PyDict::new(py);
        d.set_item("connected", r.connected)?;
        d.set_item("connections", r.connections)?;
        d.set_item("sessions_started", r.sessions_started)?;
        d.set_item("running", r.running)?;
        d.set_item("features", r.features)?;
        d.set_item("protocol_features", r.protocol_features)?;
        d.set_item("status", r.status)?;
        d.set_item("guest_memory_bytes", r.guest_memory_bytes)?;
        let queues = r
            .queues
            .iter()
            .map(|q| {
                let qd = PyDict::new(py);
                qd.set_item("index", q.index)?;
                qd.set_item("mode", q.mode.name())?;
                for (k, v) in &q.stats {
                    qd.set_item(*k, v)?;
                }
                let fault = q.fault.as_ref().map(|f| {
                    let fd = PyDict::new(py);
                    fd.set_item("queue", f.queue)?;
                    fd.set_item("kind", f.kind().name())?;
                    fd.set_item("rule", f.rule())?;
                    fd.set_item("message", f.to_string())?;
                    Ok::<_, PyErr>(fd)
                });
                qd.set_item("fault", fault.transpose()?)?;
                Ok(qd)
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("queues", queues)?;
        d.set_item("events", r.events)?;
        d.set_item("capture", r.capture.map(|c| super::capture::report_dict(py, &c)).transpose()?)?;
        Ok(d)
    }
}
