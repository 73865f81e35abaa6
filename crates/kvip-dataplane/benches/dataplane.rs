//! Dataplane bench: apply times and datapath cost, each against a baseline measured in the
//! same run. Needs root (network namespaces). Run:
//!
//!     cargo bench -p kvip-dataplane --bench dataplane            # everything
//!     KVIP_BENCH_SIZES=100,1000 cargo bench -p kvip-dataplane --bench dataplane
//!
//! Prints a Markdown report (the one in docs/benchmarks.md).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvip_core::{Cidr, DesiredState, EgressPolicy, VipClaim};
use kvip_dataplane::{BackendKind, Config, Dataplane, KernelDataplane, Variant};
use kvip_testkit::Netns;
use kvip_testkit::lab::{EXT4, EgressLab, POD4, VIP4};

const REPS: usize = 5;

fn pod(i: usize) -> IpAddr {
    // 10.128.0.0/9 holds up to 8M pods; the lab's real pod (10.244.1.5) is outside it.
    let n = 0x0a80_0000u32 + i as u32 + 1;
    IpAddr::V4(Ipv4Addr::from(n))
}

/// N pod addresses over N/10 policies (10 pods each), VIPs 192.0.2.x / 198.51.100.x.
fn state(n: usize, extra_pod: Option<IpAddr>) -> DesiredState {
    let policies = n.div_ceil(10).max(1);
    let mut egress = Vec::new();
    for p in 0..policies {
        let mut sources: Vec<IpAddr> = (p * 10..((p + 1) * 10).min(n)).map(pod).collect();
        if p == 0
            && let Some(x) = extra_pod
        {
            sources.push(x);
        }
        if sources.is_empty() {
            continue;
        }
        let vip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, (p % 250) as u8 + 1));
        let vip = if p == 0 { VIP4 } else { vip };
        egress.push(
            EgressPolicy::new(
                format!("bench/svc{p}"),
                vip,
                sources,
                vec![
                    "10.244.0.0/16".parse::<Cidr>().expect("cidr"),
                    "10.96.0.0/12".parse().expect("cidr"),
                ],
                None,
                None,
            )
            .expect("policy"),
        );
    }
    DesiredState::new(vec![], egress).expect("state")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn cfg(backend: BackendKind, variant: Option<Variant>) -> Config {
    Config {
        backend,
        iptables_variant: variant,
        no_conntrack_flush: true,
        ..Config::default()
    }
}

/// What one size measures on a backend.
struct ApplyTimes {
    full: Duration,
    /// One pod replaced by another (a deletion and an addition): nftables only.
    replace_one: Option<Duration>,
    /// One pod added: nftables only.
    add_one: Option<Duration>,
    /// The resulting table as `nft list` text, and kvip's JSON for it.
    listing: String,
    json: String,
}

/// Full apply into a fresh namespace, then (nftables) a one-pod replacement and a one-pod
/// addition on top of it.
fn apply_times(n: usize, c: &Config) -> ApplyTimes {
    let s = state(n, None);
    let with_first = |sources: Vec<IpAddr>| {
        let mut eg = s.egress().to_vec();
        eg[0] = eg[0].with_sources(sources).expect("policy");
        DesiredState::new(vec![], eg).expect("state")
    };
    let mut replaced = s.egress()[0].sources().to_vec();
    replaced[0] = pod(n + 7);
    let s2 = with_first(replaced.clone());
    replaced.push(pod(n + 8));
    let s3 = with_first(replaced);
    let (mut full, mut rep, mut add) = (Vec::new(), Vec::new(), Vec::new());
    let mut listing = String::new();
    for _ in 0..REPS {
        let ns = Netns::new("bench").expect("netns");
        let (f, r, a, l) = ns
            .block_on(|| async {
                let mut dp = KernelDataplane::new(c.clone()).await.expect("dataplane");
                let t = Instant::now();
                dp.apply(&s).await.expect("apply");
                let f = t.elapsed();
                let t = Instant::now();
                let r2 = dp.apply(&s2).await.expect("apply");
                let r = t.elapsed();
                let t = Instant::now();
                let r3 = dp.apply(&s3).await.expect("apply");
                let a = t.elapsed();
                let incremental = |m| m == kvip_dataplane::SyncMode::Incremental;
                let l = if matches!(c.backend, BackendKind::Nftables) {
                    dp.apply(&s).await.expect("apply");
                    dp.raw_listing().await.expect("listing")
                } else {
                    String::new()
                };
                (
                    f,
                    incremental(r2.mode).then_some(r),
                    incremental(r3.mode).then_some(a),
                    l,
                )
            })
            .expect("netns");
        full.push(f);
        rep.extend(r);
        add.extend(a);
        listing = l;
    }
    let med = |v: Vec<Duration>| (!v.is_empty()).then(|| median(v));
    ApplyTimes {
        full: median(full),
        replace_one: med(rep),
        add_one: med(add),
        listing,
        json: kvip_dataplane::nft::render_full("kvip", &s)
            .expect("render")
            .to_json()
            .expect("json"),
    }
}

/// Loading a file with `nft` into a fresh namespace (`-f`, or `-j -f` for JSON).
fn nft_file_time(content: &str, json: bool) -> Duration {
    let path = std::env::temp_dir().join(format!(
        "kvip-bench-{}.{}",
        std::process::id(),
        if json { "json" } else { "nft" }
    ));
    std::fs::write(&path, content).expect("write ruleset");
    let mut v = Vec::new();
    for _ in 0..REPS {
        let ns = Netns::new("limit").expect("netns");
        let p = path.clone();
        let d = ns
            .enter(move || {
                let mut cmd = Command::new("nft");
                if json {
                    cmd.arg("-j");
                }
                let t = Instant::now();
                let st = cmd.arg("-f").arg(&p).status().expect("nft");
                assert!(st.success());
                t.elapsed()
            })
            .expect("netns");
        v.push(d);
    }
    let _ = std::fs::remove_file(&path);
    median(v)
}

/// kube-vip 0.8's way: one iptables process per rule, a check then an append/insert, for the
/// mark rule and the SNAT rule of each pod. Stops after `cap`; returns (pods done, time).
fn per_rule_baseline(n: usize, cap: Duration) -> (usize, Duration) {
    let ns = Netns::new("kvb").expect("netns");
    ns.exec_ok("iptables", &["-t", "mangle", "-N", "KUBE-VIP-EGRESS"])
        .expect("chain");
    ns.enter(|| {
        let run = |args: &[&str]| {
            Command::new("iptables")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let start = Instant::now();
        for i in 0..n {
            let src = format!("{}/32", pod(i));
            let mark = [
                "-t",
                "mangle",
                "KUBE-VIP-EGRESS",
                "-s",
                &src,
                "-m",
                "comment",
                "--comment",
                "a3ViZS12aXAK=bench",
                "-j",
                "MARK",
                "--set-xmark",
                "0x40/0x40",
            ];
            let snat = [
                "-t",
                "nat",
                "POSTROUTING",
                "-s",
                &src,
                "-m",
                "mark",
                "--mark",
                "0x40/0x40",
                "-m",
                "comment",
                "--comment",
                "a3ViZS12aXAK=bench",
                "-j",
                "SNAT",
                "--to-source",
                "192.0.2.10",
            ];
            for (rule, op) in [(&mark[..], "-A"), (&snat[..], "-I")] {
                let mut check = vec![rule[0], rule[1], "-C"];
                check.extend_from_slice(&rule[2..]);
                if !run(&check) {
                    let mut add = vec![rule[0], rule[1], op];
                    add.extend_from_slice(&rule[2..]);
                    assert!(run(&add), "baseline rule insert failed");
                }
            }
            if start.elapsed() > cap {
                return (i + 1, start.elapsed());
            }
        }
        (n, start.elapsed())
    })
    .expect("netns")
}

/// How the measured pod's translation (and `n` other pods') is installed on the lab's node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Install {
    /// No NAT rule at all.
    Nothing,
    /// kvip's nftables table.
    Kvip,
    /// One iptables SNAT rule per pod in POSTROUTING, the measured pod's last (kube-vip style).
    Linear,
}

fn install(lab: &EgressLab, how: Install, n: usize) {
    match how {
        Install::Nothing => {}
        Install::Kvip => {
            let s = state(n, Some(POD4));
            let s = DesiredState::new(
                vec![VipClaim::new(VIP4, "eth0").expect("vip")],
                s.egress().to_vec(),
            )
            .expect("state");
            lab.node
                .block_on(|| async {
                    let mut dp = KernelDataplane::new(cfg(BackendKind::Nftables, None))
                        .await
                        .expect("dp");
                    dp.apply(&s).await.expect("apply");
                })
                .expect("netns");
        }
        Install::Linear => {
            let mut input = String::from("*nat\n-F POSTROUTING\n");
            for i in 0..n {
                input.push_str(&format!(
                    "-A POSTROUTING -s {}/32 -j SNAT --to-source 198.51.100.1\n",
                    pod(i)
                ));
            }
            input.push_str(&format!(
                "-A POSTROUTING -s {POD4}/32 -j SNAT --to-source {VIP4}\nCOMMIT\n"
            ));
            let _ = lab
                .node
                .exec("ip", &["addr", "add", "192.0.2.10/32", "dev", "eth0"]);
            lab.node
                .enter(|| {
                    let mut c = Command::new("iptables-restore")
                        .arg("--noflush")
                        .stdin(Stdio::piped())
                        .spawn()
                        .expect("restore");
                    c.stdin
                        .take()
                        .expect("stdin")
                        .write_all(input.as_bytes())
                        .expect("write");
                    assert!(c.wait().expect("wait").success());
                })
                .expect("netns");
        }
    }
    let want = if how == Install::Nothing { POD4 } else { VIP4 };
    assert_eq!(lab.seen_tcp(EXT4, 8080).expect("probe"), want);
}

/// New TCP connections per second from the lab's pod to the external host, for each
/// size in `sizes`, measured alternately (one run of each per round, `REPS`
/// rounds) in one lab so that the configurations share the same conditions.
fn conn_rates(how: Install, sizes: &[usize]) -> Vec<f64> {
    let lab = EgressLab::new("dp", false).expect("lab");
    let dst = SocketAddr::new(EXT4, 9000);
    // A deep backlog and a blocking accept loop: a full accept queue drops SYNs, and one
    // retransmission (1 s) would dominate the measurement.
    let listener = lab
        .ext
        .enter(move || -> std::io::Result<TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&dst.into())?;
            s.listen(4096)?;
            Ok(s.into())
        })
        .expect("netns")
        .expect("listen");
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let acceptor = std::thread::spawn(move || {
        while !s2.load(Ordering::Relaxed) {
            let _ = listener.accept();
        }
    });
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for _ in 0..REPS {
        for (i, &n) in sizes.iter().enumerate() {
            install(&lab, how, n);
            let rate = lab
                .pod
                .enter(move || {
                    let count = 3000;
                    let t = Instant::now();
                    for _ in 0..count {
                        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                            .expect("connect");
                        // RST on close: no TIME_WAIT, so ports do not run out.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                    count as f64 / t.elapsed().as_secs_f64()
                })
                .expect("netns");
            runs[i].push(rate);
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Wake the blocking accept so the loop sees the flag.
    let _ = lab
        .pod
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(1)));
    let _ = acceptor.join();
    runs.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect()
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("the dataplane bench needs root (network namespaces)");
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("KVIP_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1_000, 10_000, 50_000]);
    let cap = Duration::from_secs(
        std::env::var("KVIP_BENCH_BASELINE_CAP_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    println!("## Apply time (median of {REPS}, fresh namespace each)\n");
    println!(
        "| N pods (N/10 policies) | kube-vip-style per-rule iptables | kvip nftables full | speed-up | `nft -f` (text) of same ruleset | kvip / `nft -f` | `nft -j -f` of kvip's JSON | one pod replaced | replaced / full | one pod added | added / full | kvip iptables-nft full | kvip iptables-legacy full |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        let t = apply_times(n, &cfg(BackendKind::Nftables, None));
        let limit = nft_file_time(&t.listing, false);
        let json = nft_file_time(&t.json, true);
        let ipt_nft = apply_times(n, &cfg(BackendKind::Iptables, Some(Variant::Nft))).full;
        let ipt_leg = apply_times(n, &cfg(BackendKind::Iptables, Some(Variant::Legacy))).full;
        let (done, base) = per_rule_baseline(n, cap);
        let full = t.full;
        let (base_s, speed) = if done == n {
            (
                ms(base),
                format!("{:.0}×", base.as_secs_f64() / full.as_secs_f64()),
            )
        } else {
            (
                format!("≥ {} (stopped after {done} of {n} pods)", ms(base)),
                format!("≥ {:.0}×", base.as_secs_f64() / full.as_secs_f64()),
            )
        };
        let pct = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} %", 100.0 * d.as_secs_f64() / full.as_secs_f64()))
                .unwrap_or_else(|| "-".into())
        };
        let opt = |d: Option<Duration>| d.map(ms).unwrap_or_else(|| "-".into());
        println!(
            "| {n} | {base_s} | {} | {speed} | {} | {:.2}× | {} | {} | {} | {} | {} | {} | {} |",
            ms(full),
            ms(limit),
            full.as_secs_f64() / limit.as_secs_f64(),
            ms(json),
            opt(t.replace_one),
            pct(t.replace_one),
            opt(t.add_one),
            pct(t.add_one),
            ms(ipt_nft),
            ms(ipt_leg),
        );
    }
    if std::env::var("KVIP_BENCH_SKIP_DATAPATH").is_ok() {
        return;
    }
    println!(
        "\n## Datapath: new TCP connections per second, pod → node → external host (median of {REPS} runs of 3000)\n"
    );
    println!(
        "N is the number of other pods' egress addresses installed besides the measured pod's own translation; each column's ratio is against its own N = 0.\n"
    );
    let sizes = [0, 1_000, 10_000];
    let plain = conn_rates(Install::Nothing, &[0])[0];
    let k = conn_rates(Install::Kvip, &sizes);
    let l = conn_rates(Install::Linear, &sizes);
    println!(
        "| N other egress pod IPs | kvip nftables (vmap) | vs N=0 | linear per-pod iptables (kube-vip style) | vs N=0 |"
    );
    println!("|---|---|---|---|---|");
    for (i, n) in sizes.iter().enumerate() {
        println!(
            "| {n} | {:.0}/s | {:.2} | {:.0}/s | {:.2} |",
            k[i],
            k[i] / k[0],
            l[i],
            l[i] / l[0]
        );
    }
    println!("\nFor scale, the same path with no NAT rule at all: {plain:.0}/s.");
}
