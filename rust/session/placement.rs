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

/// Decisions taken before anything is set up.
pub(super) struct Plan {
    pub(super) modes: Vec<Mode>,
    pub(super) asids: Vec<u32>,
    pub(super) cvq: Option<CvqInfo>,
    pub(super) cvq_group: u32,
    pub(super) data_queues: Vec<u32>,
}

impl Session {
    /// Per-queue modes and address spaces, and the control queue's place.
    pub(super) fn plan(&self, cfg: &SessionConfig, id: u32, acked_backend: u64) -> Result<Plan, SessionError> {
        let dev = &self.device;
        let n = self.num_queues;
        if let Some((q, _)) = cfg.queue_modes.iter().find(|(q, _)| *q >= n) {
            return Err(SessionError::Invalid(format!("queue {q} does not exist (the device has {n})")));
        }
        let mut modes: Vec<Mode> = (0..n).map(|q| cfg.queue_modes.iter().find(|(i, _)| *i == q).map_or(cfg.mode, |(_, m)| *m)).collect();
        let has_cvq = id == device_id::NET && self.features & (1 << net_feature::CTRL_VQ) != 0;
        let mut plan = Plan { asids: vec![0; n as usize], cvq: None, cvq_group: 0, data_queues: (0..n).collect(), modes: Vec::new() };
        if has_cvq && n > 0 {
            let cvq = n - 1;
            plan.data_queues.retain(|&q| q != cvq);
            let group = dev.queue_group(cvq)?;
            let alone =
                (0..n).filter(|&q| q != cvq).map(|q| dev.queue_group(q)).collect::<Result<Vec<_>, _>>()?.iter().all(|&g| g != group);
            let isolated = cfg.isolate_cvq
                && modes[cvq as usize] == Mode::Copy
                && alone
                && dev.num_address_spaces()? >= 2
                && acked_backend & (1 << bf::IOTLB_ASID) != 0;
            let mut fallback = None;
            if modes[cvq as usize] != Mode::Passthrough
                && !isolated
                && plan.data_queues.iter().any(|&q| modes[q as usize] == Mode::Passthrough)
            {
                // The control queue's buffers would share an address space with guest
                // memory mapped for passthrough: shadow every queue instead.
                for &q in &plan.data_queues {
                    modes[q as usize] = Mode::Translate;
                }
                fallback = Some("the control queue cannot have an address space of its own: every queue is shadowed".into());
            }
            if isolated {
                plan.asids[cvq as usize] = 1;
            }
            plan.cvq_group = group;
            plan.cvq = Some(CvqInfo { queue: cvq, mode: modes[cvq as usize], isolated, asid: plan.asids[cvq as usize], fallback });
        }
        if cfg.restore.is_some() && !plan.cvq.as_ref().is_some_and(|c| c.mode != Mode::Passthrough) {
            return Err(SessionError::Invalid("restoring a state needs a shadowed virtio-net control queue".into()));
        }
        plan.modes = modes;
        Ok(plan)
    }
}
