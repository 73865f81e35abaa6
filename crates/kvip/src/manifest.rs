//! `kvip manifest`: the RBAC, DaemonSet and static pod that deploy the agent.

use anyhow::{Result, bail};
use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ManifestKind {
    /// ServiceAccount, ClusterRole and Roles with exactly the permissions the agent uses.
    Rbac,
    /// The RBAC plus a DaemonSet.
    Daemonset,
    /// A static pod (uses the node's /etc/kubernetes/admin.conf; no RBAC needed).
    Pod,
}

pub(crate) fn command(what: ManifestKind, spec: &kvip_kube::rbac::AgentSpec) -> Result<String> {
    use kvip_kube::rbac;
    let discovery = spec.pod_cidr.is_none() || spec.service_cidr.is_none();
    let docs = match what {
        ManifestKind::Rbac => rbac::rbac_manifests(&spec.namespace, discovery, spec.svc_election),
        ManifestKind::Daemonset => {
            let mut d = rbac::rbac_manifests(&spec.namespace, discovery, spec.svc_election);
            d.push(rbac::daemonset(spec));
            d
        }
        ManifestKind::Pod => vec![rbac::static_pod(spec)],
    };
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&d)?);
    }
    Ok(out)
}

/// The control-plane VIP of `--control-plane --address A --port P`: only for `pod`, and
/// with an address.
pub(crate) fn control_plane(
    what: ManifestKind,
    control_plane: bool,
    address: Option<std::net::IpAddr>,
    port: u16,
) -> Result<Option<(std::net::IpAddr, u16)>> {
    if !control_plane {
        return Ok(None);
    }
    if !matches!(what, ManifestKind::Pod) {
        bail!(
            "--control-plane is for `kvip manifest pod` (a static pod on each control-plane node)"
        );
    }
    match address {
        Some(a) if !a.is_unspecified() && !a.is_loopback() && !a.is_multicast() => {
            Ok(Some((a, port)))
        }
        Some(a) => bail!("--address {a}: not a unicast address a node can hold"),
        None => bail!("--control-plane needs --address (the control-plane VIP)"),
    }
}
