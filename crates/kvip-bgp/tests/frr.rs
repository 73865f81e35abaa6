//! kvip's speaker against a real FRR bgpd, each in its own network namespace: sessions,
//! announcements with the node as next hop (IPv4, and IPv6 over the IPv4 session), ECMP from
//! two nodes, withdrawals, the Cease at shutdown, TCP MD5, a wrong AS.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kvip_bgp::session::SessionError;
use kvip_testkit::frr::Frr;
use kvip_testkit::{Netns, require_kernel};

/// bgpd on the router, passive, with each node as a neighbour for IPv4 and IPv6 unicast.
fn frr(router: &Netns, nodes: usize, password: Option<&str>) -> Frr {
    frr_with(router, nodes, password, false)
}

/// As [`frr`]; with `bfd`, each neighbour also has a BFD session (bfdd's defaults: 300 ms ×
/// 3).
fn frr_with(router: &Netns, nodes: usize, password: Option<&str>, bfd: bool) -> Frr {
    let mut conf = format!(
        "frr defaults traditional\nhostname r\nrouter bgp {ROUTER_AS}\n bgp router-id {ROUTER}\n no bgp ebgp-requires-policy\n no bgp network import-check\n"
    );
    let mut families = String::new();
    for i in 0..nodes {
        let n = format!("192.0.2.{}", 10 + i);
        conf.push_str(&format!(
            " neighbor {n} remote-as {NODE_AS}\n neighbor {n} passive\n neighbor {n} timers 3 9\n"
        ));
        if let Some(p) = password {
            conf.push_str(&format!(" neighbor {n} password {p}\n"));
        }
        if bfd {
            conf.push_str(&format!(" neighbor {n} bfd\n"));
        }
        families.push_str(&format!("  neighbor {n} activate\n"));
    }
    conf.push_str(&format!(
        " address-family ipv4 unicast\n{families} exit-address-family\n address-family ipv6 unicast\n{families} exit-address-family\n"
    ));
    Frr::start(router, &conf, bfd).expect("frr")
}

fn ips(a: &[&str]) -> BTreeSet<IpAddr> {
    a.iter().map(|a| a.parse().expect("ip")).collect()
}

#[test]
fn frr_sees_routes_from_each_node_ecmp_withdrawals_and_the_cease() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bgf", 2);
    let frr = frr(&router, 2, None);
    let speakers: Vec<NodeSpeaker> = (0..2)
        .map(|i| NodeSpeaker::start(nodes[i].clone(), v6_local(i), vec![peer(None, ROUTER_AS)]))
        .collect();
    let diag = || {
        format!(
            "{:?}\n{}",
            speakers.iter().map(|s| s.status()).collect::<Vec<_>>(),
            frr.log()
        )
    };
    wait(
        "both sessions established on FRR",
        Duration::from_secs(15),
        diag,
        || {
            frr.established("192.0.2.10").expect("vtysh")
                && frr.established("192.0.2.11").expect("vtysh")
        },
    );
    for s in &speakers {
        s.announce(&["203.0.113.10", "2001:db8:1::10"]);
    }
    wait(
        "the VIP's routes via both nodes (ECMP)",
        Duration::from_secs(5),
        diag,
        || {
            frr.routes("ipv4").expect("vtysh").get("203.0.113.10/32")
                == Some(&ips(&["192.0.2.10", "192.0.2.11"]))
                && frr.routes("ipv6").expect("vtysh").get("2001:db8:1::10/128")
                    == Some(&ips(&["2001:db8::10", "2001:db8::11"]))
        },
    );
    speakers[0].announce(&["2001:db8:1::10"]);
    wait(
        "node 0's IPv4 route withdrawn",
        Duration::from_secs(1),
        diag,
        || frr.routes("ipv4").expect("vtysh").get("203.0.113.10/32") == Some(&ips(&["192.0.2.11"])),
    );
    let mut speakers = speakers;
    let s0 = speakers.remove(0);
    assert!(s0.shutdown(), "the speaker stopped within its limit");
    wait(
        "node 0's routes withdrawn at its stop",
        Duration::from_secs(1),
        || frr.log(),
        || {
            frr.routes("ipv6").expect("vtysh").get("2001:db8:1::10/128")
                == Some(&ips(&["2001:db8::11"]))
        },
    );
    wait(
        "FRR heard the Cease",
        Duration::from_secs(2),
        || frr.log(),
        || {
            !frr.established("192.0.2.10").expect("vtysh")
                && frr
                    .json("show bgp neighbors 192.0.2.10 json")
                    .expect("vtysh")["192.0.2.10"]["lastNotificationReason"]
                    .as_str()
                    .is_some_and(|r| r.contains("Administrative Shutdown"))
        },
    );
    let s1 = speakers.remove(0);
    assert!(s1.shutdown());
    wait(
        "every route withdrawn",
        Duration::from_secs(1),
        || frr.log(),
        || {
            frr.routes("ipv4").expect("vtysh").is_empty()
                && frr.routes("ipv6").expect("vtysh").is_empty()
        },
    );
}

#[test]
fn frr_md5_needs_the_right_password_and_a_wrong_as_is_refused() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bgg", 1);
    let frr = frr(&router, 1, Some("s3cret"));
    md5_and_wrong_as(
        nodes[0].clone(),
        || frr.established("192.0.2.10").expect("vtysh"),
        || frr.log(),
    );
}

/// One node with a BFD session (300 ms × 3) to FRR, BGP established, BFD up on both sides
/// and `203.0.113.10` announced; then `silence` (an nft rule) is applied on the node.
fn bfd_lab(tag: &str, silence: &str) -> BfdLab {
    let (lan, router, nodes) = lan(tag, 1);
    let frr = frr_with(&router, 1, None, true);
    let mut p = peer(None, ROUTER_AS);
    p.bfd = Some((Duration::from_millis(300), Duration::from_millis(300), 3));
    let speaker = NodeSpeaker::start(nodes[0].clone(), local("192.0.2.10"), vec![p]);
    let diag = || format!("{:?}\n{}", speaker.views(), frr.log());
    wait(
        "BGP established and BFD up on both sides",
        Duration::from_secs(20),
        diag,
        || {
            frr.established("192.0.2.10").expect("vtysh")
                && frr.bfd_state("192.0.2.10").expect("vtysh").as_deref() == Some("up")
                && speaker.views()[0].bfd == Some(kvip_bgp::bfd::BfdState::Up)
        },
    );
    speaker.announce(&["203.0.113.10"]);
    wait(
        "the route on the router",
        Duration::from_secs(5),
        diag,
        || {
            frr.routes("ipv4")
                .expect("vtysh")
                .contains_key("203.0.113.10/32")
        },
    );
    nodes[0].sh(silence).expect("nft");
    let took = wait(
        "the route gone by BFD",
        Duration::from_secs(3),
        diag,
        || {
            !frr.routes("ipv4")
                .expect("vtysh")
                .contains_key("203.0.113.10/32")
        },
    );
    BfdLab {
        took,
        speaker,
        frr,
        _namespaces: (lan, router),
    }
}

struct BfdLab {
    /// How long the route took to leave the router after the silence.
    took: Duration,
    speaker: NodeSpeaker,
    frr: Frr,
    _namespaces: (Netns, Netns),
}

/// The node falls silent (everything it sends to the router is dropped): the router's BFD
/// drops its route in about the detection time, and the node's session ends too — by its own
/// BFD hearing the router's Down, or by the router's Cease (BFD down), whichever comes first.
#[test]
fn frr_bfd_drops_a_silent_nodes_routes_within_the_detection_time() {
    require_kernel!();
    // The whole lab lives until the end: its namespaces are deleted when it drops.
    let lab = bfd_lab(
        "bgd",
        "nft add table ip silence && nft add chain ip silence out '{ type filter hook output priority 0; }' && nft add rule ip silence out ip daddr 192.0.2.1 drop",
    );
    eprintln!("the route went {:?} after the node fell silent", lab.took);
    assert!(lab.took < Duration::from_secs(3), "{:?}", lab.took);
    wait(
        "the node's session ended for BFD",
        Duration::from_secs(5),
        || format!("{:?}\n{}", lab.speaker.views(), lab.frr.log()),
        || {
            lab.speaker.status()[0].bfd_downs >= 1
                || matches!(
                    &lab.speaker.status()[0].last_error,
                    Some(SessionError::PeerNotification(n)) if n.code == 6 && n.subcode == 10
                )
        },
    );
    assert!(lab.speaker.shutdown());
}

/// The node stops hearing the router's BFD packets (BGP still flows both ways): kvip's own
/// BFD detects it, and kvip ends the session itself (Cease, BFD down), so the router drops
/// the route at once, before its own BFD could have noticed anything.
#[test]
fn kvip_ends_its_session_when_its_bfd_hears_nothing() {
    require_kernel!();
    // The whole lab lives until the end: its namespaces are deleted when it drops.
    let lab = bfd_lab(
        "bgk",
        "nft add table ip deaf && nft add chain ip deaf in '{ type filter hook input priority 0; }' && nft add rule ip deaf in ip saddr 192.0.2.1 udp dport 3784 drop",
    );
    eprintln!(
        "the route went {:?} after the node stopped hearing BFD",
        lab.took
    );
    wait(
        "kvip ended its BGP session on BFD down",
        Duration::from_secs(5),
        || format!("{:?}\n{}", lab.speaker.views(), lab.frr.log()),
        // Counted, not read from the last error: the session may be up again already.
        || lab.speaker.status()[0].bfd_downs >= 1,
    );
    assert!(lab.speaker.shutdown());
}
