//! The behavioural matrix, on every backend: read-back equals the desired state, re-applying
//! changes nothing, one pod changes one element, removal and teardown leave nothing of kvip,
//! and foreign objects stay byte-identical through every operation.

mod common;

use common::{backends, kvip_objects, state, with_dataplane};
use kvip_core::DesiredState;
use kvip_dataplane::{Dataplane, SyncMode};
use kvip_testkit::{Netns, require_kernel};
use serde_json::Value;

const VIPS: [&str; 4] = [
    "192.0.2.10",
    "192.0.2.11",
    "2001:db8:1::10",
    "2001:db8:1::11",
];

fn node() -> (Netns, Netns) {
    let node = Netns::new("lcn").expect("netns");
    let peer = Netns::new("lcp").expect("netns");
    node.veth("eth0", &peer, "eth0").expect("veth");
    node.addr("eth0", "192.0.2.1/24").expect("addr");
    (node, peer)
}

/// Objects kvip does not own: another nft table, iptables rules and a chain in the same
/// built-in chains (both variants, both families), an unmarked address on the VIP interface.
fn add_foreign(ns: &Netns) {
    ns.sh("nft add table inet foreign
         nft add chain inet foreign post '{ type nat hook postrouting priority 100; }'
         nft add rule inet foreign post ip saddr 10.9.9.9 counter masquerade
         nft add table ip kube_proxy_like
         for t in iptables-legacy iptables-nft; do
           $t -t nat -N FOREIGN-CHAIN
           $t -t nat -A FOREIGN-CHAIN -d 10.9.0.0/16 -j RETURN
           $t -t nat -A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE
           $t -t nat -I POSTROUTING 1 -s 10.8.0.0/16 -j FOREIGN-CHAIN
           $t -t mangle -A PREROUTING -s 10.7.0.0/16 -j MARK --set-mark 0x40
         done
         for t in ip6tables-legacy ip6tables-nft; do
           $t -t nat -A POSTROUTING -s fd00:9::/64 -j MASQUERADE
         done
         ip addr add 192.0.2.77/24 dev eth0
         ip -6 addr add 2001:db8:1::77/64 dev eth0 nodad")
        .expect("foreign objects");
}

/// Everything in the namespace that is not kvip's, as text.
fn foreign(ns: &Netns) -> String {
    let mut out = String::new();
    let rs: Value =
        serde_json::from_str(&ns.exec_ok("nft", &["-j", "list", "ruleset"]).expect("nft"))
            .expect("nft json");
    for item in rs["nftables"].as_array().into_iter().flatten() {
        let obj = item
            .as_object()
            .and_then(|o| o.values().next())
            .cloned()
            .unwrap_or(Value::Null);
        let table = obj
            .get("table")
            .or_else(|| obj.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if item.get("metainfo").is_some()
            || (table == "kvip" && obj.get("family") == Some(&Value::from("inet")))
        {
            continue;
        }
        // Rules iptables-nft writes into its own tables are foreign too; keep everything but
        // kvip's chains (which iptables-nft places in table ip/ip6 nat).
        let text = item.to_string();
        if text.contains("KVIP-") {
            continue;
        }
        out.push_str(&text);
        out.push('\n');
    }
    for cmd in [
        "iptables-legacy-save",
        "ip6tables-legacy-save",
        "iptables-nft-save",
        "ip6tables-nft-save",
    ] {
        for l in common::list(ns, cmd, &[]).lines() {
            if l.starts_with('#') || l.contains("KVIP-") {
                continue;
            }
            out.push_str(l.split(" [").next().unwrap_or(l));
            out.push('\n');
        }
    }
    let addrs: Value =
        serde_json::from_str(&ns.exec_ok("ip", &["-j", "addr", "show"]).expect("ip"))
            .expect("ip json");
    for link in addrs.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let local = a["local"].as_str().unwrap_or("");
            if VIPS.contains(&local) {
                continue;
            }
            // Duplicate address detection finishing on the link-local address is the
            // kernel's doing, not a change to the address.
            let mut a = a.clone();
            if let Some(o) = a.as_object_mut() {
                o.remove("tentative");
            }
            out.push_str(&format!("{} {a}\n", link["ifname"]));
        }
    }
    out
}

fn base(sources_web: &str) -> DesiredState {
    state(&format!(
        r#"
vips:
  - {{address: 192.0.2.10, interface: eth0}}
  - {{address: "2001:db8:1::10", interface: eth0}}
egress:
  - name: default/web
    vip: 192.0.2.10
    sources: [{sources_web}]
    exclude: [10.244.0.0/16, 10.96.0.0/12, 192.0.2.1]
    allow: [203.0.113.0/24, 198.51.100.0/25]
    ports: ["tcp:443", "udp:53", "sctp:9000"]
  - name: default/api
    vip: 192.0.2.10
    sources: [10.244.2.1, 10.244.2.2]
    exclude: [10.244.0.0/16]
  - name: other/v6
    vip: "2001:db8:1::10"
    sources: ["fd00:10:244:1::5", "fd00:10:244:2::7"]
    exclude: ["fd00:10:244::/48", "fd00:96::/108"]
    ports: ["tcp:443"]
"#
    ))
}

fn listing(ns: &Netns, backend: &str) -> String {
    if backend == "nftables" {
        common::nft_table(ns, &["-a"], "kvip")
    } else {
        let tool = if backend == "iptables-nft" {
            "nft"
        } else {
            "legacy"
        };
        let mut s = String::new();
        for cmd in [
            format!("iptables-{tool}-save"),
            format!("ip6tables-{tool}-save"),
        ] {
            let o = ns.exec_ok(&cmd, &["-t", "nat"]).expect("save");
            s.extend(
                o.lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n")),
            );
        }
        s
    }
}

fn changed_lines(a: &str, b: &str) -> Vec<String> {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out: Vec<String> = la
        .iter()
        .filter(|l| !lb.contains(l))
        .map(|l| format!("-{l}"))
        .collect();
    out.extend(
        lb.iter()
            .filter(|l| !la.contains(l))
            .map(|l| format!("+{l}")),
    );
    out
}

#[test]
fn lifecycle_matrix() {
    require_kernel!();
    for (backend, cfg) in backends() {
        let (ns, _peer) = node();
        add_foreign(&ns);
        let foreign0 = foreign(&ns);
        let check_foreign = |step: &str| {
            let now = foreign(&ns);
            assert_eq!(
                now, foreign0,
                "{backend}: foreign objects changed by {step}"
            );
        };
        let s1 = base("10.244.1.5, 10.244.1.6, 10.244.1.7");

        with_dataplane(&ns, cfg.clone(), async |dp| {
            // apply → observe equals desired, nothing stray.
            let r = dp.apply(&s1).await.expect("apply");
            assert_eq!(r.mode, SyncMode::Full, "{backend}");
            assert_eq!(r.vips_added.len(), 2, "{backend}");
            let o = dp.observe().await.expect("observe");
            assert_eq!(o.state, s1, "{backend}: read-back equals desired");
            assert!(o.stray.is_empty(), "{backend}: stray {:?}", o.stray);
        });
        check_foreign("apply");
        let l1 = listing(&ns, backend);

        // The same state again, same process: nothing changes (handles included).
        with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&s1).await.expect("apply");
            let l_first = listing(&ns, backend);
            let r = dp.apply(&s1).await.expect("re-apply");
            assert_eq!(r.mode, SyncMode::Unchanged, "{backend}");
            assert!(
                r.vips_added.is_empty() && r.vips_removed.is_empty(),
                "{backend}"
            );
            assert_eq!(
                listing(&ns, backend),
                l_first,
                "{backend}: re-apply changed the kernel"
            );
        });
        // And from a new process: the kernel content is the same as after the first apply.
        let strip_handles = |s: &str| -> String {
            s.lines()
                .map(|l| l.split(" # handle").next().unwrap_or(l).to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip_handles(&listing(&ns, backend)),
            strip_handles(&l1),
            "{backend}"
        );
        check_foreign("re-apply");

        // One pod replaced: only that element changes.
        let s2 = base("10.244.1.5, 10.244.1.6, 10.244.1.8");
        with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&s1).await.expect("apply");
            let before = listing(&ns, backend);
            let r = dp.apply(&s2).await.expect("apply one-pod change");
            if backend == "nftables" {
                assert_eq!(r.mode, SyncMode::Incremental, "{backend}");
                assert_eq!((r.elements_added, r.elements_removed), (1, 1), "{backend}");
            }
            let after = listing(&ns, backend);
            let diff = changed_lines(&before, &after);
            assert!(
                diff.len() <= 2,
                "{backend}: one pod changed more than one element: {diff:#?}"
            );
            assert!(
                after.contains("10.244.1.8") && !after.contains("10.244.1.7"),
                "{backend}"
            );
            if backend == "nftables" {
                // Every chain, set, map and rule keeps its handle: nothing was re-created.
                let handles = |s: &str| -> Vec<String> {
                    s.lines()
                        .filter(|l| l.contains("# handle"))
                        .map(str::to_string)
                        .collect()
                };
                assert_eq!(handles(&before), handles(&after), "{backend}");
                assert!(
                    !handles(&before).is_empty(),
                    "{backend}: listing without handles"
                );
            }
            let o = dp.observe().await.expect("observe");
            assert_eq!(o.state, s2, "{backend}");
        });
        check_foreign("one-pod change");

        // Removing a policy removes all of its objects.
        let s3 = state(
            r#"
vips: [{address: 192.0.2.10, interface: eth0}]
egress:
  - name: default/api
    vip: 192.0.2.10
    sources: [10.244.2.1, 10.244.2.2]
    exclude: [10.244.0.0/16]
"#,
        );
        let (r, o) = with_dataplane(&ns, cfg.clone(), async |dp| {
            let r = dp.apply(&s3).await.expect("apply");
            (r, dp.observe().await.expect("observe"))
        });
        assert_eq!(o.state, s3, "{backend}");
        assert_eq!(r.mode, SyncMode::Full, "{backend}");
        assert_eq!(
            (r.elements_added, r.elements_removed),
            (2, 7),
            "{backend}: {r:?}"
        );
        assert!(r.objects_removed > r.objects_written, "{backend}: {r:?}");
        assert_eq!(r.vips_removed.len(), 1, "{backend}: the IPv6 VIP goes");
        let l3 = listing(&ns, backend);
        for gone in [
            "default_web",
            "10.244.1.5",
            "fd00:10:244",
            "2001:db8:1::10",
            "203.0.113.0",
            "other_v6",
        ] {
            assert!(
                !l3.contains(gone),
                "{backend}: {gone} left after removing its policy:\n{l3}"
            );
        }
        if backend != "nftables" {
            let web = kvip_dataplane::names::ipt_policy_id("default/web");
            assert!(
                !l3.contains(&web),
                "{backend}: chains of default/web left:\n{l3}"
            );
        }
        check_foreign("policy removal");

        // Teardown leaves nothing kvip-owned, twice (idempotent), and reports no error.
        with_dataplane(&ns, cfg.clone(), async |dp| {
            let r = dp.teardown().await;
            assert!(r.errors.is_empty(), "{backend}: {:?}", r.errors);
            assert!(!r.removed.is_empty(), "{backend}");
            let r = dp.teardown().await;
            assert!(
                r.errors.is_empty() && r.removed.is_empty(),
                "{backend}: second teardown {r:?}"
            );
            let o = dp.observe().await.expect("observe");
            assert!(o.state.is_empty() && o.stray.is_empty(), "{backend}: {o:?}");
        });
        assert_eq!(kvip_objects(&ns), Vec::<String>::new(), "{backend}");
        check_foreign("teardown");
    }
}

#[test]
fn empty_state_owns_nothing() {
    require_kernel!();
    for (backend, cfg) in backends() {
        let (ns, _peer) = node();
        let o = common::apply_and_observe(&ns, cfg, &DesiredState::empty());
        assert!(o.state.is_empty(), "{backend}");
        assert_eq!(kvip_objects(&ns), Vec::<String>::new(), "{backend}");
    }
}
