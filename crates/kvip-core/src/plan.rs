//! `plan()`: what this node must hold, computed from a snapshot of the cluster. A pure
//! function — no I/O, no clock — so everything hard about it is tested with plain tests.
//!
//! The snapshot uses kvip's own small types rather than Kubernetes API objects, so this crate
//! stays free of the API machinery; the agent converts watched objects into them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::annotations::{AnnotationProblem, ServiceAnnotations};
use crate::cidr::Cidr;
use crate::error::ModelError;
use crate::model::{DesiredState, EgressPolicy, Family, VipClaim};
use crate::port::PortMatch;

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What kvip needs of a Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.type == LoadBalancer`.
    pub load_balancer: bool,
    pub load_balancer_class: Option<String>,
    /// `spec.loadBalancerIP` (deprecated in Kubernetes, still honoured).
    pub load_balancer_ip: Option<String>,
    /// Addresses in `status.loadBalancer.ingress` (set by kvip or an external IPAM).
    pub status_ips: Vec<String>,
    /// `spec.externalTrafficPolicy == Local`.
    pub traffic_policy_local: bool,
    pub annotations: BTreeMap<String, String>,
}

impl ServiceInfo {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// One endpoint of a Service, from its EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: IpAddr,
    pub node: Option<String>,
    pub ready: bool,
    /// The `serving` condition: ready, or terminating and still answering. A node whose
    /// local endpoints are terminating but serving keeps an `externalTrafficPolicy: Local`
    /// Service (kube-proxy sends it traffic then too).
    pub serving: bool,
}

/// The cluster's networks, with where each came from (for logs and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNetworks {
    pub pod: Vec<Cidr>,
    pub service: Vec<Cidr>,
    /// The API server's addresses: always excluded from egress translation.
    pub api_server: Vec<IpAddr>,
}

/// Everything `plan()` reads. Services and endpoints are shared (`Arc`): a snapshot per
/// sync costs pointers, not copies, and an unchanged Service is recognised by identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: Vec<Arc<ServiceInfo>>,
    pub endpoints: BTreeMap<ServiceKey, Arc<[EndpointInfo]>>,
    pub networks: ClusterNetworks,
    /// This node carries `node.kubernetes.io/exclude-from-external-load-balancers`: it holds
    /// nothing and competes for nothing.
    pub node_excluded: bool,
}

/// Which Services this node holds the lease of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Leadership {
    /// One lease for every Service (`svc_election` off): held or not.
    Global(bool),
    /// One lease per Service (`svc_election` on): the ones held.
    PerService(BTreeSet<ServiceKey>),
    #[default]
    None,
}

impl Leadership {
    fn holds(&self, k: &ServiceKey) -> bool {
        match self {
            Leadership::Global(b) => *b,
            Leadership::PerService(s) => s.contains(k),
            Leadership::None => false,
        }
    }
}

/// This node's settings that `plan()` depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    /// `vip_servicesinterface`, else `vip_interface`.
    pub interface: String,
    /// `svc_namespace`: only Services of this namespace (all when `None`).
    pub namespace: Option<String>,
    /// `lb_class_only`: only Services whose class is `lb_class_name`.
    pub class_only: bool,
    /// `lb_class_name` (kube-vip's default is `kube-vip.io/kube-vip-class`).
    pub class_name: String,
    /// Addresses no Service may claim: the control-plane VIP. A Service that asks for one is
    /// refused it (a warning), never given a share of it.
    pub reserved: Vec<IpAddr>,
}

/// A problem with one Service, for a Warning Event and a log line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ServiceWarning {
    InvalidAnnotation(AnnotationProblem),
    EgressRefused(String),
    /// The Service asked for an address reserved for something else (the control-plane VIP).
    VipRefused(IpAddr),
}

impl fmt::Display for ServiceWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceWarning::InvalidAnnotation(p) => write!(f, "InvalidAnnotation: {p}"),
            ServiceWarning::EgressRefused(r) => write!(f, "EgressRefused: {r}"),
            ServiceWarning::VipRefused(a) => write!(f, "VipRefused: {a}"),
        }
    }
}

/// What `plan()` decided for one Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub vips: Vec<IpAddr>,
    /// Whether this node may compete for the Service's lease: with `externalTrafficPolicy:
    /// Local` or egress, only nodes with a ready local endpoint may.
    pub candidate: bool,
    /// Whether this node holds the Service (and so its VIPs).
    pub held: bool,
    /// Pods translated to each VIP (holder only).
    pub egress_pods: BTreeMap<IpAddr, Vec<IpAddr>>,
    pub lease_name: Option<String>,
    pub warnings: Vec<ServiceWarning>,
}

/// The result of `plan()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What this node must hold, or why that cannot be computed. An error here is a bug in
    /// `plan()` (its checks make every state valid); the agent keeps the last good kernel
    /// state and reports it rather than emptying the node.
    pub desired: Result<DesiredState, ModelError>,
    pub services: BTreeMap<ServiceKey, ServicePlan>,
}

fn selected(s: &ServiceInfo, a: &ServiceAnnotations, cfg: &NodeConfig) -> bool {
    if !s.load_balancer || a.ignore {
        return false;
    }
    if cfg.namespace.as_ref().is_some_and(|n| *n != s.namespace) {
        return false;
    }
    match (&s.load_balancer_class, cfg.class_only) {
        (Some(c), _) => *c == cfg.class_name,
        (None, only) => !only,
    }
}

/// The Service's VIPs: the annotation, else `spec.loadBalancerIP`, else the addresses already
/// in its status (set by an external IPAM).
fn service_vips(
    s: &ServiceInfo,
    a: &ServiceAnnotations,
    warnings: &mut Vec<ServiceWarning>,
) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = if let Some(ips) = &a.loadbalancer_ips {
        ips.clone()
    } else if let Some(ip) = s
        .load_balancer_ip
        .as_deref()
        .filter(|v| !v.trim().is_empty())
    {
        match ip.trim().parse() {
            Ok(ip) => vec![ip],
            Err(_) => {
                warnings.push(ServiceWarning::InvalidAnnotation(AnnotationProblem {
                    annotation: "spec.loadBalancerIP".into(),
                    value: ip.into(),
                    reason: "not an IP address".into(),
                }));
                vec![]
            }
        }
    } else {
        s.status_ips.iter().filter_map(|v| v.parse().ok()).collect()
    };
    out.sort();
    out.dedup();
    out
}

/// Computes what this node must hold. Bad input on one Service yields warnings for that
/// Service only; it never fails the plan or touches another Service.
pub fn plan(snap: &Snapshot, lead: &Leadership, cfg: &NodeConfig) -> Plan {
    Planner::default().plan(snap, lead, cfg)
}

/// `plan()` with memory: what each Service contributes is computed from that Service's own
/// inputs (its object, its endpoints, whether this node holds it, this node's settings and
/// the cluster's networks) and reused while they stay the same, so a sync after one change
/// redoes the work of one Service. What depends on several Services (a pod claimed by two,
/// a VIP shared) is decided afresh every time. Its result always equals `plan()`'s (a
/// property test holds it to that).
#[derive(Debug, Default)]
pub struct Planner {
    /// Node settings, networks and exclusion the memory was computed with.
    context: Option<(NodeConfig, ClusterNetworks, bool)>,
    memo: HashMap<ServiceKey, Memo>,
    calls: u64,
}

#[derive(Debug)]
struct Memo {
    service: Arc<ServiceInfo>,
    endpoints: Option<Arc<[EndpointInfo]>>,
    holds: bool,
    /// The plan call that last saw the Service (older entries are gone from the cluster).
    seen: u64,
    /// `None`: the Service is not selected.
    draft: Option<Arc<Draft>>,
}

/// What one Service contributes, before the decisions that involve other Services.
#[derive(Debug)]
struct Draft {
    key: ServiceKey,
    sp: ServicePlan,
    claims: Vec<VipClaim>,
    egress: Vec<DraftEgress>,
}

/// One egress policy of a Service, as it is when no other Service claims its pods.
#[derive(Debug)]
struct DraftEgress {
    vip: IpAddr,
    name: String,
    sources: Vec<IpAddr>,
    exclude: Vec<Cidr>,
    allow: Option<Vec<Cidr>>,
    ports: Option<Vec<PortMatch>>,
    built: Result<EgressPolicy, ModelError>,
}

impl Planner {
    pub fn plan(&mut self, snap: &Snapshot, lead: &Leadership, cfg: &NodeConfig) -> Plan {
        let same_context = self
            .context
            .as_ref()
            .is_some_and(|(c, n, x)| c == cfg && *n == snap.networks && *x == snap.node_excluded);
        if !same_context {
            self.memo.clear();
            self.context = Some((cfg.clone(), snap.networks.clone(), snap.node_excluded));
        }
        self.calls += 1;
        let call = self.calls;
        let mut sorted: Vec<&Arc<ServiceInfo>> = snap.services.iter().collect();
        sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut drafts: Vec<Arc<Draft>> = Vec::with_capacity(sorted.len());
        for s in sorted {
            let key = s.key();
            let endpoints = snap.endpoints.get(&key);
            let holds = lead.holds(&key);
            let same = |m: &Memo| {
                m.holds == holds
                    && (Arc::ptr_eq(&m.service, s) || m.service == *s)
                    && match (&m.endpoints, endpoints) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                        _ => false,
                    }
            };
            let memo = match self.memo.get_mut(&key) {
                Some(m) if same(m) => m,
                _ => {
                    let eps = endpoints.map(|e| &e[..]).unwrap_or_default();
                    let draft = draft(s, eps, holds, snap, cfg).map(Arc::new);
                    self.memo.insert(
                        key.clone(),
                        Memo {
                            service: Arc::clone(s),
                            endpoints: endpoints.cloned(),
                            holds,
                            seen: call,
                            draft,
                        },
                    );
                    match self.memo.get_mut(&key) {
                        Some(m) => m,
                        None => continue,
                    }
                }
            };
            // Identical content, new allocation: keep the new one, so the next call
            // recognises it by identity.
            memo.service = Arc::clone(s);
            memo.endpoints = endpoints.cloned();
            memo.seen = call;
            if let Some(d) = &memo.draft {
                drafts.push(Arc::clone(d));
            }
        }
        self.memo.retain(|_, m| m.seen == call);
        combine(&drafts)
    }
}

/// One Service's draft, or `None` when this node does not select it.
fn draft(
    s: &ServiceInfo,
    endpoints: &[EndpointInfo],
    holds: bool,
    snap: &Snapshot,
    cfg: &NodeConfig,
) -> Option<Draft> {
    let a = ServiceAnnotations::parse(&s.annotations);
    if !selected(s, &a, cfg) {
        return None;
    }
    let key = s.key();
    let mut sp = ServicePlan {
        warnings: a
            .problems
            .iter()
            .cloned()
            .map(ServiceWarning::InvalidAnnotation)
            .collect(),
        lease_name: a.lease_name.clone(),
        ..ServicePlan::default()
    };
    sp.vips = service_vips(s, &a, &mut sp.warnings);
    sp.vips.retain(|v| {
        let reserved = cfg.reserved.contains(v);
        if reserved {
            sp.warnings.push(ServiceWarning::VipRefused(*v));
        }
        !reserved
    });
    let on_node = |e: &&EndpointInfo| e.node.as_deref() == Some(cfg.node_name.as_str());
    let local: Vec<IpAddr> = {
        let mut v: Vec<IpAddr> = endpoints
            .iter()
            .filter(|e| e.ready && on_node(e))
            .map(|e| e.address)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    // Egress translates ready pods only; traffic (externalTrafficPolicy: Local) may still go
    // to a terminating pod that serves.
    let serving = endpoints
        .iter()
        .any(|e| (e.ready || e.serving) && on_node(&e));
    let has_local = if a.egress { !local.is_empty() } else { serving };
    let needs_local = s.traffic_policy_local || a.egress;
    sp.candidate = !snap.node_excluded && !sp.vips.is_empty() && (!needs_local || has_local);
    sp.held = sp.candidate && holds;
    let mut claims = Vec::new();
    let mut egress = Vec::new();
    if sp.held {
        for v in &sp.vips {
            match VipClaim::new(*v, cfg.interface.clone()) {
                Ok(c) => claims.push(c),
                Err(e) => sp
                    .warnings
                    .push(ServiceWarning::InvalidAnnotation(AnnotationProblem {
                        annotation: "VIP".into(),
                        value: v.to_string(),
                        reason: e.to_string(),
                    })),
            }
        }
        if a.egress {
            egress = draft_egress(&key, &a, &sp.vips.clone(), &local, snap, &mut sp);
        }
    }
    Some(Draft {
        key,
        sp,
        claims,
        egress,
    })
}

/// The Services' drafts, in key order, made into one plan: a pod egresses through one VIP
/// (the first Service in key order claiming it wins), a VIP is claimed once.
fn combine(drafts: &[Arc<Draft>]) -> Plan {
    let mut services: BTreeMap<ServiceKey, ServicePlan> = BTreeMap::new();
    let mut vips: BTreeMap<IpAddr, VipClaim> = BTreeMap::new();
    let mut policies: Vec<EgressPolicy> = Vec::new();
    let pods = drafts
        .iter()
        .flat_map(|d| d.egress.iter().map(|e| e.sources.len()))
        .sum();
    let mut pod_owner: HashMap<IpAddr, usize> = HashMap::with_capacity(pods);
    for (i, d) in drafts.iter().enumerate() {
        let mut sp = d.sp.clone();
        for c in &d.claims {
            vips.entry(c.address).or_insert_with(|| c.clone());
        }
        for e in &d.egress {
            let mut sources = Vec::with_capacity(e.sources.len());
            for pod in &e.sources {
                match pod_owner.get(pod) {
                    Some(&other) if other != i => {
                        sp.warnings.push(ServiceWarning::EgressRefused(format!(
                            "pod {pod} already egresses through Service {}",
                            drafts[other].key
                        )))
                    }
                    _ => {
                        pod_owner.insert(*pod, i);
                        sources.push(*pod);
                    }
                }
            }
            if sources.is_empty() {
                continue;
            }
            let built = if sources.len() == e.sources.len() {
                e.built.clone()
            } else {
                EgressPolicy::new(
                    e.name.clone(),
                    e.vip,
                    sources.clone(),
                    e.exclude.clone(),
                    e.allow.clone(),
                    e.ports.clone(),
                )
            };
            match built {
                Ok(p) => {
                    sp.egress_pods.insert(e.vip, sources);
                    policies.push(p);
                }
                Err(err) => sp
                    .warnings
                    .push(ServiceWarning::EgressRefused(err.to_string())),
            }
        }
        services.insert(d.key.clone(), sp);
    }
    let desired = DesiredState::new(vips.into_values().collect(), policies);
    Plan { desired, services }
}

/// What may stay of `last` (a state applied earlier) when the current plan's desired state
/// is invalid: only the VIPs of Services the plan still holds, and the egress through them.
/// Keeping the last good state must never mean keeping a VIP whose Lease is gone.
pub fn still_held(last: &DesiredState, plan: &Plan) -> DesiredState {
    let held: BTreeSet<IpAddr> = plan
        .services
        .values()
        .filter(|sp| sp.held)
        .flat_map(|sp| sp.vips.iter().copied())
        .collect();
    last.subset(|v| held.contains(&v.address), |p| held.contains(&p.vip()))
}

/// The egress policies of a held Service, one per VIP family at most.
fn draft_egress(
    key: &ServiceKey,
    a: &ServiceAnnotations,
    vips: &[IpAddr],
    local: &[IpAddr],
    snap: &Snapshot,
    sp: &mut ServicePlan,
) -> Vec<DraftEgress> {
    let mut out = Vec::new();
    let nets = &snap.networks;
    if nets.pod.is_empty() || nets.service.is_empty() {
        let missing = match (nets.pod.is_empty(), nets.service.is_empty()) {
            (true, true) => "pod and service CIDRs",
            (true, false) => "pod CIDR",
            _ => "service CIDR",
        };
        sp.warnings.push(ServiceWarning::EgressRefused(format!(
            "the cluster's {missing} could not be learned (set egress_podcidr / egress_servicecidr); nothing is guessed"
        )));
        return out;
    }
    if a.egress_ports.as_ref().is_some_and(Vec::is_empty) {
        sp.warnings.push(ServiceWarning::EgressRefused(
            "no valid entry in kube-vip.io/egress-destination-ports".into(),
        ));
        return out;
    }
    if a.egress_allowed.as_ref().is_some_and(Vec::is_empty) {
        sp.warnings.push(ServiceWarning::EgressRefused(
            "no valid entry in kube-vip.io/egress-allowed-networks".into(),
        ));
        return out;
    }
    let mut families_done: Vec<Family> = Vec::new();
    for vip in vips {
        let f = Family::of(*vip);
        if families_done.contains(&f) {
            // One policy per family: a pod has one source address per family.
            sp.warnings.push(ServiceWarning::EgressRefused(format!(
                "VIP {vip}: pods egress through the Service's first {} VIP only",
                f.name()
            )));
            continue;
        }
        if f == Family::V6 && !a.egress_ipv6 {
            sp.warnings.push(ServiceWarning::EgressRefused(format!(
                "VIP {vip} is IPv6 and kube-vip.io/egress-ipv6 is not \"true\": no egress through it"
            )));
            continue;
        }
        let of_f = |l: &[Cidr]| {
            l.iter()
                .filter(|c| c.family() == f)
                .copied()
                .collect::<Vec<_>>()
        };
        let mut exclude = of_f(&nets.pod);
        exclude.extend(of_f(&nets.service));
        exclude.extend(
            nets.api_server
                .iter()
                .filter(|x| Family::of(**x) == f)
                .map(|x| Cidr::host(*x)),
        );
        exclude.extend(of_f(&a.egress_denied));
        let allow = match &a.egress_allowed {
            Some(l) => {
                let l = of_f(l);
                if l.is_empty() {
                    sp.warnings.push(ServiceWarning::EgressRefused(format!(
                        "kube-vip.io/egress-allowed-networks has no {} network for VIP {vip}",
                        f.name()
                    )));
                    continue;
                }
                Some(l)
            }
            None => None,
        };
        let sources: Vec<IpAddr> = local
            .iter()
            .filter(|p| Family::of(**p) == f)
            .copied()
            .collect();
        if sources.is_empty() {
            continue;
        }
        families_done.push(f);
        let name = match f {
            Family::V4 => key.to_string(),
            Family::V6 => format!("{key}/ipv6"),
        };
        let built = EgressPolicy::new(
            name.clone(),
            *vip,
            sources.clone(),
            exclude.clone(),
            allow.clone(),
            a.egress_ports.clone(),
        );
        out.push(DraftEgress {
            vip: *vip,
            name,
            sources,
            exclude,
            allow,
            ports: a.egress_ports.clone(),
            built,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations as ann;

    fn svc(ns: &str, name: &str, ann: &[(&str, &str)]) -> ServiceInfo {
        ServiceInfo {
            namespace: ns.into(),
            name: name.into(),
            load_balancer: true,
            annotations: ann
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..ServiceInfo::default()
        }
    }

    fn ep(addr: &str, node: &str) -> EndpointInfo {
        EndpointInfo {
            address: addr.parse().unwrap(),
            node: Some(node.into()),
            ready: true,
            serving: true,
        }
    }

    fn cfg() -> NodeConfig {
        NodeConfig {
            node_name: "n1".into(),
            interface: "eth0".into(),
            class_name: "kube-vip.io/kube-vip-class".into(),
            ..NodeConfig::default()
        }
    }

    fn nets() -> ClusterNetworks {
        ClusterNetworks {
            pod: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/48".parse().unwrap(),
            ],
            service: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:96::/108".parse().unwrap(),
            ],
            api_server: vec!["192.0.2.1".parse().unwrap()],
        }
    }

    fn snap(services: Vec<ServiceInfo>, eps: Vec<(&str, Vec<EndpointInfo>)>) -> Snapshot {
        Snapshot {
            services: services.into_iter().map(Arc::new).collect(),
            endpoints: eps
                .into_iter()
                .map(|(k, v)| {
                    let (ns, n) = k.split_once('/').unwrap();
                    (
                        ServiceKey {
                            namespace: ns.into(),
                            name: n.into(),
                        },
                        v.into(),
                    )
                })
                .collect(),
            networks: nets(),
            node_excluded: false,
        }
    }

    #[test]
    fn egress_goes_through_the_first_vip_of_each_family_only() {
        let s = svc(
            "default",
            "web",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10,198.51.100.11"),
                (ann::EGRESS, "true"),
            ],
        );
        let sn = snap(vec![s], vec![("default/web", vec![ep("10.244.1.5", "n1")])]);
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        let d = p.desired.as_ref().expect("a valid state");
        assert_eq!(d.vips().len(), 2, "both VIPs held");
        assert_eq!(d.egress().len(), 1);
        assert_eq!(d.egress()[0].vip().to_string(), "198.51.100.10");
        let sp = p.services.values().next().unwrap();
        assert!(
            sp.warnings
                .iter()
                .any(|w| w.to_string().contains("198.51.100.11")),
            "{:?}",
            sp.warnings
        );
    }

    /// `externalTrafficPolicy: Local`: a node whose only local endpoint is terminating but
    /// still serving keeps the Service (and, with BGP, its route); one that no longer serves
    /// does not. Egress needs a ready pod to translate.
    #[test]
    fn terminating_but_serving_endpoints_keep_a_local_service() {
        let mut s = svc(
            "default",
            "web",
            &[(ann::LOADBALANCER_IPS, "198.51.100.10")],
        );
        s.traffic_policy_local = true;
        let terminating = |serving: bool| EndpointInfo {
            ready: false,
            serving,
            ..ep("10.244.1.5", "n1")
        };
        for (serving, held) in [(true, true), (false, false)] {
            let sn = snap(
                vec![s.clone()],
                vec![("default/web", vec![terminating(serving)])],
            );
            let p = plan(&sn, &Leadership::Global(true), &cfg());
            let sp = p.services.values().next().expect("planned");
            assert_eq!((sp.candidate, sp.held), (held, held), "serving: {serving}");
            let d = p.desired.as_ref().expect("valid");
            assert_eq!(d.vips().len(), usize::from(held));
        }
        let mut e = s.clone();
        e.annotations.insert(ann::EGRESS.into(), "true".into());
        let sn = snap(vec![e], vec![("default/web", vec![terminating(true)])]);
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        assert!(!p.services.values().next().expect("planned").candidate);
    }

    #[test]
    fn still_held_keeps_only_what_the_plan_still_holds() {
        let mk = |name: &str, vip: &str| {
            svc(
                "default",
                name,
                &[(ann::LOADBALANCER_IPS, vip), (ann::EGRESS, "true")],
            )
        };
        let sn = snap(
            vec![mk("a", "198.51.100.10"), mk("b", "198.51.100.11")],
            vec![
                ("default/a", vec![ep("10.244.1.5", "n1")]),
                ("default/b", vec![ep("10.244.1.6", "n1")]),
            ],
        );
        let both = plan(&sn, &Leadership::Global(true), &cfg());
        let last = both.desired.clone().unwrap();
        assert_eq!(last.vips().len(), 2);
        assert_eq!(still_held(&last, &both), last);
        let only_a: BTreeSet<ServiceKey> = [ServiceKey {
            namespace: "default".into(),
            name: "a".into(),
        }]
        .into();
        let a = plan(&sn, &Leadership::PerService(only_a), &cfg());
        let kept = still_held(&last, &a);
        let vips: Vec<String> = kept.vips().iter().map(|v| v.address.to_string()).collect();
        assert_eq!(vips, ["198.51.100.10"]);
        assert_eq!(kept.egress().len(), 1);
        assert_eq!(kept.egress()[0].name(), "default/a");
        let none = plan(&sn, &Leadership::Global(false), &cfg());
        assert!(still_held(&last, &none).is_empty());
    }

    #[test]
    fn a_service_asking_for_the_control_plane_vip_is_refused_it_and_nothing_else() {
        let mk = |name: &str, vip: &str| {
            svc(
                "default",
                name,
                &[(ann::LOADBALANCER_IPS, vip), (ann::EGRESS, "true")],
            )
        };
        let sn = snap(
            vec![mk("api", "192.0.2.100"), mk("web", "198.51.100.10")],
            vec![
                ("default/api", vec![ep("10.244.1.5", "n1")]),
                ("default/web", vec![ep("10.244.1.6", "n1")]),
            ],
        );
        let c = NodeConfig {
            reserved: vec!["192.0.2.100".parse().unwrap()],
            ..cfg()
        };
        let p = plan(&sn, &Leadership::Global(true), &c);
        let vips: Vec<String> = p
            .desired
            .as_ref()
            .unwrap()
            .vips()
            .iter()
            .map(|v| v.address.to_string())
            .collect();
        assert_eq!(vips, ["198.51.100.10"], "never shared");
        let api = &p.services[&ServiceKey {
            namespace: "default".into(),
            name: "api".into(),
        }];
        assert!(api.vips.is_empty() && !api.held && !api.candidate);
        assert_eq!(
            api.warnings,
            [ServiceWarning::VipRefused("192.0.2.100".parse().unwrap())]
        );
    }

    #[test]
    fn holder_gets_vip_and_every_local_ready_endpoint() {
        let s = svc(
            "default",
            "web",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10"),
                (ann::EGRESS, "true"),
            ],
        );
        let mut not_ready = ep("10.244.1.9", "n1");
        not_ready.ready = false;
        let sn = snap(
            vec![s],
            vec![(
                "default/web",
                vec![
                    ep("10.244.1.5", "n1"),
                    ep("10.244.1.6", "n1"),
                    ep("10.244.2.5", "n2"),
                    not_ready,
                ],
            )],
        );
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        assert_eq!(p.desired.as_ref().unwrap().vips().len(), 1);
        let pol = &p.desired.as_ref().unwrap().egress()[0];
        assert_eq!(pol.name(), "default/web");
        let srcs: Vec<String> = pol.sources().iter().map(ToString::to_string).collect();
        assert_eq!(
            srcs,
            vec!["10.244.1.5", "10.244.1.6"],
            "every local ready endpoint, not only the first"
        );
        let ex: Vec<String> = pol.exclude().iter().map(ToString::to_string).collect();
        assert_eq!(ex, vec!["10.96.0.0/12", "10.244.0.0/16", "192.0.2.1/32"]);
        // Not the holder: nothing.
        let p = plan(&sn, &Leadership::Global(false), &cfg());
        assert!(p.desired.as_ref().unwrap().is_empty());
    }

    #[test]
    fn no_cidrs_refuses_egress_but_keeps_the_vip() {
        let s = svc(
            "default",
            "web",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10"),
                (ann::EGRESS, "true"),
            ],
        );
        let mut sn = snap(vec![s], vec![("default/web", vec![ep("10.244.1.5", "n1")])]);
        sn.networks = ClusterNetworks::default();
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        assert_eq!(p.desired.as_ref().unwrap().vips().len(), 1);
        assert!(p.desired.as_ref().unwrap().egress().is_empty());
        let w = &p.services.values().next().unwrap().warnings;
        assert!(
            matches!(&w[0], ServiceWarning::EgressRefused(r) if r.contains("nothing is guessed")),
            "{w:?}"
        );
    }

    #[test]
    fn bad_annotations_affect_only_their_service() {
        let good = svc(
            "a",
            "good",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10"),
                (ann::EGRESS, "true"),
            ],
        );
        let bad = svc(
            "b",
            "bad",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.11,2001:db8::11"),
                (ann::EGRESS, "true"),
                (ann::EGRESS_PORTS, "tcp:99999,udp:53"),
                (ann::EGRESS_DENIED, "300.1.1.1/8"),
            ],
        );
        let sn = snap(
            vec![good, bad],
            vec![
                ("a/good", vec![ep("10.244.1.5", "n1")]),
                (
                    "b/bad",
                    vec![ep("10.244.1.6", "n1"), ep("fd00:10:244:1::6", "n1")],
                ),
            ],
        );
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        let good = &p.services[&ServiceKey {
            namespace: "a".into(),
            name: "good".into(),
        }];
        assert!(good.warnings.is_empty());
        let bad = &p.services[&ServiceKey {
            namespace: "b".into(),
            name: "bad".into(),
        }];
        let text: Vec<String> = bad.warnings.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|w| w.contains("tcp:99999")), "{text:?}");
        assert!(text.iter().any(|w| w.contains("300.1.1.1/8")), "{text:?}");
        assert!(
            text.iter()
                .any(|w| w.contains("2001:db8::11") && w.contains("egress-ipv6")),
            "{text:?}"
        );
        // Both Services still get their IPv4 egress (the bad one with the valid parts).
        assert_eq!(p.desired.as_ref().unwrap().egress().len(), 2);
        let b = p.desired.as_ref().unwrap().policy("b/bad").unwrap();
        assert_eq!(b.ports().map(<[_]>::len), Some(1));
    }

    #[test]
    fn local_policy_and_egress_need_a_local_endpoint_to_compete() {
        let mut s = svc("d", "x", &[(ann::LOADBALANCER_IPS, "198.51.100.10")]);
        s.traffic_policy_local = true;
        let sn = snap(vec![s.clone()], vec![("d/x", vec![ep("10.244.2.5", "n2")])]);
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        let sp = p.services.values().next().unwrap();
        assert!(!sp.candidate && !sp.held);
        assert!(
            p.desired.as_ref().unwrap().is_empty(),
            "a holder without a local endpoint holds nothing"
        );
        s.traffic_policy_local = false;
        let sn = snap(vec![s], vec![]);
        assert!(
            plan(&sn, &Leadership::Global(true), &cfg())
                .services
                .values()
                .next()
                .unwrap()
                .candidate
        );
    }

    #[test]
    fn a_node_excluded_from_load_balancers_holds_and_competes_for_nothing() {
        let s = svc(
            "d",
            "x",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10"),
                (ann::EGRESS, "true"),
            ],
        );
        let mut sn = snap(vec![s], vec![("d/x", vec![ep("10.244.1.5", "n1")])]);
        let held = plan(&sn, &Leadership::Global(true), &cfg());
        assert!(held.services.values().all(|sp| sp.candidate && sp.held));
        assert!(!held.desired.as_ref().unwrap().is_empty());
        sn.node_excluded = true;
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        assert!(p.services.values().all(|sp| !sp.candidate && !sp.held));
        assert!(
            p.desired.as_ref().unwrap().is_empty(),
            "even while it still leads, an excluded node holds nothing"
        );
    }

    #[test]
    fn selection_by_class_namespace_and_ignore() {
        let mut a = svc("x", "a", &[(ann::LOADBALANCER_IPS, "198.51.100.1")]);
        a.load_balancer_class = Some("other".into());
        let b = svc(
            "x",
            "b",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.2"),
                (ann::IGNORE, "true"),
            ],
        );
        let c = svc("y", "c", &[(ann::LOADBALANCER_IPS, "198.51.100.3")]);
        let mut d = svc("x", "d", &[(ann::LOADBALANCER_IPS, "198.51.100.4")]);
        d.load_balancer_class = Some("kube-vip.io/kube-vip-class".into());
        let mut e = svc("x", "e", &[(ann::LOADBALANCER_IPS, "198.51.100.5")]);
        e.load_balancer = false;
        let sn = snap(vec![a, b, c, d, e], vec![]);
        let names = |cfg: &NodeConfig| -> Vec<String> {
            plan(&sn, &Leadership::Global(true), cfg)
                .services
                .keys()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(names(&cfg()), vec!["x/d", "y/c"]);
        let mut only = cfg();
        only.class_only = true;
        assert_eq!(names(&only), vec!["x/d"]);
        let mut ns = cfg();
        ns.namespace = Some("y".into());
        assert_eq!(names(&ns), vec!["y/c"]);
    }

    #[test]
    fn a_pod_in_two_egress_services_egresses_through_the_first() {
        let a = svc(
            "a",
            "one",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.1"),
                (ann::EGRESS, "true"),
            ],
        );
        let b = svc(
            "b",
            "two",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.2"),
                (ann::EGRESS, "true"),
            ],
        );
        let sn = snap(
            vec![b, a],
            vec![
                ("a/one", vec![ep("10.244.1.5", "n1")]),
                (
                    "b/two",
                    vec![ep("10.244.1.5", "n1"), ep("10.244.1.6", "n1")],
                ),
            ],
        );
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        assert_eq!(
            p.desired
                .as_ref()
                .unwrap()
                .policy("a/one")
                .unwrap()
                .sources()
                .len(),
            1
        );
        let two = p.desired.as_ref().unwrap().policy("b/two").unwrap();
        assert_eq!(two.sources(), &["10.244.1.6".parse::<IpAddr>().unwrap()]);
        let w = &p.services[&ServiceKey {
            namespace: "b".into(),
            name: "two".into(),
        }]
            .warnings;
        assert!(w.iter().any(|w| {
            w.to_string()
                .contains("already egresses through Service a/one")
        }));
    }

    #[test]
    fn vip_sources_in_order_and_per_service_leadership() {
        let mut s = svc("d", "x", &[]);
        s.load_balancer_ip = Some("198.51.100.7".into());
        s.status_ips = vec!["198.51.100.8".into()];
        let mut t = svc("d", "y", &[]);
        t.status_ips = vec!["198.51.100.9".into()];
        let sn = snap(vec![s, t], vec![]);
        let held: BTreeSet<ServiceKey> = [ServiceKey {
            namespace: "d".into(),
            name: "y".into(),
        }]
        .into();
        let p = plan(&sn, &Leadership::PerService(held), &cfg());
        let x = &p.services[&ServiceKey {
            namespace: "d".into(),
            name: "x".into(),
        }];
        assert_eq!(x.vips, vec!["198.51.100.7".parse::<IpAddr>().unwrap()]);
        assert!(!x.held);
        let addrs: Vec<String> = p
            .desired
            .as_ref()
            .unwrap()
            .vips()
            .iter()
            .map(|v| v.address.to_string())
            .collect();
        assert_eq!(addrs, vec!["198.51.100.9"]);
    }

    #[test]
    fn dual_stack_egress() {
        let s = svc(
            "d",
            "x",
            &[
                (ann::LOADBALANCER_IPS, "198.51.100.10,2001:db8::10"),
                (ann::EGRESS, "true"),
                (ann::EGRESS_IPV6, "true"),
            ],
        );
        let sn = snap(
            vec![s],
            vec![(
                "d/x",
                vec![ep("10.244.1.5", "n1"), ep("fd00:10:244:1::5", "n1")],
            )],
        );
        let p = plan(&sn, &Leadership::Global(true), &cfg());
        let names: Vec<&str> = p
            .desired
            .as_ref()
            .unwrap()
            .egress()
            .iter()
            .map(|p| p.name())
            .collect();
        assert_eq!(names, vec!["d/x", "d/x/ipv6"]);
        assert_eq!(p.desired.as_ref().unwrap().vips().len(), 2);
    }
}
