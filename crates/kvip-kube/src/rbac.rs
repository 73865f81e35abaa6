//! The permissions the agent uses — exactly those — and the manifests that grant them.
//! Tests compare every API call the agent makes against [`rules_for`], both ways.

use serde_json::{Value, json};

/// Where a permission applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every namespace (a ClusterRole).
    Cluster,
    /// The agent's own namespace (its Lease).
    OwnNamespace,
    /// kube-system only (CIDR discovery).
    KubeSystem,
}

/// One permission: API group ("" for core), resource (with subresource), verb, scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub group: &'static str,
    pub resource: &'static str,
    pub verb: &'static str,
    pub scope: Scope,
}

const fn r(group: &'static str, resource: &'static str, verb: &'static str, scope: Scope) -> Rule {
    Rule {
        group,
        resource,
        verb,
        scope,
    }
}

/// What the agent calls. With `discovery`, also what CIDR discovery reads (not needed when
/// both `egress_podcidr` and `egress_servicecidr` are set). With `per_service_leases`
/// (`svc_election`), Leases live in every Service's namespace, so they are granted
/// cluster-wide instead of in the agent's namespace.
pub fn rules_for(discovery: bool, per_service_leases: bool) -> Vec<Rule> {
    use Scope::*;
    let lease_scope = if per_service_leases {
        Cluster
    } else {
        OwnNamespace
    };
    let mut v = vec![
        r("", "services", "list", Cluster),
        r("", "services", "watch", Cluster),
        r("", "services", "patch", Cluster),
        r("", "services/status", "patch", Cluster),
        r("discovery.k8s.io", "endpointslices", "list", Cluster),
        r("discovery.k8s.io", "endpointslices", "watch", Cluster),
        // This node's Node (field selector metadata.name), for its labels.
        r("", "nodes", "list", Cluster),
        r("", "nodes", "watch", Cluster),
        r("events.k8s.io", "events", "create", Cluster),
        r("events.k8s.io", "events", "patch", Cluster),
        r("coordination.k8s.io", "leases", "get", lease_scope),
        // Watched (by name) to take a released Lease at once.
        r("coordination.k8s.io", "leases", "list", lease_scope),
        r("coordination.k8s.io", "leases", "watch", lease_scope),
        r("coordination.k8s.io", "leases", "create", lease_scope),
        r("coordination.k8s.io", "leases", "update", lease_scope),
    ];
    if discovery {
        v.extend([
            r("", "pods", "list", KubeSystem),
            r("", "configmaps", "get", KubeSystem),
            r("networking.k8s.io", "servicecidrs", "list", Cluster),
        ]);
    }
    v.sort();
    v
}

/// The rule a recorded call needs: `group_version` as in the URL ("v1" for core).
pub fn rule_for(
    verb: &str,
    group_version: &str,
    resource: &str,
    namespace: &str,
    own_ns: &str,
) -> (String, String, String, Scope) {
    let group = group_version
        .rsplit_once('/')
        .map_or("", |(g, _)| g)
        .to_string();
    let scope = match (resource, namespace) {
        ("leases", ns) if ns == own_ns => Scope::OwnNamespace,
        ("pods" | "configmaps", "kube-system") => Scope::KubeSystem,
        _ => Scope::Cluster,
    };
    (group, resource.to_string(), verb.to_string(), scope)
}

fn policy_rules(rules: &[Rule], scope: Scope) -> Vec<Value> {
    let mut grouped: std::collections::BTreeMap<(&str, &str), Vec<&str>> =
        std::collections::BTreeMap::new();
    for rule in rules.iter().filter(|r| r.scope == scope) {
        grouped
            .entry((rule.group, rule.resource))
            .or_default()
            .push(rule.verb);
    }
    grouped
        .into_iter()
        .map(|((g, res), verbs)| {
            let mut rule = json!({"apiGroups": [g], "resources": [res], "verbs": verbs});
            if res == "configmaps" {
                rule["resourceNames"] = json!(["kubeadm-config"]);
            }
            rule
        })
        .collect()
}

/// ServiceAccount, ClusterRole(+Binding), a Role(+Binding) for the Lease in `namespace`, and,
/// with `discovery`, a Role(+Binding) in kube-system for what discovery reads there — bound
/// to the service account in `namespace` (so an install outside kube-system still works).
pub fn rbac_manifests(namespace: &str, discovery: bool, per_service_leases: bool) -> Vec<Value> {
    let rules = rules_for(discovery, per_service_leases);
    let sa = json!({"kind": "ServiceAccount", "name": "kvip", "namespace": namespace});
    let mut out = vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "kvip", "namespace": namespace}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "kvip"}, "rules": policy_rules(&rules, Scope::Cluster)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "kvip"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kvip"},
               "subjects": [sa.clone()]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "kvip-lease", "namespace": namespace},
               "rules": policy_rules(&rules, Scope::OwnNamespace)}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "kvip-lease", "namespace": namespace},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kvip-lease"},
               "subjects": [sa.clone()]}),
    ];
    if per_service_leases {
        // Leases are granted cluster-wide (ClusterRole); no Role in the agent's namespace.
        out.truncate(3);
    }
    if discovery {
        out.push(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "kvip-discovery", "namespace": "kube-system"},
               "rules": policy_rules(&rules, Scope::KubeSystem)}),
        );
        out.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "kvip-discovery", "namespace": "kube-system"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kvip-discovery"},
               "subjects": [sa]}));
    }
    out
}

/// What the DaemonSet and the static pod share.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub namespace: String,
    pub image: String,
    pub interface: String,
    pub pod_cidr: Option<String>,
    pub service_cidr: Option<String>,
    pub svc_election: bool,
    /// The control-plane VIP and the API server's port (`kvip manifest pod --control-plane`).
    pub control_plane: Option<(std::net::IpAddr, u16)>,
}

fn container(spec: &AgentSpec, kubeconfig: Option<&str>) -> Value {
    let mut env = vec![
        json!({"name": "vip_interface", "value": spec.interface}),
        json!({"name": "vip_arp", "value": "true"}),
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
    ];
    if let Some(c) = &spec.pod_cidr {
        env.push(json!({"name": "egress_podcidr", "value": c}));
    }
    if let Some(c) = &spec.service_cidr {
        env.push(json!({"name": "egress_servicecidr", "value": c}));
    }
    if spec.svc_election {
        env.push(json!({"name": "svc_election", "value": "true"}));
    }
    if let Some(k) = kubeconfig {
        env.push(json!({"name": "k8s_config_file", "value": k}));
    }
    if let Some((address, port)) = spec.control_plane {
        env.extend([
            json!({"name": "cp_enable", "value": "true"}),
            json!({"name": "address", "value": address.to_string()}),
            json!({"name": "port", "value": port.to_string()}),
            json!({"name": "vip_leaderelection", "value": "true"}),
            json!({"name": "vip_leasename", "value": "plndr-cp-lock"}),
            json!({"name": "cp_namespace", "value": "kube-system"}),
        ]);
    }
    let mut mounts = vec![
        json!({"name": "run-kvip", "mountPath": "/run/kvip"}),
        json!({"name": "xtables-lock", "mountPath": "/run/xtables.lock"}),
    ];
    if kubeconfig.is_some() {
        mounts.push(json!({"name": "kubeconfig", "mountPath": "/etc/kubernetes/admin.conf", "readOnly": true}));
    }
    if spec.control_plane.is_some() {
        // Beside admin.conf, as kvip looks for it; an empty file on joined nodes.
        mounts.push(json!({"name": "super-admin", "mountPath": "/etc/kubernetes/super-admin.conf", "readOnly": true}));
    }
    json!({
        "name": "kvip", "image": spec.image, "args": ["run"], "env": env,
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
        "ports": [{"name": "metrics", "containerPort": 2112}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 2112}},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 2112}},
        "volumeMounts": mounts
    })
}

/// The host's `/run/kvip`: the lock every kvip process of an instance takes (agent and CLI
/// alike) and the registry of address protocols live there, so they must be the host's. And
/// the host's xtables lock, which legacy iptables takes around its read-modify-write of a
/// whole table: without it a restore of kvip's and one of kube-proxy's can each undo the
/// other's change.
fn run_volumes() -> [Value; 2] {
    [
        json!({"name": "run-kvip", "hostPath": {"path": "/run/kvip", "type": "DirectoryOrCreate"}}),
        json!({"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}}),
    ]
}

/// A DaemonSet running the agent on every node (host network, NET_ADMIN and NET_RAW).
pub fn daemonset(spec: &AgentSpec) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "kvip", "namespace": spec.namespace},
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "kvip"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "kvip"}},
                "spec": {
                    "serviceAccountName": "kvip", "hostNetwork": true,
                    "terminationGracePeriodSeconds": 30,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [container(spec, None)],
                    "volumes": run_volumes()
                }
            }
        }
    })
}

/// A static pod (for control-plane nodes before the cluster runs pods), using the node's
/// admin kubeconfig as kube-vip's static pods do.
pub fn static_pod(spec: &AgentSpec) -> Value {
    let mut volumes = run_volumes().to_vec();
    volumes.push(json!({"name": "kubeconfig", "hostPath": {"path": "/etc/kubernetes/admin.conf", "type": "File"}}));
    if spec.control_plane.is_some() {
        // kubeadm writes it on the first control-plane node only (Kubernetes 1.29 and later);
        // elsewhere the volume creates it empty, which kvip counts as absent.
        volumes.push(json!({"name": "super-admin", "hostPath": {"path": "/etc/kubernetes/super-admin.conf", "type": "FileOrCreate"}}));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kvip", "namespace": spec.namespace},
        "spec": {
            "hostNetwork": true,
            "containers": [container(spec, Some("/etc/kubernetes/admin.conf"))],
            "volumes": volumes
        }
    })
}
