//! virtio-net behaviour of the embedded device, matching the kernel's `vdpa_sim_net`:
//! TX frames loop back to RX through the same filter (broadcast, multicast and the
//! configured MAC pass; other frames complete with length 0 and are dropped), and the
//! control queue handles MAC_ADDR_SET.

use super::{SimKind, SimState};

/// virtio-net feature bits (virtio spec 5.1.3).
pub mod feature {
    /// Device reports its MTU.
    pub const MTU: u32 = 3;
    /// Device has a MAC in config space.
    pub const MAC: u32 = 5;
    /// Link status in config space.
    pub const STATUS: u32 = 16;
    /// Control queue.
    pub const CTRL_VQ: u32 = 17;
    /// MAC_ADDR_SET through the control queue.
    pub const CTRL_MAC_ADDR: u32 = 23;
    /// Any framing of headers and data.
    pub const ANY_LAYOUT: u32 = 27;
}

pub(super) const FEATURES: u64 = (1 << feature::MTU)
    | (1 << feature::MAC)
    | (1 << feature::STATUS)
    | (1 << feature::CTRL_VQ)
    | (1 << feature::CTRL_MAC_ADDR)
    | (1 << feature::ANY_LAYOUT);

pub(super) const RX_QUEUE: usize = 0;
pub(super) const TX_QUEUE: usize = 1;
pub(super) const CTRL_QUEUE: usize = 2;

/// `struct virtio_net_hdr_v1` (VERSION_1 is required, so always 12 bytes).
pub const NET_HDR_LEN: usize = 12;
/// Bytes the device reads of one TX frame (the kernel simulator's page-sized buffer).
const TX_BUFFER: usize = 4096;

const CTRL_MAC: u8 = 1;
const CTRL_MAC_ADDR_SET: u8 = 1;
const ACK_OK: u8 = 0;
const ACK_ERR: u8 = 1;

/// Config space: mac[6], status u16, max_virtqueue_pairs u16, mtu u16, speed u32,
/// duplex u8, rss fields... (24 bytes, as the kernel simulator reports).
pub(super) fn config(mac: &[u8; 6], mtu: u16) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0..6].copy_from_slice(mac);
    c[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
    c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
    c[10..12].copy_from_slice(&mtu.to_le_bytes());
    c
}

fn passes_filter(frame: &[u8], mac: &[u8; 6]) -> bool {
    if frame.len() < NET_HDR_LEN + 6 {
        return false;
    }
    let dst = &frame[NET_HDR_LEN..NET_HDR_LEN + 6];
    // Broadcast is a multicast address too: the group bit is the low bit of byte 0.
    dst[0] & 1 == 1 || dst == mac
}

pub(super) fn process(st: &mut SimState) {
    loopback(st);
    control(st);
}

/// Moves TX frames to RX buffers until TX is empty or RX has no buffer.
fn loopback(st: &mut SimState) {
    let mac = match st.kind {
        SimKind::Net { mac, .. } => mac,
        SimKind::Blk { .. } => return,
    };
    loop {
        // Take one TX frame.
        let popped = st.with_ring(TX_QUEUE, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            view.gather(&chain.out, TX_BUFFER, buf).map_err(|e| e.to_string())?;
            stats.tx_packets += 1;
            Ok(Some(chain.head))
        });
        let Some(Some(tx_head)) = popped else { break };
        let frame = std::mem::take(&mut st.scratch);
        let mut delivered = false;
        let mut overrun = false;
        if passes_filter(&frame, &mac) {
            let res = st.with_ring(RX_QUEUE, |r, view, chain, _, stats| {
                if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                    stats.rx_overruns += 1;
                    return Ok(false);
                }
                let written = view.scatter(&chain.inn, &frame).map_err(|e| e.to_string())?;
                r.push_used(chain.head, written as u32);
                stats.rx_packets += 1;
                Ok(true)
            });
            match res {
                Some(true) => delivered = true,
                Some(false) => overrun = true,
                None => {
                    st.scratch = frame;
                    return;
                }
            }
        } else {
            st.stats.rx_drops += 1;
        }
        st.scratch = frame;
        if let Some(r) = st.queues[TX_QUEUE].reader.as_mut() {
            r.push_used(tx_head, 0);
        }
        st.complete(TX_QUEUE);
        if delivered {
            st.complete(RX_QUEUE);
        }
        if overrun {
            // Like the kernel simulator: the frame is lost and TX waits for the next kick.
            break;
        }
    }
}

/// Answers control commands: MAC_ADDR_SET is applied to config space, the rest is ERR.
fn control(st: &mut SimState) {
    if st.features & (1 << feature::CTRL_VQ) == 0 {
        return;
    }
    loop {
        let mut new_mac = None;
        let done = st.with_ring(CTRL_QUEUE, |r, view, chain, buf, stats| {
            if !r.pop(&view, chain).map_err(|e| e.to_string())? {
                return Ok(false);
            }
            view.gather(&chain.out, 4096, buf).map_err(|e| e.to_string())?;
            let ack = match buf.as_slice() {
                [CTRL_MAC, CTRL_MAC_ADDR_SET, rest @ ..] if rest.len() == 6 => {
                    new_mac = Some(<[u8; 6]>::try_from(rest).unwrap_or_default());
                    ACK_OK
                }
                _ => ACK_ERR,
            };
            let written = view.scatter(&chain.inn, &[ack]).map_err(|e| e.to_string())?;
            r.push_used(chain.head, written as u32);
            stats.ctrl_commands += 1;
            Ok(true)
        });
        if let (Some(m), SimKind::Net { mac, .. }) = (new_mac, &mut st.kind) {
            *mac = m;
        }
        if done != Some(true) {
            break;
        }
        st.complete(CTRL_QUEUE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_the_kernel_simulator() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frame = |dst: [u8; 6]| {
            let mut f = vec![0u8; NET_HDR_LEN];
            f.extend_from_slice(&dst);
            f.extend_from_slice(&[0u8; 50]);
            f
        };
        assert!(passes_filter(&frame(mac), &mac));
        assert!(passes_filter(&frame([0xff; 6]), &mac));
        assert!(passes_filter(&frame([0x01, 0, 0x5e, 0, 0, 1]), &mac));
        assert!(!passes_filter(&frame([0x52, 0x54, 0, 0x12, 0x34, 0x57]), &mac));
        assert!(!passes_filter(&[0u8; 17], &mac));
    }
}
