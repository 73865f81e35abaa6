//! kvip's speaker against a real BIRD 2, each in its own network namespace: sessions,
//! announcements with the node as next hop (IPv4, and IPv6 over the IPv4 session), ECMP from
//! two nodes, withdrawals, the Cease at shutdown, TCP MD5, a wrong AS.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

mod common;

use common::*;
use kvip_bgp::State;
use kvip_testkit::bird::Bird;
use kvip_testkit::{Netns, require_kernel};

/// BIRD on the router, passive, one BGP protocol `n<i>` per node.
fn bird(router: &Netns, nodes: usize, password: Option<&str>) -> Bird {
    let mut conf = format!("log stderr all;\nrouter id {ROUTER};\nprotocol device {{}}\n");
    for i in 0..nodes {
        let pw = password
            .map(|p| format!("  password \"{p}\";\n"))
            .unwrap_or_default();
        conf.push_str(&format!(
            "protocol bgp n{i} {{\n  local {ROUTER} as {ROUTER_AS};\n  neighbor 192.0.2.{} as {NODE_AS};\n  passive on;\n  hold time 9;\n{pw}  ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n",
            10 + i
        ));
    }
    Bird::start(router, &conf).expect("bird")
}

#[test]
fn bird_sees_routes_from_each_node_ecmp_withdrawals_and_the_cease() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bgb", 2);
    let bird = bird(&router, 2, None);
    let speakers: Vec<NodeSpeaker> = (0..2)
        .map(|i| NodeSpeaker::start(nodes[i].clone(), v6_local(i), vec![peer(None, ROUTER_AS)]))
        .collect();
    let diag = || {
        format!(
            "{:?}\n{}",
            speakers.iter().map(|s| s.status()).collect::<Vec<_>>(),
            bird.log()
        )
    };
    wait(
        "both sessions established on BIRD",
        Duration::from_secs(15),
        diag,
        || bird.established("n0").expect("birdc") && bird.established("n1").expect("birdc"),
    );
    for s in &speakers {
        s.announce(&["203.0.113.10", "2001:db8:1::10"]);
    }
    let v4: IpAddr = "192.0.2.10".parse().expect("ip");
    let v4b: IpAddr = "192.0.2.11".parse().expect("ip");
    wait(
        "the VIP's routes via both nodes (ECMP)",
        Duration::from_secs(5),
        diag,
        || {
            let r = bird.routes().expect("birdc");
            r.get("203.0.113.10/32") == Some(&BTreeSet::from([v4, v4b]))
                && r.get("2001:db8:1::10/128")
                    == Some(&BTreeSet::from([
                        "2001:db8::10".parse().expect("ip"),
                        "2001:db8::11".parse().expect("ip"),
                    ]))
        },
    );
    // What each speaker announced, read back from its Adj-RIB-Out.
    for st in speakers.iter().flat_map(|s| s.status()) {
        assert_eq!(st.state, State::Established);
        assert_eq!(
            st.adj_rib_out,
            BTreeSet::from([
                "203.0.113.10".parse().expect("ip"),
                "2001:db8:1::10".parse().expect("ip")
            ])
        );
        assert!(st.unannounced.is_empty());
    }
    // Node 0 loses the endpoint: its IPv4 route is withdrawn; node 1's stays.
    speakers[0].announce(&["2001:db8:1::10"]);
    let took = wait(
        "node 0's IPv4 route withdrawn",
        Duration::from_secs(1),
        diag,
        || bird.routes().expect("birdc").get("203.0.113.10/32") == Some(&BTreeSet::from([v4b])),
    );
    assert!(took < Duration::from_secs(1));
    // Node 0 stops: explicit withdrawals, then a Cease; BIRD says so.
    let mut speakers = speakers;
    let s0 = speakers.remove(0);
    assert!(s0.shutdown(), "the speaker stopped within its limit");
    wait(
        "node 0's routes withdrawn at its stop",
        Duration::from_secs(1),
        || bird.log(),
        || {
            bird.routes()
                .expect("birdc")
                .get("2001:db8:1::10/128")
                .map(|h| h.len())
                == Some(1)
        },
    );
    wait(
        "BIRD heard the Cease",
        Duration::from_secs(2),
        || bird.log(),
        || {
            bird.log().contains("Administrative shutdown")
                && !bird.established("n0").expect("birdc")
        },
    );
    let s1 = speakers.remove(0);
    assert!(s1.shutdown());
    wait(
        "every route withdrawn",
        Duration::from_secs(1),
        || bird.log(),
        || {
            let r = bird.routes().expect("birdc");
            !r.contains_key("203.0.113.10/32") && !r.contains_key("2001:db8:1::10/128")
        },
    );
}

#[test]
fn md5_session_needs_the_right_password_and_a_wrong_as_is_refused() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bgm", 1);
    let bird = bird(&router, 1, Some("s3cret"));
    md5_and_wrong_as(
        nodes[0].clone(),
        || bird.established("n0").expect("birdc"),
        || bird.log(),
    );
}
