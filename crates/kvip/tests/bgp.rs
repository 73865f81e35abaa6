//! BGP mode end to end: a real `kvip run` with `bgp_enable` in a node namespace, a real BIRD 2
//! in the router's, exporting what it learns to the router's kernel. A Service's VIP is
//! announced with the node as next hop and reachable from the router by real packets;
//! deleting the Service withdraws it; SIGTERM withdraws it before kvip exits (and BIRD hears
//! the Cease); SIGKILL closes the session (the kernel closes kvip's connection), and a
//! frozen kvip's routes go when the hold time runs out, and come back when it thaws.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Agent, KVIP, named_service, sigterm, wait_until};
use kube::api::{DeleteParams, PostParams};
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::bird::Bird;
use kvip_testkit::{Netns, require_kernel};

const VIP: &str = "203.0.113.10";
const NODE: &str = "192.0.2.10";
const PORT: u16 = 18080;
/// The hold time kvip proposes (BIRD takes the smaller of the two).
const HOLD: u64 = 3;

fn start(ns: &Netns, url: &str, tag: &str) -> Agent {
    start_with(ns, url, tag, "192.0.2.1:65001")
}

/// The settings of a node in BGP mode with `peers` as `bgp_peers`.
fn settings(peers: &str, kubeconfig: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = [
        "NODE_NAME=n1",
        "POD_NAMESPACE=kube-system",
        // In BGP mode without vip_arp, kvip puts the VIP on the loopback whatever
        // vip_interface says: no neighbour on the LAN learns it by ARP.
        "vip_interface=eth0",
        "vip_arp=false",
        "vip_leaderelection=false",
        "egress_podcidr=10.244.0.0/16",
        "egress_servicecidr=10.96.0.0/12",
        "bgp_enable=true",
        "bgp_as=64512",
        "bgp_keepalive_interval=1",
    ]
    .map(String::from)
    .to_vec();
    v.push(format!("bgp_routerid={NODE}"));
    v.push(format!("bgp_peers={peers}"));
    v.push(format!("bgp_hold_time={HOLD}"));
    v.push(format!("k8s_config_file={}", kubeconfig.display()));
    v
}

/// `kvip run` in BGP mode with `peers` as `bgp_peers`.
fn start_with(ns: &Netns, url: &str, tag: &str, peers: &str) -> Agent {
    let kubeconfig = common::write_kubeconfig(tag, url);
    let log = std::env::temp_dir().join(format!("kvip-agent-{tag}-{}.log", std::process::id()));
    let child = ns
        .clean_env_command()
        .args(settings(peers, &kubeconfig))
        .args([KVIP, "run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("kvip run");
    Agent { child, log }
}

/// `kvip doctor --output json` on the node, with the agent's settings.
fn doctor(ns: &Netns, kubeconfig: &std::path::Path) -> serde_json::Value {
    let out = ns
        .clean_env_command()
        .args(settings("192.0.2.1:65001", kubeconfig))
        .args([KVIP, "doctor", "--output", "json"])
        .output()
        .expect("kvip doctor");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The findings of `check` in a doctor report.
fn findings<'a>(report: &'a serde_json::Value, check: &str) -> Vec<&'a serde_json::Value> {
    report["findings"]
        .as_array()
        .expect("a doctor report has findings")
        .iter()
        .filter(|f| f["check"] == check)
        .collect()
}

/// Whether BIRD has the VIP's route via the node.
fn routed(bird: &Bird) -> bool {
    bird.routes()
        .expect("birdc")
        .get(&format!("{VIP}/32"))
        .is_some_and(|h| h.contains(&NODE.parse().expect("ip")))
}

/// A node and a router joined by a veth pair, the router running BIRD with `extra`
/// protocols and a passive BGP protocol `n1` for the node (with `bgp_extra` options; BIRD
/// accepts the node again 1-2 s after a session error, not 60-300 s).
fn lab(tag: &str, extra: &str, bgp_extra: &str) -> (Netns, Netns, Bird) {
    let (node, router) = common::node_pair(tag);
    node.addr("eth0", &format!("{NODE}/24")).expect("addr");
    router.addr("eth0", "192.0.2.1/24").expect("addr");
    let bird = Bird::start(
        &router,
        &format!(
            "log stderr all;\nrouter id 192.0.2.1;\nprotocol device {{}}\n{extra}\nprotocol bgp n1 {{\n  local 192.0.2.1 as 65001;\n  neighbor {NODE} as 64512;\n  passive on;\n  {bgp_extra}\n  error wait time 1, 2;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )
    .expect("bird");
    (node, router, bird)
}

/// A TCP connection from the router to the VIP: the answer, or why it failed.
fn reach(router: &Netns) -> Result<String, String> {
    let addr: SocketAddr = format!("{VIP}:{PORT}").parse().expect("addr");
    router
        .enter(move || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .expect("netns")
        .map_err(|e| e.to_string())
}

#[test]
fn bgp_announces_withdraws_and_routes_real_packets() {
    require_kernel!();
    // The router exports what it learns to its kernel: real packets follow the routes.
    let (node, router, bird) = lab(
        "bga",
        "protocol kernel { ipv4 { import none; export all; }; }",
        "",
    );
    // A server on the node answers on every address, the VIP included once it is there.
    let listener: TcpListener = node
        .enter(|| TcpListener::bind(("0.0.0.0", PORT)))
        .expect("netns")
        .expect("listen");
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let _ = s.write_all(b"node");
        }
    });
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&node).expect("listen");
    let (rt, services, _) = common::api(&server);
    let mut agent = start(&node, &url, "bga");
    let diag = |a: &Agent| format!("{}\n{}", a.log(), bird.log());
    let create = || {
        rt.block_on(services.create(&PostParams::default(), &named_service("web", VIP, false)))
            .expect("create the Service");
    };
    create();
    wait_until(
        "the VIP's route on the router, via the node",
        Duration::from_secs(20),
        || diag(&agent),
        || routed(&bird),
    );
    let on = |dev: &str| {
        node.exec_ok("ip", &["-br", "addr", "show", "dev", dev])
            .expect("ip addr")
            .contains(&format!("{VIP}/32"))
    };
    assert!(on("lo") && !on("eth0"), "the VIP on lo only");
    // Real packets: the router's kernel route (from BIRD) leads to the node, which has the VIP.
    wait_until(
        "the VIP reached from the router",
        Duration::from_secs(5),
        || diag(&agent),
        || reach(&router).is_ok_and(|a| a == "node"),
    );
    // The per-peer metrics (read from the sessions every 500 ms).
    wait_until(
        "the session's metrics",
        Duration::from_secs(3),
        || diag(&agent),
        || {
            common::try_http_get(&node, "/metrics").is_some_and(|m| {
                m.contains("kvip_bgp_session_up{peer=\"192.0.2.1\"} 1")
                    && m.contains("kvip_bgp_routes_announced{peer=\"192.0.2.1\"} 1")
                    && m.contains("kvip_bgp_adj_rib_out_drift_total 0")
            })
        },
    );

    // kvip doctor reads the sessions from the running agent.
    let kubeconfig = common::write_kubeconfig("bgd", &url);
    let report = doctor(&node, &kubeconfig);
    assert!(
        report["facts"].as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["name"] == "BGP" && f["value"] == "1 peer(s), 1 established")),
        "{report:#}"
    );
    assert!(findings(&report, "bgp-peer").is_empty(), "{report:#}");
    // The router shuts the session down: doctor names the peer and why.
    bird.cmd("disable n1").expect("birdc");
    wait_until(
        "doctor reports the peer down",
        Duration::from_secs(5),
        || diag(&agent),
        || {
            findings(&doctor(&node, &kubeconfig), "bgp-peer")
                .iter()
                .any(|f| {
                    f["problem"]
                        .as_str()
                        .is_some_and(|p| p.contains("192.0.2.1 (AS 65001)") && p.contains(": "))
                })
        },
    );
    bird.cmd("enable n1").expect("birdc");
    wait_until(
        "established again",
        Duration::from_secs(15),
        || diag(&agent),
        || routed(&bird),
    );
    let _ = std::fs::remove_file(&kubeconfig);

    // The Service deleted: withdrawn within 1 s; the router no longer reaches the VIP.
    let t = Instant::now();
    rt.block_on(services.delete("web", &DeleteParams::default()))
        .expect("delete");
    wait_until(
        "withdrawn after the delete",
        Duration::from_secs(1),
        || diag(&agent),
        || !routed(&bird),
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    wait_until(
        "the VIP unreachable",
        Duration::from_secs(2),
        || diag(&agent),
        || reach(&router).is_err(),
    );

    // SIGTERM: withdrawn before kvip exits, and BIRD hears the Cease.
    create();
    wait_until(
        "announced again",
        Duration::from_secs(10),
        || diag(&agent),
        || routed(&bird),
    );
    let (status, took) = sigterm(&mut agent, Duration::from_secs(10));
    assert!(status.success(), "exit status {status}\n{}", diag(&agent));
    assert!(
        !routed(&bird),
        "still routed after kvip exited ({took:?})\n{}",
        diag(&agent)
    );
    assert!(
        bird.log().contains("Administrative shutdown"),
        "{}",
        bird.log()
    );

    // SIGKILL: kvip withdraws nothing, but the kernel closes its connections: the router
    // drops the session, and its routes, at once.
    let mut agent = start(&node, &url, "bgb");
    wait_until(
        "announced by the new agent",
        Duration::from_secs(20),
        || diag(&agent),
        || routed(&bird),
    );
    agent.sigkill();
    wait_until(
        "withdrawn by the router once the connection closed",
        Duration::from_secs(1),
        || diag(&agent),
        || !routed(&bird),
    );

    // SIGSTOP (a frozen node): the connection stays open and silent; the router drops the
    // routes when the hold time runs out. SIGCONT: kvip sees the session gone, dials again
    // and announces again.
    let agent = start(&node, &url, "bgc");
    wait_until(
        "announced by the third agent",
        Duration::from_secs(20),
        || diag(&agent),
        || routed(&bird),
    );
    common::signal(&agent, "STOP");
    let t = Instant::now();
    wait_until(
        "withdrawn by the router after the hold time",
        Duration::from_secs(HOLD + 2),
        || diag(&agent),
        || !routed(&bird),
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(HOLD - 1),
        "gone after {took:?}: before the hold time ran out?"
    );
    common::signal(&agent, "CONT");
    wait_until(
        "announced again after SIGCONT",
        Duration::from_secs(15),
        || diag(&agent),
        || routed(&bird),
    );
}

/// BFD (the `bfd` field of `bgp_peers`, 300 ms × 3) with BIRD's BFD: a frozen kvip stops
/// sending BFD packets and the router drops its routes within the detection time rather
/// than the hold time; thawed, kvip dials again and announces again.
#[test]
fn bgp_with_bfd_a_frozen_nodes_routes_go_within_the_detection_time() {
    require_kernel!();
    let (node, _router, bird) = lab(
        "bgf",
        "protocol bfd { interface \"eth0\" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }; }",
        "bfd on;",
    );
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&node).expect("listen");
    let (rt, services, _) = common::api(&server);
    rt.block_on(services.create(&PostParams::default(), &named_service("web", VIP, false)))
        .expect("create the Service");
    let agent = start_with(&node, &url, "bgf", "192.0.2.1:65001:::::true;300;300;3");
    let diag = |a: &Agent| format!("{}\n{}", a.log(), bird.log());
    wait_until(
        "announced, with BFD up",
        Duration::from_secs(20),
        || diag(&agent),
        || {
            routed(&bird)
                && bird
                    .cmd("show bfd sessions")
                    .is_ok_and(|o| o.lines().any(|l| l.contains(NODE) && l.contains(" Up ")))
                && common::try_http_get(&node, "/metrics").is_some_and(|m| {
                    m.contains("kvip_bfd_session_up{peer=\"192.0.2.1\"} 1")
                        && m.contains("kvip_bfd_session_downs_total{peer=\"192.0.2.1\"} 0")
                })
        },
    );
    common::signal(&agent, "STOP");
    let t = Instant::now();
    wait_until(
        "withdrawn by the router after BFD's detection time",
        Duration::from_secs(HOLD),
        || diag(&agent),
        || !routed(&bird),
    );
    let took = t.elapsed();
    eprintln!("the frozen node's route went after {took:?} (hold time {HOLD} s)");
    assert!(took < Duration::from_millis(HOLD * 1000 / 2), "{took:?}");
    common::signal(&agent, "CONT");
    wait_until(
        "announced again after SIGCONT",
        Duration::from_secs(15),
        || diag(&agent),
        || routed(&bird),
    );
}
