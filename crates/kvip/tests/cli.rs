//! The `kvip` binary against the real kernel, one namespace per test: bad input applies
//! nothing, SIGKILL in the middle of applies is repaired by the next process, instances do
//! not touch each other.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kvip_testkit::{Netns, require_kernel};

const KVIP: &str = env!("CARGO_BIN_EXE_kvip");

fn node(tag: &str) -> (Netns, Netns) {
    let ns = Netns::new(tag).expect("netns");
    let peer = Netns::new(&format!("{tag}p")).expect("netns");
    ns.veth("eth0", &peer, "eth0").expect("veth");
    (ns, peer)
}

fn kvip(ns: &Netns, args: &[&str]) -> Output {
    let mut full = vec!["netns", "exec", ns.name(), KVIP];
    full.extend_from_slice(args);
    Command::new("ip")
        .args(&full)
        .stdin(Stdio::null())
        .output()
        .expect("run kvip")
}

fn write_state(dir: &tempdir::Dir, name: &str, body: &str) -> PathBuf {
    let p = dir.path().join(name);
    let mut f = std::fs::File::create(&p).expect("create state");
    f.write_all(body.as_bytes()).expect("write state");
    p
}

mod tempdir {
    use std::path::{Path, PathBuf};
    /// A directory removed on drop.
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("kvip-test-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn listing(ns: &Netns) -> String {
    let mut s = ns.exec_ok("nft", &["list", "ruleset"]).expect("nft");
    // Duplicate address detection finishing on the link-local address is the kernel's doing.
    s.push_str(
        &ns.exec_ok("ip", &["addr", "show", "eth0"])
            .expect("ip")
            .replace(" tentative", ""),
    );
    for t in ["iptables-nft-save", "iptables-legacy-save"] {
        let o = ns.exec_ok(t, &["-t", "nat"]).expect("save");
        s.extend(
            o.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| format!("{l}\n")),
        );
    }
    s
}

const GOOD: &str = r#"
vips: [{address: 192.0.2.10, interface: eth0}]
egress:
  - {name: default/web, vip: 192.0.2.10, sources: [10.244.1.5], exclude: [10.244.0.0/16]}
"#;

#[test]
fn bad_input_is_rejected_and_applies_nothing() {
    require_kernel!();
    let (ns, _p) = node("bad");
    let dir = tempdir::Dir::new("bad");
    let good = write_state(&dir, "good.yaml", GOOD);
    let out = kvip(
        &ns,
        &[
            "dataplane",
            "apply",
            "--state",
            good.to_str().expect("path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = listing(&ns);
    let policy = |extra: &str, sources: &str, vip: &str| {
        format!(
            "egress:\n  - name: bad/one\n    vip: {vip}\n    sources: {sources}\n    exclude: [10.244.0.0/16]\n{extra}"
        )
    };
    let cases = [
        (
            "malformed CIDR",
            policy("    allow: [300.1.1.1/8]\n", "[10.244.1.9]", "192.0.2.11"),
            "300.1.1.1/8",
        ),
        (
            "port 0",
            policy("    ports: [\"tcp:0\"]\n", "[10.244.1.9]", "192.0.2.11"),
            "\"0\"",
        ),
        (
            "port 70000",
            policy("    ports: [\"tcp:70000\"]\n", "[10.244.1.9]", "192.0.2.11"),
            "70000",
        ),
        (
            "unknown protocol",
            policy("    ports: [\"icmp:7\"]\n", "[10.244.1.9]", "192.0.2.11"),
            "icmp",
        ),
        (
            "mixed families",
            policy("", "[\"fd00::9\"]", "192.0.2.11"),
            "fd00::9",
        ),
        (
            "conflicting sources",
            format!(
                "{}  - {{name: bad/two, vip: 192.0.2.12, sources: [10.244.1.9], exclude: []}}\n",
                policy("", "[10.244.1.9]", "192.0.2.11")
            ),
            "bad/two",
        ),
        (
            "unknown field",
            "egress:\n  - {name: x, vip: 192.0.2.11, sources: [10.244.1.9], exclud: []}\n"
                .to_string(),
            "exclud",
        ),
        (
            "missing interface",
            "vips: [{address: 192.0.2.11, interface: nosuch0}]\n".to_string(),
            "nosuch0",
        ),
        ("empty file", "\n  \n".to_string(), "the state is empty"),
    ];
    for (what, body, needle) in cases {
        let p = write_state(&dir, "bad.yaml", &body);
        let out = kvip(
            &ns,
            &["dataplane", "apply", "--state", p.to_str().expect("path")],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        assert!(
            err.starts_with("kvip: error: ") && err.contains(needle),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(listing(&ns), before, "{what}: the kernel changed");
    }
    // Past the size limit (a sparse file: nothing is written) and past the announcement limit.
    let huge = dir.path().join("huge.yaml");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len((64 << 20) + 1))
        .expect("sparse file");
    let good = write_state(&dir, "good.yaml", "vips: []\n");
    for (what, args, needle) in [
        (
            "huge file",
            vec![
                "dataplane",
                "apply",
                "--state",
                huge.to_str().expect("path"),
            ],
            "more than the",
        ),
        (
            "announce count",
            vec![
                "dataplane",
                "apply",
                "--announce-count",
                "101",
                "--state",
                good.to_str().expect("path"),
            ],
            "--announce-count 101",
        ),
    ] {
        let out = kvip(&ns, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(listing(&ns), before, "{what}: the kernel changed");
    }
}

#[test]
fn sigkill_during_applies_then_new_state_is_exact() {
    require_kernel!();
    let (ns, _p) = node("kil");
    let dir = tempdir::Dir::new("kil");
    // States A and B hold VIPs and policies that C has none of.
    let mut states = Vec::new();
    for i in 0..4 {
        let body = format!(
            "vips: [{{address: 192.0.2.{a}, interface: eth0}}, {{address: \"2001:db8:1::{a}\", interface: eth0}}]\negress:\n  - {{name: ns/svc{i}, vip: 192.0.2.{a}, sources: [{srcs}], exclude: [10.244.0.0/16]}}\n  - {{name: ns/v6-{i}, vip: \"2001:db8:1::{a}\", sources: [\"fd00::{i}:1\"], exclude: []}}\n",
            a = 20 + i,
            srcs = (1..=50)
                .map(|j| format!("10.244.{i}.{j}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        states.push(write_state(&dir, &format!("s{i}.yaml"), &body));
    }
    let c_body = "vips: [{address: 192.0.2.99, interface: eth0}]\negress:\n  - {name: final/c, vip: 192.0.2.99, sources: [10.244.9.9], exclude: [10.244.0.0/16], ports: [\"tcp:443\"]}\n";
    let c = write_state(&dir, "c.yaml", c_body);
    let mut rounds_with_stale_vips = 0;
    for (round, backend) in ["nftables", "iptables", "nftables", "iptables"]
        .iter()
        .enumerate()
    {
        let script = format!(
            "while true; do for s in {}; do {KVIP} dataplane --backend {backend} --announce-count 0 apply --state $s >/dev/null 2>&1; done; done",
            states
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "setsid", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("loop");
        std::thread::sleep(Duration::from_millis(300 + 170 * round as u64));
        // SIGKILL the whole loop (shell and the kvip running in it) at once: `ip netns exec`
        // execs setsid, which execs sh as the leader of a new process group.
        let pgid = child.id().to_string();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = child.wait();
        // The killed run left its state behind (rules, and VIPs unless the kill fell between
        // removing the old ones and adding the new): that is what C must clean up.
        let stale = listing(&ns);
        if (0..4).any(|i| stale.contains(&format!("192.0.2.{}/32", 20 + i))) {
            rounds_with_stale_vips += 1;
        }
        assert!(
            stale.contains("table inet kvip") || stale.contains("KVIP-"),
            "round {round}: nothing left to recover from:\n{stale}"
        );
        let out = kvip(
            &ns,
            &[
                "dataplane",
                "--backend",
                backend,
                "apply",
                "--state",
                c.to_str().expect("path"),
            ],
        );
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let show = kvip(&ns, &["dataplane", "--backend", backend, "show"]);
        assert!(show.status.success());
        let got: kvip_core::DesiredState =
            serde_norway::from_slice(&show.stdout).expect("show yaml");
        let want: kvip_core::DesiredState = serde_norway::from_str(c_body).expect("state");
        assert_eq!(got, want, "round {round} ({backend})");
        assert!(
            show.stderr.is_empty(),
            "round {round}: stray {}",
            String::from_utf8_lossy(&show.stderr)
        );
        // No stale VIP of A or B, no stale rule of either backend.
        let addrs = ns.exec_ok("ip", &["addr", "show", "eth0"]).expect("ip");
        for i in 0..4 {
            assert!(
                !addrs.contains(&format!("192.0.2.{}/", 20 + i)),
                "round {round}: stale VIP\n{addrs}"
            );
            assert!(
                !addrs.contains(&format!("2001:db8:1::{}/", 20 + i)),
                "round {round}: stale VIP\n{addrs}"
            );
        }
        let all = listing(&ns);
        assert!(
            !all.contains("ns/svc") && !all.contains("10.244.0.1 ") && !all.contains("svc"),
            "round {round}:\n{all}"
        );
        let other = if *backend == "nftables" {
            "KVIP-"
        } else {
            "table inet kvip"
        };
        assert!(
            !all.contains(other),
            "round {round}: other backend left objects:\n{all}"
        );
    }
    assert!(
        rounds_with_stale_vips > 0,
        "no round left a stale VIP to clean up"
    );
}

/// Two `kvip dataplane apply` processes of one instance racing with different states in one
/// namespace end as exactly one of the two states, rules and addresses alike, every round:
/// the instance's lock serialises them, and the second reads what the first left.
#[test]
fn racing_applies_end_as_exactly_one_state() {
    require_kernel!();
    let (ns, _p) = node("race");
    let dir = tempdir::Dir::new("race");
    let sources = |net: u8| {
        (1..=20)
            .map(|j| format!("10.244.{net}.{j}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let bodies = [
        format!(
            "vips: [{{address: 192.0.2.30, interface: eth0}}, {{address: 192.0.2.31, interface: eth0}}, {{address: \"2001:db8:1::30\", interface: eth0}}]\negress:\n  - {{name: race/one, vip: 192.0.2.30, sources: [{}], exclude: [10.244.0.0/16]}}\n",
            sources(1)
        ),
        format!(
            "vips: [{{address: 192.0.2.40, interface: eth0}}, {{address: \"2001:db8:1::40\", interface: eth0}}, {{address: \"2001:db8:1::41\", interface: eth0}}]\negress:\n  - {{name: race/two, vip: 192.0.2.40, sources: [{}], exclude: []}}\n  - {{name: race/six, vip: \"2001:db8:1::41\", sources: [\"fd00::2\"], exclude: []}}\n",
            sources(2)
        ),
    ];
    let states: Vec<kvip_core::DesiredState> = bodies
        .iter()
        .map(|b| serde_norway::from_str(b).expect("state"))
        .collect();
    let paths: Vec<PathBuf> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| write_state(&dir, &format!("s{i}.yaml"), b))
        .collect();
    for backend in ["nftables", "iptables"] {
        for round in 0..50 {
            let children: Vec<_> = paths
                .iter()
                .map(|p| {
                    Command::new("ip")
                        .args(["netns", "exec", ns.name(), KVIP, "dataplane", "--backend"])
                        .args([backend, "--announce-count", "0", "--no-conntrack-flush"])
                        .args(["apply", "--state"])
                        .arg(p)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                        .expect("run kvip")
                })
                .collect();
            for c in children {
                let out = c.wait_with_output().expect("wait for kvip");
                assert!(
                    out.status.success(),
                    "{backend} round {round}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let show = kvip(&ns, &["dataplane", "--backend", backend, "show"]);
            assert!(
                show.status.success() && show.stderr.is_empty(),
                "{backend} round {round}: {}",
                String::from_utf8_lossy(&show.stderr)
            );
            let got: kvip_core::DesiredState =
                serde_norway::from_slice(&show.stdout).expect("show yaml");
            let Some(won) = states.iter().find(|s| **s == got) else {
                panic!("{backend} round {round}: a mix of both states: {got:?}");
            };
            let v: serde_json::Value = serde_json::from_str(
                &ns.exec_ok("ip", &["-j", "addr", "show", "dev", "eth0"])
                    .expect("ip"),
            )
            .expect("ip json");
            let mut held: Vec<String> = v[0]["addr_info"]
                .as_array()
                .expect("addr_info")
                .iter()
                .filter_map(|a| a["local"].as_str())
                .filter(|a| !a.starts_with("fe80"))
                .map(str::to_string)
                .collect();
            held.sort();
            let mut want: Vec<String> = won.vips().iter().map(|v| v.address.to_string()).collect();
            want.sort();
            assert_eq!(held, want, "{backend} round {round}: addresses");
        }
        let td = kvip(&ns, &["dataplane", "--backend", backend, "teardown"]);
        assert!(
            td.status.success(),
            "{}",
            String::from_utf8_lossy(&td.stderr)
        );
    }
}

/// The second instance has a name of the maximum length (8), so its iptables chain names are
/// at the 28-character limit.
#[test]
fn instances_do_not_touch_each_other() {
    require_kernel!();
    let (ns, _p) = node("ins");
    let dir = tempdir::Dir::new("ins");
    let a = write_state(&dir, "a.yaml", GOOD);
    let b = write_state(
        &dir,
        "b.yaml",
        "vips: [{address: 192.0.2.50, interface: eth0}]\negress: [{name: blue/web, vip: 192.0.2.50, sources: [10.244.5.5], exclude: []}]\n",
    );
    for backend in ["nftables", "iptables"] {
        let run = |args: &[&str]| {
            let out = kvip(&ns, args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&[
            "dataplane",
            "--backend",
            backend,
            "apply",
            "--state",
            a.to_str().expect("p"),
        ]);
        run(&[
            "dataplane",
            "--backend",
            backend,
            "--instance",
            "bluegree",
            "apply",
            "--state",
            b.to_str().expect("p"),
        ]);
        let blue = run(&[
            "dataplane",
            "--backend",
            backend,
            "--instance",
            "bluegree",
            "show",
        ]);
        let default = run(&["dataplane", "--backend", backend, "show"]);
        assert!(
            blue.contains("blue/web") && !blue.contains("default/web"),
            "{backend}: {blue}"
        );
        assert!(
            default.contains("default/web") && !default.contains("blue/web"),
            "{backend}: {default}"
        );
        run(&["dataplane", "--backend", backend, "teardown"]);
        let blue_after = run(&[
            "dataplane",
            "--backend",
            backend,
            "--instance",
            "bluegree",
            "show",
        ]);
        assert_eq!(
            blue_after, blue,
            "{backend}: teardown of the default instance touched blue"
        );
        let addrs = ns.exec_ok("ip", &["addr", "show", "eth0"]).expect("ip");
        assert!(
            addrs.contains("192.0.2.50/32") && !addrs.contains("192.0.2.10/32"),
            "{backend}: {addrs}"
        );
        run(&[
            "dataplane",
            "--backend",
            backend,
            "--instance",
            "bluegree",
            "teardown",
        ]);
    }
}

#[test]
fn show_formats_and_teardown() {
    require_kernel!();
    let (ns, _p) = node("shw");
    let dir = tempdir::Dir::new("shw");
    let a = write_state(&dir, "a.yaml", GOOD);
    let out = kvip(
        &ns,
        &[
            "dataplane",
            "--backend",
            "nftables",
            "apply",
            "--json",
            "--state",
            a.to_str().expect("p"),
        ],
    );
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(report["mode"], "full");
    assert_eq!(report["vips_added"], serde_json::json!(["192.0.2.10"]));
    let nft = kvip(
        &ns,
        &[
            "dataplane",
            "--backend",
            "nftables",
            "show",
            "--format",
            "nft",
        ],
    );
    assert!(String::from_utf8_lossy(&nft.stdout).contains("snat ip to 192.0.2.10"));
    let wrong = kvip(
        &ns,
        &[
            "dataplane",
            "--backend",
            "nftables",
            "show",
            "--format",
            "iptables",
        ],
    );
    assert!(!wrong.status.success());
    let td = kvip(&ns, &["dataplane", "teardown"]);
    assert!(
        td.status.success(),
        "{}",
        String::from_utf8_lossy(&td.stderr)
    );
    let removed = String::from_utf8_lossy(&td.stdout);
    assert!(
        removed.contains("table inet kvip") && removed.contains("192.0.2.10"),
        "{removed}"
    );
    let all = listing(&ns);
    assert!(
        !all.contains("kvip") && !all.contains("192.0.2.10"),
        "{all}"
    );
}

/// A PATH holding every tool kvip and the tests use except `nft`.
fn path_without_nft(dir: &tempdir::Dir) -> String {
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    for tool in [
        "ip",
        "iptables",
        "ip6tables",
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
        "iptables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
        "conntrack",
        "sh",
    ] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(tool))
            .find(|p| p.exists());
        if let Some(p) = found {
            let _ = std::os::unix::fs::symlink(p, bin.join(tool));
        }
    }
    bin.display().to_string()
}

#[test]
fn without_nft_auto_uses_iptables_and_demo_says_what_to_do() {
    require_kernel!();
    let (ns, _p) = node("nonft");
    let dir = tempdir::Dir::new("nonft");
    let path = path_without_nft(&dir);
    let state = write_state(&dir, "a.yaml", GOOD);
    let env_path = format!("PATH={path}");
    let run = |args: &[&str]| {
        let mut full = vec!["netns", "exec", ns.name(), "env", &env_path, KVIP];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .expect("run kvip")
    };
    let out = run(&[
        "dataplane",
        "apply",
        "--json",
        "--state",
        state.to_str().expect("p"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report");
    assert!(
        report["backend"]
            .as_str()
            .is_some_and(|b| b.starts_with("iptables")),
        "{report}"
    );
    let out = run(&["dataplane", "--backend", "nftables", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nft not found") && err.contains("apt-get install nftables"),
        "{err}"
    );
    let out = run(&["demo"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("nft not found") && err.contains("apt-get install nftables"),
        "{err}"
    );
    run(&["dataplane", "teardown"]);
}

/// Rules written with nftables, then `nft` gone: `auto` refuses to switch to iptables (the
/// table would keep translating), and a teardown with no rule tool at all still removes the
/// VIP; with `nft` back, everything goes.
#[test]
fn auto_does_not_switch_away_from_a_live_nft_table_and_teardown_needs_no_tool() {
    require_kernel!();
    let (ns, _p) = node("nfgone");
    let dir = tempdir::Dir::new("nfgone");
    let state = write_state(&dir, "a.yaml", GOOD);
    let no_nft = format!("PATH={}", path_without_nft(&dir));
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let no_tool = format!("PATH={}", empty.display());
    let run = |path: &str, args: &[&str]| {
        let mut full = vec!["netns", "exec", ns.name(), "env", path, KVIP];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .stdin(Stdio::null())
            .output()
            .expect("run kvip")
    };
    let full_path = format!("PATH={}", std::env::var("PATH").unwrap_or_default());
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(run(
        &full_path,
        &["dataplane", "apply", "--state", state.to_str().expect("p")],
    ));
    let out = run(
        &no_nft,
        &["dataplane", "apply", "--state", state.to_str().expect("p")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "switched to iptables: {err}");
    assert!(err.contains("nftables table is in this namespace"), "{err}");
    assert!(
        ns.exec_ok("nft", &["list", "table", "inet", "kvip"])
            .is_ok(),
        "table kept"
    );
    // No nft, no iptables: the VIP still goes.
    ok(run(&no_tool, &["dataplane", "teardown"]));
    let addrs = ns
        .exec_ok("ip", &["addr", "show", "eth0"])
        .expect("ip addr");
    assert!(!addrs.contains("192.0.2.10"), "{addrs}");
    ok(run(&full_path, &["dataplane", "teardown"]));
    let ruleset = ns
        .exec_ok("nft", &["list", "ruleset"])
        .expect("nft list ruleset");
    assert!(!ruleset.contains("kvip"), "{ruleset}");
}

fn manifest_docs(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(KVIP)
        .arg("manifest")
        .args(args)
        .output()
        .expect("run kvip manifest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_norway::from_str(d).expect("each document is YAML"))
        .collect()
}

#[test]
fn manifests_grant_discovery_in_kube_system_only_when_needed() {
    let docs = manifest_docs(&["rbac", "--namespace", "kvip-system"]);
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default().to_string(),
                d["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("Role".into(), "kube-system".into())),
        "{kinds:?}"
    );
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == "kube-system")
        .expect("a RoleBinding in kube-system");
    assert_eq!(
        binding["subjects"][0]["namespace"], "kvip-system",
        "bound to the service account where the agent runs"
    );
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "kube-system")
        .expect("role");
    let cm = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["resources"][0] == "configmaps")
        .expect("configmaps rule");
    assert_eq!(cm["resourceNames"], serde_json::json!(["kubeadm-config"]));

    let docs = manifest_docs(&[
        "rbac",
        "--namespace",
        "kvip-system",
        "--pod-cidr",
        "10.244.0.0/16",
        "--service-cidr",
        "10.96.0.0/12",
    ]);
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["namespace"] == "kube-system"),
        "no discovery permissions when the CIDRs are given"
    );

    let docs = manifest_docs(&[
        "daemonset",
        "--namespace",
        "kvip-system",
        "--image",
        "registry.example/kvip:1",
        "--interface",
        "bond0",
    ]);
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("daemonset");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/kvip:1");
    assert_eq!(c["args"], serde_json::json!(["run"]));
    assert!(
        c["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "vip_interface" && e["value"] == "bond0")
    );
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
}

#[test]
fn run_refuses_conflicting_and_unsupported_options_in_one_line() {
    let run = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(KVIP)
            .env_clear()
            .envs(env.iter().copied())
            .arg("run")
            .args(args)
            .output()
            .expect("run kvip");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let err = run(
        &[
            ("NODE_NAME", "n1"),
            ("vip_interface", "eth0"),
            ("VIP_INTERFACE", "eth1"),
        ],
        &[],
    );
    assert!(
        err.contains("vip_interface") && err.contains("VIP_INTERFACE"),
        "{err}"
    );
    let err = run(
        &[("NODE_NAME", "n1"), ("VIP_INTERFACE", "eth0")],
        &["--set", "vip_interface=eth1"],
    );
    assert!(
        err.contains("--set vip_interface") && err.contains("VIP_INTERFACE"),
        "{err}"
    );
    let err = run(
        &[
            ("NODE_NAME", "n1"),
            ("BGP_ENABLE", "true"),
            ("BGP_ROUTERID", "192.0.2.1"),
            ("BGP_PEERS", "192.0.2.2:65001"),
        ],
        &[],
    );
    // BGP mode's settings are accepted (and its VIPs go on lo, so no vip_interface is
    // needed): what stops this run is the next check, the missing kubeconfig.
    assert!(
        !err.contains("bgp") && !err.contains("vip_interface") && err.contains("KUBECONFIG"),
        "{err}"
    );
    // A malformed BGP setting: one line naming it.
    let err = run(
        &[
            ("NODE_NAME", "n1"),
            ("BGP_ENABLE", "true"),
            ("BGP_ROUTERID", "192.0.2.1"),
            ("BGP_PEERS", "192.0.2.2:65001:hunter2:perhaps"),
        ],
        &[],
    );
    assert!(
        err.contains("bgp_peers=\"192.0.2.2:65001:***:perhaps\"")
            && err.contains("multihop")
            && !err.contains("hunter2")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    let err = run(&[("NODE_NAME", "n1"), ("CP_ENABLE", "true")], &[]);
    assert!(
        err.contains("address") && err.contains("cp_enable"),
        "{err}"
    );
    let err = run(&[], &[]);
    assert!(err.contains("vip_nodename (or NODE_NAME)"), "{err}");
}
