//! `svq._native.Device`: an open device (embedded or kernel), its facts for `svq info`,
//! and the test levers (fault injection, a misbehaving embedded device).

use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::args::{U32, U64};
use super::errors::{device_err, mem_err, SessionClosedError};
use super::lock;
use crate::device::faulty::{FaultInjector, FaultPoint};
use crate::device::sim::SimDevice;
use crate::device::vdpa::VhostVdpa;
use crate::device::{Device as DeviceTrait, DeviceError};

/// An open device, always behind a fault injector (disarmed unless a test arms it); the
/// embedded device is also kept by its own type for what only it can report.
#[derive(Debug, Clone)]
pub(super) struct Backend {
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
    pub(super) fn dyn_device(&self) -> Arc<dyn DeviceTrait> {
        self.device.clone()
    }
}

/// An open device: the embedded one (`sim:net`, `sim:blk`) or a vhost-vdpa character
/// device (a path, or a vdpa device name).
#[pyclass(frozen, module = "svq._native")]
pub(super) struct Device {
    spec: String,
    backend: Mutex<Option<Backend>>,
}

impl Device {
    pub(super) fn backend(&self) -> PyResult<Backend> {
        lock(&self.backend).clone().ok_or_else(|| SessionClosedError::new_err(format!("device {} is closed", self.spec)))
    }
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

/// The MAC written `text` when it is a unicast address (a station address cannot be a group address).
fn unicast(text: &str, spec: &str) -> PyResult<[u8; 6]> {
    let mac = parse_mac(text)?;
    if mac[0] & 1 != 0 {
        return Err(PyValueError::new_err(format!("{text} in {spec:?} is a multicast address: a device's MAC must be unicast")));
    }
    Ok(mac)
}

#[pymethods]
impl Device {
    /// Opens `spec`: "sim:net", "sim:blk", a path such as /dev/vhost-vdpa-0, or a vdpa
    /// device name such as "vdpa0". The embedded net device takes options:
    /// "sim:net,mac=52:54:00:12:34:56,mtu=1500", "pairs=N" for N queue pairs (1..=8, MQ),
    /// and "echo=10.0.0.2[,echo_mac=M]" to play a
    /// peer host answering ARP and ping at that address instead of looping frames back;
    /// blk takes "sim:blk,sectors=N,disk=NAME,latency_us=N": devices naming the same disk
    /// share its data (as hosts share storage, for a migration between them), and with a
    /// latency requests complete out of order, each that long after it was taken.
    #[new]
    #[pyo3(signature = (spec))]
    fn new(py: Python<'_>, spec: String) -> PyResult<Self> {
        let backend = if let Some(rest) = spec.strip_prefix("sim:") {
            let mut parts = rest.split(',');
            let kind = parts.next().unwrap_or("");
            let mut mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
            let mut mtu = 1500u16;
            let mut sectors = 262_144u64;
            let mut echo_ip: Option<[u8; 4]> = None;
            let mut echo_mac = crate::device::sim::echo::DEFAULT_MAC;
            let mut disk_name: Option<String> = None;
            let mut latency = std::time::Duration::ZERO;
            let mut pairs = 1u16;
            if !matches!(kind, "net" | "blk") {
                return Err(PyValueError::new_err(format!("unknown embedded device {spec:?}: use sim:net or sim:blk")));
            }
            let mut seen: Vec<&str> = Vec::new();
            for opt in parts {
                let (k, v) = opt
                    .split_once('=')
                    .ok_or_else(|| PyValueError::new_err(format!("bad option {opt:?} in {spec:?}: options are key=value")))?;
                if seen.contains(&k) {
                    return Err(PyValueError::new_err(format!("option {k:?} given twice in {spec:?}")));
                }
                seen.push(k);
                let num = |v: &str| v.parse::<u64>().map_err(|_| PyValueError::new_err(format!("bad number {v:?} in {spec:?}")));
                // A number within `range`, or an error naming the option and its range.
                let within = |range: std::ops::RangeInclusive<u64>, what: &str| -> PyResult<u64> {
                    let n = num(v)?;
                    if range.contains(&n) {
                        Ok(n)
                    } else {
                        Err(PyValueError::new_err(format!("{k}={n} in {spec:?}: {what} must be {}..={}", range.start(), range.end())))
                    }
                };
                match (kind, k) {
                    ("net", "mac") => mac = unicast(v, &spec)?,
                    ("net", "echo") => {
                        let ip: std::net::Ipv4Addr =
                            v.parse().map_err(|_| PyValueError::new_err(format!("bad IPv4 address {v:?} in {spec:?}")))?;
                        echo_ip = Some(ip.octets());
                    }
                    ("net", "echo_mac") => echo_mac = unicast(v, &spec)?,
                    ("net", "pairs") => pairs = within(1..=8, "the number of queue pairs")? as u16,
                    // The virtio-net MTU range (5.1.4.1).
                    ("net", "mtu") => mtu = within(68..=65_535, "the MTU")? as u16,
                    ("blk", "sectors") => sectors = within(1..=1 << 24, "the disk size in 512-byte sectors")?,
                    ("blk", "disk") if !v.is_empty() => disk_name = Some(v.to_owned()),
                    ("blk", "latency_us") => {
                        latency = std::time::Duration::from_micros(within(0..=10_000_000, "the latency in microseconds")?)
                    }
                    _ => {
                        let known = if kind == "blk" { "sectors, disk, latency_us" } else { "mac, mtu, pairs, echo, echo_mac" };
                        return Err(PyValueError::new_err(format!("unknown or invalid option {opt:?} for sim:{kind} (options: {known})")));
                    }
                }
            }
            let dev = match kind {
                "net" => {
                    let echo = echo_ip.map(|ip| crate::device::sim::echo::Echo { ip, mac: echo_mac });
                    py.detach(|| SimDevice::net_multiqueue(mac, mtu, echo, pairs))
                }
                "blk" => {
                    let disk = match &disk_name {
                        Some(name) => crate::device::sim::blk::Disk::named(name, sectors),
                        None => crate::device::sim::blk::Disk::new(sectors),
                    };
                    py.detach(|| SimDevice::blk_on(disk, latency))
                }
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
    fn config<'py>(&self, py: Python<'py>, offset: U32, length: U32) -> PyResult<Bound<'py, PyBytes>> {
        let (offset, length) = (offset.0, length.0);
        if length > 1 << 16 {
            return Err(PyValueError::new_err(format!("length {length} is larger than any config space")));
        }
        let dev = self.backend()?.dyn_device();
        let mut buf = vec![0u8; length as usize];
        py.detach(|| dev.config(offset, &mut buf)).map_err(device_err)?;
        Ok(PyBytes::new(py, &buf))
    }

    /// The virtio features a guest in front of svq may negotiate with this device: its
    /// class features svq can drive, VERSION_1 and the ring features.
    fn guest_features(&self, py: Python<'_>) -> PyResult<u64> {
        let dev = self.backend()?.dyn_device();
        let (id, features) = py.detach(|| Ok::<_, DeviceError>((dev.device_id()?, dev.features()?))).map_err(device_err)?;
        crate::session::guest_offer(id, features).map_err(super::errors::to_py)
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
    fn probe_map(&self, py: Python<'_>, asid: U32, iova: U64, size: U64) -> PyResult<()> {
        use crate::device::IotlbOp;
        use crate::virtio::Perm;
        let (asid, iova, size) = (asid.0, iova.0, size.0);
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
    fn unmap(&self, py: Python<'_>, asid: U32, iova: U64, size: U64) -> PyResult<()> {
        let (asid, iova, size) = (asid.0, iova.0, size.0);
        let dev = self.backend()?.dyn_device();
        py.detach(|| dev.iotlb(asid, &[crate::device::IotlbOp::Invalidate { iova, size }])).map_err(device_err)
    }

    /// Makes the embedded device break the virtio protocol on `queue` (tests): one of
    /// "used_id_out_of_range", "used_id_not_in_flight", "duplicate_completion",
    /// "used_idx_jump", "used_idx_backwards", "len_too_large", "never_complete",
    /// "needs_reset"; None to behave again.
    #[pyo3(signature = (queue, how))]
    fn misbehave(&self, queue: U32, how: Option<&str>) -> PyResult<()> {
        let queue = queue.0;
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
    fn fail_at(&self, point: &str, n: U64) -> PyResult<()> {
        self.backend()?.device.fail_at(fault_point(point)?, n.0);
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
