//! The control-plane VIP (`cp_enable`) on three control-plane nodes, each with its own API
//! server endpoint (one store: three kube-apiservers on one etcd) and a real `kvip run` whose
//! kubeconfig names the VIP as its server, as kubeadm writes it:
//! - bootstrap: the kubeconfig's identity refused everywhere (a first `kubeadm init`) and
//!   `super-admin.conf` beside it on the first node: the VIP comes up, the API answers
//!   through it, and the agent goes back to its own identity once it is authorised;
//! - the holder's local API server stopped (its kvip running): it drops the VIP and releases
//!   the Lease through another node's API server (learnt from the `kubernetes` Service), so
//!   another node holds the VIP without waiting for the Lease to expire; started again, it
//!   does not take the VIP back;
//! - SIGTERM of the holder: handover through the released Lease; SIGSTOP and SIGKILL: its VIP
//!   leaves its kernel by itself before another node holds it, and a thawed agent does not
//!   take it back.
//!
//! A sampler every 50 ms never sees two holders.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Agent, logs, signal, wait_until};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::apiserver::{ApiServer, Endpoint};
use kvip_testkit::tls::{Authority, KUBEADM_NAMES};
use kvip_testkit::{Netns, require_kernel};

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");
const VIP: &str = "192.0.2.100";
/// The API servers' port on every node (each in its own network namespace).
const API_PORT: u16 = 16443;
const ADMIN: &str = "kubernetes-admin";
const SUPER_ADMIN: &str = "kubernetes-super-admin";

/// Failed checks in a row that make a node drop the VIP (one a second).
const HEALTH_FAILURES: u64 = 2;

/// kubeadm's kubeconfig: the VIP as server, a token as identity, the cluster CA in `ca`.
fn kubeconfig(token: &str, ca: Option<&Path>) -> String {
    ApiServer::kubeconfig_for(&format!("https://{VIP}:6443"), Some(token), ca)
}

struct Node {
    ns: Netns,
    endpoint: Endpoint,
    dir: PathBuf,
}

fn start_agent(n: &Node, i: usize) -> Agent {
    start_agent_in(&n.ns, &n.dir, &n.endpoint.url, &format!("cp{i}"))
}

/// `kvip run` in `ns` for the control-plane VIP, with `dir/admin.conf`, its local API server
/// at `url`.
fn start_agent_in(ns: &Netns, dir: &Path, url: &str, name: &str) -> Agent {
    let log = dir.join("kvip.log");
    let child = ns
        .clean_env_command()
        .arg(format!("vip_nodename={name}"))
        .args([
            "cp_enable=true",
            "vip_interface=eth0",
            "vip_arp=true",
            "vip_leaseduration=4",
            "vip_renewdeadline=2",
            "vip_retryperiod=1",
            "control_plane_health_check_period=1",
        ])
        .arg(format!("address={VIP}"))
        .arg(format!(
            "control_plane_health_check_failures={HEALTH_FAILURES}"
        ))
        .arg(format!("kubernetes_addr={url}"))
        .arg(format!(
            "k8s_config_file={}",
            dir.join("admin.conf").display()
        ))
        .args([KVIP, "run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("kvip run");
    Agent { child, log }
}

fn holders(nodes: &[Node]) -> Vec<usize> {
    (0..nodes.len())
        .filter(|i| common::addresses(&nodes[*i].ns).contains(&format!("{VIP}/32")))
        .collect()
}

/// `GET /readyz` over HTTPS to the VIP's address on `port`, from inside `ns`, verifying the
/// certificate for the VIP (as kubectl with kubeadm's kubeconfig does).
fn readyz_through_vip(ns: &Netns, ca: &Authority, port: u16) -> std::io::Result<String> {
    let addr: SocketAddr = format!("{VIP}:{port}").parse().expect("address");
    ns.enter(|| ca.get(addr, VIP, "/readyz")).expect("netns")
}

/// A metric's value on node `n` (from its agent's /metrics).
fn metric(n: &Node, name: &str) -> Option<f64> {
    metric_in(&n.ns, name)
}

/// A metric's value from the agent in `ns`.
fn metric_in(ns: &Netns, name: &str) -> Option<f64> {
    common::try_http_get(ns, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Samples every 50 ms from `since` until another node than `old` holds the VIP, failing on
/// two holders at any sample; returns when `old`'s VIP went and when the new holder held it.
fn handover(
    nodes: &[Node],
    agents: &[Agent],
    old: usize,
    since: Instant,
    limit: Duration,
) -> (Duration, Duration, usize) {
    let mut gone = None;
    loop {
        let h = holders(nodes);
        assert!(h.len() <= 1, "two holders at once: {h:?}\n{}", logs(agents));
        let at = since.elapsed();
        if gone.is_none() && !h.contains(&old) {
            gone = Some(at);
        }
        if let Some(&new) = h.iter().find(|i| **i != old) {
            return (gone.unwrap_or(at), at, new);
        }
        assert!(
            at < limit,
            "no handover within {limit:?}: {h:?}\n{}",
            logs(agents)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// For `d`, every 50 ms: exactly `holder` holds the VIP.
fn steady(nodes: &[Node], agents: &[Agent], holder: usize, d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        assert_eq!(holders(nodes), vec![holder], "{}", logs(agents));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

#[test]
fn control_plane_vip_bootstraps_follows_health_and_fails_over() {
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    // Three nodes on one LAN.
    let lan = Netns::new("cplan").expect("netns");
    lan.sh("ip link add br0 type bridge && ip link set br0 up")
        .expect("bridge");
    let base = std::env::temp_dir().join(format!("kvip-cp-{}", std::process::id()));
    std::fs::create_dir_all(&base).expect("dir");
    // kubeadm's PKI: one cluster CA; each API server's certificate names `kubernetes`, its
    // node's address and the VIP, but not 127.0.0.1, where kvip reaches it.
    let ca = Authority::new().expect("CA");
    let ca_file = base.join("ca.crt");
    write(&ca_file, &ca.ca_pem());
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let ns = Netns::new(&format!("cp{i}")).expect("netns");
            ns.veth("eth0", &lan, &format!("n{i}")).expect("veth");
            lan.exec_ok("ip", &["link", "set", &format!("n{i}"), "master", "br0"])
                .expect("bridge port");
            ns.addr("eth0", &format!("192.0.2.{}/24", 10 + i))
                .expect("address");
            // Every address of the node: the API answers on the VIP too.
            let node_ip = format!("192.0.2.{}", 10 + i);
            let mut names = KUBEADM_NAMES.to_vec();
            names.extend([node_ip.as_str(), VIP]);
            let cert = ca.serving(&names).expect("serving certificate");
            let endpoint = server
                .tls_endpoint_in_at(&ns, SocketAddr::from(([0, 0, 0, 0], API_PORT)), &cert)
                .expect("endpoint");
            let dir = base.join(format!("cp{i}"));
            std::fs::create_dir_all(&dir).expect("dir");
            write(&dir.join("admin.conf"), &kubeconfig(ADMIN, Some(&ca_file)));
            // The first node has kubeadm's super-admin.conf; the others an empty file (the
            // static pod's FileOrCreate volume), which counts as absent.
            let sa = if i == 0 {
                kubeconfig(SUPER_ADMIN, Some(&ca_file))
            } else {
                String::new()
            };
            write(&dir.join("super-admin.conf"), &sa);
            Node { ns, endpoint, dir }
        })
        .collect();
    // The API servers, as the `kubernetes` Service's endpoints (kube-apiserver keeps them).
    let (rt, client) = server.runtime_and_client();
    let endpoints: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"addresses": [format!("192.0.2.{}", 10 + i)]}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "https", "port": API_PORT, "protocol": "TCP"}]
    }))
    .expect("slice");
    rt.block_on(async {
        Api::<EndpointSlice>::namespaced(client, "default")
            .create(&PostParams::default(), &slice)
            .await
            .expect("create the kubernetes EndpointSlice");
    });
    // The first `kubeadm init`: admin.conf's group is bound to nothing yet, anywhere.
    for n in &nodes {
        server.refuse_identity(&n.endpoint, ADMIN, true);
    }
    let mut agents = vec![start_agent(&nodes[0], 0)];
    wait_until(
        "the first node holds the VIP with super-admin.conf",
        Duration::from_secs(20),
        || logs(&agents),
        || holders(&nodes) == [0],
    );
    let answer = readyz_through_vip(&nodes[0].ns, &ca, API_PORT).expect("the API through the VIP");
    assert!(answer.ends_with("ok"), "{answer}");
    assert_eq!(
        metric(&nodes[0], "kvip_control_plane_super_admin"),
        Some(1.0)
    );
    let lease = server
        .object(
            "coordination.k8s.io/v1",
            "leases",
            "kube-system",
            "plndr-cp-lock",
        )
        .expect("the control-plane Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "cp0");

    // kubeadm binds admin.conf's group: the agent goes back to its own identity.
    for n in &nodes {
        server.refuse_identity(&n.endpoint, ADMIN, false);
    }
    agents.push(start_agent(&nodes[1], 1));
    agents.push(start_agent(&nodes[2], 2));
    wait_until(
        "back to the kubeconfig's identity",
        Duration::from_secs(15),
        || logs(&agents),
        || metric(&nodes[0], "kvip_control_plane_super_admin") == Some(0.0),
    );
    steady(&nodes, &agents, 0, Duration::from_secs(2));

    // The holder's API server stops; its kvip goes on. It drops the VIP after the failed
    // checks and releases the Lease through another node's API server: another node holds
    // the VIP without waiting for the Lease (4 s) to expire.
    let stopped = Instant::now();
    server.stop_endpoint(&nodes[0].endpoint);
    let (gone, taken, second) = handover(&nodes, &agents, 0, stopped, Duration::from_secs(15));
    assert!(gone <= taken);
    eprintln!("API server stopped: VIP gone after {gone:?}, taken over after {taken:?}");
    // The failed checks (2 × 1 s, here within the renew deadline), a retry period (1 s) for
    // the release, 0.5 s: the goal. Waiting for the Lease to expire takes 4 s or more.
    assert!(
        taken <= Duration::from_millis(HEALTH_FAILURES * 1000 + 1000 + 500),
        "taken over after {taken:?}\n{}",
        logs(&agents)
    );
    assert_eq!(metric(&nodes[0], "kvip_control_plane_api_ready"), Some(0.0));
    // Its API server back, it competes again but takes nothing from the holder.
    server
        .restart_endpoint(&nodes[0].ns, &nodes[0].endpoint)
        .expect("restart");
    steady(&nodes, &agents, second, Duration::from_secs(4));
    assert_eq!(metric(&nodes[0], "kvip_control_plane_api_ready"), Some(1.0));

    // SIGTERM: the VIP goes, then the Lease is released; another node takes it at once.
    let termed = Instant::now();
    signal(&agents[second], "TERM");
    let (_, taken, third) = handover(&nodes, &agents, second, termed, Duration::from_secs(10));
    assert!(
        taken < Duration::from_secs(2),
        "handover after SIGTERM took {taken:?}"
    );
    let status = agents[second].child.wait().expect("wait");
    assert!(status.success(), "exit status {status}");

    // SIGSTOP: the frozen holder renews no more; its VIP leaves its kernel by itself, before
    // anyone takes it. Thawed, it finds its deadline passed and does not take it back.
    let frozen = Instant::now();
    signal(&agents[third], "STOP");
    let (gone, _, fourth) = handover(&nodes, &agents, third, frozen, Duration::from_secs(15));
    assert!(
        gone <= Duration::from_millis(2000 + 1500 + 500),
        "the frozen holder's VIP went after {gone:?}"
    );
    signal(&agents[third], "CONT");
    steady(&nodes, &agents, fourth, Duration::from_secs(3));

    // SIGKILL: the same with no process left; the thawed node takes over.
    let killed = Instant::now();
    signal(&agents[fourth], "KILL");
    let (gone, _, _) = handover(&nodes, &agents, fourth, killed, Duration::from_secs(15));
    assert!(
        gone <= Duration::from_millis(2000 + 1500 + 500),
        "the killed holder's VIP went after {gone:?}"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// `cp_enable` and `svc_enable` in one process: the control-plane VIP and a Service's VIP on
/// separate Leases; a Service asking for the control-plane VIP is refused it with a Warning
/// Event and shares nothing; SIGTERM removes both.
#[test]
fn control_plane_and_services_in_one_process_on_separate_leases() {
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    let (ns, _peer) = common::node_pair("cps");
    let endpoint = server.endpoint_in(&ns).expect("endpoint");
    let dir = std::env::temp_dir().join(format!("kvip-cps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    write(&dir.join("admin.conf"), &kubeconfig(ADMIN, None));
    let log = dir.join("kvip.log");
    let child = ns
        .clean_env_command()
        .args([
            "vip_nodename=n1",
            "cp_enable=true",
            "svc_enable=true",
            "vip_interface=eth0",
            "vip_arp=true",
            "vip_leaseduration=4",
            "vip_renewdeadline=2",
            "vip_retryperiod=1",
            "egress_podcidr=10.244.0.0/16",
            "egress_servicecidr=10.96.0.0/12",
            "POD_NAMESPACE=kube-system",
        ])
        .arg(format!("address={VIP}"))
        .arg(format!("kubernetes_addr={}", endpoint.url))
        .arg(format!(
            "k8s_config_file={}",
            dir.join("admin.conf").display()
        ))
        .args([KVIP, "run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("kvip run");
    let mut agent = Agent { child, log };
    let (rt, services, _) = common::api(&server);
    rt.block_on(async {
        for (name, vip) in [("web", "192.0.2.10"), ("api", VIP)] {
            services
                .create(
                    &PostParams::default(),
                    &common::named_service(name, vip, false),
                )
                .await
                .expect("service");
        }
    });
    let addrs = || common::addresses(&ns);
    common::until("both VIPs held", &agent, Duration::from_secs(20), || {
        let a = addrs();
        a.contains("192.0.2.10/32") && a.contains(&format!("{VIP}/32"))
    });
    for lease in ["plndr-cp-lock", "plndr-svcs-lock"] {
        let l = server
            .object("coordination.k8s.io/v1", "leases", "kube-system", lease)
            .unwrap_or_else(|| panic!("no Lease {lease}"));
        assert_eq!(l["spec"]["holderIdentity"], "n1", "{lease}");
    }
    common::until(
        "a VipRefused Event for default/api",
        &agent,
        Duration::from_secs(10),
        || {
            server
                .objects("events.k8s.io/v1", "events", "default")
                .iter()
                .any(|e| e["reason"] == "VipRefused" && e["regarding"]["name"] == "api")
        },
    );
    let (status, _) = common::sigterm(&mut agent, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let a = addrs();
    assert!(
        !a.contains("192.0.2.10/32") && !a.contains(&format!("{VIP}/32")),
        "{a}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// kvip reaches its local API server at 127.0.0.1 and verifies its certificate for the name
/// `kubernetes` against the kubeconfig's CA: a certificate from another CA, or one valid for
/// 127.0.0.1 but not for `kubernetes`, is refused (the reason logged, no VIP); kubeadm's
/// certificate, which has no 127.0.0.1 in it, is taken.
#[test]
fn control_plane_verifies_the_local_api_server_as_kubernetes() {
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    let (ns, _peer) = common::node_pair("cpt");
    let dir = std::env::temp_dir().join(format!("kvip-cpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Authority::new().expect("CA");
    let ca_file = dir.join("ca.crt");
    write(&ca_file, &ca.ca_pem());
    write(&dir.join("admin.conf"), &kubeconfig(ADMIN, Some(&ca_file)));
    let other_ca = Authority::new().expect("CA");
    let refused = [
        (
            other_ca.serving(&KUBEADM_NAMES).expect("certificate"),
            // Every kubeadm CA is named `kubernetes`: the other CA's certificate is found as
            // the issuer, and its signature does not verify.
            "invalid peer certificate: BadSignature",
        ),
        (
            ca.serving(&["127.0.0.1", "localhost", "cp0"])
                .expect("certificate"),
            "certificate not valid for name \"kubernetes\"",
        ),
    ];
    let endpoint = server
        .tls_endpoint_in_at(&ns, SocketAddr::from(([127, 0, 0, 1], 0)), &refused[0].0)
        .expect("endpoint");
    let mut agent = start_agent_in(&ns, &dir, &endpoint.url, "cp0");
    let agents = std::slice::from_ref(&agent);
    for (i, (cert, reason)) in refused.iter().enumerate() {
        if i > 0 {
            server
                .restart_endpoint_with(&ns, &endpoint, cert)
                .expect("endpoint");
        }
        let failures = metric_in(&ns, "kvip_control_plane_health_failures_total").unwrap_or(0.0);
        wait_until(
            &format!("the certificate refused ({reason})"),
            Duration::from_secs(20),
            || logs(agents),
            || {
                metric_in(&ns, "kvip_control_plane_health_failures_total")
                    .is_some_and(|f| f >= failures + 2.0)
                    && std::fs::read_to_string(&agent.log).is_ok_and(|l| {
                        l.lines()
                            .any(|l| l.contains("/readyz failed") && l.contains(reason))
                    })
            },
        );
        assert!(
            !common::addresses(&ns).contains(&format!("{VIP}/32")),
            "the VIP came up against a refused certificate\n{}",
            logs(agents)
        );
        assert_eq!(
            metric_in(&ns, "kvip_control_plane_api_ready"),
            Some(0.0),
            "{}",
            logs(agents)
        );
    }
    // kubeadm's certificate: `kubernetes`, the node's address and the VIP, no 127.0.0.1.
    let mut names = KUBEADM_NAMES.to_vec();
    names.extend(["192.0.2.10", VIP]);
    let good = ca.serving(&names).expect("certificate");
    server
        .restart_endpoint_with(&ns, &endpoint, &good)
        .expect("endpoint");
    common::until("the VIP held", &agent, Duration::from_secs(20), || {
        common::addresses(&ns).contains(&format!("{VIP}/32"))
    });
    let (status, _) = common::sigterm(&mut agent, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
