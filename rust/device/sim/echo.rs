//! The echo responder personality of the embedded net device: instead of looping TX back
//! to RX, the device behaves like a peer host at one IPv4 address. It answers ARP
//! requests for that address and ICMP echo requests sent to it, so a real guest's own IP
//! stack (`ping`) checks every reply: addresses, checksums, identifiers and sequence
//! numbers. Anything else the guest sends is dropped, as a host would ignore it.

use super::net::NET_HDR_LEN;

/// The peer the device plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// Its IPv4 address.
    pub ip: [u8; 4],
    /// Its MAC address.
    pub mac: [u8; 6],
}

/// The MAC the responder uses unless told otherwise (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x5e, 0x00, 0xec, 0x00, 0x01];

const ETH_HDR: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Echo {
    /// The reply to one TX buffer (a virtio-net header, then an Ethernet frame), as an RX
    /// buffer (header included), or None when a host at this address would not answer.
    pub fn reply(&self, tx: &[u8]) -> Option<Vec<u8>> {
        let frame = tx.get(NET_HDR_LEN..)?;
        if frame.len() < ETH_HDR {
            return None;
        }
        let src: [u8; 6] = frame[6..12].try_into().ok()?;
        let body = &frame[ETH_HDR..];
        let (ethertype, payload) = match be16(frame, 12) {
            ETHERTYPE_ARP => (ETHERTYPE_ARP, self.arp(body)?),
            ETHERTYPE_IPV4 => (ETHERTYPE_IPV4, self.icmp(body)?),
            _ => return None,
        };
        let mut out = vec![0u8; NET_HDR_LEN];
        // num_buffers = 1 (virtio_net_hdr_v1): the whole frame is in this buffer.
        out[10] = 1;
        out.extend_from_slice(&src);
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(&payload);
        // Ethernet's minimum frame (without FCS).
        if out.len() < NET_HDR_LEN + 60 {
            out.resize(NET_HDR_LEN + 60, 0);
        }
        Some(out)
    }

    /// An ARP reply to a request for our address.
    fn arp(&self, a: &[u8]) -> Option<Vec<u8>> {
        // htype Ethernet, ptype IPv4, hlen 6, plen 4, op request.
        if a.len() < 28 || a[0..8] != [0, 1, 8, 0, 6, 4, 0, 1] || a[24..28] != self.ip {
            return None;
        }
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        r.extend_from_slice(&self.mac);
        r.extend_from_slice(&self.ip);
        r.extend_from_slice(&a[8..14]); // their hardware address
        r.extend_from_slice(&a[14..18]); // their protocol address
        Some(r)
    }

    /// An ICMP echo reply to a well-formed echo request sent to our address.
    fn icmp(&self, ip: &[u8]) -> Option<Vec<u8>> {
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        let fragmented = be16(ip, 6) & 0x3fff != 0;
        if ihl < 20 || total < ihl + 8 || total > ip.len() || fragmented || ip[9] != 1 || ip[16..20] != self.ip {
            return None;
        }
        if checksum(&ip[..ihl]) != 0 || checksum(&ip[ihl..total]) != 0 || ip[ihl] != 8 {
            // A corrupt header or message, or not an echo request: a host drops it.
            return None;
        }
        let mut r = ip[..total].to_vec();
        r[8] = 64; // TTL
        r[10..12].fill(0);
        r.copy_within(12..16, 16);
        r[12..16].copy_from_slice(&self.ip);
        let hc = checksum(&r[..ihl]);
        r[10..12].copy_from_slice(&hc.to_be_bytes());
        r[ihl] = 0; // echo reply
        r[ihl + 2..ihl + 4].fill(0);
        let ic = checksum(&r[ihl..total]);
        r[ihl + 2..ihl + 4].copy_from_slice(&ic.to_be_bytes());
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const ECHO: Echo = Echo { ip: [10, 0, 0, 2], mac: DEFAULT_MAC };

    fn frame(ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; NET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn ping(to: [u8; 4], seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
        icmp.extend_from_slice(&seq.to_be_bytes());
        icmp.extend_from_slice(payload);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let total = (20 + icmp.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 0, 0, 1];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&to);
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&icmp);
        ip
    }

    #[test]
    fn answers_arp_for_its_address_only() {
        let mut req = vec![0, 1, 8, 0, 6, 4, 0, 1];
        req.extend_from_slice(&GUEST_MAC);
        req.extend_from_slice(&[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        let r = ECHO.reply(&frame(ETHERTYPE_ARP, &req)).unwrap();
        let eth = &r[NET_HDR_LEN..];
        assert_eq!((&eth[0..6], &eth[6..12], be16(eth, 12)), (&GUEST_MAC[..], &DEFAULT_MAC[..], ETHERTYPE_ARP));
        let arp = &eth[ETH_HDR..];
        assert_eq!((be16(arp, 6), &arp[8..14], &arp[14..18], &arp[24..28]), (2, &DEFAULT_MAC[..], &[10, 0, 0, 2][..], &[10, 0, 0, 1][..]));
        req[27] = 3;
        assert!(ECHO.reply(&frame(ETHERTYPE_ARP, &req)).is_none(), "another address");
    }

    #[test]
    fn answers_a_valid_echo_request_with_checksums_that_verify() {
        let r = ECHO.reply(&frame(ETHERTYPE_IPV4, &ping([10, 0, 0, 2], 7, b"abcdefgh"))).unwrap();
        let ip = &r[NET_HDR_LEN + ETH_HDR..];
        assert_eq!(checksum(&ip[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&ip[20..36]), 0, "ICMP checksum");
        assert_eq!((&ip[12..16], &ip[16..20], ip[20], be16(ip, 26)), (&[10, 0, 0, 2][..], &[10, 0, 0, 1][..], 0, 7));
        assert_eq!(&ip[28..36], b"abcdefgh");
        // Not for us, corrupt, or not an echo request: no answer.
        assert!(ECHO.reply(&frame(ETHERTYPE_IPV4, &ping([10, 0, 0, 3], 1, b"x"))).is_none());
        let mut bad = ping([10, 0, 0, 2], 1, b"xy");
        bad[29] ^= 0xff;
        assert!(ECHO.reply(&frame(ETHERTYPE_IPV4, &bad)).is_none());
        assert!(ECHO.reply(&frame(0x86dd, &[0; 40])).is_none());
        assert!(ECHO.reply(&[0u8; 5]).is_none());
    }
}
