//! kube-vip's Service annotations, parsed into typed values. A bad value never aborts the
//! parse: it becomes an [`AnnotationProblem`] naming the annotation, the value and the reason,
//! and the rest of the Service is still used.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::cidr::Cidr;
use crate::port::{PortMatch, PortParseError};

/// Every kube-vip annotation starts with this.
pub const PREFIX: &str = "kube-vip.io/";
pub const LOADBALANCER_IPS: &str = "kube-vip.io/loadbalancerIPs";
pub const IGNORE: &str = "kube-vip.io/ignore";
pub const EGRESS: &str = "kube-vip.io/egress";
pub const EGRESS_IPV6: &str = "kube-vip.io/egress-ipv6";
pub const EGRESS_PORTS: &str = "kube-vip.io/egress-destination-ports";
pub const EGRESS_ALLOWED: &str = "kube-vip.io/egress-allowed-networks";
pub const EGRESS_DENIED: &str = "kube-vip.io/egress-denied-networks";
pub const LEASE_NAME: &str = "kube-vip.io/leaseName";
/// Written by the holder (kube-vip compatible).
pub const VIP_HOST: &str = "kube-vip.io/vipHost";
/// Written by the holder: the pod egressing through the IPv4 / IPv6 VIP.
pub const ACTIVE_ENDPOINT: &str = "kube-vip.io/active-endpoint";
pub const ACTIVE_ENDPOINT_IPV6: &str = "kube-vip.io/active-endpoint-ipv6";

/// One bad annotation value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AnnotationProblem {
    pub annotation: String,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for AnnotationProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "annotation {} value {:?}: {}",
            self.annotation, self.value, self.reason
        )
    }
}

/// What kvip reads from a Service's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAnnotations {
    /// `kube-vip.io/loadbalancerIPs`, when present (valid entries only).
    pub loadbalancer_ips: Option<Vec<IpAddr>>,
    pub ignore: bool,
    pub egress: bool,
    pub egress_ipv6: bool,
    pub egress_ports: Option<Vec<PortMatch>>,
    pub egress_allowed: Option<Vec<Cidr>>,
    pub egress_denied: Vec<Cidr>,
    pub lease_name: Option<String>,
    pub problems: Vec<AnnotationProblem>,
}

/// kube-vip's boolean annotations: an empty value is false.
fn flag(value: &str) -> Option<bool> {
    let v = value.trim();
    if v.is_empty() {
        return Some(false);
    }
    crate::config::parse_bool(v)
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl ServiceAnnotations {
    pub fn parse(annotations: &BTreeMap<String, String>) -> ServiceAnnotations {
        let mut out = ServiceAnnotations::default();
        let mut problems = Vec::new();
        let mut bad = |annotation: &str, value: &str, reason: String| {
            problems.push(AnnotationProblem {
                annotation: annotation.to_string(),
                value: value.to_string(),
                reason,
            })
        };
        let get = |k: &str| annotations.get(k).map(String::as_str);
        for (key, field) in [(IGNORE, 0), (EGRESS, 1), (EGRESS_IPV6, 2)] {
            if let Some(v) = get(key) {
                match flag(v) {
                    Some(b) => match field {
                        0 => out.ignore = b,
                        1 => out.egress = b,
                        _ => out.egress_ipv6 = b,
                    },
                    None => bad(key, v, "expected true or false".into()),
                }
            }
        }
        if let Some(v) = get(LOADBALANCER_IPS) {
            let mut ips = Vec::new();
            for item in list(v) {
                match item.parse::<IpAddr>() {
                    Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() && !ip.is_loopback() => {
                        ips.push(ip)
                    }
                    Ok(_) => bad(
                        LOADBALANCER_IPS,
                        item,
                        "not a usable unicast address".into(),
                    ),
                    Err(_) => bad(LOADBALANCER_IPS, item, "not an IP address".into()),
                }
            }
            out.loadbalancer_ips = Some(ips);
        }
        if let Some(v) = get(EGRESS_PORTS) {
            let mut ports = Vec::new();
            for item in list(v) {
                match item.parse::<PortMatch>() {
                    Ok(p) => ports.push(p),
                    Err(PortParseError::UnknownProtocol(p)) => bad(
                        EGRESS_PORTS,
                        item,
                        format!("unknown protocol {p:?} (tcp, udp or sctp)"),
                    ),
                    Err(PortParseError::InvalidPort(_, reason)) => {
                        bad(EGRESS_PORTS, item, format!("port {reason}"))
                    }
                }
            }
            // A list whose every entry was bad restricts nothing we could honour: egress for
            // this Service is refused rather than widened to all ports.
            out.egress_ports = Some(ports);
        }
        for (key, allowed) in [(EGRESS_ALLOWED, true), (EGRESS_DENIED, false)] {
            if let Some(v) = get(key) {
                let mut nets = Vec::new();
                for item in list(v) {
                    match item.parse::<Cidr>() {
                        Ok(c) => nets.push(c),
                        Err(e) => bad(key, item, e.0),
                    }
                }
                if allowed {
                    out.egress_allowed = Some(nets);
                } else {
                    out.egress_denied = nets;
                }
            }
        }
        if let Some(v) = get(LEASE_NAME) {
            let v = v.trim();
            if is_dns_subdomain(v) {
                out.lease_name = Some(v.to_string());
            } else {
                bad(
                    LEASE_NAME,
                    v,
                    "not a valid Lease name (lowercase DNS subdomain)".into(),
                );
            }
        }
        out.problems = problems;
        out
    }
}

/// A Kubernetes object name: lowercase RFC 1123 subdomain, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> ServiceAnnotations {
        ServiceAnnotations::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn reads_kube_vip_annotations() {
        let a = parse(&[
            (LOADBALANCER_IPS, "192.0.2.10, 2001:db8::10"),
            (EGRESS, "true"),
            (EGRESS_IPV6, "true"),
            (EGRESS_PORTS, "TCP:80,udp:53,8443"),
            (EGRESS_ALLOWED, "203.0.113.0/24"),
            (EGRESS_DENIED, "198.51.100.0/24,2001:db8:9::/48"),
            (LEASE_NAME, "my-lease"),
        ]);
        assert!(a.problems.is_empty(), "{:?}", a.problems);
        assert_eq!(a.loadbalancer_ips.as_ref().map(Vec::len), Some(2));
        assert!(a.egress && a.egress_ipv6 && !a.ignore);
        let ports: Vec<String> = a
            .egress_ports
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ports, vec!["tcp:80", "udp:53", "tcp:8443"]);
        assert_eq!(a.egress_denied.len(), 2);
        assert_eq!(a.lease_name.as_deref(), Some("my-lease"));
    }

    #[test]
    fn bad_values_are_named_and_the_rest_kept() {
        let a = parse(&[
            (LOADBALANCER_IPS, "192.0.2.10,nope"),
            (EGRESS, "maybe"),
            (EGRESS_PORTS, "tcp:99999,udp:53"),
            (EGRESS_DENIED, "300.1.1.1/8"),
            (LEASE_NAME, "Not_Valid"),
        ]);
        let names: Vec<(&str, &str)> = a
            .problems
            .iter()
            .map(|p| (p.annotation.as_str(), p.value.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (EGRESS, "maybe"),
                (LOADBALANCER_IPS, "nope"),
                (EGRESS_PORTS, "tcp:99999"),
                (EGRESS_DENIED, "300.1.1.1/8"),
                (LEASE_NAME, "Not_Valid"),
            ]
        );
        assert_eq!(
            a.loadbalancer_ips,
            Some(vec!["192.0.2.10".parse().unwrap()])
        );
        assert_eq!(a.egress_ports.map(|p| p.len()), Some(1));
        assert!(a.problems[2].to_string().contains("tcp:99999"));
    }
}
