//! The egress lab: three namespaces wired like a pod, the node it runs on, and a host outside
//! the cluster, dual-stack.
//!
//! ```text
//!  pod ── eth0 10.244.1.5/24 ─── pod0 10.244.1.1/24 ── node ── eth0 192.0.2.1/24 ─── eth0 192.0.2.100/24 ── ext
//!         fd00:10:244:1::5/64      fd00:10:244:1::1/64          2001:db8:1::1/64       2001:db8:1::100/64
//!                                                                                     lo:   198.51.100.100, 203.0.113.100,
//!                                                                                          2001:db8:2::100, 2001:db8:3::100
//! ```
//! The VIPs (192.0.2.10, 2001:db8:1::10) live on the node's eth0, in the subnet it shares with
//! the external host, as on a real L2 segment. The external host runs a reporter on ports 80,
//! 443 and 8080 (TCP and UDP) of each of its addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::netns::{Netns, NetnsError};
use crate::probe::{Reporter, tcp_seen_source, udp_seen_source};

pub const POD4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5));
pub const POD6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 1, 0, 0, 0, 5));
pub const NODE4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
pub const NODE6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
pub const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
pub const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));
pub const EXT4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100));
pub const EXT6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100));
/// Second and third external destinations (different networks, same host).
pub const DST4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100));
pub const DST4_C: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 100));
pub const DST6_B: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x100));
pub const DST6_C: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x100));
/// Ports the reporter listens on.
pub const PORTS: [u16; 3] = [80, 443, 8080];
/// The node's interface toward the external host, where VIPs go.
pub const NODE_UPLINK: &str = "eth0";

/// A pod, a node and an external host.
pub struct EgressLab {
    pub pod: Netns,
    pub node: Netns,
    pub ext: Netns,
    _reporter: Reporter,
}

impl EgressLab {
    /// Builds the lab. With `masquerade`, the node also has a CNI-like MASQUERADE rule
    /// (iptables, nat POSTROUTING) for pod traffic leaving the pod network.
    pub fn new(tag: &str, masquerade: bool) -> Result<EgressLab, NetnsError> {
        let pod = Netns::new(&format!("{tag}p"))?;
        let node = Netns::new(&format!("{tag}n"))?;
        let ext = Netns::new(&format!("{tag}e"))?;
        pod.veth("eth0", &node, "pod0")?;
        node.veth("eth0", &ext, "eth0")?;
        pod.addr("eth0", "10.244.1.5/24")?;
        pod.addr("eth0", "fd00:10:244:1::5/64")?;
        node.addr("pod0", "10.244.1.1/24")?;
        node.addr("pod0", "fd00:10:244:1::1/64")?;
        node.addr("eth0", "192.0.2.1/24")?;
        node.addr("eth0", "2001:db8:1::1/64")?;
        ext.addr("eth0", "192.0.2.100/24")?;
        ext.addr("eth0", "2001:db8:1::100/64")?;
        for a in [
            "198.51.100.100/32",
            "203.0.113.100/32",
            "2001:db8:2::100/128",
            "2001:db8:3::100/128",
        ] {
            ext.addr("lo", a)?;
        }
        pod.route(&["default", "via", "10.244.1.1"])?;
        pod.route(&["default", "via", "fd00:10:244:1::1"])?;
        node.route(&["198.51.100.0/24", "via", "192.0.2.100"])?;
        node.route(&["203.0.113.0/24", "via", "192.0.2.100"])?;
        node.route(&["2001:db8:2::/64", "via", "2001:db8:1::100"])?;
        node.route(&["2001:db8:3::/64", "via", "2001:db8:1::100"])?;
        ext.route(&["10.244.0.0/16", "via", "192.0.2.1"])?;
        ext.route(&["fd00:10:244::/48", "via", "2001:db8:1::1"])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        if masquerade {
            node.exec_ok(
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    "10.244.0.0/16",
                    "!",
                    "-d",
                    "10.244.0.0/16",
                    "-j",
                    "MASQUERADE",
                ],
            )?;
            node.exec_ok(
                "ip6tables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    "fd00:10:244::/48",
                    "!",
                    "-d",
                    "fd00:10:244::/48",
                    "-j",
                    "MASQUERADE",
                ],
            )?;
        }
        let mut listen = Vec::new();
        for a in [EXT4, EXT6, DST4_B, DST4_C, DST6_B, DST6_C] {
            for p in PORTS {
                listen.push(SocketAddr::new(a, p));
            }
        }
        let reporter = Reporter::start(&ext, &listen)?;
        Ok(EgressLab {
            pod,
            node,
            ext,
            _reporter: reporter,
        })
    }

    /// The source address the external host saw for a TCP connection from the pod.
    pub fn seen_tcp(&self, dst: IpAddr, port: u16) -> Result<IpAddr, NetnsError> {
        tcp_seen_source(&self.pod, SocketAddr::new(dst, port))
    }

    /// The source address the external host saw for a UDP datagram from the pod.
    pub fn seen_udp(&self, dst: IpAddr, port: u16) -> Result<IpAddr, NetnsError> {
        udp_seen_source(&self.pod, SocketAddr::new(dst, port))
    }

    /// Names of the lab's namespaces (for clean-up from a signal handler).
    pub fn namespace_names(&self) -> Vec<String> {
        [&self.pod, &self.node, &self.ext]
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }
}
