//! The one place where Rust errors become Python exceptions: svq's own hierarchy under
//! `SvqError`, OS failures as `OSError` with their errno (Python picks the subclass),
//! bad arguments as `ValueError`, timeouts as `TimeoutError`. A broken queue's exception
//! carries the typed fault as attributes: `queue`, `kind` and `rule` (a stable name
//! orchestration code branches on).

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use crate::bounce::BounceError;
use crate::capture::CaptureError;
use crate::device::DeviceError;
use crate::dma::DmaError;
use crate::fault::{FaultKind, QueueFault};
use crate::front::driver::DriverError;
use crate::front::external::FrontError;
use crate::mem::MemError;
use crate::session::SessionError;
use crate::shadow::InjectError as RustInjectError;

create_exception!(svq, SvqError, PyException, "Base class of svq's own errors.");
create_exception!(svq, NegotiationError, SvqError, "The device lacks or refused what svq needs.");
create_exception!(svq, SessionClosedError, SvqError, "The session was closed.");
create_exception!(svq, DeviceBusyError, SvqError, "Another session owns the device.");
create_exception!(svq, GuestMemoryError, SvqError, "Guest memory is exhausted or an access is outside it.");
create_exception!(svq, QueueBrokenError, SvqError, "A queue stopped because a peer broke the virtio protocol.");
create_exception!(svq, GuestProtocolError, QueueBrokenError, "The guest wrote an invalid chain or index.");
create_exception!(svq, DeviceProtocolError, QueueBrokenError, "The device wrote an invalid used entry.");
create_exception!(svq, DeviceNeedsResetError, QueueBrokenError, "The device entered NEEDS_RESET.");
create_exception!(svq, ElementTooLargeError, QueueBrokenError, "An element can never fit the shadow ring.");
create_exception!(svq, InjectError, SvqError, "An injected element failed (the queue broke or stopped, or a map failed).");
create_exception!(svq, RestoreError, SvqError, "A command restoring a saved state was refused or failed.");
create_exception!(svq, StateError, SvqError, "A saved device state is malformed, of another version, or does not fit the device or guest.");

/// Sets the typed fault's attributes on an exception.
fn with_fault(e: PyErr, f: &QueueFault) -> PyErr {
    Python::attach(|py| {
        let v = e.value(py);
        let _ = v.setattr("queue", f.queue);
        let _ = v.setattr("kind", f.kind().name());
        let _ = v.setattr("rule", f.rule());
    });
    e
}

/// A broken queue: the subclass of `QueueBrokenError` naming who broke it.
pub(super) fn fault_err(f: QueueFault) -> PyErr {
    let msg = f.to_string();
    let e = match f.kind() {
        FaultKind::Guest => GuestProtocolError::new_err(msg),
        FaultKind::DeviceProtocol => DeviceProtocolError::new_err(msg),
        FaultKind::DeviceNeedsReset => DeviceNeedsResetError::new_err(msg),
        FaultKind::TooLarge => ElementTooLargeError::new_err(msg),
        FaultKind::Internal => QueueBrokenError::new_err(msg),
    };
    with_fault(e, &f)
}

/// An injected element that failed.
pub(super) fn inject_err(e: RustInjectError) -> PyErr {
    match e {
        RustInjectError::Closed => SessionClosedError::new_err("session is closed"),
        RustInjectError::Invalid(m) => PyValueError::new_err(m),
        RustInjectError::Broken(f) => {
            let msg = format!("injected element failed: {f}");
            with_fault(InjectError::new_err(msg), &f)
        }
        e @ (RustInjectError::Stopped { .. } | RustInjectError::NoBuffer { .. }) => InjectError::new_err(e.to_string()),
    }
}

/// The one place where Rust errors become Python exceptions.
pub(super) fn to_py(e: SessionError) -> PyErr {
    match e {
        SessionError::Device(d) => device_err(d),
        SessionError::Driver(d) => driver_err(d),
        SessionError::Dma(e) => dma_err(e),
        SessionError::Bounce(BounceError::Dma(e)) => dma_err(e),
        SessionError::Bounce(BounceError::Mem(m)) => mem_err(m),
        SessionError::Invalid(m) => PyValueError::new_err(m),
        SessionError::Busy => DeviceBusyError::new_err(e.to_string()),
        e @ SessionError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        SessionError::Injected(e) => inject_err(e),
        e @ SessionError::Restore { .. } => RestoreError::new_err(e.to_string()),
        e @ SessionError::State(_) => StateError::new_err(e.to_string()),
        SessionError::Mem(e) => mem_err(e),
        SessionError::Front(FrontError::Mem(e)) => mem_err(e),
        e @ SessionError::Front(FrontError::Queue { .. }) => PyValueError::new_err(e.to_string()),
        SessionError::Negotiation(m) => NegotiationError::new_err(m),
        SessionError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        SessionError::Closed => SessionClosedError::new_err("session is closed"),
        SessionError::Capture(e) => capture_err(e),
    }
}

/// A capture file that cannot be written is an `OSError` with its errno.
pub(super) fn capture_err(e: CaptureError) -> PyErr {
    match &e {
        CaptureError::Io { source, .. } => PyOSError::new_err((source.raw_os_error().unwrap_or(0), e.to_string())),
        CaptureError::Invalid(m) => PyValueError::new_err(m.clone()),
    }
}

fn dma_err(e: DmaError) -> PyErr {
    match e {
        DmaError::Device(d) => device_err(d),
        e @ DmaError::Iova(_) => GuestMemoryError::new_err(e.to_string()),
    }
}

pub(super) fn device_err(e: DeviceError) -> PyErr {
    match &e {
        // OSError(errno, msg) becomes the matching subclass (FileExistsError, ...).
        DeviceError::Os { errno, .. } => PyOSError::new_err((*errno as i32, e.to_string())),
        DeviceError::Unsupported(_) => NegotiationError::new_err(e.to_string()),
        DeviceError::NotVhostVdpa { .. } => PyValueError::new_err(e.to_string()),
    }
}

pub(super) fn mem_err(e: MemError) -> PyErr {
    match e {
        MemError::Layout(m) => PyValueError::new_err(m),
        e @ MemError::File { .. } => PyValueError::new_err(e.to_string()),
        MemError::Os { op, errno } => PyOSError::new_err((errno as i32, format!("{op}: {}", errno.desc()))),
        e @ MemError::OutOfBounds { .. } => GuestMemoryError::new_err(e.to_string()),
    }
}

pub(super) fn driver_err(e: DriverError) -> PyErr {
    match e {
        DriverError::Broken(f) => fault_err(f),
        DriverError::Used { queue, source } => fault_err(QueueFault { queue, fault: source.into() }),
        e @ DriverError::Timeout { .. } => PyTimeoutError::new_err(e.to_string()),
        e @ (DriverError::NoQueue(_) | DriverError::TooLong(_) | DriverError::Invalid(_)) => PyValueError::new_err(e.to_string()),
        e @ (DriverError::NoMemory(_) | DriverError::RingFull(_)) => GuestMemoryError::new_err(e.to_string()),
        DriverError::Mem(m) => mem_err(m),
    }
}

/// Registers the exception types on the module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("SvqError", py.get_type::<SvqError>())?;
    m.add("NegotiationError", py.get_type::<NegotiationError>())?;
    m.add("SessionClosedError", py.get_type::<SessionClosedError>())?;
    m.add("DeviceBusyError", py.get_type::<DeviceBusyError>())?;
    m.add("GuestMemoryError", py.get_type::<GuestMemoryError>())?;
    m.add("QueueBrokenError", py.get_type::<QueueBrokenError>())?;
    m.add("GuestProtocolError", py.get_type::<GuestProtocolError>())?;
    m.add("DeviceProtocolError", py.get_type::<DeviceProtocolError>())?;
    m.add("DeviceNeedsResetError", py.get_type::<DeviceNeedsResetError>())?;
    m.add("ElementTooLargeError", py.get_type::<ElementTooLargeError>())?;
    m.add("InjectError", py.get_type::<InjectError>())?;
    m.add("RestoreError", py.get_type::<RestoreError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("FAULT_RULES", crate::fault::Fault::RULES.to_vec())?;
    Ok(())
}
