//! The agent's configuration from kube-vip's environment variables.
//!
//! Each variable is read in its lowercase spelling (`vip_interface`, as kube-vip documents
//! it) and its UPPERCASE one (`VIP_INTERFACE`); both set to different values is an error, not
//! a silent pick. A kube-vip feature kvip does not implement, switched on, is an error naming
//! the variable — never ignored. Pure: the caller passes the environment as a map.

use std::collections::BTreeMap;
use std::time::Duration;

use thiserror::Error;

use crate::cidr::Cidr;
use crate::control_plane::{ADMIN_CONF, ControlPlaneConfig};

/// One supported variable: name (lowercase), default, meaning.
pub struct OptionDoc {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

/// Every variable kvip reads, in the order `docs/configuration.md` lists them.
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        name: "vip_interface",
        default: "(required)",
        meaning: "interface VIPs are added to",
    },
    OptionDoc {
        name: "vip_servicesinterface",
        default: "vip_interface",
        meaning: "interface for Service VIPs, when different",
    },
    OptionDoc {
        name: "vip_arp",
        default: "false",
        meaning: "announce VIPs with gratuitous ARP / unsolicited NA (layer 2 mode)",
    },
    OptionDoc {
        name: "vip_arpRate",
        default: "30000",
        meaning: "milliseconds between the holder's repeated announcements of its VIPs, so switches that aged their entry learn it again (kube-vip: 3000); 0: announce only on acquisition",
    },
    OptionDoc {
        name: "svc_enable",
        default: "true (false with cp_enable)",
        meaning: "handle Services of type LoadBalancer; off only with cp_enable (there is nothing else to do)",
    },
    OptionDoc {
        name: "cp_enable",
        default: "false",
        meaning: "hold the control-plane VIP (the API server's address) on one control-plane node at a time; see docs/control-plane.md",
    },
    OptionDoc {
        name: "address",
        default: "(required with cp_enable)",
        meaning: "the control-plane VIP; `vip_address` is the older name",
    },
    OptionDoc {
        name: "port",
        default: "6443",
        meaning: "the API server's port, on the VIP and on the node",
    },
    OptionDoc {
        name: "vip_leasename",
        default: "plndr-cp-lock",
        meaning: "the control-plane Lease; `namespace/name` names its namespace too",
    },
    OptionDoc {
        name: "cp_namespace",
        default: "kube-system",
        meaning: "namespace of the control-plane Lease",
    },
    OptionDoc {
        name: "kubernetes_addr",
        default: "127.0.0.1:<port>",
        meaning: "the node's own API server (`host:port`, or a URL), which the control-plane mode talks to whatever server the kubeconfig names; its certificate is verified for the name `kubernetes`",
    },
    OptionDoc {
        name: "control_plane_health_check_period",
        default: "1",
        meaning: "kvip only: seconds between checks of the local API server's /readyz",
    },
    OptionDoc {
        name: "control_plane_health_check_timeout",
        default: "1",
        meaning: "kvip only: seconds a /readyz check may take",
    },
    OptionDoc {
        name: "control_plane_health_check_failures",
        default: "3",
        meaning: "kvip only: failed checks in a row that make the node drop the control-plane VIP and its Lease; as many successes in a row make it compete again",
    },
    OptionDoc {
        name: "svc_election",
        default: "false",
        meaning: "one lease per Service (`kubevip-<service>` in its namespace, or kube-vip.io/leaseName) instead of one for all; with externalTrafficPolicy Local or egress, only nodes with a ready local endpoint compete",
    },
    OptionDoc {
        name: "vip_leaderelection",
        default: "true",
        meaning: "elect a holder through Leases (off: every node holds every VIP; for single-node clusters)",
    },
    OptionDoc {
        name: "svc_leasename",
        default: "plndr-svcs-lock",
        meaning: "name of the global lease",
    },
    OptionDoc {
        name: "vip_leaseduration",
        default: "5",
        meaning: "lease duration, seconds",
    },
    OptionDoc {
        name: "vip_renewdeadline",
        default: "3",
        meaning: "a holder that cannot renew within this many seconds drops its VIPs",
    },
    OptionDoc {
        name: "vip_retryperiod",
        default: "1",
        meaning: "seconds between lease attempts",
    },
    OptionDoc {
        name: "svc_namespace",
        default: "(all namespaces)",
        meaning: "only Services of this namespace",
    },
    OptionDoc {
        name: "vip_nodename",
        default: "NODE_NAME",
        meaning: "this node's name (required, from one of the two)",
    },
    OptionDoc {
        name: "lb_class_only",
        default: "false",
        meaning: "only Services whose loadBalancerClass is lb_class_name",
    },
    OptionDoc {
        name: "lb_class_name",
        default: "kube-vip.io/kube-vip-class",
        meaning: "the loadBalancerClass kvip answers to",
    },
    OptionDoc {
        name: "egress_podcidr",
        default: "(discovered)",
        meaning: "pod CIDRs, comma-separated; when set, not discovered",
    },
    OptionDoc {
        name: "egress_servicecidr",
        default: "(discovered)",
        meaning: "service CIDRs, comma-separated; when set, not discovered",
    },
    OptionDoc {
        name: "egress_withnftables",
        default: "(auto: nftables when nft works)",
        meaning: "true: nftables backend; false: iptables backend",
    },
    OptionDoc {
        name: "egress_clean",
        default: "false",
        meaning: "remove kube-vip's leftover egress rules at start",
    },
    OptionDoc {
        name: "egress_default_cidrs",
        default: "false",
        meaning: "kvip only: when discovery finds no pod or service CIDR, use kube-vip's guesses 10.0.0.0/16 and 10.96.0.0/12 (with a warning) instead of refusing egress",
    },
    OptionDoc {
        name: "instance_name",
        default: "(none)",
        meaning: "a second kvip on the same nodes: its own table, chains and address mark",
    },
    OptionDoc {
        name: "prometheus_server",
        default: ":2112",
        meaning: "address of /metrics, /healthz and /readyz",
    },
    OptionDoc {
        name: "k8s_config_file",
        default: "(in-cluster, then KUBECONFIG)",
        meaning: "kubeconfig file",
    },
    OptionDoc {
        name: "resync_period",
        default: "30",
        meaning: "kvip only: seconds between read-backs of kvip's kernel state that repair drift (objects changed by hand)",
    },
    OptionDoc {
        name: "shutdown_timeout",
        default: "10",
        meaning: "kvip only: seconds from SIGTERM to exit; kernel state is removed first, then the leases are released",
    },
];

/// kube-vip features kvip does not implement: switched on, they stop the agent.
pub const UNSUPPORTED: &[&str] = &[
    "vip_wireguard",
    "vip_routingtable",
    "dhcp_mode",
    "enable_upnp",
    "vip_ddns",
    "enable_endpointslices_v6",
    "enable_service_security",
    "egress_withipvs",
    "lb_enable",
];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{lower}={lower_value:?} and {upper}={upper_value:?} disagree: set one of them")]
    Conflict {
        lower: String,
        upper: String,
        lower_value: String,
        upper_value: String,
    },
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
    #[error(
        "{var}={value:?}: kvip does not implement this kube-vip feature yet; unset it or set it to false"
    )]
    Unsupported { var: String, value: String },
    #[error("{0} is not set")]
    Missing(String),
}

/// Where VIPs go in BGP mode without `vip_arp`.
pub const LOOPBACK: &str = "lo";

/// The agent's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub vip_interface: Option<String>,
    pub services_interface: Option<String>,
    pub arp: bool,
    pub svc_election: bool,
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    pub namespace: Option<String>,
    pub node_name: String,
    pub lb_class_only: bool,
    pub lb_class_name: String,
    pub egress_pod_cidr: Option<Vec<Cidr>>,
    pub egress_service_cidr: Option<Vec<Cidr>>,
    pub egress_with_nftables: Option<bool>,
    pub egress_clean: bool,
    pub instance_name: Option<String>,
    pub prometheus_server: String,
    pub kubeconfig: Option<String>,
    pub egress_default_cidrs: bool,
    pub shutdown_timeout: Duration,
    /// `vip_arpRate`: repeat announcements this often while holding (`None`: never).
    pub arp_refresh: Option<Duration>,
    pub resync_period: Duration,
    /// `svc_enable`: LoadBalancer Services are handled.
    pub services: bool,
    /// `cp_enable`: the control-plane VIP.
    pub control_plane: Option<ControlPlaneConfig>,
    /// `bgp_enable`: the VIPs this node holds are announced to BGP peers.
    pub bgp: Option<crate::bgp::BgpConfig>,
}

pub(crate) struct Env<'a>(pub(crate) &'a BTreeMap<String, String>);

impl Env<'_> {
    /// The value of `name` in either spelling; an error when both are set and differ.
    pub(crate) fn get(&self, name: &str) -> Result<Option<String>, ConfigError> {
        let upper = name.to_ascii_uppercase();
        // kube-vip's spelling (`vip_arpRate`), or all lowercase (as `--set` writes it).
        let lo = self
            .0
            .get(name)
            .or_else(|| self.0.get(&name.to_ascii_lowercase()))
            .map(|v| v.trim().to_string());
        let up = self.0.get(&upper).map(|v| v.trim().to_string());
        match (lo, up) {
            (Some(l), Some(u)) if l != u => {
                // Values that may carry a password are not shown.
                let secret = matches!(name, "bgp_peerpass" | "bgp_peers");
                let show = |v: String| if secret { "***".to_string() } else { v };
                Err(ConfigError::Conflict {
                    lower: name.to_string(),
                    upper,
                    lower_value: show(l),
                    upper_value: show(u),
                })
            }
            (Some(v), _) | (None, Some(v)) => Ok(Some(v).filter(|v| !v.is_empty())),
            (None, None) => Ok(None),
        }
    }

    pub(crate) fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name)? {
            None => Ok(default),
            Some(v) => parse_bool(&v).ok_or_else(|| ConfigError::Invalid {
                var: name.into(),
                value: v,
                reason: "expected true or false".into(),
            }),
        }
    }

    pub(crate) fn seconds(&self, name: &str, default: u64) -> Result<Duration, ConfigError> {
        match self.get(name)? {
            None => Ok(Duration::from_secs(default)),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=3600).contains(&n) => Ok(Duration::from_secs(n)),
                _ => Err(ConfigError::Invalid {
                    var: name.into(),
                    value: v,
                    reason: "expected whole seconds from 1 to 3600".into(),
                }),
            },
        }
    }

    fn cidrs(&self, name: &str) -> Result<Option<Vec<Cidr>>, ConfigError> {
        let Some(v) = self.get(name)? else {
            return Ok(None);
        };
        let mut out = Vec::new();
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            out.push(item.parse::<Cidr>().map_err(|e| ConfigError::Invalid {
                var: name.into(),
                value: item.into(),
                reason: e.0,
            })?);
        }
        if out.is_empty() {
            return Err(ConfigError::Invalid {
                var: name.into(),
                value: v,
                reason: "no CIDR in the list".into(),
            });
        }
        Ok(Some(out))
    }
}

/// true/false, 1/0, yes/no, on/off, any case.
pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl AgentConfig {
    /// The interface Service VIPs go on: `vip_servicesinterface`, else `vip_interface`. In
    /// BGP mode without `vip_arp`, the loopback: the node accepts the VIPs' traffic, and no
    /// neighbour on a LAN learns them by ARP/NDP (routers learn them by BGP).
    pub fn interface(&self) -> Option<&str> {
        if self.bgp_only() {
            return Some(LOOPBACK);
        }
        self.services_interface
            .as_deref()
            .or(self.vip_interface.as_deref())
    }

    /// The interface the control-plane VIP goes on: `vip_interface` (the loopback in BGP
    /// mode without `vip_arp`, as Service VIPs).
    pub fn control_plane_interface(&self) -> Option<&str> {
        if self.bgp_only() {
            return Some(LOOPBACK);
        }
        self.vip_interface.as_deref()
    }

    /// BGP mode without ARP/NDP: VIPs are announced to routers only.
    fn bgp_only(&self) -> bool {
        self.bgp.is_some() && !self.arp
    }

    /// Reads the configuration from the environment (as a map of variables).
    pub fn from_env(vars: &BTreeMap<String, String>) -> Result<AgentConfig, ConfigError> {
        let env = Env(vars);
        for name in UNSUPPORTED {
            if let Some(v) = env.get(name)?
                && parse_bool(&v) != Some(false)
            {
                return Err(ConfigError::Unsupported {
                    var: name.to_string(),
                    value: v,
                });
            }
        }
        // kube-vip's VIP mask: kvip adds Service VIPs as host addresses only. Anything else
        // would silently change what the VIP's subnet route looks like: refuse it.
        for var in ["vip_subnet", "vip_cidr"] {
            if let Some(v) = env.get(var)?
                && !v
                    .split(',')
                    .map(str::trim)
                    .all(|m| m.is_empty() || m == "32" || m == "128")
            {
                return Err(ConfigError::Invalid {
                    var: var.into(),
                    value: v,
                    reason: "kvip adds VIPs as host addresses (/32, /128) only; unset it or use 32 (and 128)".into(),
                });
            }
        }
        let bgp = crate::bgp::BgpConfig::from_env(&env)?;
        let control_plane = ControlPlaneConfig::from_env(&env)?;
        // As kube-vip: a control-plane pod serves Services only when asked to.
        let services = env.bool("svc_enable", control_plane.is_none())?;
        if !services && control_plane.is_none() {
            return Err(ConfigError::Invalid {
                var: "svc_enable".into(),
                value: "false".into(),
                reason: "with neither Services nor cp_enable there is nothing to do".into(),
            });
        }
        let node_name = match env.get("vip_nodename")? {
            Some(n) => n,
            None => vars
                .get("NODE_NAME")
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ConfigError::Missing("vip_nodename (or NODE_NAME)".into()))?,
        };
        let lease_duration = env.seconds("vip_leaseduration", 5)?;
        let renew_deadline = env.seconds("vip_renewdeadline", 3)?;
        let retry_period = env.seconds("vip_retryperiod", 1)?;
        // The kernel removes a VIP whose lifetime ran out less than 1.5 s after its renew
        // deadline (lifetimes are whole seconds, rounded up, and short; the kernel removes an
        // expired address a little late): the Lease must outlast that.
        if renew_deadline + Duration::from_secs(2) > lease_duration
            || retry_period >= renew_deadline
        {
            return Err(ConfigError::Invalid {
                var: "vip_leaseduration/vip_renewdeadline/vip_retryperiod".into(),
                value: format!(
                    "{}/{}/{}",
                    lease_duration.as_secs(),
                    renew_deadline.as_secs(),
                    retry_period.as_secs()
                ),
                reason: "need lease duration ≥ renew deadline + 2 s and renew deadline > retry period, so a holder's VIPs leave its kernel (less than 1.5 s after the renew deadline) before anyone else may take the Lease".into(),
            });
        }
        let instance_name = env.get("instance_name")?;
        if let Some(i) = &instance_name
            && (i.len() > 8
                || !i
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        {
            return Err(ConfigError::Invalid {
                var: "instance_name".into(),
                value: i.clone(),
                reason: "1 to 8 characters of a-z and 0-9".into(),
            });
        }
        let egress_with_nftables = match env.get("egress_withnftables")? {
            None => None,
            Some(v) => Some(parse_bool(&v).ok_or_else(|| ConfigError::Invalid {
                var: "egress_withnftables".into(),
                value: v,
                reason: "expected true or false".into(),
            })?),
        };
        Ok(AgentConfig {
            vip_interface: env.get("vip_interface")?,
            services_interface: env.get("vip_servicesinterface")?,
            arp: env.bool("vip_arp", false)?,
            svc_election: env.bool("svc_election", false)?,
            leader_election: env.bool("vip_leaderelection", true)?,
            lease_name: env
                .get("svc_leasename")?
                .unwrap_or_else(|| "plndr-svcs-lock".into()),
            lease_duration,
            renew_deadline,
            retry_period,
            namespace: env.get("svc_namespace")?,
            node_name,
            lb_class_only: env.bool("lb_class_only", false)?,
            lb_class_name: env
                .get("lb_class_name")?
                .unwrap_or_else(|| "kube-vip.io/kube-vip-class".into()),
            egress_pod_cidr: env.cidrs("egress_podcidr")?,
            egress_service_cidr: env.cidrs("egress_servicecidr")?,
            egress_with_nftables,
            egress_clean: env.bool("egress_clean", false)?,
            egress_default_cidrs: env.bool("egress_default_cidrs", false)?,
            shutdown_timeout: env.seconds("shutdown_timeout", 10)?,
            resync_period: env.seconds("resync_period", 30)?,
            arp_refresh: match env.get("vip_arpRate")? {
                None => Some(Duration::from_secs(30)),
                Some(v) => match v.parse::<u64>() {
                    Ok(0) => None,
                    Ok(ms) if (100..=3_600_000).contains(&ms) => Some(Duration::from_millis(ms)),
                    _ => {
                        return Err(ConfigError::Invalid {
                            var: "vip_arpRate".into(),
                            value: v,
                            reason: "expected 0 or milliseconds from 100 to 3600000".into(),
                        });
                    }
                },
            },
            instance_name,
            prometheus_server: env
                .get("prometheus_server")?
                .unwrap_or_else(|| ":2112".into()),
            kubeconfig: env
                .get("k8s_config_file")?
                .or_else(|| control_plane.as_ref().map(|_| ADMIN_CONF.to_string())),
            services,
            control_plane,
            bgp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_both_spellings() {
        let c = AgentConfig::from_env(&env(&[("NODE_NAME", "n1")])).unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.lease_name, "plndr-svcs-lock");
        assert_eq!(c.lease_duration, Duration::from_secs(5));
        assert!(c.leader_election && !c.svc_election && !c.arp);
        let c = AgentConfig::from_env(&env(&[
            ("vip_nodename", "n2"),
            ("VIP_INTERFACE", "eth1"),
            ("svc_election", "true"),
            ("EGRESS_PODCIDR", "10.244.0.0/16, fd00:10:244::/48"),
            ("egress_servicecidr", "10.96.0.0/12"),
            ("vip_arp", "true"),
            ("VIP_ARP", "true"),
        ]))
        .unwrap();
        assert_eq!(c.node_name, "n2");
        assert_eq!(c.vip_interface.as_deref(), Some("eth1"));
        assert!(c.svc_election && c.arp);
        assert_eq!(c.egress_pod_cidr.map(|v| v.len()), Some(2));
    }

    #[test]
    fn errors_name_the_variable() {
        let e = AgentConfig::from_env(&env(&[
            ("NODE_NAME", "n"),
            ("vip_interface", "eth0"),
            ("VIP_INTERFACE", "eth1"),
        ]))
        .unwrap_err();
        assert!(
            matches!(e, ConfigError::Conflict { .. }) && e.to_string().contains("VIP_INTERFACE")
        );
        let e =
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("bgp_enable", "true")])).unwrap_err();
        assert!(e.to_string().contains("bgp_routerid"), "{e}");
        let c = AgentConfig::from_env(&env(&[
            ("NODE_NAME", "n"),
            ("bgp_enable", "true"),
            ("bgp_routerid", "192.0.2.1"),
            ("bgp_peers", "192.0.2.2:65001:secret"),
        ]))
        .expect("BGP mode");
        assert_eq!(c.interface(), Some("lo"), "BGP without ARP: the loopback");
        assert_eq!(c.control_plane_interface(), Some("lo"));
        let bgp = c.bgp.expect("bgp settings");
        assert_eq!(bgp.peers.len(), 1);
        assert!(!format!("{bgp:?}").contains("secret"));
        assert!(
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("BGP_ENABLE", "false")])).is_ok()
        );
        let e = AgentConfig::from_env(&env(&[
            ("NODE_NAME", "n"),
            ("egress_podcidr", "10.0.0.0/33"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("egress_podcidr") && e.to_string().contains("10.0.0.0/33"));
        let e = AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_leaseduration", "3")]))
            .unwrap_err();
        assert!(e.to_string().contains("renew deadline"));
        // One second between the deadline and the Lease's end is not enough for the kernel.
        let e = AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_leaseduration", "4")]))
            .unwrap_err();
        assert!(e.to_string().contains("4/3/1"), "{e}");
        assert!(
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_leaseduration", "5")])).is_ok()
        );
        let e =
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_subnet", "24")])).unwrap_err();
        assert!(e.to_string().contains("vip_subnet") && e.to_string().contains("host addresses"));
        assert!(
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_subnet", "32,128")])).is_ok()
        );
        assert!(AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("VIP_CIDR", "32")])).is_ok());
        let e =
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_arpRate", "50")])).unwrap_err();
        assert!(e.to_string().contains("vip_arpRate") && e.to_string().contains("\"50\""));
        let rate = |v: &str| {
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("VIP_ARPRATE", v)]))
                .map(|c| c.arp_refresh)
        };
        assert_eq!(rate("0"), Ok(None));
        assert_eq!(
            AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_arprate", "500")]))
                .map(|c| c.arp_refresh),
            Ok(Some(Duration::from_millis(500))),
            "as --set writes it"
        );
        assert_eq!(rate("3000"), Ok(Some(Duration::from_secs(3))));
        assert_eq!(
            AgentConfig::from_env(&env(&[])).unwrap_err(),
            ConfigError::Missing("vip_nodename (or NODE_NAME)".into())
        );
        let e = AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("svc_enable", "false")]))
            .unwrap_err();
        assert!(e.to_string().contains("svc_enable"));
        let e = AgentConfig::from_env(&env(&[("NODE_NAME", "n"), ("vip_arp", "sometimes")]))
            .unwrap_err();
        assert!(e.to_string().contains("vip_arp"));
    }

    #[test]
    fn every_option_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for o in OPTIONS {
            let row = format!("| `{}` | {} | {} |", o.name, o.default, o.meaning);
            assert!(
                doc.lines().any(|l| l == row),
                "docs/configuration.md lacks the row\n{row}"
            );
        }
        for u in UNSUPPORTED {
            assert!(
                doc.contains(&format!("`{u}`")),
                "docs/configuration.md lacks {u}"
            );
        }
    }
}
