//! Agent bench: time from an EndpointSlice change at the API to the rule in the kernel, with
//! many egress Services, and the agent's memory and idle CPU at that scale. Needs root.
//!
//!     cargo bench -p kvip --bench agent
//!     KVIP_BENCH_SERVICES=1000 KVIP_BENCH_ENDPOINTS=10 KVIP_BENCH_CHANGES=200 cargo bench -p kvip --bench agent
//!     KVIP_BENCH_AGENT_LOG=/tmp/agent.log …   (keeps the agent's log, at info)
//!     KVIP_BENCH_DETECT=poll …                 (see below)
//!     KVIP_BENCH_FOREIGN_EVERY=N …             (another program's nftables transaction
//!                                              every N changes: the next read-back lists)
//!
//! A change counts as in the kernel when the kernel reports the new element: `nft monitor`
//! runs beside the agent and each of its lines is timestamped as it is read, so the
//! measurement neither waits on a polling interval nor takes CPU from the agent.
//! `KVIP_BENCH_DETECT=poll` detects it the older way instead, by running `nft get element`
//! back to back until it succeeds: each of those lists a set of 10,000 elements, so it competes
//! with the agent for the two cores and adds its own granularity to every figure.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::Netns;
use kvip_testkit::apiserver::ApiServer;
use serde_json::json;

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pod(i: usize) -> String {
    let n = 0x0a80_0000u32 + i as u32 + 1;
    std::net::Ipv4Addr::from(n).to_string()
}

/// VIPs from the documentation ranges, shared by four Services each.
fn vip(i: usize) -> String {
    let k = i / 4;
    match k {
        0..=249 => format!("198.51.100.{}", k + 1),
        _ => format!("203.0.113.{}", (k - 250) % 250 + 1),
    }
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc{i}"), "namespace": "default",
                     "annotations": {"kube-vip.io/loadbalancerIPs": vip(i), "kube-vip.io/egress": "true"}},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}
    }))
    .expect("service")
}

fn slice(i: usize, pods: &[String]) -> EndpointSlice {
    let eps: Vec<_> = pods
        .iter()
        .map(|p| json!({"addresses": [p], "nodeName": "n1", "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc{i}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc{i}")}},
        "addressType": "IPv4", "endpoints": eps
    }))
    .expect("slice")
}

/// Whether `ip` is in kvip's source map (inside the node namespace).
fn in_kernel(ip: &str) -> bool {
    Command::new("nft")
        .args([
            "get",
            "element",
            "inet",
            "kvip",
            "src4",
            &format!("{{ {ip} }}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child process killed when dropped, also when the bench panics.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nft monitor new elements` in the namespace: each line it prints, with the instant it was
/// read.
fn monitor(ns: &Netns) -> (Killed, mpsc::Receiver<(Instant, String)>) {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "nft",
            "monitor",
            "new",
            "elements",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nft monitor");
    let out = child.stdout.take().expect("monitor stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    (Killed(child), rx)
}

/// Returns once the monitor reports elements: one is added to a table of the bench's own
/// until the monitor prints it; the table is then deleted and what was printed dropped.
fn monitor_ready(ns: &Netns, lines: &mpsc::Receiver<(Instant, String)>) {
    ns.exec_ok(
        "nft",
        &["add table inet kvipbench; add set inet kvipbench s { type ipv4_addr; }"],
    )
    .expect("probe table");
    'probe: for k in 1..=250 {
        let ip = format!("192.0.2.{k}");
        ns.exec_ok(
            "nft",
            &[
                "add",
                "element",
                "inet",
                "kvipbench",
                "s",
                &format!("{{ {ip} }}"),
            ],
        )
        .expect("probe element");
        while let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(100)) {
            if line.starts_with("add element inet kvipbench s ") && line.contains(&ip) {
                break 'probe;
            }
        }
        assert!(k < 250, "nft monitor printed nothing");
    }
    ns.exec_ok("nft", &["delete table inet kvipbench"])
        .expect("probe table");
    while lines.try_recv().is_ok() {}
}

/// Whether a monitor line adds `ip` to kvip's source map (exact token, not a prefix; kvip
/// adds elements to a full table and creates them in a change).
fn adds(line: &str, ip: &str) -> bool {
    (line.starts_with("add element inet kvip src4 ")
        || line.starts_with("create element inet kvip src4 "))
        && line
            .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
            .any(|t| t == ip)
}

fn proc_field(pid: u32, file: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// User + system CPU ticks of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !kvip_testkit::bench_start("agent", "network namespaces") {
        return;
    }
    let n_svc = env_usize("KVIP_BENCH_SERVICES", 1000);
    let n_ep = env_usize("KVIP_BENCH_ENDPOINTS", 10);
    let changes = env_usize("KVIP_BENCH_CHANGES", 200);
    let poll = std::env::var("KVIP_BENCH_DETECT").is_ok_and(|v| v == "poll");
    let foreign_every = env_usize("KVIP_BENCH_FOREIGN_EVERY", 0);
    let ns = Netns::new("abn").expect("netns");
    let peer = Netns::new("abnp").expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&ns).expect("listen");
    let dir = std::env::temp_dir();
    let kubeconfig = dir.join(format!("kvip-bench-{}.kubeconfig", std::process::id()));
    std::fs::write(&kubeconfig, ApiServer::kubeconfig(&url)).expect("kubeconfig");
    // The monitor is started and proven to report before the agent starts: the probe's
    // transactions then precede all of the agent's.
    let (mon, lines) = monitor(&ns);
    monitor_ready(&ns, &lines);
    let agent_log = std::env::var("KVIP_BENCH_AGENT_LOG").ok();
    // Killed should the bench fail; stopped with SIGTERM at its end.
    let mut agent = Killed(
        ns.clean_env_command()
            .args([
                "NODE_NAME=n1",
                "vip_interface=eth0",
                "egress_podcidr=10.244.0.0/16",
                "egress_servicecidr=10.96.0.0/12",
                // Read-backs (drift checks) every 2 s, not every 30: several fall among the
                // measured changes and into the memory peak.
                "resync_period=2",
            ])
            // KVIP_BENCH_AGENT_LOG=FILE keeps the agent's log (at info) for a look at each sync.
            .arg(match agent_log {
                Some(_) => "RUST_LOG=info",
                None => "RUST_LOG=warn",
            })
            .arg(format!("k8s_config_file={}", kubeconfig.display()))
            .args([KVIP, "run"])
            .stdout(Stdio::null())
            .stderr(match &agent_log {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("agent log file")),
                None => Stdio::null(),
            })
            .spawn()
            .expect("kvip run"),
    );
    let pid = agent.0.id();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _in = rt.enter();
    let client = server.client();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let mut pods: Vec<Vec<String>> = (0..n_svc)
        .map(|i| (0..n_ep).map(|j| pod(i * n_ep + j)).collect())
        .collect();
    let load = Instant::now();
    rt.block_on(async {
        for (i, p) in pods.iter().enumerate() {
            services
                .create(&PostParams::default(), &service(i))
                .await
                .expect("service");
            slices
                .create(&PostParams::default(), &slice(i, p))
                .await
                .expect("slice");
        }
    });
    let last = pods[n_svc - 1][n_ep - 1].clone();
    ns.enter(|| {
        while !in_kernel(&last) {
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .expect("netns");
    let loaded = load.elapsed();
    // What the monitor printed during the load is dropped.
    while lines.try_recv().is_ok() {}

    // One endpoint replaced per change, on a Service picked round-robin.
    let mut lat = Vec::with_capacity(changes);
    for k in 0..changes {
        let i = (k * 7919) % n_svc;
        let fresh = pod(n_svc * n_ep + k);
        if foreign_every > 0 && k % foreign_every == foreign_every - 1 {
            // Between two changes, not timed: a table of the bench's own, added and removed.
            ns.exec_ok(
                "nft",
                &["add table inet kvipbench; delete table inet kvipbench"],
            )
            .expect("foreign transaction");
        }
        pods[i][k % n_ep] = fresh.clone();
        let t0 = Instant::now();
        rt.block_on(async {
            let cur = slices.get(&format!("svc{i}-1")).await.expect("get");
            let mut next = slice(i, &pods[i]);
            next.metadata.resource_version = cur.metadata.resource_version;
            slices
                .replace(&format!("svc{i}-1"), &PostParams::default(), &next)
                .await
                .expect("replace");
        });
        if poll {
            ns.enter(|| {
                while !in_kernel(&fresh) {
                    std::hint::spin_loop();
                }
            })
            .expect("netns");
            lat.push(t0.elapsed());
        } else {
            loop {
                let (at, line) = lines
                    .recv_timeout(Duration::from_secs(30))
                    .expect("the kernel reported no new element within 30 s");
                if adds(&line, &fresh) {
                    lat.push(at.saturating_duration_since(t0));
                    break;
                }
            }
        }
    }
    lat.sort();
    let rss_kb = proc_field(pid, "status", "VmRSS:").unwrap_or(0);
    let hwm_kb = proc_field(pid, "status", "VmHWM:").unwrap_or(0);
    let t0 = cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(10));
    let idle_ticks = cpu_ticks(pid).unwrap_or(0).saturating_sub(t0);
    let hz = 100.0;
    println!("## Agent: EndpointSlice change → rule in the kernel\n");
    println!(
        "{n_svc} egress Services × {n_ep} endpoints ({} pods) on one node; initial load of all objects to all rules: {:.1} s.\n",
        n_svc * n_ep,
        loaded.as_secs_f64()
    );
    println!(
        "Detection: {}.\n",
        if poll {
            "`nft get element` run back to back (KVIP_BENCH_DETECT=poll)"
        } else {
            "`nft monitor new elements`, each line timestamped as read"
        }
    );
    if foreign_every > 0 {
        println!(
            "Another nftables transaction every {foreign_every} changes (KVIP_BENCH_FOREIGN_EVERY).\n"
        );
    }
    println!("| changes | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "| {changes} | {} | {} | {} | {} |",
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.9)),
        ms(pct(&lat, 0.99)),
        ms(lat[lat.len() - 1])
    );
    println!(
        "\nAgent memory after the load: RSS {:.1} MB (peak {:.1} MB). Idle CPU over 10 s: {:.2} % of one core.",
        rss_kb as f64 / 1024.0,
        hwm_kb as f64 / 1024.0,
        idle_ticks as f64 / hz / 10.0 * 100.0
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.0.wait();
    drop(mon);
    let _ = std::fs::remove_file(&kubeconfig);
}
