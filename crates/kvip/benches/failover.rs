//! Failover bench: three real `kvip run` agents on one layer-2 segment (a bridge), an
//! observer host on it, and a pod behind each node sending a UDP datagram every 10 ms to the
//! observer. The holder of one egress Service's VIP is killed (SIGKILL, or SIGTERM), over and
//! over; for each failover it measures from the signal to
//!   (a) the Lease held by another node,
//!   (b) the VIP on another node,
//!   (c) the gratuitous ARP from the new holder seen by the observer,
//!   (d) the first datagram from the new holder's pod reaching the observer with the VIP as
//!       its source.
//! Needs root.
//!
//!     cargo bench -p kvip --bench failover
//!     KVIP_FAILOVERS=50 KVIP_TIMINGS=5/3/1,4/2/1 KVIP_MODES=kill,term cargo bench -p kvip --bench failover

use std::net::{IpAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::Netns;
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::capture::{Capture, parse_garp};
use serde_json::json;

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");
const VIP: &str = "192.0.2.10";
const OBSERVER: &str = "192.0.2.100";
const NODES: usize = 3;

struct Lab {
    _lan: Netns,
    observer: Netns,
    nodes: Vec<Netns>,
    pods: Vec<Netns>,
    macs: Vec<[u8; 6]>,
}

fn mac_of(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns
        .exec_ok("cat", &[&format!("/sys/class/net/{ifname}/address")])
        .expect("mac");
    let mut mac = [0u8; 6];
    for (i, part) in out.trim().split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// A bridge in its own namespace; the observer and each node's `eth0` on it; a pod behind
/// each node (10.244.<i>.2, routed through the node, which forwards).
fn lab() -> Lab {
    let lan = Netns::new("flan").expect("netns");
    lan.sh("ip link add br0 type bridge && ip link set br0 up")
        .expect("bridge");
    let attach = |ns: &Netns, port: &str, addr: &str| {
        ns.veth("eth0", &lan, port).expect("veth");
        lan.exec_ok("ip", &["link", "set", port, "master", "br0"])
            .expect("bridge port");
        ns.addr("eth0", addr).expect("addr");
    };
    let observer = Netns::new("fobs").expect("netns");
    attach(&observer, "obs", &format!("{OBSERVER}/24"));
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    let mut macs = Vec::new();
    for i in 0..NODES {
        let node = Netns::new(&format!("fn{i}")).expect("netns");
        attach(&node, &format!("n{i}"), &format!("192.0.2.{}/24", 21 + i));
        node.sysctl("net.ipv4.ip_forward", "1").expect("forward");
        let pod = Netns::new(&format!("fp{i}")).expect("netns");
        pod.veth("eth0", &node, "pod0").expect("veth");
        pod.addr("eth0", &format!("10.244.{i}.2/24")).expect("addr");
        node.addr("pod0", &format!("10.244.{i}.1/24"))
            .expect("addr");
        pod.route(&["default", "via", &format!("10.244.{i}.1")])
            .expect("route");
        macs.push(mac_of(&node, "eth0"));
        nodes.push(node);
        pods.push(pod);
    }
    Lab {
        _lan: lan,
        observer,
        nodes,
        pods,
        macs,
    }
}

struct Agent {
    child: Child,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(
    node: &Netns,
    i: usize,
    kubeconfig: &std::path::Path,
    timings: (u64, u64, u64),
) -> Agent {
    let child = node
        .clean_env_command()
        .arg(format!("NODE_NAME=n{i}"))
        .arg(format!("vip_leaseduration={}", timings.0))
        .arg(format!("vip_renewdeadline={}", timings.1))
        .arg(format!("vip_retryperiod={}", timings.2))
        .args([
            "vip_interface=eth0",
            "vip_arp=true",
            "egress_podcidr=10.244.0.0/16",
            "egress_servicecidr=10.96.0.0/12",
            "POD_NAMESPACE=kube-system",
            "RUST_LOG=warn",
        ])
        .arg(format!("k8s_config_file={}", kubeconfig.display()))
        .args([KVIP, "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kvip run");
    Agent { child }
}

fn has_vip(node: &Netns) -> bool {
    node.exec_ok("ip", &["-br", "addr", "show", "dev", "eth0"])
        .is_ok_and(|o| o.contains(&format!("{VIP}/32")))
}

/// (received at, source, sending pod) of every datagram the observer got.
type Seen = Arc<Mutex<Vec<(Instant, IpAddr, u8)>>>;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

#[derive(Default)]
struct Samples {
    lease: Vec<Duration>,
    vip: Vec<Duration>,
    garp: Vec<Duration>,
    packet: Vec<Duration>,
    /// The stopped holder's VIP gone from its own `eth0`.
    gone: Vec<Duration>,
    /// Polls that saw the VIP on the stopped holder and on another node at once.
    overlaps: usize,
}

fn main() {
    if !kvip_testkit::bench_start("failover", "network namespaces") {
        return;
    }
    let rounds: usize = std::env::var("KVIP_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let timing_sets: Vec<(u64, u64, u64)> = std::env::var("KVIP_TIMINGS")
        .unwrap_or_else(|_| "5/3/1,4/2/1".into())
        .split(',')
        .filter_map(|t| {
            let v: Vec<u64> = t.split('/').filter_map(|x| x.parse().ok()).collect();
            (v.len() == 3).then(|| (v[0], v[1], v[2]))
        })
        .collect();
    let modes: Vec<String> = std::env::var("KVIP_MODES")
        .unwrap_or_else(|_| "kill,term".into())
        .split(',')
        .map(str::to_string)
        .collect();

    println!("## Failover: holder stopped → the next node serving\n");
    println!(
        "{rounds} failovers per row; three agents, one egress Service with a ready pod on every node; times from the signal.\n"
    );
    println!("| signal | lease/renew/retry | to | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|---|");
    for timings in &timing_sets {
        for mode in &modes {
            let s = run(rounds, *timings, mode == "kill");
            let label = if mode == "kill" { "SIGKILL" } else { "SIGTERM" };
            for (what, v) in [
                ("(a) Lease on another node", &s.lease),
                ("(b) VIP on another node", &s.vip),
                ("(c) gratuitous ARP seen", &s.garp),
                ("(d) first pod packet with the VIP", &s.packet),
                ("(e) VIP gone from the stopped holder", &s.gone),
            ] {
                let mut v = v.clone();
                v.sort();
                if v.is_empty() {
                    println!(
                        "| {label} | {}/{}/{} s | {what} | – | – | – | – |",
                        timings.0, timings.1, timings.2
                    );
                    continue;
                }
                println!(
                    "| {label} | {}/{}/{} s | {what} | {} | {} | {} | {} |",
                    timings.0,
                    timings.1,
                    timings.2,
                    ms(pct(&v, 0.5)),
                    ms(pct(&v, 0.9)),
                    ms(pct(&v, 0.99)),
                    ms(v[v.len() - 1]),
                );
            }
            println!(
                "| {label} | {}/{}/{} s | polls seeing two holders | {} | | | |",
                timings.0, timings.1, timings.2, s.overlaps
            );
        }
    }
}

fn run(rounds: usize, timings: (u64, u64, u64), kill: bool) -> Samples {
    let lab = lab();
    let server = ApiServer::start().expect("api server");
    let kubeconfigs: Vec<std::path::PathBuf> = (0..NODES)
        .map(|i| {
            let url = server.listen_in(&lab.nodes[i]).expect("listen");
            let path = std::env::temp_dir().join(format!(
                "kvip-failover-{}-{i}.kubeconfig",
                std::process::id()
            ));
            std::fs::write(&path, ApiServer::kubeconfig(&url)).expect("kubeconfig");
            path
        })
        .collect();
    // The Service, with a ready pod on every node.
    let (rt, client) = server.runtime_and_client();
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default",
                     "annotations": {"kube-vip.io/loadbalancerIPs": VIP, "kube-vip.io/egress": "true"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service");
    let eps: Vec<_> = (0..NODES)
        .map(|i| json!({"addresses": [format!("10.244.{i}.2")], "nodeName": format!("n{i}"), "conditions": {"ready": true}}))
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": eps
    }))
    .expect("slice");
    rt.block_on(async {
        Api::<Service>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &svc)
            .await
            .expect("service");
        Api::<EndpointSlice>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &slice)
            .await
            .expect("slice");
    });

    // The observer's receiver and capture; each pod's sender.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let rx = lab
        .observer
        .enter(|| UdpSocket::bind(format!("{OBSERVER}:9999")))
        .expect("enter")
        .expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let receiver = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = rx.recv_from(&mut buf)
                    && n > 0
                    && let Ok(mut v) = seen.lock()
                {
                    v.push((Instant::now(), from.ip(), buf[0]));
                }
            }
        })
    };
    let capture = Capture::start(&lab.observer, "eth0").expect("capture");
    let senders: Vec<_> = (0..NODES)
        .map(|i| {
            let sock = lab.pods[i]
                .enter(|| UdpSocket::bind("0.0.0.0:0"))
                .expect("enter")
                .expect("bind");
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = sock.send_to(&[i as u8], format!("{OBSERVER}:9999"));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();

    let mut agents: Vec<Option<Agent>> = (0..NODES)
        .map(|i| Some(start_agent(&lab.nodes[i], i, &kubeconfigs[i], timings)))
        .collect();
    let vip: IpAddr = VIP.parse().expect("vip");
    let lease_holder = || -> String {
        server
            .object(
                "coordination.k8s.io/v1",
                "leases",
                "kube-system",
                "plndr-svcs-lock",
            )
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    // Steady: one node holds the VIP, the Lease names it, and its pod's datagrams arrive
    // with the VIP as their source.
    let steady = |limit: Duration| -> usize {
        let start = Instant::now();
        loop {
            let holders: Vec<usize> = (0..NODES).filter(|i| has_vip(&lab.nodes[*i])).collect();
            if let [h] = holders[..]
                && lease_holder() == format!("n{h}")
            {
                let since = Instant::now();
                std::thread::sleep(Duration::from_millis(60));
                let ok = seen.lock().is_ok_and(|v| {
                    v.iter()
                        .any(|(t, src, pod)| *t >= since && *src == vip && *pod as usize == h)
                });
                if ok {
                    return h;
                }
            }
            assert!(start.elapsed() < limit, "no steady state within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut s = Samples::default();
    let limit = Duration::from_secs(timings.0 * 3 + 10);
    for round in 0..rounds {
        let holder = steady(limit);
        // Let the holder renew a few times, at a random point of its renewal period.
        std::thread::sleep(Duration::from_millis(1000 + (round as u64 * 137) % 1000));
        let cap_from = capture.count();
        let pid = agents[holder]
            .as_ref()
            .map(|a| a.child.id())
            .expect("agent");
        let t0 = Instant::now();
        Command::new("kill")
            .args([if kill { "-KILL" } else { "-TERM" }, &pid.to_string()])
            .status()
            .expect("kill");
        let (mut ta, mut tb, mut tc, mut td, mut te) = (None, None, None, None, None);
        let mut new_holder = None;
        while (ta.is_none() || tb.is_none() || tc.is_none() || td.is_none() || te.is_none())
            && t0.elapsed() < limit
        {
            let old_has = has_vip(&lab.nodes[holder]);
            if te.is_none() && !old_has {
                te = Some(t0.elapsed());
            }
            if old_has && (0..NODES).any(|i| i != holder && has_vip(&lab.nodes[i])) {
                s.overlaps += 1;
            }
            if ta.is_none() {
                let h = lease_holder();
                if !h.is_empty() && h != format!("n{holder}") {
                    ta = Some(t0.elapsed());
                }
            }
            if tb.is_none()
                && let Some(n) = (0..NODES).find(|i| *i != holder && has_vip(&lab.nodes[*i]))
            {
                tb = Some(t0.elapsed());
                new_holder = Some(n);
            }
            if tc.is_none() {
                let (frames, _) = capture.timed_since(cap_from);
                tc = frames.iter().find_map(|(t, f)| {
                    parse_garp(f)
                        .filter(|a| a.address == vip && *t >= t0 && a.mac != lab.macs[holder])
                        .map(|_| t.duration_since(t0))
                });
            }
            if td.is_none() {
                td = seen.lock().ok().and_then(|v| {
                    v.iter()
                        .find(|(t, src, pod)| *t >= t0 && *src == vip && *pod as usize != holder)
                        .map(|(t, _, _)| t.duration_since(t0))
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(a) = agents[holder].as_mut() {
            let _ = a.child.wait();
        }
        eprintln!(
            "{} {}/{}/{} round {round}: holder n{holder} → {:?}: lease {ta:?}, vip {tb:?}, garp {tc:?}, packet {td:?}, old vip gone {te:?}",
            if kill { "SIGKILL" } else { "SIGTERM" },
            timings.0,
            timings.1,
            timings.2,
            new_holder.map(|n| format!("n{n}")),
        );
        s.lease.extend(ta);
        s.vip.extend(tb);
        s.garp.extend(tc);
        s.packet.extend(td);
        s.gone.extend(te);
        // The stopped node comes back (it does not lead: another node holds the Lease).
        agents[holder] = Some(start_agent(
            &lab.nodes[holder],
            holder,
            &kubeconfigs[holder],
            timings,
        ));
    }
    stop.store(true, Ordering::Relaxed);
    drop(agents);
    let _ = receiver.join();
    for t in senders {
        let _ = t.join();
    }
    for k in kubeconfigs {
        let _ = std::fs::remove_file(k);
    }
    s
}
