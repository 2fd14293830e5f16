//! virtio-net behaviour of the embedded device. Like the kernel's `vdpa_sim_net`, TX
//! frames loop back to RX through a filter that, from reset, passes broadcast, multicast
//! and the configured MAC (other frames complete with length 0 and are dropped), and
//! MAC_ADDR_SET changes the config-space MAC. Beyond the kernel simulator, the control
//! queue implements every command class of the virtio spec that the device offers (RX
//! modes, MAC table, VLAN filter, announce, MQ pairs, guest offloads) and the filter
//! honours them; RSS and hash configuration are refused with ERR. With several queue
//! pairs, a frame sent on TX k comes back on RX k, for the pairs MQ_VQ_PAIRS_SET put in
//! use (pair 0 alone before it, as the spec says).

use super::{SimKind, SimState};
use crate::net::{Command, NetState, RxMode, ACK_ERR, ACK_OK};
use crate::virtio::net_feature as feature;

pub(super) const FEATURES: u64 = (1 << feature::MTU)
    | (1 << feature::MAC)
    | (1 << feature::STATUS)
    | (1 << feature::CTRL_VQ)
    | (1 << feature::CTRL_MAC_ADDR)
    | (1 << feature::ANY_LAYOUT)
    | (1 << feature::CTRL_GUEST_OFFLOADS)
    | (1 << feature::CTRL_RX)
    | (1 << feature::CTRL_VLAN)
    | (1 << feature::CTRL_RX_EXTRA)
    | (1 << feature::GUEST_ANNOUNCE)
    | (1 << feature::MQ);

/// Queue pairs the embedded device can have.
pub(super) const MAX_PAIRS: u16 = 8;

/// The control queue's index with `pairs` queue pairs.
pub(super) fn ctrl_queue(pairs: u16) -> usize {
    2 * usize::from(pairs)
}

/// `struct virtio_net_hdr_v1` (VERSION_1 is required, so always 12 bytes).
pub const NET_HDR_LEN: usize = 12;
/// Bytes the device reads of one TX frame (the kernel simulator's page-sized buffer).
const TX_BUFFER: usize = 4096;

/// Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16, then zeroes up
/// to 24 bytes (the size the kernel simulator reports).
pub(super) fn config(mac: &[u8; 6], mtu: u16, pairs: u16) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0..6].copy_from_slice(mac);
    c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
    c[8..10].copy_from_slice(&pairs.to_le_bytes());
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

/// Whether a looped-back frame reaches RX. Without CTRL_RX the filter is fixed (the
/// kernel simulator's); with it, the RX modes and MAC tables decide; with CTRL_VLAN a
/// tagged frame needs its VLAN id in the filter.
fn passes_filter(frame: &[u8], mac: &[u8; 6], st: &NetState, rx_ctrl: bool, vlan_ctrl: bool) -> bool {
    if frame.len() < NET_HDR_LEN + 6 {
        return false;
    }
    let dst: [u8; 6] = frame[NET_HDR_LEN..NET_HDR_LEN + 6].try_into().unwrap_or_default();
    let on = |m: RxMode| st.rx[m as usize];
    let broadcast = dst == [0xff; 6];
    // The group bit is the low bit of byte 0 (broadcast is a multicast address too).
    let multicast = dst[0] & 1 == 1;
    let addressed = if !rx_ctrl {
        multicast || dst == *mac
    } else if on(RxMode::Promisc) {
        true
    } else if broadcast {
        !on(RxMode::NoBcast)
    } else if multicast {
        !on(RxMode::NoMulti) && (on(RxMode::AllMulti) || st.multicast.contains(&dst))
    } else {
        !on(RxMode::NoUni) && (on(RxMode::AllUni) || dst == *mac || st.unicast.contains(&dst))
    };
    let tagged = frame.len() >= NET_HDR_LEN + 16 && frame[NET_HDR_LEN + 12..NET_HDR_LEN + 14] == [0x81, 0x00];
    if addressed && vlan_ctrl && tagged {
        let vid = u16::from_be_bytes([frame[NET_HDR_LEN + 14], frame[NET_HDR_LEN + 15]]) & 0x0fff;
        return st.vlans.contains(vid);
    }
    addressed
}

pub(super) fn process(st: &mut SimState) {
    let SimKind::Net { pairs, .. } = st.kind else { return };
    // Before MQ_VQ_PAIRS_SET only pair 0 is in use.
    let active = if st.has(feature::MQ) { st.net.mq_pairs.clamp(1, pairs) } else { 1 };
    for pair in 0..usize::from(active) {
        loopback(st, 2 * pair + 1, 2 * pair);
    }
    control(st, ctrl_queue(pairs));
}

/// Moves frames of TX queue `tx` to buffers of RX queue `rx` until TX is empty or RX
/// has no buffer.
fn loopback(st: &mut SimState, tx: usize, rx: usize) {
    let (mac, echo) = match st.kind {
        SimKind::Net { mac, echo, .. } => (mac, echo),
        SimKind::Blk { .. } => return,
    };
    loop {
        // Take one TX frame.
        let popped = st.with_ring(tx, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            view.gather(&chain.out, TX_BUFFER, buf).map_err(|e| e.to_string())?;
            stats.tx_packets += 1;
            Ok(Some(chain.head))
        });
        let Some(Some(tx_head)) = popped else { break };
        let sent = std::mem::take(&mut st.scratch);
        // An echo responder answers (or ignores) the frame; a loopback returns it.
        let reply = echo.map(|e| e.reply(&sent));
        let frame = match &reply {
            Some(Some(r)) => r.as_slice(),
            Some(None) => &[][..],
            None => sent.as_slice(),
        };
        let mut delivered = false;
        let mut overrun = false;
        let (rx_ctrl, vlan_ctrl) = (st.has(feature::CTRL_RX), st.has(feature::CTRL_VLAN));
        if passes_filter(frame, &mac, &st.net, rx_ctrl, vlan_ctrl) {
            let res = st.with_ring(rx, |r, view, chain, _, stats| {
                if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                    stats.rx_overruns += 1;
                    return Ok(false);
                }
                let written = view.scatter(&chain.inn, frame).map_err(|e| e.to_string())?;
                r.push_used(chain.head, written as u32);
                stats.rx_packets += 1;
                Ok(true)
            });
            match res {
                Some(true) => delivered = true,
                Some(false) => overrun = true,
                None => {
                    st.scratch = sent;
                    return;
                }
            }
        } else {
            st.stats.rx_drops += 1;
        }
        st.scratch = sent;
        if let Some(r) = st.queues[tx].reader.as_mut() {
            r.push_used(tx_head, 0);
        }
        st.complete(tx);
        if delivered {
            st.complete(rx);
        }
        if overrun {
            // Like the kernel simulator: the frame is lost and TX waits for the next kick.
            break;
        }
    }
}

/// Whether the device takes `cmd` with the negotiated features.
fn supported(st: &SimState, cmd: &Command) -> bool {
    let pairs = match st.kind {
        SimKind::Net { pairs, .. } => pairs,
        SimKind::Blk { .. } => 1,
    };
    let has = |bit| st.has(bit);
    match cmd {
        Command::Rx(RxMode::Promisc | RxMode::AllMulti, _) | Command::MacTable { .. } => has(feature::CTRL_RX),
        Command::Rx(..) => has(feature::CTRL_RX_EXTRA),
        Command::MacAddr(_) => has(feature::CTRL_MAC_ADDR),
        Command::VlanAdd(_) | Command::VlanDel(_) => has(feature::CTRL_VLAN),
        Command::AnnounceAck => has(feature::GUEST_ANNOUNCE),
        Command::MqPairs(n) => has(feature::MQ) && (1..=pairs).contains(n),
        // No guest offload feature is offered: only "none" can be set.
        Command::GuestOffloads(o) => has(feature::CTRL_GUEST_OFFLOADS) && *o == 0,
        Command::RssConfig(_) | Command::HashConfig(_) => false,
    }
}

/// Answers control commands: what the device supports is applied and acked OK, the rest
/// (and anything malformed) gets ERR.
fn control(st: &mut SimState, ctrl: usize) {
    if !st.has(feature::CTRL_VQ) {
        return;
    }
    loop {
        let mut cmd = None;
        let done = st.with_ring(ctrl, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(false);
            }
            view.gather(&chain.out, 4096, buf).map_err(|e| e.to_string())?;
            cmd = Some(Command::decode(buf).ok());
            stats.ctrl_commands += 1;
            Ok(true)
        });
        if done != Some(true) {
            break;
        }
        let ack = match cmd.flatten() {
            Some(c) if supported(st, &c) => {
                if let (Command::MacAddr(m), SimKind::Net { mac, .. }) = (&c, &mut st.kind) {
                    *mac = *m;
                }
                st.net.apply(&c);
                ACK_OK
            }
            _ => ACK_ERR,
        };
        let written = st.with_ring(ctrl, |r, view, chain, _, _| {
            let n = view.scatter(&chain.inn, &[ack]).map_err(|e| e.to_string())?;
            r.push_used(chain.head, n as u32);
            Ok(())
        });
        if written.is_none() {
            break;
        }
        st.complete(ctrl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f.extend_from_slice(&dst);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        if let Some(v) = vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(&[0u8; 50]);
        f
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    #[test]
    fn filter_from_reset_matches_the_kernel_simulator() {
        let st = NetState::default();
        for rx_ctrl in [false, true] {
            let pass = |d| passes_filter(&frame(d, None), &MAC, &st, rx_ctrl, false);
            assert!(pass(MAC));
            assert!(pass([0xff; 6]));
            assert!(pass([0x01, 0, 0x5e, 0, 0, 1]));
            assert!(!pass([0x52, 0x54, 0, 0x12, 0x34, 0x57]));
        }
        assert!(!passes_filter(&[0u8; 17], &MAC, &st, false, false));
    }

    #[test]
    fn rx_modes_tables_and_vlans() {
        let mut st = NetState::default();
        let pass = |st: &NetState, d, vlan| passes_filter(&frame(d, vlan), &MAC, st, true, true);
        let other = [2, 9, 9, 9, 9, 9];
        let group = [0x01, 0, 0x5e, 0, 0, 7];
        st.apply(&Command::Rx(RxMode::Promisc, true));
        assert!(pass(&st, other, None));
        st.apply(&Command::Rx(RxMode::Promisc, false));
        st.apply(&Command::MacTable { unicast: vec![other], multicast: vec![group] });
        st.apply(&Command::Rx(RxMode::AllMulti, false));
        assert!(pass(&st, other, None) && pass(&st, group, None));
        assert!(!pass(&st, [0x01, 0, 0x5e, 0, 0, 8], None));
        st.apply(&Command::Rx(RxMode::NoBcast, true));
        assert!(!pass(&st, [0xff; 6], None));
        st.apply(&Command::Rx(RxMode::NoUni, true));
        assert!(!pass(&st, MAC, None));
        st.apply(&Command::Rx(RxMode::NoUni, false));
        assert!(!pass(&st, MAC, Some(5)), "VLAN 5 not in the filter");
        st.apply(&Command::VlanAdd(5));
        assert!(pass(&st, MAC, Some(5)));
    }
}
