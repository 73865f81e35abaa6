//! BGP mode's settings, from kube-vip's variables: the local AS and router ID, the peers
//! (`bgp_peers`, or the single `bgp_peeraddress` peer), the session's source and timers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::config::{ConfigError, Env};

/// kube-vip's default local AS and peer AS.
pub const DEFAULT_AS: u32 = 65000;
/// kube-vip's default hold time and keepalive interval, in seconds.
pub const DEFAULT_HOLD_TIME: u16 = 30;
pub const DEFAULT_KEEPALIVE: u16 = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    /// `bgp_as`.
    pub local_as: u32,
    /// `bgp_routerid`; when unset, `bgp_routerinterface`'s first IPv4 address is used.
    pub router_id: Option<Ipv4Addr>,
    /// `bgp_routerinterface`.
    pub router_interface: Option<String>,
    /// `bgp_sourceip`: the local address sessions are opened from.
    pub source_ip: Option<IpAddr>,
    /// `bgp_sourceif`: the interface sessions are bound to.
    pub source_if: Option<String>,
    /// `bgp_hold_time`, seconds (0: no hold timer, no keepalives; else at least 3).
    pub hold_time: u16,
    /// `bgp_keepalive_interval`, seconds.
    pub keepalive: u16,
    /// `mpbgp_nexthop`: how IPv6 (or IPv4) next hops of the other family are chosen, for
    /// peers that do not say.
    pub mp_next_hop: MpNextHop,
    pub peers: Vec<BgpPeer>,
}

/// The next hop of routes of the other family than the session's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MpNextHop {
    /// The session's source interface's global addresses (kube-vip's `auto_sourceif`;
    /// kvip's default).
    #[default]
    SourceInterface,
    /// The interface holding `bgp_sourceip` (`auto_sourceip`).
    SourceIp,
    /// Given addresses (`fixed`, with `mpbgp_ipv4` / `mpbgp_ipv6` of the peer).
    Fixed {
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
    },
}

#[derive(Clone, PartialEq, Eq)]
pub struct BgpPeer {
    pub address: IpAddr,
    pub remote_as: u32,
    /// TCP MD5 signature key (RFC 2385); `None`: no signature.
    pub password: Option<String>,
    /// eBGP multihop: the session's TTL is 255 rather than 1.
    pub multihop: bool,
    pub port: u16,
    /// The peer's own MP-BGP next-hop choice (`None`: `mpbgp_nexthop`'s).
    pub mp_next_hop: Option<MpNextHop>,
    /// BFD for this peer's session.
    pub bfd: Option<Bfd>,
}

/// The password is never printed.
impl std::fmt::Debug for BgpPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BgpPeer")
            .field("address", &self.address)
            .field("remote_as", &self.remote_as)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("multihop", &self.multihop)
            .field("port", &self.port)
            .field("mp_next_hop", &self.mp_next_hop)
            .field("bfd", &self.bfd)
            .finish()
    }
}

/// BFD timers (RFC 5880): the peer is declared down after `multiplier` intervals without a
/// packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bfd {
    pub receive_interval: Duration,
    pub transmit_interval: Duration,
    pub multiplier: u8,
}

impl Default for Bfd {
    /// kube-vip's defaults: 300 ms × 3.
    fn default() -> Self {
        Bfd {
            receive_interval: Duration::from_millis(300),
            transmit_interval: Duration::from_millis(300),
            multiplier: 3,
        }
    }
}

fn invalid(var: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn parse_as(var: &str, v: &str) -> Result<u32, ConfigError> {
    match v.parse::<u32>() {
        Ok(0) | Err(_) => Err(invalid(
            var,
            v,
            "expected an AS number from 1 to 4294967295",
        )),
        Ok(n) => Ok(n),
    }
}

fn parse_mp_next_hop(
    var: &str,
    v: &str,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
) -> Result<MpNextHop, ConfigError> {
    match v {
        "auto_sourceif" => Ok(MpNextHop::SourceInterface),
        "auto_sourceip" => Ok(MpNextHop::SourceIp),
        "fixed" if v4.is_some() || v6.is_some() => Ok(MpNextHop::Fixed { v4, v6 }),
        "fixed" => Err(invalid(
            var,
            v,
            "fixed needs mpbgp_ipv4 or mpbgp_ipv6 in the peer's options",
        )),
        _ => Err(invalid(
            var,
            v,
            "expected auto_sourceif, auto_sourceip or fixed",
        )),
    }
}

/// `entry` with its password field (the third) replaced by `***`, for error messages.
fn redact(entry: &str) -> String {
    let (head, rest) = match entry.find(']') {
        Some(end) if entry.starts_with('[') => entry.split_at(end + 1),
        _ => match entry.split_once(':') {
            Some((a, _)) if a.parse::<IpAddr>().is_ok() => entry.split_at(a.len()),
            // The fields cannot be told apart (an IPv6 address without brackets, an
            // unnumbered peer): nothing after the first two is shown.
            _ => {
                let mut f = entry.splitn(3, ':');
                let shown: Vec<&str> = f.by_ref().take(2).collect();
                return match f.next() {
                    Some(_) => format!("{}:***", shown.join(":")),
                    None => entry.to_string(),
                };
            }
        },
    };
    // rest: ":AS:password:..."
    let mut f: Vec<&str> = rest.splitn(4, ':').collect();
    if f.len() >= 3 && !f[2].is_empty() {
        f[2] = "***";
    }
    format!("{head}{}", f.join(":"))
}

/// One entry of `bgp_peers`:
/// `address:AS[:password[:multihop[:port[:mpbgp options[:bfd options]]]]]`, the address of an
/// IPv6 peer in brackets; mpbgp options are `key=value` pairs separated by `;`
/// (`mpbgp_nexthop`, `mpbgp_ipv4`, `mpbgp_ipv6`); bfd options are
/// `enable;receive ms;transmit ms;multiplier` (empty fields: the defaults).
pub fn parse_peer(entry: &str) -> Result<BgpPeer, ConfigError> {
    const VAR: &str = "bgp_peers";
    let shown = redact(entry);
    let bad = |reason: &str| invalid(VAR, &shown, reason);
    let (address, rest) = if let Some(r) = entry.strip_prefix('[') {
        let end = r
            .find(']')
            .ok_or_else(|| bad("an IPv6 address needs its closing ]"))?;
        let a: Ipv6Addr = r[..end]
            .parse()
            .map_err(|_| bad("the address in brackets is not an IPv6 address"))?;
        let rest = r[end + 1..]
            .strip_prefix(':')
            .ok_or_else(|| bad("expected :AS after the address"))?;
        (IpAddr::V6(a), rest)
    } else {
        if entry.starts_with("unnumbered:") {
            return Err(bad("unnumbered peers are not supported"));
        }
        let (a, rest) = entry
            .split_once(':')
            .ok_or_else(|| bad("expected address:AS"))?;
        let a: IpAddr = a
            .parse()
            .map_err(|_| bad("the address is not an IP address (IPv6 goes in brackets)"))?;
        (a, rest)
    };
    let f: Vec<&str> = rest.split(':').collect();
    if f.len() > 6 {
        return Err(bad(
            "too many fields: address:AS:password:multihop:port:mpbgp:bfd",
        ));
    }
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let remote_as =
        parse_as(VAR, f[0]).map_err(|_| bad("the AS is not a number from 1 to 4294967295"))?;
    let password = field(1).map(str::to_string);
    if password.as_ref().is_some_and(|p| p.len() > 80) {
        return Err(bad(
            "the password is longer than 80 bytes (TCP MD5's limit)",
        ));
    }
    let multihop = match field(2) {
        None => false,
        Some(m) => {
            crate::config::parse_bool(m).ok_or_else(|| bad("multihop is not true or false"))?
        }
    };
    let port = match field(3) {
        None => 179,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port is not a number from 1 to 65535")),
            Ok(p) => p,
        },
    };
    let mp_next_hop = match field(4) {
        None => None,
        Some(opts) => {
            let (mut kind, mut v4, mut v6) = (None, None, None);
            for kv in opts.split(';').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| bad("an mpbgp option is not key=value"))?;
                match k {
                    "mpbgp_nexthop" => kind = Some(v),
                    "mpbgp_ipv4" if !v.is_empty() => {
                        v4 = Some(
                            v.parse()
                                .map_err(|_| bad("mpbgp_ipv4 is not an IPv4 address"))?,
                        )
                    }
                    "mpbgp_ipv6" if !v.is_empty() => {
                        v6 = Some(
                            v.parse()
                                .map_err(|_| bad("mpbgp_ipv6 is not an IPv6 address"))?,
                        )
                    }
                    "mpbgp_ipv4" | "mpbgp_ipv6" => {}
                    _ => {
                        return Err(bad(
                            "unknown mpbgp option (mpbgp_nexthop, mpbgp_ipv4, mpbgp_ipv6)",
                        ));
                    }
                }
            }
            match kind {
                Some(k) => Some(parse_mp_next_hop(VAR, k, v4, v6).map_err(|e| match e {
                    ConfigError::Invalid { reason, .. } => bad(&reason),
                    other => other,
                })?),
                None if v4.is_some() || v6.is_some() => Some(MpNextHop::Fixed { v4, v6 }),
                None => None,
            }
        }
    };
    let bfd = match field(5) {
        None => None,
        Some(b) => {
            let p: Vec<&str> = b.split(';').collect();
            if p.len() != 4 {
                return Err(bad(
                    "bfd options are enable;receive ms;transmit ms;multiplier",
                ));
            }
            let on = crate::config::parse_bool(p[0])
                .ok_or_else(|| bad("the bfd switch is not true or false"))?;
            let d = Bfd::default();
            let ms = |s: &str, default: Duration| -> Result<Duration, ConfigError> {
                if s.is_empty() {
                    return Ok(default);
                }
                match s.parse::<u64>() {
                    Ok(n) if (10..=60_000).contains(&n) => Ok(Duration::from_millis(n)),
                    _ => Err(bad("a bfd interval is not milliseconds from 10 to 60000")),
                }
            };
            let bfd = Bfd {
                receive_interval: ms(p[1], d.receive_interval)?,
                transmit_interval: ms(p[2], d.transmit_interval)?,
                multiplier: if p[3].is_empty() {
                    d.multiplier
                } else {
                    match p[3].parse::<u8>() {
                        Ok(n) if n >= 1 => n,
                        _ => return Err(bad("the bfd multiplier is not a number from 1 to 255")),
                    }
                },
            };
            on.then_some(bfd)
        }
    };
    if bfd.is_some() && multihop {
        return Err(bad("BFD is single-hop only (RFC 5881): not with multihop"));
    }
    Ok(BgpPeer {
        address,
        remote_as,
        password,
        multihop,
        port,
        mp_next_hop,
        bfd,
    })
}

impl BgpConfig {
    /// `None` when `bgp_enable` is off.
    pub(crate) fn from_env(env: &Env) -> Result<Option<BgpConfig>, ConfigError> {
        if !env.bool("bgp_enable", false)? {
            return Ok(None);
        }
        let local_as = match env.get("bgp_as")? {
            Some(v) => parse_as("bgp_as", &v)?,
            None => DEFAULT_AS,
        };
        let router_id = match env.get("bgp_routerid")? {
            Some(v) => Some(v.parse::<Ipv4Addr>().map_err(|_| {
                invalid(
                    "bgp_routerid",
                    &v,
                    "expected an IPv4 address (the BGP identifier)",
                )
            })?),
            None => None,
        };
        let router_interface = env.get("bgp_routerinterface")?;
        if router_id.is_none() && router_interface.is_none() {
            return Err(ConfigError::Missing(
                "bgp_routerid (or bgp_routerinterface), with bgp_enable".into(),
            ));
        }
        let source_ip = match env.get("bgp_sourceip")? {
            Some(v) => Some(
                v.parse::<IpAddr>()
                    .map_err(|_| invalid("bgp_sourceip", &v, "expected an IP address"))?,
            ),
            None => None,
        };
        let source_if = env.get("bgp_sourceif")?;
        let secs = |var: &str, default: u16| -> Result<u16, ConfigError> {
            match env.get(var)? {
                None => Ok(default),
                Some(v) => v
                    .parse::<u16>()
                    .map_err(|_| invalid(var, &v, "expected whole seconds from 0 to 65535")),
            }
        };
        let hold_time = secs("bgp_hold_time", DEFAULT_HOLD_TIME)?;
        if hold_time != 0 && hold_time < 3 {
            return Err(invalid(
                "bgp_hold_time",
                &hold_time.to_string(),
                "RFC 4271: 0 (no hold timer) or at least 3 seconds",
            ));
        }
        let keepalive = secs("bgp_keepalive_interval", DEFAULT_KEEPALIVE)?;
        if hold_time != 0 && (keepalive == 0 || keepalive > hold_time / 3) {
            return Err(invalid(
                "bgp_keepalive_interval",
                &keepalive.to_string(),
                format!("at least 1 second and at most a third of bgp_hold_time ({hold_time})"),
            ));
        }
        let mp_next_hop = match env.get("mpbgp_nexthop")? {
            None => MpNextHop::default(),
            Some(v) => {
                let v4 = match env.get("mpbgp_ipv4")? {
                    Some(a) => Some(
                        a.parse()
                            .map_err(|_| invalid("mpbgp_ipv4", &a, "expected an IPv4 address"))?,
                    ),
                    None => None,
                };
                let v6 = match env.get("mpbgp_ipv6")? {
                    Some(a) => Some(
                        a.parse()
                            .map_err(|_| invalid("mpbgp_ipv6", &a, "expected an IPv6 address"))?,
                    ),
                    None => None,
                };
                parse_mp_next_hop("mpbgp_nexthop", &v, v4, v6)?
            }
        };
        let mut peers = Vec::new();
        if let Some(list) = env.get("bgp_peers")? {
            for entry in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                peers.push(parse_peer(entry)?);
            }
        }
        if let Some(a) = env.get("bgp_peeraddress")? {
            let address = a
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| invalid("bgp_peeraddress", &a, "expected an IP address"))?;
            let remote_as = match env.get("bgp_peeras")? {
                Some(v) => parse_as("bgp_peeras", &v)?,
                None => DEFAULT_AS,
            };
            peers.push(BgpPeer {
                address,
                remote_as,
                password: env.get("bgp_peerpass")?,
                multihop: env.bool("bgp_multihop", false)?,
                port: 179,
                mp_next_hop: None,
                bfd: None,
            });
        }
        if peers.is_empty() {
            return Err(ConfigError::Missing(
                "bgp_peers (or bgp_peeraddress), with bgp_enable".into(),
            ));
        }
        for (i, p) in peers.iter().enumerate() {
            if peers[..i]
                .iter()
                .any(|q| q.address == p.address && q.port == p.port)
            {
                return Err(invalid(
                    "bgp_peers",
                    &p.address.to_string(),
                    "the same peer is listed twice",
                ));
            }
        }
        Ok(Some(BgpConfig {
            local_as,
            router_id,
            router_interface,
            source_ip,
            source_if,
            hold_time,
            keepalive,
            mp_next_hop,
            peers,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Option<BgpConfig>, ConfigError> {
        let m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BgpConfig::from_env(&Env(&m))
    }

    #[test]
    fn current_peer_format_with_every_field() {
        let p = parse_peer(
            "192.0.2.1:65001:s3cret:true:1179:mpbgp_nexthop=fixed;mpbgp_ipv6=2001:db8::1:true;100;200;5",
        );
        // An IPv6 address inside the options has colons: kube-vip splits on them too, so
        // only addresses without colons fit there. This entry is therefore refused.
        assert!(p.is_err());
        let p = parse_peer(
            "192.0.2.1:65001:s3cret:false:1179:mpbgp_nexthop=auto_sourceip:true;100;200;5",
        )
        .expect("peer");
        assert_eq!(p.address, "192.0.2.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(p.remote_as, 65001);
        assert_eq!(p.password.as_deref(), Some("s3cret"));
        assert!(!p.multihop);
        assert!(
            parse_peer("192.0.2.1:65001::true")
                .expect("multihop")
                .multihop
        );
        assert_eq!(p.port, 1179);
        assert_eq!(p.mp_next_hop, Some(MpNextHop::SourceIp));
        assert_eq!(
            p.bfd,
            Some(Bfd {
                receive_interval: Duration::from_millis(100),
                transmit_interval: Duration::from_millis(200),
                multiplier: 5
            })
        );
    }

    #[test]
    fn older_forms_and_defaults() {
        let p = parse_peer("192.0.2.1:65001::false").expect("four fields");
        assert_eq!(
            (p.password, p.multihop, p.port, p.bfd),
            (None, false, 179, None)
        );
        let p = parse_peer("[2001:db8::2]:4200000000").expect("IPv6 and a 4-octet AS");
        assert_eq!(p.address, "2001:db8::2".parse::<IpAddr>().expect("ip"));
        assert_eq!(p.remote_as, 4_200_000_000);
        let p = parse_peer("192.0.2.1:65001:::::true;;;").expect("bfd defaults");
        assert_eq!(p.bfd, Some(Bfd::default()));
        let p = parse_peer("192.0.2.1:65001:::::false;;;").expect("bfd off");
        assert_eq!(p.bfd, None);
    }

    #[test]
    fn malformed_peers_name_the_variable_and_the_entry() {
        for bad in [
            "192.0.2.1",
            "192.0.2.1:",
            "192.0.2.1:0",
            "192.0.2.1:x",
            "192.0.2.1:4294967296",
            "host:65001",
            "2001:db8::1:65001",
            "[2001:db8::1:65001",
            "[2001:db8::1]65001",
            "192.0.2.1:65001::maybe",
            "192.0.2.1:65001:::0",
            "192.0.2.1:65001:::70000",
            "192.0.2.1:65001::::mpbgp_nexthop=sometimes",
            "192.0.2.1:65001::::mpbgp_nexthop=fixed",
            "192.0.2.1:65001::::color=blue",
            "192.0.2.1:65001:::::true;300",
            "192.0.2.1:65001:::::true;5;300;3",
            "192.0.2.1:65001:::::true;300;300;0",
            "192.0.2.1:65001:::::true;300;300;3:extra",
            "unnumbered:eth0:65001",
        ] {
            let e = parse_peer(bad).expect_err(bad).to_string();
            assert!(e.starts_with("bgp_peers="), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: {e}");
        }
        let long = format!("192.0.2.1:65001:{}", "p".repeat(81));
        assert!(parse_peer(&long).is_err());
        // The password never reaches the message.
        let e = parse_peer("[2001:db8::1]:65001:hunter2:maybe")
            .expect_err("multihop")
            .to_string();
        assert!(e.contains("[2001:db8::1]:65001:***:maybe"), "{e}");
        for bad in ["2001:db8::1:65001:hunter2", "unnumbered:eth0:65001:hunter2"] {
            let e = parse_peer(bad).expect_err(bad).to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
        assert!(
            parse_peer("192.0.2.1:65001::true:::true;;;").is_err(),
            "BFD with multihop"
        );
        let e = parse_peer("192.0.2.1:65001:hunter2:true:0")
            .expect_err("port")
            .to_string();
        assert!(
            e.contains("192.0.2.1:65001:***:true:0") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn from_env() {
        assert_eq!(cfg(&[]).expect("off"), None);
        let c = cfg(&[
            ("bgp_enable", "true"),
            ("bgp_routerid", "192.0.2.10"),
            ("bgp_as", "64512"),
            ("bgp_peers", "192.0.2.1:65001,[2001:db8::1]:65002::true"),
            ("bgp_peeraddress", "192.0.2.2"),
            ("bgp_peerpass", "pw"),
        ])
        .expect("valid")
        .expect("on");
        assert_eq!(c.local_as, 64512);
        assert_eq!(c.hold_time, DEFAULT_HOLD_TIME);
        assert_eq!(c.keepalive, DEFAULT_KEEPALIVE);
        assert_eq!(c.peers.len(), 3);
        assert_eq!(c.peers[2].remote_as, DEFAULT_AS);
        assert_eq!(c.peers[2].password.as_deref(), Some("pw"));
        assert!(c.peers[1].multihop);
    }

    #[test]
    fn from_env_refuses_with_one_line() {
        let base = [("bgp_enable", "true"), ("bgp_routerid", "192.0.2.10")];
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("bgp_peers", "192.0.2.1:65001")][..], ""),
            (&[][..], "bgp_peers"),
            (
                &[("bgp_peers", "192.0.2.1:65001"), ("bgp_as", "0")][..],
                "bgp_as",
            ),
            (
                &[("bgp_peers", "192.0.2.1:65001"), ("bgp_hold_time", "2")][..],
                "bgp_hold_time",
            ),
            (
                &[
                    ("bgp_peers", "192.0.2.1:65001"),
                    ("bgp_hold_time", "9"),
                    ("bgp_keepalive_interval", "4"),
                ][..],
                "bgp_keepalive_interval",
            ),
            (
                &[("bgp_peers", "192.0.2.1:65001,192.0.2.1:65002")][..],
                "twice",
            ),
            (
                &[("bgp_peers", "192.0.2.1:65001"), ("bgp_sourceip", "eth0")][..],
                "bgp_sourceip",
            ),
            (
                &[("bgp_peers", "192.0.2.1:65001"), ("mpbgp_nexthop", "fixed")][..],
                "mpbgp_nexthop",
            ),
        ];
        for (extra, want) in cases {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            let r = cfg(&vars);
            if want.is_empty() {
                assert!(r.is_ok(), "{extra:?}: {r:?}");
                continue;
            }
            let e = r.expect_err(want).to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(!e.contains('\n'));
        }
        let e = cfg(&[("bgp_enable", "true"), ("bgp_peers", "192.0.2.1:65001")])
            .expect_err("no router id")
            .to_string();
        assert!(e.contains("bgp_routerid"), "{e}");
    }
}
