//! kvip's speaker against a real BIRD 2, each in its own network namespace: sessions,
//! announcements with the node as next hop (IPv4, and IPv6 over the IPv4 session), ECMP from
//! two nodes, withdrawals, the Cease at shutdown, TCP MD5, a wrong AS.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvip_bgp::session::SessionError;
use kvip_bgp::{Local, Peer, Speaker, State, Status};
use kvip_testkit::bird::Bird;
use kvip_testkit::{Netns, require_kernel};

const ROUTER: &str = "192.0.2.1";
const ROUTER_AS: u32 = 65001;
const NODE_AS: u32 = 64512;

enum Cmd {
    Announce(BTreeSet<IpAddr>),
    Status(mpsc::Sender<Vec<Status>>),
    Shutdown(mpsc::Sender<bool>),
}

/// A speaker running inside a node's namespace on its own thread.
struct NodeSpeaker {
    tx: mpsc::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeSpeaker {
    fn start(ns: Arc<Netns>, local: Local, peers: Vec<Peer>) -> NodeSpeaker {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let thread = std::thread::spawn(move || {
            ns.block_on(move || async move {
                let speaker = Speaker::start(local, peers);
                let (atx, mut arx) = tokio::sync::mpsc::unbounded_channel();
                // Commands arrive on a blocking channel: hand them over from a thread.
                std::thread::spawn(move || {
                    while let Ok(c) = rx.recv() {
                        if atx.send(c).is_err() {
                            return;
                        }
                    }
                });
                while let Some(c) = arx.recv().await {
                    match c {
                        Cmd::Announce(r) => speaker.announce(r),
                        Cmd::Status(reply) => {
                            let _ =
                                reply.send(speaker.peers().into_iter().map(|(_, s)| s).collect());
                        }
                        Cmd::Shutdown(reply) => {
                            let _ = reply.send(speaker.shutdown(Duration::from_secs(5)).await);
                            return;
                        }
                    }
                }
            })
            .expect("netns");
        });
        NodeSpeaker {
            tx,
            thread: Some(thread),
        }
    }

    fn announce(&self, routes: &[&str]) {
        let r = routes.iter().map(|a| a.parse().expect("address")).collect();
        self.tx.send(Cmd::Announce(r)).expect("speaker thread");
    }

    fn status(&self) -> Vec<Status> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Status(tx)).expect("speaker thread");
        rx.recv().expect("status")
    }

    fn shutdown(mut self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Shutdown(tx)).expect("speaker thread");
        let done = rx.recv().expect("shutdown");
        if let Some(t) = self.thread.take() {
            t.join().expect("speaker thread");
        }
        done
    }
}

fn local(id: &str) -> Local {
    Local {
        asn: NODE_AS,
        router_id: id.parse().expect("id"),
        hold_time: 9,
        keepalive: 3,
        next_hop_v4: None,
        next_hop_v6: None,
    }
}

fn peer(password: Option<&str>, remote_as: u32) -> Peer {
    Peer {
        address: ROUTER.parse().expect("router"),
        port: 179,
        remote_as,
        password: password.map(str::to_string),
        multihop: false,
        source: None,
        interface: None,
    }
}

fn wait(
    what: &str,
    limit: Duration,
    diag: impl Fn() -> String,
    mut cond: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A router namespace and `n` node namespaces on one LAN (a bridge): the router at
/// 192.0.2.1 and 2001:db8::1, node i at 192.0.2.(10+i) and 2001:db8::(10+i).
fn lan(tag: &str, n: usize) -> (Netns, Netns, Vec<Arc<Netns>>) {
    let lan = Netns::new(&format!("{tag}l")).expect("netns");
    lan.sh("ip link add br0 type bridge && ip link set br0 up")
        .expect("bridge");
    let router = Netns::new(&format!("{tag}r")).expect("netns");
    router.veth("eth0", &lan, "r").expect("veth");
    lan.exec_ok("ip", &["link", "set", "r", "master", "br0"])
        .expect("port");
    router.addr("eth0", "192.0.2.1/24").expect("addr");
    router
        .exec_ok(
            "ip",
            &["addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"],
        )
        .expect("addr6");
    let nodes = (0..n)
        .map(|i| {
            let ns = Netns::new(&format!("{tag}n{i}")).expect("netns");
            ns.veth("eth0", &lan, &format!("n{i}")).expect("veth");
            lan.exec_ok("ip", &["link", "set", &format!("n{i}"), "master", "br0"])
                .expect("port");
            ns.addr("eth0", &format!("192.0.2.{}/24", 10 + i))
                .expect("addr");
            ns.exec_ok(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("2001:db8::{}/64", 10 + i),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )
            .expect("addr6");
            Arc::new(ns)
        })
        .collect();
    (lan, router, nodes)
}

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

fn v6_local(i: usize) -> Local {
    let mut l = local(&format!("192.0.2.{}", 10 + i));
    l.next_hop_v6 = Some(format!("2001:db8::{}", 10 + i).parse().expect("v6"));
    l
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
    let r = bird.routes().expect("birdc");
    assert_eq!(
        r.get("2001:db8:1::10/128").map(|h| h.len()),
        Some(1),
        "{r:?}"
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
    let r = bird.routes().expect("birdc");
    assert!(
        !r.contains_key("203.0.113.10/32") && !r.contains_key("2001:db8:1::10/128"),
        "{r:?}"
    );
}

#[test]
fn md5_session_needs_the_right_password_and_a_wrong_as_is_refused() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bgm", 1);
    let bird = bird(&router, 1, Some("s3cret"));
    // The wrong password: the router's kernel drops every segment; nothing comes up.
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
    assert!(!bird.established("n0").expect("birdc"));
    assert!(wrong.shutdown());
    let right = NodeSpeaker::start(
        nodes[0].clone(),
        local("192.0.2.10"),
        vec![peer(Some("s3cret"), ROUTER_AS)],
    );
    wait(
        "established with the right password",
        Duration::from_secs(15),
        || format!("{:?}\n{}", right.status(), bird.log()),
        || bird.established("n0").expect("birdc") && right.status()[0].state == State::Established,
    );
    assert!(right.shutdown());
    // The wrong AS configured for the router: BIRD refuses the OPEN... or kvip does.
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
    assert!(!bird.established("n0").expect("birdc"));
    assert!(bad_as.shutdown());
}
