//! Where each queue goes: its mode (with the fallback when the control queue cannot be
//! isolated) and its address space, and where the virtio-net control queue ended up.

use super::{Mode, Session, SessionConfig, SessionError};
use crate::virtio::{backend_feature as bf, device_id, net_feature};

/// Where the virtio-net control queue ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CvqInfo {
    /// Its queue index.
    pub queue: u32,
    /// Its mode.
    pub mode: Mode,
    /// Whether it runs in an address space of its own.
    pub isolated: bool,
    /// Its address space.
    pub asid: u32,
    /// Why the data queues were shadowed although passthrough was asked for.
    pub fallback: Option<String>,
}

/// Decisions taken before anything is set up, for the queues served (by index).
pub(super) struct Plan {
    pub(super) modes: Vec<(u32, Mode)>,
    pub(super) asids: Vec<(u32, u32)>,
    pub(super) cvq: Option<CvqInfo>,
    pub(super) cvq_group: u32,
    pub(super) data_queues: Vec<u32>,
    /// A virtio-net device (its data queues come in RX/TX pairs).
    pub(super) net: bool,
}

impl Plan {
    pub(super) fn mode(&self, q: u32) -> Mode {
        self.modes.iter().find(|(i, _)| *i == q).map_or(Mode::Passthrough, |(_, m)| *m)
    }

    pub(super) fn asid(&self, q: u32) -> u32 {
        self.asids.iter().find(|(i, _)| *i == q).map_or(0, |(_, a)| *a)
    }

    /// The engine lane of every queue served: queues of one group (a virtio-net queue
    /// pair; the control queue; any other queue alone) share a lane, groups go round the
    /// lanes, and there are at most `workers` lanes (zero: one per CPU this process may
    /// run on) and never more than groups.
    pub(super) fn lanes(&self, workers: usize) -> Vec<(u32, usize)> {
        let cvq = self.cvq.as_ref().map(|c| c.queue);
        let group = |q: u32| match () {
            _ if Some(q) == cvq => u32::MAX,
            _ if self.net => q / 2,
            _ => q,
        };
        let mut groups: Vec<u32> = Vec::new();
        for &(q, _) in &self.modes {
            if !groups.contains(&group(q)) {
                groups.push(group(q));
            }
        }
        let workers = if workers == 0 { crate::engine::default_workers() } else { workers };
        let lanes = workers.min(groups.len()).max(1);
        self.modes.iter().map(|&(q, _)| (q, groups.iter().position(|&g| g == group(q)).unwrap_or(0) % lanes)).collect()
    }
}

impl Session {
    /// The virtio-net queue pairs the negotiated features give: max_virtqueue_pairs from
    /// config space with MQ, one without.
    pub(super) fn net_pairs(&self) -> Result<u16, SessionError> {
        if self.features & (1 << net_feature::MQ) == 0 {
            return Ok(1);
        }
        let mut raw = [0u8; 2];
        self.device.config(8, &mut raw)?;
        match u16::from_le_bytes(raw) {
            pairs @ 1..=0x8000 => Ok(pairs),
            pairs => Err(SessionError::Negotiation(format!("max_virtqueue_pairs {pairs} is not within 1..=32768"))),
        }
    }

    /// Per-queue modes and address spaces for the queues in `served`, and the control
    /// queue's place.
    pub(super) fn plan(&self, cfg: &SessionConfig, id: u32, served: &[u32]) -> Result<Plan, SessionError> {
        let dev = &self.device;
        let n = self.device_queues;
        if let Some((q, _)) = cfg.queue_modes.iter().find(|(q, _)| !served.contains(q)) {
            return Err(SessionError::Invalid(if *q >= n {
                format!("queue {q} does not exist (the device has {n})")
            } else {
                format!("queue {q} is not served by this session")
            }));
        }
        let mut modes: Vec<(u32, Mode)> =
            served.iter().map(|&q| (q, cfg.queue_modes.iter().find(|(i, _)| *i == q).map_or(cfg.mode, |(_, m)| *m))).collect();
        let has_cvq = id == device_id::NET && self.features & (1 << net_feature::CTRL_VQ) != 0;
        let net = id == device_id::NET;
        let mut plan = Plan { asids: Vec::new(), cvq: None, cvq_group: 0, data_queues: served.to_vec(), modes: Vec::new(), net };
        if has_cvq && n > 0 {
            // virtio-net: the control queue follows the queue pairs, 2 * max_virtqueue_pairs
            // with MQ, 2 without (spec 5.1.2).
            let cvq = 2 * u32::from(self.net_pairs()?);
            if cvq >= n {
                return Err(SessionError::Negotiation(format!("control queue {cvq} does not exist (the device has {n} queues)")));
            }
            if !served.contains(&cvq) {
                return Err(SessionError::Invalid(format!("CTRL_VQ was negotiated but control queue {cvq} is not served")));
            }
            plan.data_queues.retain(|&q| q != cvq);
            let mode_of = |modes: &[(u32, Mode)], q: u32| modes.iter().find(|(i, _)| *i == q).map_or(Mode::Passthrough, |(_, m)| *m);
            let cvq_mode = mode_of(&modes, cvq);
            let group = dev.queue_group(cvq)?;
            let alone = plan.data_queues.iter().map(|&q| dev.queue_group(q)).collect::<Result<Vec<_>, _>>()?.iter().all(|&g| g != group);
            let isolated = cfg.isolate_cvq
                && cvq_mode == Mode::Copy
                && alone
                && dev.num_address_spaces()? >= 2
                && self.backend_features & (1 << bf::IOTLB_ASID) != 0;
            let mut fallback = None;
            if cvq_mode != Mode::Passthrough && !isolated && plan.data_queues.iter().any(|&q| mode_of(&modes, q) == Mode::Passthrough) {
                // The control queue's buffers would share an address space with guest
                // memory mapped for passthrough: shadow every queue instead.
                for (q, m) in modes.iter_mut() {
                    if *q != cvq {
                        *m = Mode::Translate;
                    }
                }
                fallback = Some("the control queue cannot have an address space of its own: every queue is shadowed".into());
            }
            let asid = u32::from(isolated);
            plan.asids.push((cvq, asid));
            plan.cvq_group = group;
            plan.cvq = Some(CvqInfo { queue: cvq, mode: cvq_mode, isolated, asid, fallback });
        }
        if cfg.restore.is_some() && !plan.cvq.as_ref().is_some_and(|c| c.mode != Mode::Passthrough) {
            return Err(SessionError::Invalid("restoring a state needs a shadowed virtio-net control queue".into()));
        }
        plan.modes = modes;
        Ok(plan)
    }
}
