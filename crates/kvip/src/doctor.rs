//! `kvip doctor`: looks at this node (and the cluster, when the API answers) for what would
//! make kvip misbehave, and says for each finding how to fix it. Changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;
use kvip_core::Family;
use kvip_core::config::AgentConfig;
use kvip_core::plan::{ClusterNetworks, ServiceKey};
use kvip_core::{Leadership, Snapshot, plan};
use kvip_dataplane::exec::run_tool;
use kvip_dataplane::iptables::{Chains, rule_count};
use kvip_dataplane::nft::NAT_PRIORITY;
use kvip_dataplane::{Config, Dataplane, Instance, KernelDataplane, Variant};
use kvip_kube::cluster::{EXCLUDE_FROM_LB_LABEL, service_info, slice_endpoints};
use kvip_kube::discovery;
use kvip_kube::elections::default_service_lease;
use serde::Serialize;
use serde_json::Value;

/// How bad a finding is. Both make the exit status 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// kvip cannot work as configured.
    Error,
    /// kvip works, but something will surprise you.
    Warning,
}

/// One problem, and how to fix it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// A stable name for scripts: `vip-interface`, `ip-forward`, `rp-filter`,
    /// `kube-vip-leftovers`, `iptables-split`, `masquerade-first`, `kvip-stray`, `cidrs`,
    /// `rbac`, `state-differs`, `bgp-agent`, `bgp-peer`, `bfd`, `bgp-next-hop`.
    pub check: &'static str,
    pub severity: Severity,
    pub problem: String,
    pub fix: String,
}

/// Something worth knowing that is not a problem (where a CIDR came from, the backend, ...).
#[derive(Debug, Clone, Serialize)]
pub struct Fact {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub node: String,
    pub facts: Vec<Fact>,
    pub findings: Vec<Finding>,
}

impl Report {
    fn fact(&mut self, name: &str, value: impl Into<String>) {
        self.facts.push(Fact {
            name: name.into(),
            value: value.into(),
        });
    }

    fn finding(&mut self, check: &'static str, severity: Severity, problem: String, fix: String) {
        self.findings.push(Finding {
            check,
            severity,
            problem,
            fix,
        });
    }

    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn text(&self) -> String {
        let mut out = format!("kvip doctor on node {}\n", self.node);
        for f in &self.facts {
            out.push_str(&format!("  {}: {}\n", f.name, f.value));
        }
        for f in &self.findings {
            let sev = match f.severity {
                Severity::Error => "ERROR  ",
                Severity::Warning => "WARNING",
            };
            out.push_str(&format!(
                "{sev} {}: {}\n        fix: {}\n",
                f.check, f.problem, f.fix
            ));
        }
        out.push_str(&match self.findings.len() {
            0 => "no problem found\n".to_string(),
            1 => "1 problem found\n".to_string(),
            n => format!("{n} problems found\n"),
        });
        out
    }
}

fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()
        .map(|s| s.trim().to_string())
}

async fn tool(cmd: &str, args: &[&str]) -> Option<String> {
    match run_tool(cmd, args, None).await {
        Ok(o) if o.status_ok => Some(o.stdout),
        _ => None,
    }
}

/// Runs every check; the API's only when a client can be made and answers.
pub async fn run(cfg: &AgentConfig) -> Result<Report> {
    let mut r = Report {
        node: cfg.node_name.clone(),
        ..Report::default()
    };
    let interface = cfg.interface().map(str::to_string);
    check_interface(&mut r, interface.as_deref()).await;
    check_sysctls(&mut r, interface.as_deref());
    check_kube_vip(&mut r).await;
    check_iptables_split(&mut r).await;
    let instance = Instance::new(cfg.instance_name.as_deref())?;
    check_masquerade_first(&mut r, &instance).await;
    let dp = KernelDataplane::new(Config {
        instance,
        backend: crate::agent::backend_kind(cfg),
        iptables_variant: None,
        no_conntrack_flush: true,
        announce: Default::default(),
    })
    .await;
    let observed = match &dp {
        Ok(dp) => {
            r.fact("backend", dp.backend().name());
            match dp.observe().await {
                Ok(o) => {
                    if !o.stray.is_empty() {
                        r.finding(
                            "kvip-stray",
                            Severity::Warning,
                            format!("kvip's objects not in the form kvip writes: {}", o.stray.join("; ")),
                            "the agent replaces them at its next read-back (resync_period); `kvip dataplane show` lists kvip's objects".into(),
                        );
                    }
                    r.fact(
                        "held now",
                        format!(
                            "{} VIP(s), {} egress pod(s)",
                            o.state.vips().len(),
                            o.state.source_count()
                        ),
                    );
                    Some(o.state)
                }
                Err(e) => {
                    r.fact("kvip's kernel state", format!("unreadable: {e}"));
                    None
                }
            }
        }
        Err(e) => {
            r.fact("backend", format!("unusable: {e}"));
            None
        }
    };
    if cfg.bgp.is_some() {
        check_bgp(&mut r, &cfg.prometheus_server).await;
    }
    let client = match crate::agent::client(cfg).await {
        Ok(c) => c,
        Err(e) => {
            r.fact(
                "API",
                format!("not used ({e}): the checks that need it were skipped"),
            );
            return Ok(r);
        }
    };
    check_api(&mut r, cfg, client, interface, observed).await;
    Ok(r)
}

/// The running agent's `/bgp`, on its metrics address.
async fn agent_bgp(prometheus_server: &str) -> Result<Vec<crate::metrics::BgpPeerReport>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = crate::metrics::listen_address(prometheus_server).map_err(|e| e.to_string())?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /bgp HTTP/1.0\r\nHost: kvip\r\n\r\n")
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(2), ask)
        .await
        .map_err(|_| format!("{addr} did not answer within 2 s"))?
        .map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "{addr}/bgp answered {}",
            head.lines().next().unwrap_or("")
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("{addr}/bgp: {e}"))
}

/// BGP mode: each peer's session, as the running agent reports it.
async fn check_bgp(r: &mut Report, prometheus_server: &str) {
    let peers = match agent_bgp(prometheus_server).await {
        Ok(p) => p,
        Err(e) => {
            r.finding(
                "bgp-agent",
                Severity::Warning,
                format!("the BGP sessions could not be read from the running agent: {e}"),
                "run kvip doctor on a node where kvip runs, with the same prometheus_server".into(),
            );
            return;
        }
    };
    let up = peers.iter().filter(|p| p.state == "established").count();
    r.fact("BGP", format!("{} peer(s), {up} established", peers.len()));
    for p in &peers {
        if p.state != "established" {
            r.finding(
                "bgp-peer",
                Severity::Error,
                format!(
                    "the BGP session with {} (AS {}) is {}: {}",
                    p.peer,
                    p.remote_as,
                    p.state,
                    p.last_error.as_deref().unwrap_or("no attempt has finished yet")
                ),
                "check the router's neighbour for this node (address, AS, password), that TCP port 179 reaches it, and the agent's log".into(),
            );
        } else if let Some(b) = p.bfd.as_deref().filter(|b| *b != "up") {
            r.finding(
                "bfd",
                Severity::Warning,
                format!("the BFD session with {} is {b} while BGP is established", p.peer),
                "enable BFD for this node on the router (kvip sends to UDP port 3784), or remove the bfd field from bgp_peers".into(),
            );
        }
        if !p.routes_unannounced.is_empty() {
            r.finding(
                "bgp-next-hop",
                Severity::Warning,
                format!(
                    "{} cannot be announced to {}: no next hop of their family on this session",
                    p.routes_unannounced.join(", "),
                    p.peer
                ),
                "set bgp_sourceif (its global addresses are the next hops), or mpbgp_nexthop=fixed with mpbgp_ipv4/mpbgp_ipv6".into(),
            );
        }
    }
}

async fn check_interface(r: &mut Report, interface: Option<&str>) {
    let Some(ifname) = interface else {
        r.finding(
            "vip-interface",
            Severity::Error,
            "vip_interface is not set: kvip has nowhere to put VIPs".into(),
            "set vip_interface (or vip_servicesinterface) to the interface of the VIPs' subnet"
                .into(),
        );
        return;
    };
    let Some(out) = tool("ip", &["-j", "link", "show", "dev", ifname]).await else {
        r.finding(
            "vip-interface",
            Severity::Error,
            format!("interface {ifname} (vip_interface) does not exist"),
            "set vip_interface to an existing interface (`ip link` lists them)".into(),
        );
        return;
    };
    let links: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let up = links[0]["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"));
    r.fact(
        "interface",
        format!(
            "{ifname} ({})",
            links[0]["operstate"].as_str().unwrap_or("unknown")
        ),
    );
    if !up {
        r.finding(
            "vip-interface",
            Severity::Error,
            format!("interface {ifname} (vip_interface) is down: VIPs on it are unreachable"),
            format!("ip link set {ifname} up (and find out who set it down)"),
        );
    }
}

fn check_sysctls(r: &mut Report, interface: Option<&str>) {
    if sysctl("net/ipv4/ip_forward").as_deref() != Some("1") {
        r.finding(
            "ip-forward",
            Severity::Error,
            "net.ipv4.ip_forward is off: the node does not forward its pods' traffic, so no pod can leave through a VIP".into(),
            "sysctl -w net.ipv4.ip_forward=1, and persist it in /etc/sysctl.d/".into(),
        );
    }
    let Some(ifname) = interface else { return };
    let level = |p: &str| sysctl(p).and_then(|v| v.parse::<u8>().ok()).unwrap_or(0);
    // The kernel applies the larger of `all` and the interface's own value.
    let effective = level("net/ipv4/conf/all/rp_filter")
        .max(level(&format!("net/ipv4/conf/{ifname}/rp_filter")));
    if effective == 1 {
        r.finding(
            "rp-filter",
            Severity::Warning,
            format!("strict reverse-path filtering (rp_filter=1) applies to {ifname}: packets to a VIP from clients whose route back leaves by another interface are dropped"),
            format!("use loose mode: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{ifname}.rp_filter=2, persisted in /etc/sysctl.d/"),
        );
    }
}

async fn check_kube_vip(r: &mut Report) {
    let found = kvip_dataplane::legacy::find_legacy().await;
    if !found.removed.is_empty() {
        r.finding(
            "kube-vip-leftovers",
            Severity::Warning,
            format!(
                "kube-vip's egress rules are still on this node (they may send pods out with a stale source): {}",
                found.removed.join("; ")
            ),
            "kvip dataplane clean-legacy (removes exactly these), or start the agent with egress_clean=true".into(),
        );
    }
}

async fn check_iptables_split(r: &mut Report) {
    let count = |v| async move { rule_count(v).await.unwrap_or(0) };
    let (legacy, nft) = (count(Variant::Legacy).await, count(Variant::Nft).await);
    if legacy > 0 && nft > 0 {
        r.finding(
            "iptables-split",
            Severity::Warning,
            format!("rules in both iptables variants: {legacy} in iptables-legacy, {nft} in iptables-nft; each `iptables` shows only its own, so no single listing shows what the kernel does"),
            "settle on one variant (update-alternatives --config iptables; the CNI and kube-proxy must agree) and remove the other's rules; iptables-legacy-save and iptables-nft-save list each".into(),
        );
    }
}

/// Whether `chain` of `family` `table` translates (masquerade or snat), itself or through
/// the chains it jumps or goes to.
fn translates(
    rules: &BTreeMap<(String, String, String), Vec<Value>>,
    (family, table, chain): (&str, &str, &str),
    seen: &mut BTreeSet<String>,
) -> bool {
    if !seen.insert(chain.to_string()) {
        return false;
    }
    let key = (family.to_string(), table.to_string(), chain.to_string());
    rules.get(&key).into_iter().flatten().any(|expr| {
        expr.as_array().into_iter().flatten().any(|x| {
            if x.get("masquerade").is_some() || x.get("snat").is_some() {
                return true;
            }
            let target = x["jump"]["target"]
                .as_str()
                .or_else(|| x["goto"]["target"].as_str());
            target.is_some_and(|t| translates(rules, (family, table, t), seen))
        })
    })
}

/// kvip's SNAT must come before any masquerade: nftables chains hooked at or before kvip's
/// priority (at the same priority the order is not defined) that translate, themselves or
/// through a jump; or, with the iptables backend, rules above kvip's jump.
async fn check_masquerade_first(r: &mut Report, instance: &Instance) {
    let table = instance.nft_table();
    if let Some(out) = tool("nft", &["-j", "list", "ruleset"]).await {
        let listing: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let items = listing["nftables"].as_array().cloned().unwrap_or_default();
        let ours = items.iter().any(|i| {
            i["table"]["name"].as_str() == Some(table.as_str())
                && i["table"]["family"].as_str() == Some("inet")
        });
        let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
        let mut rules: BTreeMap<(String, String, String), Vec<Value>> = BTreeMap::new();
        for rule in items.iter().filter_map(|i| i.get("rule")) {
            rules
                .entry((
                    text(rule, "family"),
                    text(rule, "table"),
                    text(rule, "chain"),
                ))
                .or_default()
                .push(rule["expr"].clone());
        }
        let early = items
            .iter()
            .filter_map(|i| i.get("chain"))
            .filter(|c| {
                ours && c["type"] == "nat"
                    && c["hook"] == "postrouting"
                    && c["table"].as_str() != Some(table.as_str())
            })
            .filter_map(|c| {
                let prio = c["prio"].as_i64()?;
                (prio <= i64::from(NAT_PRIORITY))
                    .then(|| (text(c, "family"), text(c, "table"), text(c, "name"), prio))
            });
        for (family, tbl, chain, prio) in early {
            if translates(&rules, (&family, &tbl, &chain), &mut BTreeSet::new()) {
                r.finding(
                    "masquerade-first",
                    Severity::Error,
                    format!("nftables chain {family} {tbl} {chain} translates at priority {prio}, not after kvip's SNAT (priority {NAT_PRIORITY}): egress pods may leave with that chain's address, not the VIP"),
                    "hook that NAT at priority srcnat (100) or later, or exclude the egress pods from it".into(),
                );
            }
        }
    }
    let chain = Chains::new(instance.chain_prefix()).post();
    for variant in [Variant::Legacy, Variant::Nft] {
        for fam in [Family::V4, Family::V6] {
            let cmd = variant.save_cmd(fam);
            let Some(save) = tool(cmd, &["-t", "nat"]).await else {
                continue;
            };
            let who = cmd.trim_end_matches("-save");
            if !save.contains(&format!(":{chain} ")) {
                continue;
            }
            let post: Vec<&str> = save
                .lines()
                .filter(|l| l.starts_with("-A POSTROUTING "))
                .collect();
            let jump = post
                .iter()
                .position(|l| l.ends_with(&format!("-j {chain}")));
            let before: Vec<&&str> = post[..jump.unwrap_or(post.len())]
                .iter()
                .filter(|l| l.contains("-j MASQUERADE") || l.contains("-j SNAT"))
                .collect();
            if jump.is_none() {
                r.finding(
                    "masquerade-first",
                    Severity::Error,
                    format!("{who}: kvip's chain {chain} exists but nat POSTROUTING does not jump to it: no egress pod is translated"),
                    "the agent puts the jump back at its next read-back (resync_period); if it keeps disappearing, find what rewrites POSTROUTING".into(),
                );
            } else if !before.is_empty() {
                r.finding(
                    "masquerade-first",
                    Severity::Error,
                    format!("{who}: nat POSTROUTING translates before kvip's jump: {}", before.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("; ")),
                    "kvip keeps its jump first; something inserted rules above it since: the agent repairs it at its next read-back, and the other tool should append, not insert".into(),
                );
            }
        }
    }
}

/// Whether `lease` names `node` as a holder whose term has not run out.
fn holds(lease: &Lease, node: &str) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_microsecond());
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    spec.holder_identity.as_deref() == Some(node) && renewed.is_some_and(|t| t + duration > now)
}

async fn check_api(
    r: &mut Report,
    cfg: &AgentConfig,
    (client, url): (kube::Client, http::Uri),
    interface: Option<String>,
    observed: Option<kvip_core::DesiredState>,
) {
    let found = discovery::discover(
        &client,
        cfg.egress_pod_cidr.clone(),
        cfg.egress_service_cidr.clone(),
    )
    .await;
    for (kind, v) in [("pod CIDR", &found.pod), ("service CIDR", &found.service)] {
        match v {
            Some((cidrs, source)) => r.fact(
                kind,
                format!(
                    "{} (from {source})",
                    cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            None => r.finding(
                "cidrs",
                Severity::Warning,
                format!("no {kind} configured or discovered{}: egress is refused for every Service (VIPs still work)", if found.denied.is_empty() { String::new() } else { format!(" (denied: {})", found.denied.join("; ")) }),
                "set egress_podcidr and egress_servicecidr, or grant what discovery reads (`kvip manifest rbac` without --pod-cidr/--service-cidr)".into(),
            ),
        }
    }
    // RBAC, through SelfSubjectAccessReview: what the agent calls, for this identity — the
    // agent's own check, with the namespaces of the Services it would select.
    let needs = crate::agent::permissions::Needs::for_config(cfg);
    let mut namespaces = BTreeSet::new();
    if cfg.svc_election {
        let services: Api<Service> = match &cfg.namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        if let Ok(list) = services.list(&ListParams::default()).await {
            namespaces.extend(
                list.items
                    .iter()
                    .filter_map(|s| s.metadata.namespace.clone()),
            );
        }
    }
    match crate::agent::permissions::check(&client, &needs, &namespaces).await {
        Ok(missing) if !missing.is_empty() => r.finding(
            "rbac",
            Severity::Error,
            format!(
                "this identity may not: {}",
                missing
                    .iter()
                    .map(|m| m.what())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            format!(
                "{} (run the doctor with the agent's own service account to check the agent)",
                needs.fix()
            ),
        ),
        Ok(_) => {}
        Err(e) => r.fact("RBAC", format!("not checked: {e}")),
    }
    // What this node should hold, from the API now, against what the kernel holds.
    let Some(observed) = observed else { return };
    let Some(interface) = interface else { return };
    let networks = ClusterNetworks {
        pod: found.pod.map(|p| p.0).unwrap_or_default(),
        service: found.service.map(|s| s.0).unwrap_or_default(),
        api_server: crate::agent::api_server_addresses(&url),
    };
    let (services, slices): (Api<Service>, Api<EndpointSlice>) = match &cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (Ok(svc_list), Ok(slice_list)) = (
        services.list(&ListParams::default()).await,
        slices.list(&ListParams::default()).await,
    ) else {
        r.fact(
            "expected state",
            "not computed: Services or EndpointSlices unreadable",
        );
        return;
    };
    let node_excluded = Api::<Node>::all(client.clone())
        .get_opt(&cfg.node_name)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.metadata.labels)
        .is_some_and(|l| l.contains_key(EXCLUDE_FROM_LB_LABEL));
    let mut endpoints: BTreeMap<ServiceKey, Vec<_>> = BTreeMap::new();
    for s in &slice_list.items {
        if let Some((k, eps)) = slice_endpoints(s) {
            endpoints.entry(k).or_default().extend(eps);
        }
    }
    let snapshot = Snapshot {
        services: svc_list
            .items
            .iter()
            .map(|s| std::sync::Arc::new(service_info(s)))
            .collect(),
        endpoints: endpoints.into_iter().map(|(k, v)| (k, v.into())).collect(),
        networks,
        node_excluded,
    };
    let node = crate::agent::node_config(cfg, interface);
    let leadership = if !cfg.leader_election {
        Leadership::Global(true)
    } else if cfg.svc_election {
        let mut held = BTreeSet::new();
        for (key, sp) in plan(&snapshot, &Leadership::None, &node).services {
            let name = sp
                .lease_name
                .clone()
                .unwrap_or_else(|| default_service_lease(&key.name));
            let leases: Api<Lease> = Api::namespaced(client.clone(), &key.namespace);
            if let Ok(Some(l)) = leases.get_opt(&name).await
                && holds(&l, &cfg.node_name)
            {
                held.insert(key);
            }
        }
        Leadership::PerService(held)
    } else {
        let leases: Api<Lease> = Api::namespaced(client.clone(), &needs.own_namespace);
        Leadership::Global(
            leases
                .get_opt(&cfg.lease_name)
                .await
                .ok()
                .flatten()
                .is_some_and(|l| holds(&l, &cfg.node_name)),
        )
    };
    let want = match plan(&snapshot, &leadership, &node).desired {
        Ok(w) => w,
        Err(e) => {
            r.finding(
                "state-differs",
                Severity::Error,
                format!("the desired state cannot be computed: {e}"),
                "this is a bug in kvip: report it with the Services of this cluster".into(),
            );
            return;
        }
    };
    r.fact(
        "should hold",
        format!(
            "{} VIP(s), {} egress pod(s)",
            want.vips().len(),
            want.source_count()
        ),
    );
    let kinds = want.drift(&observed);
    if !kinds.is_empty() {
        let vips = |s: &kvip_core::DesiredState| {
            s.vips()
                .iter()
                .map(|v| v.address.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        r.finding(
            "state-differs",
            Severity::Error,
            format!(
                "kvip's kernel state differs from what this node should hold ({}): VIPs held [{}], should be [{}]; egress pods held {}, should be {}",
                kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
                vips(&observed),
                vips(&want),
                observed.source_count(),
                want.source_count()
            ),
            "the agent repairs this within resync_period: if it stays, check that the agent runs on this node (with the same settings as this command) and read its log; during a failover a difference is expected for a few seconds".into(),
        );
    }
}

/// The command: prints the report, returns whether nothing is wrong.
pub async fn command(cfg: &AgentConfig, json: bool) -> Result<bool> {
    let report = run(cfg).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.ok())
}
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum DoctorOutput {
    Text,
    Json,
}

/// `kvip doctor`: whether nothing is wrong.
pub(crate) fn from_cli(set: &[String], output: DoctorOutput) -> Result<bool> {
    let mut vars = crate::settings::run_settings(set)?;
    crate::settings::default_node_name(&mut vars)?;
    let cfg = kvip_core::config::AgentConfig::from_env(&vars)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?
        .block_on(command(&cfg, matches!(output, DoctorOutput::Json)))
}
