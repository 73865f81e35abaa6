//! What the BGP tests share: a speaker on its own thread inside a node's namespace, and a LAN
//! of a router and nodes.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvip_bgp::{Local, Peer, PeerView, Speaker, Status};
use kvip_testkit::Netns;

pub const ROUTER: &str = "192.0.2.1";
pub const ROUTER_AS: u32 = 65001;
pub const NODE_AS: u32 = 64512;

pub enum Cmd {
    Announce(BTreeSet<IpAddr>),
    Status(mpsc::Sender<Vec<PeerView>>),
    Shutdown(mpsc::Sender<bool>),
}

/// A speaker running inside a node's namespace on its own thread.
pub struct NodeSpeaker {
    tx: mpsc::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeSpeaker {
    pub fn start(ns: Arc<Netns>, local: Local, peers: Vec<Peer>) -> NodeSpeaker {
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
                            let _ = reply.send(speaker.peers().into_iter().collect());
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

    pub fn announce(&self, routes: &[&str]) {
        let r = routes.iter().map(|a| a.parse().expect("address")).collect();
        self.tx.send(Cmd::Announce(r)).expect("speaker thread");
    }

    pub fn status(&self) -> Vec<Status> {
        self.views().into_iter().map(|v| v.status).collect()
    }

    /// Each peer's session and BFD state.
    pub fn views(&self) -> Vec<PeerView> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Status(tx)).expect("speaker thread");
        rx.recv().expect("status")
    }

    pub fn shutdown(mut self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Cmd::Shutdown(tx)).expect("speaker thread");
        let done = rx.recv().expect("shutdown");
        if let Some(t) = self.thread.take() {
            t.join().expect("speaker thread");
        }
        done
    }
}

pub fn local(id: &str) -> Local {
    Local {
        asn: NODE_AS,
        router_id: id.parse().expect("id"),
        hold_time: 9,
        keepalive: 3,
        next_hop_v4: None,
        next_hop_v6: None,
    }
}

pub fn peer(password: Option<&str>, remote_as: u32) -> Peer {
    Peer {
        address: ROUTER.parse().expect("router"),
        port: 179,
        remote_as,
        password: password.map(str::to_string),
        multihop: false,
        source: None,
        interface: None,
        next_hop_v4: None,
        next_hop_v6: None,
        bfd: None,
    }
}

pub fn wait(
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
pub fn lan(tag: &str, n: usize) -> (Netns, Netns, Vec<Arc<Netns>>) {
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

pub fn v6_local(i: usize) -> Local {
    let mut l = local(&format!("192.0.2.{}", 10 + i));
    l.next_hop_v6 = Some(format!("2001:db8::{}", 10 + i).parse().expect("v6"));
    l
}

/// Against a router whose session with the node needs the password `s3cret`: a wrong
/// password never comes up (the router's kernel drops the segments: kvip's dial times out),
/// the right one does, and a wrong AS for the router is refused by kvip. `established` says
/// whether the router sees the session up; `log` is the router's log.
pub fn md5_and_wrong_as(
    node: Arc<Netns>,
    established: impl Fn() -> bool,
    log: impl Fn() -> String,
) {
    use kvip_bgp::State;
    use kvip_bgp::session::SessionError;
    let wrong = NodeSpeaker::start(
        node.clone(),
        local("192.0.2.10"),
        vec![peer(Some("wrong"), ROUTER_AS)],
    );
    wait(
        "the wrong password's attempt given up",
        Duration::from_secs(10),
        || format!("{:?}", wrong.status()),
        || matches!(wrong.status()[0].last_error, Some(SessionError::Dial(_))),
    );
    assert!(!established());
    assert!(wrong.shutdown());
    let right = NodeSpeaker::start(
        node.clone(),
        local("192.0.2.10"),
        vec![peer(Some("s3cret"), ROUTER_AS)],
    );
    wait(
        "established with the right password",
        Duration::from_secs(15),
        || format!("{:?}\n{}", right.status(), log()),
        || established() && right.status()[0].state == State::Established,
    );
    assert!(right.shutdown());
    let bad_as = NodeSpeaker::start(node, local("192.0.2.10"), vec![peer(Some("s3cret"), 65999)]);
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
    assert!(!established());
    assert!(bad_as.shutdown());
}
