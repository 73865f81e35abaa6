//! Helpers of the agent tests: the real `kvip run` in node namespaces against the test API
//! server, and what the tests read back from the kernel and the API.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::Netns;
use kvip_testkit::apiserver::ApiServer;
use serde_json::json;

pub const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

pub fn service(egress: bool) -> Service {
    let mut ann = json!({"kube-vip.io/loadbalancerIPs": "192.0.2.10"});
    if egress {
        ann["kube-vip.io/egress"] = json!("true");
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "annotations": ann},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service")
}

pub fn slice(pod: &str) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [pod], "nodeName": "n1", "conditions": {"ready": true}}]
    }))
    .expect("slice")
}

pub struct Agent {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Agent {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (the child is kvip itself: `ip netns exec` and `env` exec it), and reap it.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(self.log.with_extension("kubeconfig"));
    }
}

/// The logs of several agents, one after the other.
pub fn logs<'a>(agents: impl IntoIterator<Item = &'a Agent>) -> String {
    agents
        .into_iter()
        .map(Agent::log)
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// A kubeconfig for `url` (no credentials: the test API server takes any), named by `tag`;
/// removed with the agent's log.
pub fn write_kubeconfig(tag: &str, url: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "kvip-agent-{tag}-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(&path, ApiServer::kubeconfig(url)).expect("kubeconfig");
    path
}

pub fn start_agent(ns: &Netns, url: &str, tag: &str) -> Agent {
    start_agent_as(ns, url, tag, "n1")
}

pub fn start_agent_as(ns: &Netns, url: &str, tag: &str, node: &str) -> Agent {
    start_agent_with(ns, url, tag, node, true)
}

/// Starts `kvip run` in `ns`; with `cidrs`, the pod and service CIDRs are configured (so no
/// discovery call is made).
pub fn start_agent_with(ns: &Netns, url: &str, tag: &str, node: &str, cidrs: bool) -> Agent {
    start_agent_full(ns, url, tag, node, cidrs, false)
}

pub fn start_agent_full(
    ns: &Netns,
    url: &str,
    tag: &str,
    node: &str,
    cidrs: bool,
    per_service: bool,
) -> Agent {
    start_agent_env(ns, url, tag, node, cidrs, per_service, &[])
}

/// As [`start_agent_full`], with `extra` settings (`name=value`) after the defaults (later
/// ones win).
pub fn start_agent_env(
    ns: &Netns,
    url: &str,
    tag: &str,
    node: &str,
    cidrs: bool,
    per_service: bool,
    extra: &[&str],
) -> Agent {
    let dir = std::env::temp_dir();
    let kubeconfig = write_kubeconfig(tag, url);
    let log = dir.join(format!("kvip-agent-{tag}-{}.log", std::process::id()));
    let child = ns
        .clean_env_command()
        .arg(format!("NODE_NAME={node}"))
        .args([
            "vip_interface=eth0",
            "vip_leaseduration=4",
            "vip_renewdeadline=2",
            "vip_retryperiod=1",
            "POD_NAMESPACE=kube-system",
        ])
        .args(if cidrs {
            &[
                "egress_podcidr=10.244.0.0/16",
                "EGRESS_SERVICECIDR=10.96.0.0/12",
            ][..]
        } else {
            &[][..]
        })
        .arg(format!("svc_election={per_service}"))
        .arg(format!("k8s_config_file={}", kubeconfig.display()))
        .args(extra)
        // One option through the command line, the rest through the environment.
        .args([KVIP, "run", "--set", "vip_arp=true"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start kvip run");
    Agent { child, log }
}

/// A runtime and the Service and EndpointSlice APIs of the test API server (loopback).
pub fn api(server: &ApiServer) -> (tokio::runtime::Runtime, Api<Service>, Api<EndpointSlice>) {
    let (rt, client) = server.runtime_and_client();
    (
        rt,
        Api::namespaced(client.clone(), "default"),
        Api::namespaced(client, "default"),
    )
}

/// Creates Service default/web (egress) and its EndpointSlice with one pod on n1.
pub fn create_web(
    rt: &tokio::runtime::Runtime,
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    pod: &str,
) {
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(true))
            .await
            .expect("service");
        slices
            .create(&PostParams::default(), &slice(pod))
            .await
            .expect("slice");
    });
}

/// Replaces the pod of default/web's EndpointSlice (guarded by its resourceVersion).
pub fn set_web_pod(rt: &tokio::runtime::Runtime, slices: &Api<EndpointSlice>, pod: &str) {
    rt.block_on(put(slices, "web-1", slice(pod)));
}

/// Polls `f` every 20 ms until it holds and returns how long that took; fails after `limit`
/// naming `what`, with `context()` (the agents' logs, say).
pub fn wait_until(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// [`wait_until`] with one agent's log as the context.
pub fn until(what: &str, agent: &Agent, limit: Duration, f: impl FnMut() -> bool) {
    wait_until(what, limit, || format!("agent log:\n{}", agent.log()), f);
}

/// `nft list ruleset` in `ns`; the test fails when the listing does.
pub fn rules(ns: &Netns) -> String {
    ns.exec_ok("nft", &["list", "ruleset"])
        .expect("nft list ruleset")
}

/// The addresses of `eth0` in `ns`; the test fails when the listing does.
pub fn addresses(ns: &Netns) -> String {
    ns.exec_ok("ip", &["addr", "show", "eth0"])
        .expect("ip addr show eth0")
}

pub fn has_vip(ns: &Netns) -> bool {
    addresses(ns).contains("192.0.2.10/32")
}

/// A plain HTTP GET from inside `ns` (the agent's metrics server listens there); the test
/// fails when the server cannot be reached.
pub fn http_get(ns: &Netns, path: &str) -> String {
    try_http_get(ns, path).expect("the agent's metrics server answers")
}

/// [`http_get`], `None` when the server cannot be reached (yet).
pub fn try_http_get(ns: &Netns, path: &str) -> Option<String> {
    use std::io::Read;
    let path = path.to_string();
    ns.enter(move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:2112")?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("netns")
    .ok()
}

pub type Permission = (String, String, String, kvip_kube::rbac::Scope);

/// The permissions the calls through `listener` needed. SelfSubjectAccessReviews (the
/// agent's permission checks) are left out: Kubernetes grants them to every authenticated
/// identity (the `system:basic-user` ClusterRole), so kvip's RBAC does not.
pub fn used_permissions(
    server: &ApiServer,
    listener: usize,
) -> std::collections::BTreeSet<Permission> {
    server
        .calls()
        .iter()
        .filter(|c| c.listener == listener && c.resource != "selfsubjectaccessreviews")
        .map(|c| {
            kvip_kube::rbac::rule_for(
                &c.verb,
                &c.group_version,
                &c.resource,
                &c.namespace,
                "kube-system",
            )
        })
        .collect()
}

/// What `kvip manifest rbac` grants, in the form [`used_permissions`] reports calls.
pub fn granted_permissions(
    discovery: bool,
    per_service_leases: bool,
) -> std::collections::BTreeSet<Permission> {
    kvip_kube::rbac::rules_for(discovery, per_service_leases)
        .iter()
        .map(|r| {
            (
                r.group.to_string(),
                r.resource.to_string(),
                r.verb.to_string(),
                r.scope,
            )
        })
        .collect()
}

/// `n` node namespaces, each with an `eth0` whose peer is in a namespace of its own.
pub fn node_pairs(tag: &str, n: usize) -> (Vec<Netns>, Vec<Netns>) {
    (0..n).map(|i| node_pair(&format!("{tag}{i}"))).unzip()
}

/// `n` nodes (see [`node_pairs`]) and the test API server, listening in each: the server,
/// the nodes, their peers, and the URL to use in each node.
pub fn nodes_with_api(tag: &str, n: usize) -> (ApiServer, Vec<Netns>, Vec<Netns>, Vec<String>) {
    let server = ApiServer::start().expect("api server");
    let (nodes, peers) = node_pairs(tag, n);
    let urls = nodes
        .iter()
        .map(|ns| server.listen_in(ns).expect("listen in the node namespace"))
        .collect();
    (server, nodes, peers, urls)
}

/// A node namespace with an `eth0` whose peer is in a namespace of its own.
pub fn node_pair(tag: &str) -> (Netns, Netns) {
    let ns = Netns::new(tag).expect("netns");
    let peer = Netns::new(&format!("{tag}p")).expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    (ns, peer)
}

/// A node (see [`node_pair`]) and the test API server, listening in it at the URL returned.
pub fn node_with_api(tag: &str) -> (Netns, Netns, ApiServer, String) {
    let (ns, peer) = node_pair(tag);
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&ns).expect("listen in the node namespace");
    (ns, peer, server, url)
}

pub fn holders(nodes: &[Netns]) -> Vec<usize> {
    (0..nodes.len()).filter(|i| has_vip(&nodes[*i])).collect()
}

pub fn named_service(name: &str, vip: &str, egress: bool) -> Service {
    let mut s = service(egress);
    s.metadata.name = Some(name.into());
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.insert("kube-vip.io/loadbalancerIPs".into(), vip.into());
    }
    s
}

pub fn named_slice(service: &str, pod: &str, node: &str) -> EndpointSlice {
    let mut s = slice(pod);
    s.metadata.name = Some(format!("{service}-1"));
    if let Some(l) = s.metadata.labels.as_mut() {
        l.insert("kubernetes.io/service-name".into(), service.into());
    }
    s.endpoints[0].node_name = Some(node.into());
    s
}

pub fn holders_of(nodes: &[Netns], vip: &str) -> Vec<usize> {
    (0..nodes.len())
        .filter(|i| addresses(&nodes[*i]).contains(&format!("{vip}/32")))
        .collect()
}

/// Sends `sig` (`STOP`, `CONT`, `KILL`, ...) to the agent; the test fails if `kill` does.
pub fn signal(agent: &Agent, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &agent.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig}");
}

/// Sends SIGTERM and waits (at most `limit`) for the exit: its status and how long it took.
pub fn sigterm(agent: &mut Agent, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .expect("kill");
    loop {
        if let Some(s) = agent.child.try_wait().expect("wait") {
            return (s, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "no exit within {limit:?} of SIGTERM:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Everything kvip may own in a namespace, as text: its nft table, its chains in both
/// iptables variants of both families, and the VIP.
pub fn kvip_state(ns: &Netns) -> String {
    // The table may be absent (then `nft list table` fails): read the whole ruleset.
    let all = rules(ns);
    let mut out: String = all
        .split("\ntable ")
        .filter(|t| t.trim_start_matches("table ").starts_with("inet kvip "))
        .collect();
    for (cmd, args) in [
        ("iptables-nft-save", &["-t", "nat"][..]),
        ("ip6tables-nft-save", &["-t", "nat"][..]),
        ("iptables-legacy-save", &["-t", "nat"][..]),
        ("ip6tables-legacy-save", &["-t", "nat"][..]),
    ] {
        let text = ns
            .exec_ok(cmd, args)
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        out.extend(
            text.lines()
                .filter(|l| l.contains("kvip") || l.contains("KVIP"))
                .map(|l| format!("{cmd}: {l}\n")),
        );
    }
    if has_vip(ns) {
        out.push_str("VIP 192.0.2.10\n");
    }
    out
}

/// The test's own writes, retried through the short API faults the test injects.
pub async fn retried<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut last = None;
    for _ in 0..40 {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {last:?}")
}

/// Creates `obj` named `name`, or replaces it (guarded by its resourceVersion).
pub async fn put<K>(api: &kube::Api<K>, name: &str, obj: K)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    retried(name, || async {
        match api.get_opt(name).await? {
            Some(cur) => {
                let mut next = obj.clone();
                next.meta_mut().resource_version = cur.meta().resource_version.clone();
                api.replace(name, &PostParams::default(), &next).await
            }
            None => api.create(&PostParams::default(), &obj).await,
        }
    })
    .await;
}

/// Deletes `name` if it exists.
pub async fn remove<K>(api: &kube::Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    retried(name, || async {
        match api.delete(name, &kube::api::DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await;
}
