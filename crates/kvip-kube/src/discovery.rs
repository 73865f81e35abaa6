//! Learning the cluster's pod and service CIDRs, in this order, stopping at the first source
//! that answers: (a) configuration (`egress_podcidr` / `egress_servicecidr`: no API call is
//! made for a CIDR that is configured); (b) the kube-controller-manager pod's flags; (c) the
//! `kubeadm-config` ConfigMap; (d) for pods, every Node's `spec.podCIDRs` summarised
//! cluster-wide, and for services, the `ServiceCIDR` objects. A source the agent may not read
//! (403) is skipped and named, so the missing permission can be reported (kube-vip's cause 1).
//! Nothing is ever guessed: no source, no CIDR.

use std::fmt;

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::ListParams;
use kube::{Api, Client};
use kvip_core::Cidr;

/// Where a CIDR came from (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    ControllerManager,
    KubeadmConfig,
    Nodes,
    ServiceCidrObjects,
    /// kube-vip's guessed defaults, used only with `egress_default_cidrs`.
    Guessed,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::ControllerManager => "kube-controller-manager",
            Source::KubeadmConfig => "kubeadm-config",
            Source::Nodes => "nodes",
            Source::ServiceCidrObjects => "servicecidrs",
            Source::Guessed => "guessed",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What discovery learned, and what stopped it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    pub pod: Option<(Vec<Cidr>, Source)>,
    pub service: Option<(Vec<Cidr>, Source)>,
    /// Permissions the agent lacked, as "verb resource in namespace" (for a Warning Event).
    pub denied: Vec<String>,
    /// Other failures (server errors, unparsable values), one line each.
    pub errors: Vec<String>,
}

const KUBE_SYSTEM: &str = "kube-system";

/// The outcome of asking one source.
enum Asked<T> {
    Found(T),
    Nothing,
}

fn note(d: &mut Discovered, what: &str, e: kube::Error) {
    match &e {
        kube::Error::Api(s) if s.code == 403 => d.denied.push(what.to_string()),
        kube::Error::Api(s) if s.code == 404 => {}
        _ => d.errors.push(format!("{what}: {e}")),
    }
}

fn parse_list(v: &str, errors: &mut Vec<String>, origin: &str) -> Vec<Cidr> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<Cidr>() {
            Ok(c) => out.push(c),
            Err(e) => errors.push(format!("{origin}: {item:?}: {}", e.0)),
        }
    }
    out
}

/// The value of `--flag=value` or `--flag value` in a container's command and args.
fn flag_value(words: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    for (i, w) in words.iter().enumerate() {
        if let Some(v) = w.strip_prefix(&eq) {
            return Some(v.to_string());
        }
        if w == flag {
            return words.get(i + 1).cloned();
        }
    }
    None
}

async fn from_controller_manager(
    client: &Client,
    d: &mut Discovered,
) -> Asked<(Option<Vec<Cidr>>, Option<Vec<Cidr>>)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), KUBE_SYSTEM);
    let list = match pods
        .list(&ListParams::default().labels("component=kube-controller-manager"))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            note(d, "list pods in kube-system", e);
            return Asked::Nothing;
        }
    };
    for pod in list.items {
        for c in pod.spec.map(|s| s.containers).unwrap_or_default() {
            let words: Vec<String> = c
                .command
                .unwrap_or_default()
                .into_iter()
                .chain(c.args.unwrap_or_default())
                .collect();
            let pod_cidr = flag_value(&words, "--cluster-cidr")
                .map(|v| parse_list(&v, &mut d.errors, "--cluster-cidr"));
            let svc_cidr = flag_value(&words, "--service-cluster-ip-range")
                .map(|v| parse_list(&v, &mut d.errors, "--service-cluster-ip-range"));
            if pod_cidr.is_some() || svc_cidr.is_some() {
                return Asked::Found((
                    pod_cidr.filter(|v| !v.is_empty()),
                    svc_cidr.filter(|v| !v.is_empty()),
                ));
            }
        }
    }
    Asked::Nothing
}

async fn from_kubeadm_config(
    client: &Client,
    d: &mut Discovered,
) -> Asked<(Option<Vec<Cidr>>, Option<Vec<Cidr>>)> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), KUBE_SYSTEM);
    let cm = match cms.get_opt("kubeadm-config").await {
        Ok(Some(cm)) => cm,
        Ok(None) => return Asked::Nothing,
        Err(e) => {
            note(d, "get configmaps/kubeadm-config in kube-system", e);
            return Asked::Nothing;
        }
    };
    let Some(text) = cm.data.as_ref().and_then(|m| m.get("ClusterConfiguration")) else {
        return Asked::Nothing;
    };
    let doc: serde_norway::Value = match serde_norway::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            d.errors
                .push(format!("kubeadm-config ClusterConfiguration: {e}"));
            return Asked::Nothing;
        }
    };
    let get = |k: &str| {
        doc.get("networking")
            .and_then(|n| n.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let pod = get("podSubnet").map(|v| parse_list(&v, &mut d.errors, "kubeadm-config podSubnet"));
    let svc =
        get("serviceSubnet").map(|v| parse_list(&v, &mut d.errors, "kubeadm-config serviceSubnet"));
    Asked::Found((pod.filter(|v| !v.is_empty()), svc.filter(|v| !v.is_empty())))
}

async fn pod_cidr_from_nodes(client: &Client, d: &mut Discovered) -> Option<Vec<Cidr>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let list = match nodes.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(e) => {
            note(d, "list nodes", e);
            return None;
        }
    };
    let mut ranges = Vec::new();
    for n in list.items {
        let spec = n.spec.unwrap_or_default();
        let cidrs = spec
            .pod_cidrs
            .unwrap_or_else(|| spec.pod_cidr.into_iter().collect());
        for c in cidrs {
            ranges.extend(parse_list(&c, &mut d.errors, "node podCIDRs"));
        }
    }
    // The cluster's pod network, not one node's range: the smallest network per family that
    // covers every node's range.
    let cover = Cidr::covering(&ranges);
    (!cover.is_empty()).then_some(cover)
}

async fn service_cidr_from_objects(client: &Client, d: &mut Discovered) -> Option<Vec<Cidr>> {
    let api: Api<ServiceCIDR> = Api::all(client.clone());
    let list = match api.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(e) => {
            note(d, "list servicecidrs.networking.k8s.io", e);
            return None;
        }
    };
    let mut out = Vec::new();
    for o in list.items {
        for c in o.spec.and_then(|s| s.cidrs).unwrap_or_default() {
            out.extend(parse_list(&c, &mut d.errors, "ServiceCIDR"));
        }
    }
    (!out.is_empty()).then(|| Cidr::canonicalize(out))
}

/// Runs discovery. `pod` and `service` are the configured values, if any.
pub async fn discover(
    client: &Client,
    pod: Option<Vec<Cidr>>,
    service: Option<Vec<Cidr>>,
) -> Discovered {
    let mut d = Discovered {
        pod: pod.map(|v| (v, Source::Config)),
        service: service.map(|v| (v, Source::Config)),
        ..Discovered::default()
    };
    let missing = |d: &Discovered| d.pod.is_none() || d.service.is_none();
    if missing(&d)
        && let Asked::Found((p, s)) = from_controller_manager(client, &mut d).await
    {
        fill(&mut d, p, s, Source::ControllerManager);
    }
    if missing(&d)
        && let Asked::Found((p, s)) = from_kubeadm_config(client, &mut d).await
    {
        fill(&mut d, p, s, Source::KubeadmConfig);
    }
    if d.pod.is_none()
        && let Some(p) = pod_cidr_from_nodes(client, &mut d).await
    {
        d.pod = Some((p, Source::Nodes));
    }
    if d.service.is_none()
        && let Some(s) = service_cidr_from_objects(client, &mut d).await
    {
        d.service = Some((s, Source::ServiceCidrObjects));
    }
    for (what, v) in [("pod", &d.pod), ("service", &d.service)] {
        match v {
            Some((c, src)) => tracing::info!(
                cidrs = %c.iter().map(Cidr::to_string).collect::<Vec<_>>().join(","),
                source = %src,
                "{what} CIDR"
            ),
            None => tracing::warn!("{what} CIDR unknown: egress will be refused"),
        }
    }
    d
}

fn fill(d: &mut Discovered, pod: Option<Vec<Cidr>>, svc: Option<Vec<Cidr>>, src: Source) {
    if d.pod.is_none()
        && let Some(p) = pod
    {
        d.pod = Some((p, src));
    }
    if d.service.is_none()
        && let Some(s) = svc
    {
        d.service = Some((s, src));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_in_both_forms() {
        let w: Vec<String> = [
            "kube-controller-manager",
            "--cluster-cidr=10.244.0.0/16,fd00::/48",
            "--service-cluster-ip-range",
            "10.96.0.0/12",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            flag_value(&w, "--cluster-cidr").as_deref(),
            Some("10.244.0.0/16,fd00::/48")
        );
        assert_eq!(
            flag_value(&w, "--service-cluster-ip-range").as_deref(),
            Some("10.96.0.0/12")
        );
        assert_eq!(flag_value(&w, "--missing"), None);
    }
}
