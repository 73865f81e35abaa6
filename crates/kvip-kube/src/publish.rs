//! What the holder of a Service writes back to it, kube-vip compatible: the VIPs in
//! `status.loadBalancer.ingress`, `kube-vip.io/vipHost`, and the pod egressing through each
//! VIP in `kube-vip.io/active-endpoint` / `-ipv6`. Writes are merge patches, made only when
//! the Service does not already show the same (so a write does not cause another).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kvip_core::annotations::{ACTIVE_ENDPOINT, ACTIVE_ENDPOINT_IPV6, VIP_HOST};
use kvip_core::plan::ServiceInfo;
use serde_json::{Map, Value, json};

/// What the Service should show while this node holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderView {
    pub node: String,
    pub vips: Vec<IpAddr>,
    /// A pod egressing through the IPv4 / IPv6 VIP (kube-vip's single-pod annotation; kvip
    /// translates every local ready pod and names the first).
    pub active4: Option<IpAddr>,
    pub active6: Option<IpAddr>,
}

/// The status patch, or `None` when the status already lists exactly these VIPs.
pub fn status_patch(svc: &ServiceInfo, view: &HolderView) -> Option<Value> {
    let mut want: Vec<String> = view.vips.iter().map(IpAddr::to_string).collect();
    want.sort();
    let mut have = svc.status_ips.clone();
    have.sort();
    (want != have).then(|| {
        let ingress: Vec<Value> = want.iter().map(|ip| json!({"ip": ip})).collect();
        json!({"status": {"loadBalancer": {"ingress": ingress}}})
    })
}

/// The annotation patch, or `None` when the annotations already say the same.
pub fn annotation_patch(svc: &ServiceInfo, view: &HolderView) -> Option<Value> {
    let mut changes = Map::new();
    let mut want = |key: &str, value: Option<String>| {
        let have = svc.annotations.get(key).cloned();
        if have != value {
            changes.insert(key.to_string(), value.map_or(Value::Null, Value::String));
        }
    };
    want(VIP_HOST, Some(view.node.clone()));
    want(ACTIVE_ENDPOINT, view.active4.map(|a| a.to_string()));
    want(ACTIVE_ENDPOINT_IPV6, view.active6.map(|a| a.to_string()));
    (!changes.is_empty()).then(|| json!({"metadata": {"annotations": changes}}))
}

/// Writes what differs. Returns whether anything was written.
pub async fn publish(
    client: &kube::Client,
    svc: &ServiceInfo,
    view: &HolderView,
) -> Result<bool, kube::Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), &svc.namespace);
    let pp = PatchParams::default();
    let mut wrote = false;
    if let Some(p) = status_patch(svc, view) {
        api.patch_status(&svc.name, &pp, &Patch::Merge(&p)).await?;
        wrote = true;
    }
    if let Some(p) = annotation_patch(svc, view) {
        api.patch(&svc.name, &pp, &Patch::Merge(&p)).await?;
        wrote = true;
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_only_what_differs() {
        let mut svc = ServiceInfo {
            namespace: "d".into(),
            name: "web".into(),
            status_ips: vec!["192.0.2.10".into()],
            ..ServiceInfo::default()
        };
        svc.annotations.insert(VIP_HOST.into(), "n1".into());
        svc.annotations
            .insert(ACTIVE_ENDPOINT.into(), "10.244.1.5".into());
        let view = HolderView {
            node: "n1".into(),
            vips: vec!["192.0.2.10".parse().unwrap()],
            active4: Some("10.244.1.5".parse().unwrap()),
            active6: None,
        };
        assert_eq!(status_patch(&svc, &view), None);
        assert_eq!(annotation_patch(&svc, &view), None);
        let moved = HolderView {
            node: "n2".into(),
            active4: None,
            ..view
        };
        assert_eq!(
            annotation_patch(&svc, &moved),
            Some(json!({"metadata": {"annotations": {VIP_HOST: "n2", ACTIVE_ENDPOINT: null}}}))
        );
    }
}
