//! Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6) for a VIP, sent on
//! the VIP's interface through an AF_PACKET socket, so that neighbours update their caches
//! when the VIP moves to this node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};

use crate::error::DataplaneError;

/// How many announcements to send when a VIP is acquired, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceConfig {
    pub count: u32,
    pub interval: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            count: 3,
            interval: Duration::from_millis(500),
        }
    }
}

/// A gratuitous ARP request: broadcast, sender and target protocol address both the VIP.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f
}

fn checksum_icmpv6(src: &[u8; 16], dst: &[u8; 16], icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let hi = c[0];
            let lo = c.get(1).copied().unwrap_or(0);
            sum += u32::from(u16::from_be_bytes([hi, lo]));
        }
    };
    add(src);
    add(dst);
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited neighbour advertisement to all nodes (ff02::1): override set, solicited
/// clear, target the VIP, with the target link-layer address option.
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let dst: [u8; 16] = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets();
    let src = vip.octets();
    let mut icmp = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&src);
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let ck = checksum_icmpv6(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&ck.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// The announcement frame for a VIP.
pub fn frame_for(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(a) => garp_frame(mac, a),
        IpAddr::V6(a) => unsolicited_na_frame(mac, a),
    }
}

/// A raw link-layer socket for one interface, opened in the creating thread's namespace.
/// Close-on-exec, so the tools kvip runs (nft, conntrack) do not inherit it.
pub struct LinkSender {
    socket: Socket,
    ifindex: u32,
}

/// The link-layer address (`sockaddr_ll`) of `ifindex` for frames of `ethertype`, sent to
/// `dest` (the first six bytes of the frame).
fn link_addr(ifindex: u32, ethertype: u16, dest: &[u8]) -> Result<SockAddr, DataplaneError> {
    let bad = |what: &str| DataplaneError::PacketSocket {
        op: "addressing a frame",
        ifindex,
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string()),
    };
    let index = i32::try_from(ifindex).map_err(|_| bad("interface index out of range"))?;
    if dest.len() < 6 {
        return Err(bad("frame shorter than an Ethernet header"));
    }
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: SockAddrStorage is a sockaddr_storage, larger than and aligned for sockaddr_ll,
    // and zeroed memory is a valid sockaddr_ll.
    let sll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = index;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dest[..6]);
    sll.sll_protocol = ethertype.to_be();
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the storage holds an initialised sockaddr_ll of `len` bytes.
    Ok(unsafe { SockAddr::new(storage, len) })
}

impl LinkSender {
    pub fn open(ifindex: u32) -> Result<Self, DataplaneError> {
        // Protocol 0 (none): the socket only sends, it receives nothing.
        let socket = Socket::new(Domain::PACKET, Type::RAW.cloexec(), None).map_err(|source| {
            DataplaneError::PacketSocket {
                op: "opening",
                ifindex,
                source,
            }
        })?;
        Ok(LinkSender { socket, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> Result<(), DataplaneError> {
        let ethertype = match frame.get(12..14) {
            Some(t) => u16::from_be_bytes([t[0], t[1]]),
            None => 0,
        };
        let addr = link_addr(self.ifindex, ethertype, frame)?;
        self.socket
            .send_to(frame, &addr)
            .map_err(|source| DataplaneError::PacketSocket {
                op: "sending an announcement",
                ifindex: self.ifindex,
                source,
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn na_checksum_verifies() {
        let f = unsolicited_na_frame([2, 0, 0, 0, 0, 1], "2001:db8::10".parse().unwrap());
        let src: [u8; 16] = f[22..38].try_into().unwrap();
        let dst: [u8; 16] = f[38..54].try_into().unwrap();
        assert_eq!(checksum_icmpv6(&src, &dst, &f[54..]), 0);
        assert_eq!(f.len(), 14 + 40 + 32);
    }

    #[test]
    fn sender_is_close_on_exec() {
        // Opening needs CAP_NET_RAW; where it fails the cause must be the privilege.
        match LinkSender::open(1) {
            Ok(s) => {
                use std::os::fd::AsRawFd;
                let fd = s.socket.as_raw_fd();
                let info =
                    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).expect("fdinfo");
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    .expect("flags in fdinfo");
                assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "flags {flags:o}");
            }
            Err(e) => assert!(e.is_permission_denied(), "{e}"),
        }
    }

    #[test]
    fn garp_layout() {
        let f = garp_frame([2, 0, 0, 0, 0, 1], "192.0.2.10".parse().unwrap());
        assert_eq!(f.len(), 42);
        assert_eq!(&f[28..32], &f[38..42]);
    }
}
