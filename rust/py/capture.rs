//! Packet capture for the bindings: its settings from Python arguments, its report as a
//! dict, and waiting until a session's taps are in place.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{wait_all_interruptibly, U32, U64};
use super::errors::inject_err;
use crate::capture::{CaptureConfig, CaptureReport};
use crate::shadow::InjectSlot;

/// How long attaching a capture waits for the engine.
const ATTACH_WAIT: Duration = Duration::from_secs(10);

/// The settings: `snaplen` bytes of each frame, the file at most `limit` bytes.
pub(super) fn config(snaplen: U32, limit: Option<U64>) -> CaptureConfig {
    CaptureConfig { snaplen: snaplen.0, limit: limit.map(|l| l.0) }
}

/// Waits (the interpreter released, Ctrl-C answered) until every tap is in place.
pub(super) fn wait_attached(py: Python<'_>, slots: &[Arc<InjectSlot>]) -> PyResult<()> {
    wait_all_interruptibly(py, 0, slots, ATTACH_WAIT)?.into_iter().try_for_each(|r| r.map(drop).map_err(inject_err))
}

/// dict(path, packets, dropped, dropped_limit, dropped_busy, bytes, finished, error,
/// interfaces=[dict(name, packets, dropped)]).
pub(super) fn report_dict<'py>(py: Python<'py>, r: &CaptureReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", r.path.to_string_lossy())?;
    d.set_item("packets", r.packets)?;
    d.set_item("dropped", r.dropped)?;
    d.set_item("dropped_limit", r.dropped_limit)?;
    d.set_item("dropped_busy", r.dropped_busy)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("finished", r.finished)?;
    d.set_item("error", r.error.clone())?;
    let ifaces = r
        .interfaces
        .iter()
        .map(|i| {
            let id = PyDict::new(py);
            id.set_item("name", &i.name)?;
            id.set_item("packets", i.packets)?;
            id.set_item("dropped", i.dropped)?;
            Ok(id)
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("interfaces", ifaces)?;
    Ok(d)
}
