//! A seeded, model-based chaos test: three real agents (one per node namespace) against the
//! test API server, driven by a random sequence of operations — Services created, changed
//! (egress on and off, an invalid port list, ignored) and deleted; endpoints churning and
//! moving between nodes; agents SIGKILLed, SIGTERMed and restarted; the API dropping its
//! watches, expiring its history, answering 500 or stalling; kvip's table or a VIP removed by
//! hand; foreign tables and addresses appearing. After every operation the test waits for a
//! quiescent point and checks, against a simple model of what each node must hold:
//! - every running node's kvip-owned kernel state (VIPs, and pods per VIP) equals the model;
//! - a node whose agent was stopped with SIGTERM holds nothing;
//! - the Lease names a running agent, so each VIP has exactly one holder (or none, when no
//!   node may hold it);
//! - foreign tables and addresses are untouched;
//! - no agent repaired drift the test did not make (a repair nobody provoked means a sync
//!   left the kernel different from what it meant to write, and the read-back hid it).
//!
//! `KVIP_CHAOS_OPS` (default 200) operations from `KVIP_CHAOS_SEED` (default: from the clock,
//! printed). A failure prints the seed and the shortest prefix of operations that fails:
//! `KVIP_CHAOS_SEED=<seed> KVIP_CHAOS_OPS=<n>` replays it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::{Netns, require_kernel};
use serde_json::{Value, json};

const NODES: usize = 3;
const SERVICES: usize = 3;

/// xorshift64*: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    Egress,
    /// Egress with only invalid destination ports: refused (never widened to every port).
    EgressBadPorts,
    /// `kube-vip.io/ignore`.
    Ignored,
}

/// The cluster as the test made it.
#[derive(Debug, Clone, Default)]
struct Model {
    services: BTreeMap<usize, Variant>,
    /// Per Service: (pod address, node, ready).
    endpoints: BTreeMap<usize, Vec<(String, usize, bool)>>,
}

fn vip(i: usize) -> String {
    format!("192.0.2.{}", 10 + i)
}

impl Model {
    /// What node `n` must hold when `holder` holds the Lease: VIP → pods translated to it.
    /// In global election an egress Service is held only by a holder with a ready local
    /// endpoint; its pods are exactly those endpoints (pod addresses are disjoint between
    /// Services here, so no pod is claimed twice).
    fn expected(&self, n: usize, holder: Option<usize>) -> BTreeMap<String, BTreeSet<String>> {
        let mut out = BTreeMap::new();
        if holder != Some(n) {
            return out;
        }
        for (i, v) in &self.services {
            let local: BTreeSet<String> = self
                .endpoints
                .get(i)
                .map(|eps| {
                    eps.iter()
                        .filter(|(_, node, ready)| *node == n && *ready)
                        .map(|(a, _, _)| a.clone())
                        .collect()
                })
                .unwrap_or_default();
            match v {
                Variant::Ignored => {}
                Variant::Plain => {
                    out.insert(vip(*i), BTreeSet::new());
                }
                Variant::Egress if !local.is_empty() => {
                    out.insert(vip(*i), local);
                }
                Variant::EgressBadPorts if !local.is_empty() => {
                    out.insert(vip(*i), BTreeSet::new());
                }
                Variant::Egress | Variant::EgressBadPorts => {}
            }
        }
        out
    }
}

fn service_object(i: usize, v: Variant) -> Service {
    let mut ann = json!({"kube-vip.io/loadbalancerIPs": vip(i)});
    match v {
        Variant::Plain => {}
        Variant::Egress => ann["kube-vip.io/egress"] = json!("true"),
        Variant::EgressBadPorts => {
            ann["kube-vip.io/egress"] = json!("true");
            ann["kube-vip.io/egress-destination-ports"] = json!("tcp:99999,udp:0");
        }
        Variant::Ignored => ann["kube-vip.io/ignore"] = json!("true"),
    }
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc{i}"), "namespace": "default", "annotations": ann},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service")
}

fn slice_object(i: usize, eps: &[(String, usize, bool)]) -> EndpointSlice {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(a, n, ready)| json!({"addresses": [a], "nodeName": format!("n{n}"), "conditions": {"ready": ready}}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc{i}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
        "addressType": "IPv4", "endpoints": endpoints
    }))
    .expect("slice")
}

/// kvip's state on a node as VIP → pods, read back by `kvip dataplane show`.
fn observed(ns: &Netns) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let out = ns
        .exec_ok(KVIP, &["dataplane", "show", "--format", "json"])
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for x in v["vips"].as_array().into_iter().flatten() {
        m.entry(x["address"].as_str().unwrap_or_default().to_string())
            .or_default();
    }
    for p in v["egress"].as_array().into_iter().flatten() {
        let e = m
            .entry(p["vip"].as_str().unwrap_or_default().to_string())
            .or_default();
        for s in p["sources"].as_array().into_iter().flatten() {
            e.insert(s.as_str().unwrap_or_default().to_string());
        }
    }
    Ok(m)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentState {
    Running,
    Killed,
    Terminated,
}

struct Cluster {
    server: ApiServer,
    nodes: Vec<Netns>,
    _peers: Vec<Netns>,
    urls: Vec<String>,
    agents: Vec<Option<Agent>>,
    state: Vec<AgentState>,
    starts: usize,
    /// Per node: foreign nft tables and addresses that must stay.
    foreign_tables: Vec<Vec<String>>,
    foreign_addrs: Vec<Vec<String>>,
    /// Per node: drift repairs counted at the last quiescent point, and whether the test has
    /// changed kvip's objects there by hand since. A repair nobody provoked means a sync
    /// left the kernel different from what it meant to write.
    repairs_seen: Vec<u64>,
    /// Until when a by-hand change on the node explains a repair (the counter moves just
    /// after the kernel state is back, or at the next read-back).
    provoked: Vec<Option<Instant>>,
    rt: tokio::runtime::Runtime,
    services: kube::Api<Service>,
    slices: kube::Api<EndpointSlice>,
}

impl Cluster {
    fn start_agent(&mut self, n: usize) {
        self.starts += 1;
        self.agents[n] = Some(start_agent_env(
            &self.nodes[n],
            &self.urls[n],
            &format!("ch{n}s{}", self.starts),
            &format!("n{n}"),
            true,
            false,
            &["resync_period=1"],
        ));
        self.state[n] = AgentState::Running;
        self.repairs_seen[n] = 0;
    }

    /// `None` while the agent's metrics server does not answer (yet).
    fn drift_repairs(&self, n: usize) -> Option<u64> {
        let metrics = try_http_get(&self.nodes[n], "/metrics")?;
        Some(
            metrics
                .lines()
                .filter(|l| l.starts_with("kvip_drift_repairs_total{"))
                .filter_map(|l| {
                    l.rsplit(' ')
                        .next()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .sum(),
        )
    }

    /// After a quiescent point: drift repairs from here on must be provoked again.
    fn settle(&mut self) {
        for n in 0..NODES {
            if self.state[n] == AgentState::Running {
                // Read at a quiescent point, when the metrics server has answered.
                self.repairs_seen[n] = self
                    .drift_repairs(n)
                    .expect("the agent's metrics server answers");
            }
            if self.provoked[n].is_some_and(|t| Instant::now() > t) {
                self.provoked[n] = None;
            }
        }
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| format!("---- n{i}\n{}", a.log())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every running node drops its VIPs and egress within `limit` (the Lease duration: before
    /// another node could take the Lease).
    fn all_dropped_within(&self, limit: Duration, done: &[String]) {
        let start = Instant::now();
        loop {
            let holding: Vec<String> = (0..NODES)
                .filter(|n| self.state[*n] == AgentState::Running)
                .filter_map(|n| match observed(&self.nodes[n]) {
                    Ok(m) if m.is_empty() => None,
                    Ok(m) => Some(format!("n{n} holds {m:?}")),
                    Err(e) => panic!("n{n}: reading kvip's state: {e}"),
                })
                .collect();
            if holding.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "not dropped within {limit:?} of losing the API: {holding:?}\noperations: {done:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn holder(&self) -> Option<usize> {
        let h = self
            .server
            .object(
                "coordination.k8s.io/v1",
                "leases",
                "kube-system",
                "plndr-svcs-lock",
            )
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))?;
        (0..NODES).find(|n| h == format!("n{n}"))
    }

    /// What differs from the model now (empty at a quiescent point).
    fn differences(&self, model: &Model) -> Vec<String> {
        let mut out = Vec::new();
        let holder = self.holder();
        match holder {
            Some(h) if self.state[h] == AgentState::Running => {}
            _ => out.push(format!("the Lease names no running agent: {holder:?}")),
        }
        for n in 0..NODES {
            for t in &self.foreign_tables[n] {
                if self.nodes[n]
                    .exec_ok("nft", &["list", "table", "ip", t])
                    .is_err()
                {
                    out.push(format!("n{n}: foreign table {t} is gone"));
                }
            }
            let addrs = self.nodes[n]
                .exec_ok("ip", &["-br", "addr", "show", "dev", "eth0"])
                .unwrap_or_default();
            for a in &self.foreign_addrs[n] {
                if !addrs.contains(a.as_str()) {
                    out.push(format!("n{n}: foreign address {a} is gone"));
                }
            }
            if self.state[n] == AgentState::Running && self.provoked[n].is_none() {
                let Some(r) = self.drift_repairs(n) else {
                    out.push(format!("n{n}: the metrics server does not answer"));
                    continue;
                };
                if r > self.repairs_seen[n] {
                    out.push(format!(
                        "n{n}: repaired drift nobody made (kvip_drift_repairs_total {} → {r}): a sync left the kernel different from the desired state",
                        self.repairs_seen[n]
                    ));
                }
            }
            let want = match self.state[n] {
                AgentState::Killed => continue,
                AgentState::Terminated => BTreeMap::new(),
                AgentState::Running => model.expected(n, holder),
            };
            match observed(&self.nodes[n]) {
                Ok(got) if got == want => {}
                Ok(got) => out.push(format!("n{n}: holds {got:?}, should hold {want:?}")),
                Err(e) => out.push(format!("n{n}: {e}")),
            }
        }
        out
    }
}

#[test]
fn chaos_against_the_model() {
    require_kernel!();
    let ops: usize = std::env::var("KVIP_CHAOS_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("KVIP_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos: KVIP_CHAOS_SEED={seed} KVIP_CHAOS_OPS={ops}");
    let mut rng = Rng(seed);
    let (server, nodes, peers, urls) = nodes_with_api("ch", NODES);
    let (rt, services, slices) = api(&server);
    let mut c = Cluster {
        server,
        nodes,
        _peers: peers,
        urls,
        agents: (0..NODES).map(|_| None).collect(),
        state: vec![AgentState::Terminated; NODES],
        starts: 0,
        foreign_tables: vec![Vec::new(); NODES],
        foreign_addrs: vec![Vec::new(); NODES],
        repairs_seen: vec![0; NODES],
        provoked: vec![None; NODES],
        rt,
        services,
        slices,
    };
    // Foreign objects from the start: an nft table and an unmarked address on every node.
    for n in 0..NODES {
        c.nodes[n]
            .sh("nft add table ip foreign0 && nft add chain ip foreign0 post '{ type nat hook postrouting priority 100; }'")
            .expect("foreign table");
        let addr = format!("198.51.100.{}/32", 1 + n);
        c.nodes[n]
            .exec_ok("ip", &["addr", "add", &addr, "dev", "eth0"])
            .expect("foreign address");
        c.foreign_tables[n].push("foreign0".into());
        c.foreign_addrs[n].push(addr);
        c.start_agent(n);
    }
    let mut model = Model::default();
    let mut done: Vec<String> = Vec::new();
    let mut replay = 0;
    let quiet = |c: &Cluster, model: &Model, done: &[String], replay: usize| {
        let start = Instant::now();
        loop {
            let diff = c.differences(model);
            if diff.is_empty() {
                return;
            }
            if start.elapsed() > Duration::from_secs(20) {
                panic!(
                    "chaos: not converged 20 s after operation {} ({}):\n  {}\nreplay: KVIP_CHAOS_SEED={seed} KVIP_CHAOS_OPS={replay} cargo nextest run -p kvip --test chaos\noperations:\n  {}\n{}",
                    done.len(),
                    done.last().map_or("start", String::as_str),
                    diff.join("\n  "),
                    done.join("\n  "),
                    c.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    quiet(&c, &model, &done, replay);
    c.settle();
    for iteration in 0..ops {
        // The operations up to this one reproduce a failure here (a skipped draw included).
        replay = iteration + 1;
        let roll = rng.below(100);
        let op = match roll {
            // Services: create, change, delete.
            0..=29 => {
                let i = rng.below(SERVICES);
                let variant = match rng.below(10) {
                    0..=3 => Variant::Egress,
                    4..=6 => Variant::Plain,
                    7..=8 => Variant::EgressBadPorts,
                    _ => Variant::Ignored,
                };
                if model.services.contains_key(&i) && rng.chance(30) {
                    model.services.remove(&i);
                    model.endpoints.remove(&i);
                    c.rt.block_on(remove(&c.services, &format!("svc{i}")));
                    c.rt.block_on(remove(&c.slices, &format!("svc{i}-1")));
                    format!("delete svc{i}")
                } else {
                    let exists = model.services.insert(i, variant).is_some();
                    c.rt.block_on(put(
                        &c.services,
                        &format!("svc{i}"),
                        service_object(i, variant),
                    ));
                    format!(
                        "{} svc{i} {variant:?}",
                        if exists { "change" } else { "create" }
                    )
                }
            }
            // Endpoints: a new random set (pods appear, go, move between nodes, turn ready
            // or not).
            30..=64 => {
                let Some(&i) = model
                    .services
                    .keys()
                    .nth(rng.below(model.services.len().max(1)))
                else {
                    continue;
                };
                // A pod on most nodes (so whichever node holds the Lease usually has local
                // endpoints): one of three addresses per node and Service, so pods come,
                // go and are replaced; most are ready.
                let eps: Vec<(String, usize, bool)> = (0..NODES)
                    .filter_map(|n| {
                        if !rng.chance(75) {
                            return None;
                        }
                        let k = 1 + rng.below(3);
                        Some((format!("10.244.{n}.{}", 10 * i + k), n, rng.chance(85)))
                    })
                    .collect();
                model.endpoints.insert(i, eps.clone());
                c.rt.block_on(put(&c.slices, &format!("svc{i}-1"), slice_object(i, &eps)));
                format!("endpoints svc{i} {eps:?}")
            }
            // Agents: SIGKILL, SIGTERM (keeping at least two running), restart.
            65..=74 => {
                let down: Vec<usize> = (0..NODES)
                    .filter(|n| c.state[*n] != AgentState::Running)
                    .collect();
                if let Some(&n) = down.first() {
                    // After a SIGKILL, the new agent's first act removes the stale state.
                    c.start_agent(n);
                    format!("restart n{n}")
                } else {
                    let n = rng.below(NODES);
                    let kill = rng.chance(50);
                    if let Some(a) = c.agents[n].as_mut() {
                        if kill {
                            a.sigkill();
                        } else {
                            let (status, _) = sigterm(a, Duration::from_secs(15));
                            assert!(status.success(), "n{n} exited with {status}\n{}", a.log());
                        }
                    }
                    c.state[n] = if kill {
                        AgentState::Killed
                    } else {
                        AgentState::Terminated
                    };
                    format!("{} n{n}", if kill { "SIGKILL" } else { "SIGTERM" })
                }
            }
            // API faults.
            75..=84 => match rng.below(6) {
                0 => {
                    c.server.drop_watches();
                    "API drops every watch".to_string()
                }
                1 => {
                    c.server.expire_history();
                    "API expires its history (410)".to_string()
                }
                2 => {
                    let ms = 500 + rng.below(2000) as u64;
                    c.server.fail_for(Duration::from_millis(ms));
                    std::thread::sleep(Duration::from_millis(ms));
                    format!("API answers 500 for {ms} ms")
                }
                3 => {
                    let ms = 200 + rng.below(800) as u64;
                    c.server.stall(Duration::from_millis(ms));
                    std::thread::sleep(Duration::from_secs(2));
                    c.server.stall(Duration::ZERO);
                    format!("API answers {ms} ms late for 2 s")
                }
                // Longer than the renew deadline: every node drops everything by then.
                4 => {
                    c.server.freeze();
                    c.all_dropped_within(Duration::from_secs(3), &done);
                    c.server.thaw();
                    "API frozen past the renew deadline".to_string()
                }
                _ => {
                    // A status write that never answers, then no renewal either: the
                    // hanging write must not keep the holder from stepping down.
                    c.server.hang("patch", "services/status");
                    c.server.hang("patch", "services");
                    std::thread::sleep(Duration::from_millis(200));
                    c.server.fail_resource("leases");
                    c.all_dropped_within(Duration::from_secs(3), &done);
                    c.server.heal();
                    "Service writes hang forever, then Lease renewals fail".to_string()
                }
            },
            // Drift by hand on the holder: kvip's table deleted, or a VIP removed.
            85..=94 => {
                let Some(h) = c.holder() else { continue };
                c.provoked[h] = Some(Instant::now() + Duration::from_secs(3));
                if rng.chance(50) {
                    let _ = c.nodes[h].exec("nft", &["delete", "table", "inet", "kvip"]);
                    format!("by hand on n{h}: delete table inet kvip")
                } else {
                    let Some(v) = model.expected(h, Some(h)).keys().next().cloned() else {
                        continue;
                    };
                    let _ =
                        c.nodes[h].exec("ip", &["addr", "del", &format!("{v}/32"), "dev", "eth0"]);
                    format!("by hand on n{h}: delete VIP {v}")
                }
            }
            // Foreign objects appear.
            _ => {
                let n = rng.below(NODES);
                let k = c.foreign_tables[n].len();
                let t = format!("foreign{k}");
                let _ = c.nodes[n].exec("nft", &["add", "table", "ip", &t]);
                let a = format!("203.0.113.{}/32", 1 + k + 10 * n);
                let _ = c.nodes[n].exec("ip", &["addr", "add", &a, "dev", "eth0"]);
                c.foreign_tables[n].push(t.clone());
                c.foreign_addrs[n].push(a.clone());
                format!("foreign on n{n}: table {t}, address {a}")
            }
        };
        done.push(op);
        quiet(&c, &model, &done, replay);
        c.settle();
    }
    eprintln!(
        "chaos: {} operations, every quiescent point as the model says",
        done.len()
    );
    if std::env::var("KVIP_CHAOS_LOGS").is_ok() {
        eprintln!("{}", c.logs());
    }
}
