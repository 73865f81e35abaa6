//! Migrations on a node, with real agents and real packets: from kube-vip (its leftover egress
//! rules removed with `egress_clean`), and between kvip's own backends (nftables ↔ iptables):
//! after each step nothing of the previous one remains and the pod leaves with the VIP.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::lab::{EXT4, EgressLab, POD4, VIP4};
use kvip_testkit::require_kernel;

/// kube-vip 0.8.4's leftovers for a pod that has since gone (its mark and SNAT rules, the
/// kind the bug left behind), plus a stale rule that would send this lab's pod out with a
/// wrong source, and kube-vip's nftables tables.
const KUBE_VIP_LEFTOVERS: &str = r#"*mangle
:KUBE-VIP-EGRESS - [0:0]
-A PREROUTING -j KUBE-VIP-EGRESS
-A KUBE-VIP-EGRESS -d 10.0.0.0/16 -m comment --comment "a3ViZS12aXAK=kube-vip-old" -j RETURN
-A KUBE-VIP-EGRESS -d 10.96.0.0/12 -m comment --comment "a3ViZS12aXAK=kube-vip-old" -j RETURN
-A KUBE-VIP-EGRESS -s 172.30.3.22/32 -m comment --comment "a3ViZS12aXAK=kube-vip-old" -j MARK --set-xmark 0x40/0x40
-A KUBE-VIP-EGRESS -s 10.244.1.5/32 -m comment --comment "a3ViZS12aXAK=kube-vip-old" -j MARK --set-xmark 0x40/0x40
COMMIT
*nat
-A POSTROUTING -m mark --mark 0x40/0x40 -m comment --comment "a3ViZS12aXAK=kube-vip-old" -j SNAT --to-source 192.0.2.99
COMMIT
"#;

fn wait_seen(lab: &EgressLab, agent: &Agent, want: std::net::IpAddr, what: &str) {
    let start = Instant::now();
    loop {
        let seen = lab.seen_tcp(EXT4, 8080).ok();
        if seen == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: the external host sees {seen:?}, not {want}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn iptables_nat(lab: &EgressLab) -> String {
    ["iptables-nft-save", "iptables-legacy-save"]
        .iter()
        .map(|c| lab.node.exec_ok(c, &[]).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn from_kube_vip_with_egress_clean() {
    require_kernel!();
    let lab = EgressLab::new("mkv", true).expect("lab");
    lab.node
        .exec_ok(
            "sh",
            &[
                "-c",
                &format!("printf '%s' '{KUBE_VIP_LEFTOVERS}' | iptables-nft-restore --noflush"),
            ],
        )
        .expect("kube-vip's rules");
    lab.node
        .sh("nft add table ip kube_vip_v4; nft add chain ip kube_vip_v4 post '{ type nat hook postrouting priority 100; }'")
        .expect("kube-vip's table");
    assert!(iptables_nat(&lab).contains("KUBE-VIP-EGRESS"));
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&lab.node).expect("listen");
    let agent = start_agent_env(
        &lab.node,
        &url,
        "mkv",
        "n1",
        true,
        false,
        &["egress_clean=true"],
    );
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, &POD4.to_string());
    wait_seen(&lab, &agent, VIP4, "after the migration");
    let ipt = iptables_nat(&lab);
    assert!(
        !ipt.contains("KUBE-VIP") && !ipt.contains("kube-vip-old"),
        "kube-vip's rules left:\n{ipt}"
    );
    assert!(
        ipt.contains("MASQUERADE"),
        "the CNI's masquerade is not kube-vip's and stays:\n{ipt}"
    );
    let tables = lab
        .node
        .exec_ok("nft", &["list", "tables"])
        .unwrap_or_default();
    assert!(!tables.contains("kube_vip_v4"), "{tables}");
    let ours = lab
        .node
        .exec_ok("nft", &["list", "table", "inet", "kvip"])
        .expect("kvip's table");
    assert!(ours.contains(&format!("{POD4} : goto")), "{ours}");
    assert!(
        agent.log().contains("kube-vip leftover removed"),
        "{}",
        agent.log()
    );
}

/// nftables → iptables → nftables on one node, each agent replacing the previous one after a
/// SIGKILL (so the previous backend's state is still in the kernel when the next one starts).
#[test]
fn switching_backends_leaves_nothing_of_the_other() {
    require_kernel!();
    let lab = EgressLab::new("mbs", true).expect("lab");
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&lab.node).expect("listen");
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, &POD4.to_string());
    for (round, nftables) in [true, false, true].into_iter().enumerate() {
        let backend = format!("egress_withnftables={nftables}");
        let mut agent = start_agent_env(
            &lab.node,
            &url,
            &format!("mbs{round}"),
            "n1",
            true,
            false,
            &[&backend],
        );
        // The previous agent's state is still there (and still translating): wait for this
        // agent's own state, then nothing of the other backend may remain.
        until(
            &format!("round {round}: this backend's state"),
            &agent,
            Duration::from_secs(15),
            || {
                if nftables {
                    lab.node
                        .exec_ok("nft", &["list", "table", "inet", "kvip"])
                        .is_ok_and(|t| t.contains(&format!("{POD4} : goto")))
                } else {
                    iptables_nat(&lab).contains(&format!("-A KVIP-POST -s {POD4}/32"))
                }
            },
        );
        let ipt = iptables_nat(&lab);
        let nft = lab
            .node
            .exec_ok("nft", &["list", "ruleset"])
            .unwrap_or_default();
        if nftables {
            assert!(
                !ipt.contains("KVIP"),
                "round {round}: iptables chains left:\n{ipt}"
            );
        } else {
            assert!(
                !nft.contains("table inet kvip"),
                "round {round}: nftables table left:\n{nft}"
            );
        }
        wait_seen(&lab, &agent, VIP4, &format!("round {round}"));
        agent.sigkill();
    }
    // The last agent was killed: its state stays (only a SIGTERM or the next start removes
    // it); the pod still leaves with the VIP, never with a stale source.
    assert_eq!(lab.seen_tcp(EXT4, 8080).ok(), Some(VIP4));
}
