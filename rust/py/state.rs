//! `svq._native.SavedState`: a stopped session's device state (`Session.save()`), with
//! svq's own guest riding along when the session played it; and the virtio-net state as
//! dicts.

use std::sync::Mutex;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::to_py;
use super::lock;
use crate::migrate::DeviceState;
use crate::net::{NetState, RxMode};
use crate::session::{Saved, SessionError};

/// A saved device state. Resuming it moves the guest it carries into the new session;
/// a resume that fails puts the guest back, ready for another device.
#[pyclass(frozen, module = "svq._native")]
pub(super) struct SavedState {
    inner: Mutex<Inner>,
}

struct Inner {
    state: DeviceState,
    /// svq's own guest, until a session resumes it.
    driver: Option<crate::front::driver::Driver>,
    /// Whether a session took the guest (a second resume is refused).
    taken: bool,
}

impl SavedState {
    pub(super) fn new(saved: Saved) -> Self {
        SavedState { inner: Mutex::new(Inner { state: saved.state, driver: saved.driver, taken: false }) }
    }

    /// The state alone (for an external guest's session).
    pub(super) fn device_state(&self) -> DeviceState {
        lock(&self.inner).state.clone()
    }

    /// Takes the saved state with its guest out, for a session to resume; refuses a
    /// guest another session took already.
    pub(super) fn take_guest(&self) -> Result<Saved, SessionError> {
        let mut g = lock(&self.inner);
        if g.taken {
            return Err(SessionError::Invalid("this saved guest was resumed by another session already".into()));
        }
        let Some(driver) = g.driver.take() else {
            return Err(SessionError::Invalid(
                "this state has no guest of svq's own (it was saved from an external guest, or read from JSON): pass guest= to resume it"
                    .into(),
            ));
        };
        g.taken = true;
        Ok(Saved { state: g.state.clone(), driver: Some(driver) })
    }

    /// Gives back a guest whose resume failed, with where its rings now stand.
    pub(super) fn put_back(&self, saved: Saved) {
        let mut g = lock(&self.inner);
        g.state = saved.state;
        g.driver = saved.driver;
        g.taken = false;
    }

    /// Whether it carries svq's own guest.
    pub(super) fn has_guest(&self) -> bool {
        lock(&self.inner).driver.is_some()
    }
}

#[pymethods]
impl SavedState {
    /// The state as versioned JSON bytes (svq's own guest does not travel this way: its
    /// memory is in this process).
    fn to_json<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &lock(&self.inner).state.to_json())
    }

    /// A state from JSON bytes written by `to_json`, checked for format and version.
    #[staticmethod]
    fn from_json(data: &[u8]) -> PyResult<Self> {
        let state = DeviceState::from_json(data).map_err(|e| to_py(e.into()))?;
        Ok(SavedState { inner: Mutex::new(Inner { state, driver: None, taken: false }) })
    }

    /// dict(version, device_id, features, queues=[dict(index, size, avail, used,
    /// inflight)], net=dict or None).
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = self.device_state();
        let d = PyDict::new(py);
        d.set_item("version", st.version)?;
        d.set_item("device_id", st.device_id)?;
        d.set_item("features", st.features)?;
        let queues = st
            .queues
            .iter()
            .map(|q| {
                let qd = PyDict::new(py);
                qd.set_item("index", q.index)?;
                qd.set_item("size", q.size)?;
                qd.set_item("avail", q.avail)?;
                qd.set_item("used", q.used)?;
                qd.set_item("inflight", q.inflight.clone())?;
                Ok(qd)
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("queues", queues)?;
        d.set_item("net", st.net.as_ref().map(|n| state_to_dict(py, n)).transpose()?)?;
        Ok(d)
    }

    /// Whether it carries svq's own guest (a session resuming it needs no `guest=`).
    #[getter]
    fn carries_guest(&self) -> bool {
        self.has_guest()
    }
}

const RX_NAMES: [&str; 6] = ["promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"];

pub(super) fn state_to_dict<'py>(py: Python<'py>, st: &NetState) -> PyResult<Bound<'py, PyDict>> {
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
    d.set_item("vlans", st.vlans.iter().collect::<Vec<_>>())?;
    Ok(d)
}

fn mac6(v: Vec<u8>) -> PyResult<[u8; 6]> {
    <[u8; 6]>::try_from(v.as_slice()).map_err(|_| PyValueError::new_err(format!("a MAC address is 6 bytes, got {}", v.len())))
}

pub(super) fn state_from_dict(d: &Bound<'_, PyDict>) -> PyResult<NetState> {
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
