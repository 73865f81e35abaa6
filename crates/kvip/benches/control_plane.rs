//! Control-plane failover bench: three control-plane nodes on one LAN, each with its own API
//! server endpoint (one store) and a real `kvip run` with `cp_enable`; the holder is stopped
//! `KVIP_FAILOVERS` times per way (its local API server killed, kvip SIGTERM, kvip SIGKILL),
//! and the time from the stop to another node holding the VIP is measured, with the time the
//! stopped holder's VIP left its own kernel and every poll that saw two holders. Needs root.
//!
//!     cargo bench -p kvip --bench control_plane
//!     KVIP_FAILOVERS=50 KVIP_MODES=apiserver,term,kill cargo bench -p kvip --bench control_plane
//!
//! Timings: lease 5 s, renew deadline 3 s, retry period 1 s (kube-vip's defaults); health
//! checks every second, three failures to drop the VIP (kvip's defaults).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::Netns;
use kvip_testkit::apiserver::{ApiServer, Endpoint};

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");
const VIP: &str = "192.0.2.100";
const API_PORT: u16 = 16443;
const NODES: usize = 3;

struct Node {
    ns: Netns,
    endpoint: Endpoint,
    dir: std::path::PathBuf,
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(n: &Node, i: usize) -> Agent {
    let child =
        n.ns.clean_env_command()
            .arg(format!("vip_nodename=cp{i}"))
            .args([
                "cp_enable=true",
                "vip_interface=eth0",
                "vip_arp=true",
                "RUST_LOG=warn",
            ])
            .arg(format!("address={VIP}"))
            .arg(format!("kubernetes_addr={}", n.endpoint.url))
            .arg(format!(
                "k8s_config_file={}",
                n.dir.join("admin.conf").display()
            ))
            .args([KVIP, "run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kvip run");
    Agent(child)
}

fn holds(ns: &Netns) -> bool {
    ns.exec_ok("ip", &["-br", "addr", "show", "dev", "eth0"])
        .is_ok_and(|o| o.contains(&format!("{VIP}/32")))
}

/// The nodes holding the VIP, `last` read last: one read after another is no snapshot, and
/// reading the stopped holder after the others makes a handover (its VIP goes before another
/// node's comes) never look like two holders, while a real overlap still does.
fn holders(nodes: &[Node], last: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..nodes.len()).filter(|i| Some(*i) != last).collect();
    order.extend(last);
    let mut h: Vec<usize> = order.into_iter().filter(|i| holds(&nodes[*i].ns)).collect();
    h.sort();
    h
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if !kvip_testkit::bench_start("control-plane", "network namespaces") {
        return;
    }
    let rounds: usize = std::env::var("KVIP_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let modes: Vec<String> = std::env::var("KVIP_MODES")
        .unwrap_or_else(|_| "apiserver,term,kill".into())
        .split(',')
        .map(str::to_string)
        .collect();

    let server = ApiServer::start().expect("api server");
    let lan = Netns::new("cpblan").expect("netns");
    lan.sh("ip link add br0 type bridge && ip link set br0 up")
        .expect("bridge");
    let base = std::env::temp_dir().join(format!("kvip-cp-bench-{}", std::process::id()));
    let nodes: Vec<Node> = (0..NODES)
        .map(|i| {
            let ns = Netns::new(&format!("cpb{i}")).expect("netns");
            ns.veth("eth0", &lan, &format!("n{i}")).expect("veth");
            lan.exec_ok("ip", &["link", "set", &format!("n{i}"), "master", "br0"])
                .expect("bridge port");
            ns.addr("eth0", &format!("192.0.2.{}/24", 10 + i))
                .expect("address");
            let endpoint = server
                .endpoint_in_at(&ns, SocketAddr::from(([0, 0, 0, 0], API_PORT)))
                .expect("endpoint");
            let dir = base.join(format!("cp{i}"));
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(
                dir.join("admin.conf"),
                ApiServer::kubeconfig_with_token(&format!("https://{VIP}:6443"), Some("admin")),
            )
            .expect("kubeconfig");
            Node { ns, endpoint, dir }
        })
        .collect();
    let (rt, client) = server.runtime_and_client();
    let endpoints: Vec<serde_json::Value> = (0..NODES)
        .map(|i| serde_json::json!({"addresses": [format!("192.0.2.{}", 10 + i)]}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "https", "port": API_PORT, "protocol": "TCP"}]
    }))
    .expect("slice");
    rt.block_on(async {
        Api::<EndpointSlice>::namespaced(client, "default")
            .create(&PostParams::default(), &slice)
            .await
            .expect("slice");
    });
    let mut agents: Vec<Agent> = (0..NODES).map(|i| start(&nodes[i], i)).collect();

    println!("## Control-plane VIP: holder stopped → another node holds the VIP\n");
    println!(
        "{rounds} failovers per row; three control-plane nodes, lease/renew/retry 5/3/1 s, health checks every 1 s, 3 failures; times from the stop.\n"
    );
    println!("| stop | to | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    for mode in &modes {
        let (mut taken, mut gone, mut overlaps) = (Vec::new(), Vec::new(), 0usize);
        for round in 0..rounds {
            // Steady: one holder, for a second.
            let start_wait = Instant::now();
            let holder = loop {
                let h = holders(&nodes, None);
                if h.len() == 1 {
                    std::thread::sleep(Duration::from_millis(1000 + (round as u64 * 137) % 1000));
                    if holders(&nodes, None) == h {
                        break h[0];
                    }
                }
                assert!(
                    start_wait.elapsed() < Duration::from_secs(60),
                    "no steady holder"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let t0 = Instant::now();
            match mode.as_str() {
                "apiserver" => server.stop_endpoint(&nodes[holder].endpoint),
                "term" | "kill" => {
                    let sig = if mode == "term" { "-TERM" } else { "-KILL" };
                    Command::new("kill")
                        .args([sig, &agents[holder].0.id().to_string()])
                        .status()
                        .expect("kill");
                }
                other => panic!("unknown mode {other}"),
            }
            let (mut tg, mut tt) = (None, None);
            while tt.is_none() && t0.elapsed() < Duration::from_secs(30) {
                let h = holders(&nodes, Some(holder));
                if h.len() > 1 {
                    overlaps += 1;
                }
                if tg.is_none() && !h.contains(&holder) {
                    tg = Some(t0.elapsed());
                }
                if h.iter().any(|i| *i != holder) {
                    tt = Some(t0.elapsed());
                }
            }
            eprintln!("{mode} round {round}: cp{holder}: VIP gone {tg:?}, taken over {tt:?}");
            gone.extend(tg);
            taken.extend(tt);
            // Back to three ready nodes.
            match mode.as_str() {
                "apiserver" => server
                    .restart_endpoint(&nodes[holder].ns, &nodes[holder].endpoint)
                    .expect("restart"),
                _ => {
                    let _ = agents[holder].0.wait();
                    agents[holder] = start(&nodes[holder], holder);
                }
            }
        }
        let label = match mode.as_str() {
            "apiserver" => "local API server killed",
            "term" => "kvip SIGTERM",
            _ => "kvip SIGKILL",
        };
        for (what, v) in [
            ("VIP on another node", &mut taken),
            ("VIP gone from the stopped holder", &mut gone),
        ] {
            v.sort();
            if v.is_empty() {
                println!("| {label} | {what} | – | – | – | – |");
                continue;
            }
            println!(
                "| {label} | {what} | {} | {} | {} | {} |",
                ms(pct(v, 0.5)),
                ms(pct(v, 0.9)),
                ms(pct(v, 0.99)),
                ms(v[v.len() - 1])
            );
        }
        println!("| {label} | polls seeing two holders | {overlaps} | | | |");
    }
    drop(agents);
    let _ = std::fs::remove_dir_all(&base);
}
