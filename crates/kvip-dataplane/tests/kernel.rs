//! Atomicity, recovery from drift, announcements, conntrack flushing and kube-vip clean-up,
//! on the real kernel in fresh namespaces.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{backends, state, with_dataplane};
use kvip_core::{DesiredState, EgressPolicy, Family};
use kvip_dataplane::{AnnounceConfig, Config, Dataplane, SyncMode, nft};
use kvip_testkit::capture::{Capture, parse_garp, parse_unsolicited_na};
use kvip_testkit::lab::*;
use kvip_testkit::{Netns, require_kernel};
use serde_json::json;

fn of_family(s: &DesiredState, f: Family) -> Vec<EgressPolicy> {
    s.egress()
        .iter()
        .filter(|p| p.family() == f)
        .cloned()
        .collect()
}

fn pair(tag: &str) -> (Netns, Netns) {
    let node = Netns::new(tag).expect("netns");
    let peer = Netns::new(&format!("{tag}p")).expect("netns");
    node.veth("eth0", &peer, "eth0").expect("veth");
    (node, peer)
}

fn two_states() -> (DesiredState, DesiredState) {
    let a = state(
        r#"
egress:
  - {name: a/one, vip: 192.0.2.10, sources: [10.244.1.1, 10.244.1.2], exclude: [10.244.0.0/16]}
  - {name: a/two, vip: "2001:db8:1::10", sources: ["fd00::1"], exclude: ["fd00::/48"], ports: ["tcp:443"]}
"#,
    );
    let b = state(
        r#"
egress:
  - {name: b/one, vip: 192.0.2.11, sources: [10.244.2.1], exclude: [10.96.0.0/12], allow: [203.0.113.0/24]}
  - {name: b/two, vip: 192.0.2.12, sources: [10.244.2.2, 10.244.2.3], exclude: []}
"#,
    );
    (a, b)
}

#[test]
fn nft_rejected_transaction_leaves_previous_ruleset() {
    require_kernel!();
    let (ns, _p) = pair("atn");
    let (a, b) = two_states();
    let before = with_dataplane(&ns, Config::default(), async |dp| {
        dp.apply(&a).await.expect("apply");
        ns.exec_ok("nft", &["-a", "list", "ruleset"]).expect("list")
    });
    // B's full replace (delete table, recreate everything) followed by a command the kernel
    // refuses: the whole transaction must be rejected.
    let mut doc = nft::render_full("kvip", &b)
        .expect("render")
        .to_value()
        .expect("json");
    doc["nftables"]
        .as_array_mut()
        .expect("array")
        .push(json!({"add": {"rule": {"family": "inet", "table": "kvip", "chain": "no_such_chain", "expr": [{"accept": null}]}}}));
    let res = ns
        .block_on(|| async { nft::nft_apply(&doc.to_string()).await })
        .expect("netns");
    assert!(
        res.is_err(),
        "the kernel accepted a rule in a missing chain"
    );
    assert_eq!(
        ns.exec_ok("nft", &["-a", "list", "ruleset"]).expect("list"),
        before
    );
}

#[test]
fn iptables_rejected_commit_leaves_previous_rules() {
    require_kernel!();
    for (name, cfg) in backends().into_iter().skip(1) {
        let (ns, _p) = pair("ati");
        let (a, b) = two_states();
        with_dataplane(&ns, cfg.clone(), async |dp| dp.apply(&a).await.map(|_| ())).expect("apply");
        // Someone references one of kvip's chains from outside: deleting that chain (B does
        // not have policy a/one) must fail, and the commit with it.
        let tool = if name == "iptables-nft" {
            "iptables-nft"
        } else {
            "iptables-legacy"
        };
        let chain = format!("KVIP-E-{}", kvip_dataplane::names::ipt_policy_id("a/one"));
        ns.exec_ok(tool, &["-t", "nat", "-N", "FOREIGN"])
            .expect("foreign chain");
        ns.exec_ok(tool, &["-t", "nat", "-A", "FOREIGN", "-j", &chain])
            .expect("foreign ref");
        let save = format!("{tool}-save");
        let before = ns.exec_ok(&save, &["-t", "nat"]).expect("save");
        let strip = |s: &str| {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let err = with_dataplane(&ns, cfg.clone(), async |dp| dp.apply(&b).await.map(|_| ()));
        assert!(
            err.is_err(),
            "{name}: the commit deleting a referenced chain was accepted"
        );
        assert_eq!(
            strip(&ns.exec_ok(&save, &["-t", "nat"]).expect("save")),
            strip(&before),
            "{name}"
        );
        // Once the reference is gone, B applies exactly.
        ns.exec_ok(tool, &["-t", "nat", "-D", "FOREIGN", "-j", &chain])
            .expect("remove ref");
        let o = common::apply_and_observe(&ns, cfg.clone(), &b);
        assert_eq!(o.state, b, "{name}");
    }
}

#[test]
fn readers_never_see_a_partial_ruleset() {
    require_kernel!();
    for (name, cfg) in backends() {
        let (ns, _p) = pair("atr");
        let (a, b) = two_states();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let o = with_dataplane(&ns, cfg.clone(), async |dp| {
                        dp.observe().await.expect("observe")
                    });
                    assert!(
                        o.stray.is_empty(),
                        "{name}: partial state visible: {:?}",
                        o.stray
                    );
                    // nftables: one inet table, one transaction for both families.
                    // iptables: one commit per family (separate kernel tables).
                    let ok = if name == "nftables" {
                        o.state.is_empty() || o.state == a || o.state == b
                    } else {
                        [Family::V4, Family::V6].iter().all(|f| {
                            let got = of_family(&o.state, *f);
                            got.is_empty() || got == of_family(&a, *f) || got == of_family(&b, *f)
                        })
                    };
                    assert!(
                        ok,
                        "{name}: a reader saw a state that was never applied: {:?}",
                        o.state
                    );
                    n += 1;
                }
                n
            });
            with_dataplane(&ns, cfg.clone(), async |dp| {
                for i in 0..30 {
                    let s = if i % 2 == 0 { &a } else { &b };
                    dp.apply(s).await.expect("apply");
                }
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().expect("reader")
        });
        assert!(seen > 3, "{name}: the reader ran only {seen} times");
    }
}

#[test]
fn nft_incremental_failure_falls_back_to_full_replace() {
    require_kernel!();
    let (ns, _p) = pair("inc");
    let a = state(
        "egress: [{name: x/y, vip: 192.0.2.10, sources: [10.244.1.1, 10.244.1.2], exclude: [10.244.0.0/16]}]",
    );
    let b = state(
        "egress: [{name: x/y, vip: 192.0.2.10, sources: [10.244.1.3], exclude: [10.244.0.0/16]}]",
    );
    with_dataplane(&ns, Config::default(), async |dp| {
        dp.apply(&a).await.expect("apply");
        // Drift: an element removed by hand. The delta (delete 10.244.1.1) is refused by the
        // kernel; the dataplane must fall back to a full replace and end exact.
        ns.exec_ok(
            "nft",
            &[
                "delete",
                "element",
                "inet",
                "kvip",
                "src4",
                "{ 10.244.1.1 }",
            ],
        )
        .expect("drift");
        let r = dp.apply(&b).await.expect("apply");
        assert_eq!(r.mode, SyncMode::Full);
        assert_eq!(dp.observe().await.expect("observe").state, b);
    });
}

#[test]
fn announcements_are_seen_on_the_peer() {
    require_kernel!();
    let (ns, peer) = pair("ann");
    let cap = Capture::start(&peer, "eth0").expect("capture");
    let cfg = Config {
        announce: AnnounceConfig {
            count: 3,
            interval: Duration::from_millis(50),
        },
        ..Config::default()
    };
    let s = state(
        r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: "2001:db8:1::10", interface: eth0}
"#,
    );
    with_dataplane(&ns, cfg, async |dp| dp.apply(&s).await.map(|_| ())).expect("apply");
    // Every announcement has been sent when the apply returns; wait until all six arrived.
    let counts = |frames: &[Vec<u8>]| {
        (
            frames.iter().filter_map(|f| parse_garp(f)).count(),
            frames
                .iter()
                .filter_map(|f| parse_unsolicited_na(f))
                .count(),
        )
    };
    common::wait_for(Duration::from_secs(5), "3 GARPs and 3 NAs", || {
        let (g, n) = counts(&cap.snapshot());
        (g >= 3 && n >= 3).then_some(())
    });
    let frames = cap.finish();
    let mac_s = common::list(&ns, "cat", &["/sys/class/net/eth0/address"]);
    let mac: Vec<u8> = mac_s
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    let garps: Vec<_> = frames
        .iter()
        .filter_map(|f| parse_garp(f))
        .filter(|a| a.address == VIP4)
        .collect();
    let nas: Vec<_> = frames
        .iter()
        .filter_map(|f| parse_unsolicited_na(f))
        .filter(|a| a.address == VIP6)
        .collect();
    assert_eq!(garps.len(), 3, "gratuitous ARPs seen: {garps:?}");
    assert_eq!(nas.len(), 3, "unsolicited NAs seen: {nas:?}");
    for a in garps.iter().chain(&nas) {
        assert_eq!(a.mac.to_vec(), mac, "announcement carries the node's MAC");
    }
    assert!(garps.iter().all(|a| a.dest_mac == [0xff; 6]));
    assert!(nas.iter().all(|a| a.dest_mac == [0x33, 0x33, 0, 0, 0, 1]));
}

#[test]
fn conntrack_flush_moves_existing_flows_to_the_vip() {
    require_kernel!();
    for (name, cfg) in backends() {
        // With the CNI-like masquerade, connection tracking is active on the node (as on
        // every Kubernetes node) and the flow starts out masqueraded.
        let lab = EgressLab::new("ctf", true).expect("lab");
        let dst = SocketAddr::new(EXT4, 8080);
        let sock = lab
            .pod
            .enter(|| UdpSocket::bind("0.0.0.0:0"))
            .expect("netns")
            .expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let ask = |s: &UdpSocket| -> String {
            s.send_to(b"?", dst).expect("send");
            let mut buf = [0u8; 64];
            let n = loop {
                // Child processes (nft, conntrack) exiting send SIGCHLD, which can interrupt
                // a blocking receive.
                match s.recv_from(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.expect("answer").0,
                }
            };
            String::from_utf8_lossy(&buf[..n]).trim().to_string()
        };
        assert_eq!(ask(&sock), NODE4.to_string(), "{name}: before any policy");
        let s = state(
            "vips: [{address: 192.0.2.10, interface: eth0}]
egress: [{name: d/web, vip: 192.0.2.10, sources: [10.244.1.5], exclude: [10.244.0.0/16]}]",
        );
        let r = with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&s).await.expect("apply")
        });
        assert_eq!(r.conntrack_flushed, 1, "{name}: {r:?}");
        // Same socket, same 5-tuple: without the flush the old untranslated entry would stay.
        assert_eq!(
            ask(&sock),
            VIP4.to_string(),
            "{name}: existing flow after apply"
        );
        let r = with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&DesiredState::empty()).await.expect("apply")
        });
        assert_eq!(r.conntrack_flushed, 1, "{name}");
        assert_eq!(
            ask(&sock),
            NODE4.to_string(),
            "{name}: existing flow after removal"
        );
        // Control: with flushing switched off the same flow keeps its stale translation,
        // which is what the flush exists to prevent.
        let off = Config {
            no_conntrack_flush: true,
            ..cfg.clone()
        };
        let r = with_dataplane(&lab.node, off, async |dp| {
            dp.apply(&s).await.expect("apply")
        });
        assert_eq!(r.conntrack_flushed, 0, "{name}");
        assert_eq!(
            ask(&sock),
            NODE4.to_string(),
            "{name}: unflushed flow keeps the old source"
        );
    }
}

const KUBE_VIP_MANGLE: &str = r#"*mangle
:KUBE-VIP-EGRESS - [0:0]
-A PREROUTING -j KUBE-VIP-EGRESS
-A KUBE-VIP-EGRESS -d 10.0.0.0/16 -m comment --comment "a3ViZS12aXAK=kube-vip-e2e-test" -j RETURN
-A KUBE-VIP-EGRESS -d 10.96.0.0/12 -m comment --comment "a3ViZS12aXAK=kube-vip-e2e-test" -j RETURN
-A KUBE-VIP-EGRESS -s 172.30.3.22/32 -m comment --comment "a3ViZS12aXAK=kube-vip-e2e-test" -j MARK --set-xmark 0x40/0x40
COMMIT
*nat
-A POSTROUTING -m mark --mark 0x40/0x40 -m comment --comment "a3ViZS12aXAK=kube-vip-e2e-test" -j SNAT --to-source 192.0.2.10
COMMIT
"#;

const FOREIGN_RULES: &str = r#"*mangle
:OTHER-EGRESS - [0:0]
-A PREROUTING -s 10.7.0.0/16 -j OTHER-EGRESS
-A OTHER-EGRESS -s 10.7.0.1/32 -m comment --comment "not-kube-vip" -j MARK --set-xmark 0x80/0x80
COMMIT
*nat
-A POSTROUTING -s 10.9.0.0/16 -m comment --comment "cni masquerade" -j MASQUERADE
-A POSTROUTING -s 10.8.0.0/16 -m comment --comment "kube-vip-lookalike" -j MASQUERADE
COMMIT
"#;

#[test]
fn clean_legacy_removes_kube_vip_and_nothing_else() {
    require_kernel!();
    let (ns, _p) = pair("leg");
    for v in ["legacy", "nft"] {
        for (rules, what) in [(FOREIGN_RULES, "foreign"), (KUBE_VIP_MANGLE, "kube-vip")] {
            let out = ns
                .exec(
                    "sh",
                    &[
                        "-c",
                        &format!("printf '%s' '{rules}' | iptables-{v}-restore --noflush"),
                    ],
                )
                .expect("restore");
            assert!(
                out.status.success(),
                "{v} {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    ns.sh("nft add table ip kube_vip_v4
         nft add chain ip kube_vip_v4 post '{ type nat hook postrouting priority 100; }'
         nft add table ip6 kube_vip_v6
         nft add table inet mykube_vip_v4
         nft add table ip kubevip")
        .expect("nft tables");
    let foreign = |ns: &Netns| -> String {
        let mut s = String::new();
        for v in ["legacy", "nft"] {
            let o = ns
                .exec_ok(&format!("iptables-{v}-save"), &[])
                .expect("save");
            s.extend(
                o.lines()
                    .filter(|l| {
                        !l.starts_with('#')
                            && !l.contains("KUBE-VIP")
                            && !l.contains("a3ViZS12aXAK=")
                    })
                    .map(|l| format!("{}\n", l.split(" [").next().unwrap_or(l))),
            );
        }
        s.extend(
            ns.exec_ok("nft", &["list", "tables"])
                .expect("nft")
                .lines()
                .filter(|l| !l.contains(" kube_vip_"))
                .map(|l| format!("{l}\n")),
        );
        s
    };
    let foreign_before = foreign(&ns);
    assert!(
        foreign_before.contains("OTHER-EGRESS") && foreign_before.contains("kube-vip-lookalike")
    );
    let report = ns
        .block_on(|| async { kvip_dataplane::legacy::clean_legacy().await })
        .expect("netns");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for v in ["legacy", "nft"] {
        let all = ns
            .exec_ok(&format!("iptables-{v}-save"), &[])
            .expect("save");
        assert!(!all.contains("KUBE-VIP-EGRESS"), "{v}: {all}");
        assert!(!all.contains("a3ViZS12aXAK="), "{v}: {all}");
    }
    let tables = ns.exec_ok("nft", &["list", "tables"]).expect("nft");
    assert!(
        !tables.contains(" kube_vip_v4\n") && !tables.contains("kube_vip_v6"),
        "{tables}"
    );
    assert_eq!(foreign(&ns), foreign_before, "foreign rules changed");
    // 2 variants × (3 kube-vip rules' chain + jump + nat rule) + 2 nft tables.
    assert_eq!(report.removed.len(), 2 * 3 + 2, "{:#?}", report.removed);
    let again = ns
        .block_on(|| async { kvip_dataplane::legacy::clean_legacy().await })
        .expect("netns");
    assert!(
        again.removed.is_empty() && again.errors.is_empty(),
        "second run: {again:?}"
    );
}

#[test]
fn iptables_variant_follows_the_hosts_rules() {
    require_kernel!();
    let (ns, _p) = pair("var");
    let detect = || {
        ns.block_on(|| async { kvip_dataplane::iptables::detect_variant().await })
            .expect("netns")
            .expect("detect")
    };
    assert_eq!(
        detect(),
        kvip_dataplane::Variant::Nft,
        "no rules anywhere: nf_tables"
    );
    for i in 0..3 {
        ns.exec_ok(
            "iptables-legacy",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &format!("10.9.{i}.0/24"),
                "-j",
                "MASQUERADE",
            ],
        )
        .expect("legacy rule");
    }
    assert_eq!(
        detect(),
        kvip_dataplane::Variant::Legacy,
        "the host's rules are legacy"
    );
    for i in 0..4 {
        ns.exec_ok(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &format!("10.8.{i}.0/24"),
                "-j",
                "MASQUERADE",
            ],
        )
        .expect("nft rule");
    }
    assert_eq!(
        detect(),
        kvip_dataplane::Variant::Nft,
        "more rules in nf_tables"
    );
}

/// The nftables backend (and the iptables-nft one) never load iptables-legacy's tables: a node
/// that never used iptables-legacy does not get them from kvip looking for its leftovers.
#[test]
fn other_backends_are_looked_for_without_loading_legacy_tables() {
    require_kernel!();
    for (name, cfg) in backends().into_iter().take(2) {
        let (ns, _peer) = common::node("nolg");
        let s = common::state(
            "vips: [{address: 192.0.2.10, interface: eth0}]\negress:\n  - {name: a/b, vip: 192.0.2.10, sources: [10.244.1.5], exclude: []}\n",
        );
        common::with_dataplane(&ns, cfg, async |dp| {
            dp.apply(&s).await.expect("apply");
            dp.observe().await.expect("observe");
            dp.teardown().await;
        });
        for f in ["ip_tables_names", "ip6_tables_names"] {
            let loaded = ns
                .exec_ok("cat", &[&format!("/proc/net/{f}")])
                .unwrap_or_else(|e| panic!("{name}: reading {f}: {e}"));
            assert!(
                !loaded.contains("nat"),
                "{name}: legacy nat table loaded: {f}: {loaded}"
            );
        }
    }
}
