//! CIDR discovery against the test API server: sources in order, configuration first with no
//! API call, 403s skipped and named (kube-vip's cause 1), nothing guessed.

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::Api;
use kube::api::PostParams;
use kvip_core::Cidr;
use kvip_kube::discovery::{Source, discover};
use kvip_testkit::apiserver::ApiServer;
use serde_json::json;

fn cidrs(v: &[&str]) -> Vec<Cidr> {
    v.iter().map(|s| s.parse().expect("cidr")).collect()
}

async fn controller_manager(c: &kube::Client, args_form: bool) {
    let container = if args_form {
        json!({"name": "kcm", "image": "kcm", "command": ["kube-controller-manager"],
               "args": ["--cluster-cidr=10.244.0.0/16,fd00:10:244::/48", "--service-cluster-ip-range", "10.96.0.0/12"]})
    } else {
        json!({"name": "kcm", "image": "kcm",
               "command": ["kube-controller-manager", "--cluster-cidr=10.244.0.0/16,fd00:10:244::/48", "--service-cluster-ip-range=10.96.0.0/12"]})
    };
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kube-controller-manager-cp1", "namespace": "kube-system",
                     "labels": {"component": "kube-controller-manager"}},
        "spec": {"containers": [container]}
    }))
    .expect("pod");
    Api::<Pod>::namespaced(c.clone(), "kube-system")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
}

async fn kubeadm_config(c: &kube::Client) {
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kubeadm-config", "namespace": "kube-system"},
        "data": {"ClusterConfiguration": "apiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\nnetworking:\n  podSubnet: 10.32.0.0/12\n  serviceSubnet: 10.112.0.0/12\n"}
    }))
    .expect("configmap");
    Api::<ConfigMap>::namespaced(c.clone(), "kube-system")
        .create(&PostParams::default(), &cm)
        .await
        .expect("create cm");
}

#[tokio::test]
async fn configured_cidrs_make_no_call() {
    let server = ApiServer::start().expect("api server");
    let d = discover(
        &server.client(),
        Some(cidrs(&["10.1.0.0/16"])),
        Some(cidrs(&["10.2.0.0/16"])),
    )
    .await;
    assert_eq!(d.pod, Some((cidrs(&["10.1.0.0/16"]), Source::Config)));
    assert_eq!(d.service, Some((cidrs(&["10.2.0.0/16"]), Source::Config)));
    assert!(server.calls().is_empty(), "{:?}", server.calls());
}

#[tokio::test]
async fn controller_manager_flags_in_command_or_args() {
    for args_form in [false, true] {
        let server = ApiServer::start().expect("api server");
        let c = server.client();
        controller_manager(&c, args_form).await;
        kubeadm_config(&c).await;
        let d = discover(&c, None, None).await;
        assert_eq!(
            d.pod,
            Some((
                cidrs(&["10.244.0.0/16", "fd00:10:244::/48"]),
                Source::ControllerManager
            ))
        );
        assert_eq!(
            d.service,
            Some((cidrs(&["10.96.0.0/12"]), Source::ControllerManager))
        );
        assert!(d.denied.is_empty() && d.errors.is_empty(), "{d:?}");
    }
}

/// kube-vip's cause 1: the agent may not list pods in kube-system. The configured CIDRs are
/// used; with nothing configured, the next sources answer and the missing permission is named.
#[tokio::test]
async fn denied_pods_fall_through_and_are_named() {
    let server = ApiServer::start().expect("api server");
    let c = server.client();
    controller_manager(&c, false).await;
    kubeadm_config(&c).await;
    server.deny("pods");
    let d = discover(
        &c,
        Some(cidrs(&["10.244.0.0/16"])),
        Some(cidrs(&["10.96.0.0/12"])),
    )
    .await;
    assert_eq!(d.pod.map(|p| p.1), Some(Source::Config));
    let d = discover(&c, None, None).await;
    assert_eq!(d.denied, vec!["list pods in kube-system".to_string()]);
    assert_eq!(
        d.pod,
        Some((cidrs(&["10.32.0.0/12"]), Source::KubeadmConfig))
    );
    assert_eq!(
        d.service,
        Some((cidrs(&["10.112.0.0/12"]), Source::KubeadmConfig))
    );
}

#[tokio::test]
async fn nodes_are_summarised_and_servicecidrs_read() {
    let server = ApiServer::start().expect("api server");
    let c = server.client();
    for (i, r) in [
        ("n1", ["10.244.0.0/24", "fd00:10:244::/64"]),
        ("n2", ["10.244.3.0/24", "fd00:10:244:1::/64"]),
    ] {
        let n: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": i},
            "spec": {"podCIDR": r[0], "podCIDRs": r}
        }))
        .expect("node");
        Api::<Node>::all(c.clone())
            .create(&PostParams::default(), &n)
            .await
            .expect("node");
    }
    let sc: ServiceCIDR = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
        "spec": {"cidrs": ["10.96.0.0/12", "fd00:96::/108"]}
    }))
    .expect("servicecidr");
    Api::<ServiceCIDR>::all(c.clone())
        .create(&PostParams::default(), &sc)
        .await
        .expect("servicecidr");
    let d = discover(&c, None, None).await;
    // Never one node's range: the network covering them all.
    assert_eq!(
        d.pod,
        Some((cidrs(&["10.244.0.0/22", "fd00:10:244::/63"]), Source::Nodes))
    );
    assert_eq!(
        d.service,
        Some((
            cidrs(&["10.96.0.0/12", "fd00:96::/108"]),
            Source::ServiceCidrObjects
        ))
    );
}

#[tokio::test]
async fn nothing_readable_means_nothing_guessed() {
    let server = ApiServer::start().expect("api server");
    for r in ["pods", "configmaps", "nodes", "servicecidrs"] {
        server.deny(r);
    }
    let d = discover(&server.client(), None, None).await;
    assert_eq!((d.pod, d.service), (None, None));
    assert_eq!(
        d.denied,
        vec![
            "list pods in kube-system",
            "get configmaps/kubeadm-config in kube-system",
            "list nodes",
            "list servicecidrs.networking.k8s.io"
        ]
    );
}
