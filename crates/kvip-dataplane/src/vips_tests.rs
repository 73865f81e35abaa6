//! A VIP step that fails after the rules were committed puts the previous rules back and
//! removes the VIPs it added; the VIPs it removed stay removed (a removal is never undone:
//! it may be a lost Lease). The failure comes from the test seam `fail_add`.

use std::collections::BTreeSet;

use kvip_core::DesiredState;
use kvip_testkit::{Netns, require_kernel};

use crate::{BackendKind, Config, Dataplane, KernelDataplane, Variant};

fn state(yaml: &str) -> DesiredState {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("fixture: {e}\n{yaml}"))
}

/// kvip's rules (without nft handles or counters) and the interface's addresses as a set.
fn snapshot(ns: &Netns, nft: bool) -> (String, BTreeSet<String>) {
    let rules = if nft {
        ns.exec_ok("nft", &["list", "table", "inet", "kvip"])
            .unwrap_or_else(|e| panic!("listing failed: {e}"))
    } else {
        let mut s = String::new();
        for t in ["iptables-nft-save", "ip6tables-nft-save"] {
            let o = ns
                .exec_ok(t, &["-t", "nat"])
                .unwrap_or_else(|e| panic!("listing failed: {e}"));
            for l in o.lines().filter(|l| !l.starts_with('#')) {
                s.push_str(l.split(" [").next().unwrap_or(l));
                s.push('\n');
            }
        }
        s
    };
    let addrs: serde_json::Value = serde_json::from_str(
        &ns.exec_ok("ip", &["-j", "addr", "show", "dev", "eth0"])
            .unwrap_or_else(|e| panic!("listing failed: {e}")),
    )
    .expect("ip json");
    let set = addrs[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .map(|a| format!("{}/{}", a["local"], a["prefixlen"]))
        .collect();
    (rules, set)
}

#[test]
fn failure_after_the_rules_commit_restores_rules_and_keeps_removals() {
    require_kernel!();
    let a = state(
        r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: "2001:db8:1::10", interface: eth0}
egress:
  - {name: a/one, vip: 192.0.2.10, sources: [10.244.1.1, 10.244.1.2], exclude: [10.244.0.0/16]}
  - {name: a/six, vip: "2001:db8:1::10", sources: ["fd00::1"], exclude: []}
"#,
    );
    let b = state(
        r#"
vips:
  - {address: 192.0.2.11, interface: eth0}
  - {address: 192.0.2.12, interface: eth0}
egress:
  - {name: b/one, vip: 192.0.2.11, sources: [10.244.2.1], exclude: [10.96.0.0/12]}
"#,
    );
    for (name, backend, variant) in [
        ("nftables", BackendKind::Nftables, None),
        ("iptables-nft", BackendKind::Iptables, Some(Variant::Nft)),
    ] {
        let ns = Netns::new("rbk").expect("netns");
        let peer = Netns::new("rbkp").expect("netns");
        ns.veth("eth0", &peer, "eth0").expect("veth");
        let cfg = Config {
            backend,
            iptables_variant: variant,
            ..Config::default()
        };
        ns.block_on(|| async {
            let mut dp = KernelDataplane::new(cfg).await.expect("open");
            dp.apply(&a).await.expect("apply A");
            let before = snapshot(&ns, name == "nftables");
            // 192.0.2.11 is added, A's VIPs are removed, then adding 192.0.2.12 fails.
            dp.fail_add = Some("192.0.2.12".parse().expect("ip"));
            let err = dp.apply(&b).await.expect_err("the injected failure");
            assert!(err.to_string().contains("test seam"), "{name}: {err}");
            let (rules, addrs) = snapshot(&ns, name == "nftables");
            assert_eq!(rules, before.0, "{name}: the previous rules");
            let gone: BTreeSet<String> = before
                .1
                .iter()
                .filter(|a| a.contains("192.0.2.10") || a.contains("2001:db8:1::10"))
                .cloned()
                .collect();
            assert_eq!(gone.len(), 2, "{name}: A's VIPs were there: {:?}", before.1);
            let kept: BTreeSet<String> = before.1.difference(&gone).cloned().collect();
            assert_eq!(
                addrs, kept,
                "{name}: A's VIPs removed, B's added one removed again"
            );
            let seen = dp.observe().await.expect("observe").state;
            assert_eq!(seen.egress(), a.egress(), "{name}");
            assert!(seen.vips().is_empty(), "{name}: {seen:?}");
            // Without the failure, B applies exactly.
            dp.fail_add = None;
            dp.apply(&b).await.expect("apply B");
            assert_eq!(dp.observe().await.expect("observe").state, b, "{name}");
            dp.teardown().await;
        })
        .expect("netns");
    }
}
