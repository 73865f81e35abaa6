//! kvip's speaker against a real FRR bgpd, each in its own network namespace: sessions,
//! announcements with the node as next hop (IPv4, and IPv6 over the IPv4 session), ECMP from
//! two nodes, withdrawals, the Cease at shutdown, TCP MD5, a wrong AS.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use common::*;
use kvip_bgp::State;
use kvip_bgp::session::SessionError;
use kvip_testkit::frr::Frr;
use kvip_testkit::{Netns, require_kernel};

/// bgpd on the router, passive, with each node as a neighbour for IPv4 and IPv6 unicast.
fn frr(router: &Netns, nodes: usize, password: Option<&str>) -> Frr {
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
        families.push_str(&format!("  neighbor {n} activate\n"));
    }
    conf.push_str(&format!(
        " address-family ipv4 unicast\n{families} exit-address-family\n address-family ipv6 unicast\n{families} exit-address-family\n"
    ));
    Frr::start(router, &conf, false).expect("frr")
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
    let wrong = NodeSpeaker::start(
        nodes[0].clone(),
        local("192.0.2.10"),
        vec![peer(Some("wrong"), ROUTER_AS)],
    );
    wait(
        "the wrong password's attempt given up",
        Duration::from_secs(10),
        || format!("{:?}", wrong.status()),
        || matches!(wrong.status()[0].last_error, Some(SessionError::Dial(_))),
    );
    assert!(!frr.established("192.0.2.10").expect("vtysh"));
    assert!(wrong.shutdown());
    let right = NodeSpeaker::start(
        nodes[0].clone(),
        local("192.0.2.10"),
        vec![peer(Some("s3cret"), ROUTER_AS)],
    );
    wait(
        "established with the right password",
        Duration::from_secs(15),
        || format!("{:?}\n{}", right.status(), frr.log()),
        || {
            frr.established("192.0.2.10").expect("vtysh")
                && right.status()[0].state == State::Established
        },
    );
    assert!(right.shutdown());
    let bad_as = NodeSpeaker::start(
        nodes[0].clone(),
        local("192.0.2.10"),
        vec![peer(Some("s3cret"), 65999)],
    );
    wait(
        "the wrong AS refused",
        Duration::from_secs(10),
        || format!("{:?}", bad_as.status()),
        || {
            matches!(
                bad_as.status()[0].last_error,
                Some(SessionError::WrongAs {
                    got: ROUTER_AS,
                    want: 65999
                })
            )
        },
    );
    assert!(!frr.established("192.0.2.10").expect("vtysh"));
    assert!(bad_as.shutdown());
}
