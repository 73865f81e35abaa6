//! BGP bench, against a real BIRD 2 router in a network namespace. Needs root.
//!
//!     cargo bench -p kvip --bench bgp
//!     KVIP_BGP=failover KVIP_FAILOVERS=50 cargo bench -p kvip --bench bgp
//!     KVIP_BGP=startup KVIP_STARTS=5 KVIP_ROUTES=1000 cargo bench -p kvip --bench bgp
//!
//! - `failover`: a node runs `kvip run` in BGP mode with one Service; its agent is stopped
//!   `KVIP_FAILOVERS` times per way (SIGTERM, SIGKILL, SIGSTOP without BFD, SIGSTOP with BFD
//!   300 ms × 3), and the time from the signal to the route gone from BIRD is measured (BIRD
//!   polled through `birdc`, a few ms per poll). Hold time 3 s, keepalive 1 s.
//! - `startup`: the time from start to all `KVIP_ROUTES` host routes seen by the router, for
//!   `kvip run` (that many Services, every node holding them) and, in the same run, for BIRD
//!   itself announcing as many static routes from another node to the same router; runs
//!   alternate, `KVIP_STARTS` each.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::Netns;
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::bird::Bird;

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");
const VIP: &str = "10.200.0.10";

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(a: &Agent, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &a.0.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig}");
}

fn start(ns: &Netns, kubeconfig: &std::path::Path, node_ip: &str, peers: &str) -> Agent {
    let child = ns
        .clean_env_command()
        .args([
            "NODE_NAME=n1",
            "POD_NAMESPACE=kube-system",
            "vip_interface=lo",
            "vip_arp=false",
            "vip_leaderelection=false",
            "egress_podcidr=10.244.0.0/16",
            "egress_servicecidr=10.96.0.0/12",
            "bgp_enable=true",
            "bgp_as=64512",
            "bgp_hold_time=3",
            "bgp_keepalive_interval=1",
            "RUST_LOG=warn",
        ])
        .arg(format!("bgp_routerid={node_ip}"))
        .arg(format!("bgp_peers={peers}"))
        .arg(format!("k8s_config_file={}", kubeconfig.display()))
        .args([KVIP, "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvip run");
    Agent(child)
}

fn service(name: &str, vip: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"kube-vip.io/loadbalancerIPs": vip}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service")
}

/// Routes BIRD has from protocol `proto` (`show route protocol <p> count`).
fn count(bird: &Bird, proto: &str) -> usize {
    let out = bird
        .cmd(&format!("show route protocol {proto} count"))
        .expect("birdc");
    // "N of M routes for K networks in table T", a line per table: their sum. No such line
    // at all is no answer.
    let counts: Vec<usize> = out
        .lines()
        .filter(|l| l.contains(" routes for "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(!counts.is_empty(), "no route count from BIRD: {out}");
    counts.iter().sum()
}

/// Whether BIRD's protocol `proto` is Established.
fn established(bird: &Bird, proto: &str) -> bool {
    bird.established(proto).expect("birdc")
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn router_conf(peers: &[(&str, &str, bool)]) -> String {
    let mut c = "log stderr all;\nrouter id 192.0.2.1;\nprotocol device {}\nprotocol bfd { interface \"*\" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }; }\n".to_string();
    for (name, ip, bfd) in peers {
        let asn = if *name == "pbird" { 64513 } else { 64512 };
        c.push_str(&format!(
            "protocol bgp {name} {{\n  local 192.0.2.1 as 65001;\n  neighbor {ip} as {asn};\n  passive on;\n  error wait time 1, 2;\n  {}\n  ipv4 {{ import all; export none; }};\n}}\n",
            if *bfd { "bfd on;" } else { "" }
        ));
    }
    c
}

fn failover(rounds: usize) {
    let (node, router) = (
        Netns::new("bfn").expect("netns"),
        Netns::new("bfr").expect("netns"),
    );
    node.veth("eth0", &router, "eth0").expect("veth");
    node.addr("eth0", "192.0.2.10/24").expect("addr");
    router.addr("eth0", "192.0.2.1/24").expect("addr");
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&node).expect("listen");
    let kubeconfig =
        std::env::temp_dir().join(format!("kvip-bench-bgp-{}.conf", std::process::id()));
    std::fs::write(&kubeconfig, ApiServer::kubeconfig(&url)).expect("kubeconfig");
    let (rt, client) = server.runtime_and_client();
    rt.block_on(
        Api::<Service>::namespaced(client, "default")
            .create(&PostParams::default(), &service("web", VIP)),
    )
    .expect("service");
    println!("## BGP: the announcing node's agent stopped → its route gone from the router\n");
    println!("{rounds} runs per row; hold time 3 s (keepalive 1 s); BFD 300 ms × 3.\n");
    println!("| stop | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (label, sig, bfd) in [
        ("kvip SIGTERM", "TERM", false),
        ("kvip SIGKILL", "KILL", false),
        ("kvip SIGSTOP, no BFD", "STOP", false),
        ("kvip SIGSTOP, BFD", "STOP", true),
        ("kvip SIGKILL, BFD", "KILL", true),
    ] {
        let bird = Bird::start(&router, &router_conf(&[("n1", "192.0.2.10", bfd)])).expect("bird");
        let peers = if bfd {
            "192.0.2.1:65001:::::true;300;300;3"
        } else {
            "192.0.2.1:65001"
        };
        let mut took = Vec::new();
        for round in 0..rounds {
            let agent = start(&node, &kubeconfig, "192.0.2.10", peers);
            wait("announced", Duration::from_secs(30), || {
                count(&bird, "n1") == 1
            });
            if bfd {
                wait("BFD up", Duration::from_secs(10), || {
                    bird.cmd("show bfd sessions").is_ok_and(|o| {
                        o.lines()
                            .any(|l| l.contains("192.0.2.10") && l.contains(" Up "))
                    })
                });
            }
            let t = Instant::now();
            signal(&agent, sig);
            wait("withdrawn", Duration::from_secs(10), || {
                count(&bird, "n1") == 0
            });
            let d = t.elapsed();
            eprintln!("{label} round {round}: {d:?}");
            took.push(d);
            drop(agent);
            // The next agent starts on a router that has forgotten this one.
            wait("BIRD ready again", Duration::from_secs(10), || {
                bird.cmd("show protocols n1")
                    .is_ok_and(|o| !o.contains("Established"))
            });
        }
        took.sort();
        println!(
            "| {label} | {} | {} | {} | {} |",
            ms(pct(&took, 0.5)),
            ms(pct(&took, 0.9)),
            ms(pct(&took, 0.99)),
            ms(took[took.len() - 1])
        );
    }
    let _ = std::fs::remove_file(&kubeconfig);
}

fn startup(starts: usize, routes: usize) {
    let lan = Netns::new("bsl").expect("netns");
    lan.sh("ip link add br0 type bridge && ip link set br0 up")
        .expect("bridge");
    let mk = |tag: &str, port: &str, ip: &str| {
        let ns = Netns::new(tag).expect("netns");
        ns.veth("eth0", &lan, port).expect("veth");
        lan.exec_ok("ip", &["link", "set", port, "master", "br0"])
            .expect("port");
        ns.addr("eth0", &format!("{ip}/24")).expect("addr");
        ns
    };
    let router = mk("bsr", "pr", "192.0.2.1");
    let kvip_node = mk("bsk", "pk", "192.0.2.10");
    let bird_node = mk("bsb", "pb", "192.0.2.11");
    let router_bird = Bird::start(
        &router,
        &router_conf(&[
            ("pkvip", "192.0.2.10", false),
            ("pbird", "192.0.2.11", false),
        ]),
    )
    .expect("bird");
    let vips: Vec<String> = (0..routes)
        .map(|i| format!("10.200.{}.{}", i / 250, 1 + i % 250))
        .collect();
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&kvip_node).expect("listen");
    let kubeconfig =
        std::env::temp_dir().join(format!("kvip-bench-bgps-{}.conf", std::process::id()));
    std::fs::write(&kubeconfig, ApiServer::kubeconfig(&url)).expect("kubeconfig");
    let (rt, client) = server.runtime_and_client();
    let api = Api::<Service>::namespaced(client, "default");
    rt.block_on(async {
        for (i, v) in vips.iter().enumerate() {
            api.create(&PostParams::default(), &service(&format!("s{i}"), v))
                .await
                .expect("service");
        }
    });
    let mut static_conf =
        "log stderr all;\nrouter id 192.0.2.11;\nprotocol device {}\nprotocol static { ipv4;\n"
            .to_string();
    for v in &vips {
        static_conf.push_str(&format!("  route {v}/32 blackhole;\n"));
    }
    static_conf.push_str("}\nprotocol bgp r {\n  local 192.0.2.11 as 64513;\n  neighbor 192.0.2.1 as 65001;\n  connect delay time 0;\n  ipv4 { import none; export all; next hop self; };\n}\n");
    let (mut k, mut b) = (Vec::new(), Vec::new());
    // From the router's view: the session up → the last route in.
    let (mut ka, mut ba) = (Vec::new(), Vec::new());
    for run in 0..starts {
        let t = Instant::now();
        let agent = start(&kvip_node, &kubeconfig, "192.0.2.10", "192.0.2.1:65001");
        let ek = wait("kvip's session", Duration::from_secs(60), || {
            established(&router_bird, "pkvip")
        });
        wait(
            "kvip's routes on the router",
            Duration::from_secs(120),
            || count(&router_bird, "pkvip") == routes,
        );
        let dk = t.elapsed();
        signal(&agent, "TERM");
        wait("kvip's routes withdrawn", Duration::from_secs(30), || {
            count(&router_bird, "pkvip") == 0
        });
        drop(agent);
        let t = Instant::now();
        let speaker = Bird::start(&bird_node, &static_conf).expect("bird speaker");
        let eb = wait("BIRD's session", Duration::from_secs(60), || {
            established(&router_bird, "pbird")
        });
        wait(
            "BIRD's routes on the router",
            Duration::from_secs(120),
            || count(&router_bird, "pbird") == routes,
        );
        let db = t.elapsed();
        drop(speaker);
        wait("BIRD's routes gone", Duration::from_secs(30), || {
            count(&router_bird, "pbird") == 0
        });
        eprintln!(
            "run {run}: kvip {dk:?} (session up after {ek:?}), BIRD {db:?} (session up after {eb:?})"
        );
        k.push(dk);
        b.push(db);
        ka.push(dk.saturating_sub(ek));
        ba.push(db.saturating_sub(eb));
        // Both sessions down before the next run (BIRD's error wait: 1-2 s).
        wait("router sessions down", Duration::from_secs(10), || {
            router_bird
                .cmd("show protocols")
                .is_ok_and(|o| !o.contains("Established"))
        });
    }
    println!("## BGP: {routes} host routes to the router\n");
    println!("| measure | speaker | runs | median | min | max |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (what, v, who) in [
        (
            "start → all routes on the router",
            &mut k,
            format!("kvip run ({routes} Services)"),
        ),
        (
            "start → all routes on the router",
            &mut b,
            format!("BIRD 2 ({routes} static routes)"),
        ),
        (
            "session up → all routes on the router",
            &mut ka,
            "kvip run".to_string(),
        ),
        (
            "session up → all routes on the router",
            &mut ba,
            "BIRD 2".to_string(),
        ),
    ] {
        v.sort();
        let m = pct(v, 0.5);
        medians.push(m);
        println!(
            "| {what} | {who} | {starts} | {} | {} | {} |",
            ms(m),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    }
    println!(
        "\nkvip / BIRD (medians): start → routes {:.2}×, session up → routes {:.2}×",
        medians[0].as_secs_f64() / medians[1].as_secs_f64(),
        medians[2].as_secs_f64() / medians[3].as_secs_f64()
    );
    let _ = std::fs::remove_file(&kubeconfig);
}

fn main() {
    if !kvip_testkit::bench_start("BGP", "network namespaces") {
        return;
    }
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let which = std::env::var("KVIP_BGP").unwrap_or_else(|_| "failover,startup".into());
    if which.contains("failover") {
        failover(env("KVIP_FAILOVERS", 50));
    }
    if which.contains("startup") {
        startup(env("KVIP_STARTS", 5), env("KVIP_ROUTES", 1000));
    }
}
