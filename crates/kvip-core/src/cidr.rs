use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::model::Family;

/// An IP network in canonical form: the host bits of `addr` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

/// Why a string is not a CIDR (the caller adds the field name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrParseError(pub String);

impl Cidr {
    /// A network from an address and prefix length; fails when the length is too long for the
    /// family or host bits are set.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, CidrParseError> {
        let max = max_len(addr);
        if len > max {
            return Err(CidrParseError(format!(
                "prefix length {len} is longer than {max}"
            )));
        }
        let masked = mask(addr, len);
        if masked != addr {
            return Err(CidrParseError(format!(
                "host bits are set (the network is {masked}/{len})"
            )));
        }
        Ok(Cidr { addr, len })
    }

    /// The network of a single host (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Cidr {
            addr,
            len: max_len(addr),
        }
    }

    /// The smallest network containing `addr` with prefix `len` (host bits cleared).
    pub fn containing(addr: IpAddr, len: u8) -> Self {
        let len = len.min(max_len(addr));
        Cidr {
            addr: mask(addr, len),
            len,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    pub fn is_host(&self) -> bool {
        self.len == max_len(self.addr)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        self.family() == other.family()
            && self.len <= other.len
            && mask(other.addr, self.len) == self.addr
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.contains_net(&Cidr::host(addr))
    }

    /// The last address of the network.
    pub fn last(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        }
    }

    /// Sorts, removes duplicates and networks contained in another one of the list.
    /// The result matches exactly the same addresses as the input.
    pub fn canonicalize(mut list: Vec<Cidr>) -> Vec<Cidr> {
        // Sorting by (family, address, length) puts a containing network before everything it
        // contains, so one pass that keeps the last kept network as reference is enough.
        list.sort_by_key(|c| (c.family(), c.addr, c.len));
        let mut out: Vec<Cidr> = Vec::with_capacity(list.len());
        for c in list {
            match out.last() {
                Some(prev) if prev.contains_net(&c) => {}
                _ => out.push(c),
            }
        }
        out
    }

    /// The smallest single network per family that covers every network of `list` (one
    /// entry for IPv4, one for IPv6, for the families present). Used to summarise per-node pod
    /// ranges into the cluster's pod network.
    pub fn covering(list: &[Cidr]) -> Vec<Cidr> {
        let mut out = Vec::new();
        for fam in [Family::V4, Family::V6] {
            let nets: Vec<&Cidr> = list.iter().filter(|c| c.family() == fam).collect();
            let Some(first) = nets.first() else { continue };
            let mut cover = **first;
            for n in &nets[1..] {
                while !cover.contains_net(n) {
                    cover = Cidr::containing(cover.addr, cover.len.saturating_sub(1));
                    if cover.len == 0 {
                        break;
                    }
                }
            }
            out.push(cover);
        }
        out
    }

    /// The minimal list of networks covering exactly the inclusive range `first..=last`
    /// (both of one family). Used to read interval sets back from the kernel.
    pub fn from_range(first: IpAddr, last: IpAddr) -> Option<Vec<Cidr>> {
        match (first, last) {
            (IpAddr::V4(f), IpAddr::V4(l)) => {
                let (f, l) = (u128::from(u32::from(f)), u128::from(u32::from(l)));
                range_to_prefixes(f, l, 32).map(|v| {
                    v.into_iter()
                        .map(|(a, len)| Cidr {
                            addr: IpAddr::V4(Ipv4Addr::from(a as u32)),
                            len,
                        })
                        .collect()
                })
            }
            (IpAddr::V6(f), IpAddr::V6(l)) => range_to_prefixes(u128::from(f), u128::from(l), 128)
                .map(|v| {
                    v.into_iter()
                        .map(|(a, len)| Cidr {
                            addr: IpAddr::V6(Ipv6Addr::from(a)),
                            len,
                        })
                        .collect()
                }),
            _ => None,
        }
    }
}

fn range_to_prefixes(mut first: u128, last: u128, bits: u8) -> Option<Vec<(u128, u8)>> {
    if first > last {
        return None;
    }
    let mut out = Vec::new();
    loop {
        // Largest block aligned at `first` that does not pass `last`.
        let mut size_bits = if first == 0 {
            u32::from(bits)
        } else {
            first.trailing_zeros().min(u32::from(bits))
        };
        while size_bits > 0 {
            let span = if size_bits >= 128 {
                u128::MAX
            } else {
                (1u128 << size_bits) - 1
            };
            match first.checked_add(span) {
                Some(end) if end <= last => break,
                _ => size_bits -= 1,
            }
        }
        out.push((first, bits - size_bits as u8));
        let span = if size_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << size_bits) - 1
        };
        let end = first + span;
        if end >= last {
            return Some(out);
        }
        first = end + 1;
    }
}

fn max_len(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a host network).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| CidrParseError(format!("{addr_s:?} is not an IP address")))?;
        let len = match len_s {
            None => max_len(addr),
            Some(l) => {
                if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrParseError(format!("{l:?} is not a prefix length")));
                }
                l.parse::<u8>()
                    .map_err(|_| CidrParseError(format!("{l:?} is not a prefix length")))?
            }
        };
        Cidr::new(addr, len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().expect("valid cidr in test")
    }

    #[test]
    fn parses_networks_and_hosts() {
        assert_eq!(c("10.244.0.0/16").to_string(), "10.244.0.0/16");
        assert_eq!(c("10.0.0.1").to_string(), "10.0.0.1/32");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::/0").prefix_len(), 0);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "300.1.1.1/8",
            "10.0.0.0/33",
            "10.0.0.1/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "2001:db8::/129",
            "",
            "/8",
            "abc",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn canonicalize_removes_contained_and_duplicates() {
        let out = Cidr::canonicalize(vec![
            c("10.1.0.0/16"),
            c("10.0.0.0/8"),
            c("10.0.0.0/8"),
            c("192.0.2.0/24"),
            c("2001:db8::/32"),
            c("2001:db8:1::/48"),
        ]);
        let s: Vec<String> = out.iter().map(Cidr::to_string).collect();
        assert_eq!(s, vec!["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]);
    }

    #[test]
    fn covering_summarises_per_family() {
        let out = Cidr::covering(&[
            c("10.244.0.0/24"),
            c("10.244.1.0/24"),
            c("10.244.7.0/24"),
            c("fd00:10:244:1::/64"),
            c("fd00:10:244:2::/64"),
        ]);
        let s: Vec<String> = out.iter().map(Cidr::to_string).collect();
        assert_eq!(s, vec!["10.244.0.0/21", "fd00:10:244::/62"]);
        assert_eq!(Cidr::covering(&[c("10.1.0.0/16")]), vec![c("10.1.0.0/16")]);
        assert!(Cidr::covering(&[]).is_empty());
    }

    #[test]
    fn range_round_trip() {
        let r = Cidr::from_range("10.0.0.0".parse().unwrap(), "10.0.0.255".parse().unwrap());
        assert_eq!(r, Some(vec![c("10.0.0.0/24")]));
        let r = Cidr::from_range("10.0.0.1".parse().unwrap(), "10.0.0.4".parse().unwrap());
        assert_eq!(
            r,
            Some(vec![c("10.0.0.1/32"), c("10.0.0.2/31"), c("10.0.0.4/32")])
        );
        let r = Cidr::from_range(
            "0.0.0.0".parse().unwrap(),
            "255.255.255.255".parse().unwrap(),
        );
        assert_eq!(r, Some(vec![c("0.0.0.0/0")]));
        let r = Cidr::from_range("::".parse().unwrap(), Ipv6Addr::from(u128::MAX).into());
        assert_eq!(r, Some(vec![c("::/0")]));
        assert_eq!(
            c("10.0.0.0/24").last(),
            "10.0.0.255".parse::<IpAddr>().unwrap()
        );
    }
}
