//! The control-plane VIP's settings (`cp_enable`), from kube-vip's variables: the API
//! server's highly available address, held by one control-plane node at a time under its own
//! Lease, and only while that node's own API server is ready.

use std::net::IpAddr;
use std::time::Duration;

use crate::config::{ConfigError, Env};

/// The name the API server's certificate carries on every kubeadm node (127.0.0.1 is not in
/// it): the local API server is verified for this name.
pub const API_SERVER_NAME: &str = "kubernetes";

/// kube-vip's default kubeconfig of a control-plane static pod.
pub const ADMIN_CONF: &str = "/etc/kubernetes/admin.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneConfig {
    /// `address` (or the older `vip_address`).
    pub address: IpAddr,
    /// `port`: the API server's port, on the VIP and locally.
    pub port: u16,
    /// `cp_namespace`, or the namespace part of `vip_leasename` (`ns/name`).
    pub lease_namespace: String,
    /// `vip_leasename`.
    pub lease_name: String,
    /// `kubernetes_addr`: the local API server as `host:port` or a URL (default
    /// `https://127.0.0.1:<port>`).
    pub local_api: Option<String>,
    /// `control_plane_health_check_period`: how often the local API server's `/readyz` is
    /// asked.
    pub health_period: Duration,
    /// `control_plane_health_check_timeout`: how long an answer may take.
    pub health_timeout: Duration,
    /// `control_plane_health_check_failures`: failed checks in a row that make the node drop
    /// the VIP; as many successes in a row make it compete again.
    pub health_failures: u32,
}

impl ControlPlaneConfig {
    /// The local API server's URL.
    pub fn local_api_url(&self) -> String {
        match &self.local_api {
            Some(a) if a.contains("://") => a.clone(),
            Some(a) => format!("https://{a}"),
            None => format!("https://127.0.0.1:{}", self.port),
        }
    }

    /// `None` when `cp_enable` is off.
    pub(crate) fn from_env(env: &Env) -> Result<Option<ControlPlaneConfig>, ConfigError> {
        if !env.bool("cp_enable", false)? {
            return Ok(None);
        }
        let invalid = |var: &str, value: String, reason: &str| ConfigError::Invalid {
            var: var.into(),
            value,
            reason: reason.into(),
        };
        let (var, raw) = match (env.get("address")?, env.get("vip_address")?) {
            (Some(a), Some(b)) if a != b => {
                return Err(ConfigError::Conflict {
                    lower: "address".into(),
                    upper: "vip_address".into(),
                    lower_value: a,
                    upper_value: b,
                });
            }
            (Some(a), _) => ("address", a),
            (None, Some(b)) => ("vip_address", b),
            (None, None) => {
                return Err(ConfigError::Missing(
                    "address (the control-plane VIP, with cp_enable)".into(),
                ));
            }
        };
        let address: IpAddr = raw.parse().map_err(|_| {
            invalid(
                var,
                raw.clone(),
                "an IP address (kvip does not resolve names for the control-plane VIP)",
            )
        })?;
        if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
            return Err(invalid(var, raw, "not a unicast address a node can hold"));
        }
        let port = match env.get("port")? {
            None => 6443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid("port", p, "a TCP port from 1 to 65535"))?,
        };
        let lease = env
            .get("vip_leasename")?
            .unwrap_or_else(|| "plndr-cp-lock".into());
        let (lease_namespace, lease_name) = match lease.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                (ns.to_string(), name.to_string())
            }
            Some(_) => return Err(invalid("vip_leasename", lease, "name or namespace/name")),
            None => (
                env.get("cp_namespace")?
                    .unwrap_or_else(|| "kube-system".into()),
                lease,
            ),
        };
        for (var, v) in [
            ("vip_leasename", &lease_name),
            ("cp_namespace", &lease_namespace),
        ] {
            if !(is_dns_label(v) || var == "vip_leasename" && is_dns_subdomain(v)) {
                return Err(invalid(var, v.clone(), "not a valid Kubernetes name"));
            }
        }
        let health_failures = match env.get("control_plane_health_check_failures")? {
            None => 3,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "control_plane_health_check_failures",
                        v,
                        "a count from 1 to 100",
                    )
                })?,
        };
        Ok(Some(ControlPlaneConfig {
            address,
            port,
            lease_namespace,
            lease_name,
            local_api: env.get("kubernetes_addr")?,
            health_period: env.seconds("control_plane_health_check_period", 1)?,
            health_timeout: env.seconds("control_plane_health_check_timeout", 1)?,
            health_failures,
        }))
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;
    use std::collections::BTreeMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        let mut m: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry("NODE_NAME".into()).or_insert_with(|| "cp1".into());
        AgentConfig::from_env(&m)
    }

    #[test]
    fn kube_vips_control_plane_variables() {
        let c = cfg(&[("cp_enable", "true"), ("address", "192.0.2.100")]).expect("valid");
        let cp = c.control_plane.expect("control plane");
        assert_eq!(cp.address, "192.0.2.100".parse::<IpAddr>().expect("ip"));
        assert_eq!(cp.port, 6443);
        assert_eq!(
            (cp.lease_namespace.as_str(), cp.lease_name.as_str()),
            ("kube-system", "plndr-cp-lock")
        );
        assert_eq!(cp.local_api_url(), "https://127.0.0.1:6443");
        assert_eq!(cp.health_failures, 3);
        // kube-vip's control-plane manifests run without Services unless svc_enable is set,
        // and with admin.conf.
        assert!(!c.services);
        assert_eq!(c.kubeconfig.as_deref(), Some(ADMIN_CONF));
        let c = cfg(&[
            ("cp_enable", "true"),
            ("vip_address", "2001:db8::100"),
            ("port", "8443"),
            ("vip_leasename", "infra/cp-lock"),
            ("kubernetes_addr", "127.0.0.1:16443"),
            ("svc_enable", "true"),
            ("k8s_config_file", "/etc/kvip/kubeconfig"),
        ])
        .expect("valid");
        assert!(c.services);
        assert_eq!(c.kubeconfig.as_deref(), Some("/etc/kvip/kubeconfig"));
        let cp = c.control_plane.expect("control plane");
        assert_eq!(cp.port, 8443);
        assert_eq!(
            (cp.lease_namespace.as_str(), cp.lease_name.as_str()),
            ("infra", "cp-lock")
        );
        assert_eq!(cp.local_api_url(), "https://127.0.0.1:16443");
        // Without cp_enable: Services only, as before.
        let c = cfg(&[]).expect("valid");
        assert!(c.services && c.control_plane.is_none());
    }

    #[test]
    fn bad_control_plane_settings_are_named() {
        for (vars, named) in [
            (&[("cp_enable", "true")][..], "address"),
            (
                &[("cp_enable", "true"), ("address", "cp.example")][..],
                "address",
            ),
            (
                &[("cp_enable", "true"), ("address", "127.0.0.1")][..],
                "address",
            ),
            (
                &[
                    ("cp_enable", "true"),
                    ("address", "192.0.2.1"),
                    ("vip_address", "192.0.2.2"),
                ][..],
                "vip_address",
            ),
            (
                &[
                    ("cp_enable", "true"),
                    ("address", "192.0.2.1"),
                    ("port", "0"),
                ][..],
                "port",
            ),
            (
                &[
                    ("cp_enable", "true"),
                    ("address", "192.0.2.1"),
                    ("vip_leasename", "a/b/c"),
                ][..],
                "vip_leasename",
            ),
            (
                &[
                    ("cp_enable", "true"),
                    ("address", "192.0.2.1"),
                    ("cp_namespace", "Kube_System"),
                ][..],
                "cp_namespace",
            ),
            (
                &[
                    ("cp_enable", "true"),
                    ("address", "192.0.2.1"),
                    ("control_plane_health_check_failures", "0"),
                ][..],
                "control_plane_health_check_failures",
            ),
            (&[("svc_enable", "false")][..], "svc_enable"),
        ] {
            let e = cfg(vars).expect_err("invalid");
            assert!(e.to_string().contains(named), "{vars:?}: {e}");
        }
    }
}
