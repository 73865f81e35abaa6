//! RFC 5881 section 5: without authentication, kvip takes only BFD packets that arrived with
//! TTL (hop limit) 255. The test plays the router by hand from its own namespace, so it can
//! send the very same packet with TTL 254 and with 255.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::lan;
use kvip_bgp::bfd::{self, BfdSettings, BfdState, Packet, Receivers};
use kvip_testkit::{Netns, require_kernel};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The router's discriminator.
const ROUTER_DISC: u32 = 0x5eed;

/// A socket in `ns` bound to `addr`.
fn socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns
        .enter(|| UdpSocket::bind(addr))
        .expect("netns")
        .expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    s
}

/// The TTL (hop limit) of what `s` sends next.
fn set_ttl(s: &UdpSocket, ttl: u32) {
    let r = socket2::SockRef::from(s);
    if s.local_addr().expect("local address").is_ipv6() {
        r.set_unicast_hops_v6(ttl).expect("hop limit");
    } else {
        r.set_ttl_v4(ttl).expect("ttl");
    }
}

/// The next packet from kvip on `s` for which `want` holds (at most 5 s).
fn next(s: &UdpSocket, want: impl Fn(&Packet) -> bool) -> Packet {
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    loop {
        assert!(Instant::now() < end, "no such packet from kvip within 5 s");
        let Ok(n) = s.recv(&mut buf) else {
            continue;
        };
        if let Some(p) = Packet::decode(&buf[..n])
            && want(&p)
        {
            return p;
        }
    }
}

fn wait_state(state: &watch::Receiver<BfdState>, want: BfdState) {
    let end = Instant::now() + Duration::from_secs(5);
    while *state.borrow() != want {
        assert!(
            Instant::now() < end,
            "kvip's BFD not {want:?} within 5 s: {:?}",
            *state.borrow()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings kvip's session with `router` up by hand, then: a Down with TTL 254 is discarded (a
/// Poll sent after it is answered while the session stays Up), and the same Down with TTL 255
/// takes the session down.
fn only_ttl_255_counts(
    router: &Netns,
    node: std::sync::Arc<Netns>,
    router_ip: IpAddr,
    node_ip: IpAddr,
) {
    let listen = socket(router, SocketAddr::new(router_ip, bfd::CONTROL_PORT));
    // One socket for every packet, so that they reach kvip in the order sent.
    let out = socket(router, SocketAddr::new(router_ip, 0));
    let to = SocketAddr::new(node_ip, bfd::CONTROL_PORT);
    let (state_tx, state) = watch::channel(BfdState::Down);
    let stop = CancellationToken::new();
    let settings = BfdSettings {
        peer: router_ip,
        source: Some(node_ip),
        interface: None,
        transmit: Duration::from_millis(300),
        receive: Duration::from_millis(300),
        multiplier: 3,
    };
    let session = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            node.block_on(move || bfd::run(settings, Receivers::default(), state_tx, stop))
                .expect("netns")
        })
    };
    let kvip = next(&listen, |_| true).my_disc;
    // The router's packets: slow (2 s × 3), so that kvip's detection time cannot run out
    // while the test looks.
    let packet = |state: BfdState, poll: bool| Packet {
        diag: 0,
        state,
        poll,
        fin: false,
        detect_mult: 3,
        my_disc: ROUTER_DISC,
        your_disc: kvip,
        desired_min_tx: Duration::from_secs(2),
        required_min_rx: Duration::from_millis(300),
    };
    let send = |ttl: u32, p: Packet| {
        set_ttl(&out, ttl);
        out.send_to(&p.encode(), to).expect("send");
    };
    send(255, packet(BfdState::Down, false));
    next(&listen, |p| p.state == BfdState::Init);
    send(255, packet(BfdState::Up, false));
    wait_state(&state, BfdState::Up);

    // As if from off the link: discarded. The Poll after it takes the same way, so once its
    // Final is back the Down has been judged.
    send(254, packet(BfdState::Down, false));
    send(255, packet(BfdState::Up, true));
    next(&listen, |p| p.fin);
    assert_eq!(*state.borrow(), BfdState::Up, "a TTL-254 Down was taken");

    send(255, packet(BfdState::Down, false));
    wait_state(&state, BfdState::Down);
    stop.cancel();
    session
        .join()
        .expect("session thread")
        .expect("the BFD session ran");
}

#[test]
fn bfd_takes_only_packets_sent_with_ttl_255() {
    require_kernel!();
    let (_lan, router, nodes) = lan("bft", 1);
    only_ttl_255_counts(
        &router,
        nodes[0].clone(),
        "192.0.2.1".parse().expect("ip"),
        "192.0.2.10".parse().expect("ip"),
    );
    only_ttl_255_counts(
        &router,
        nodes[0].clone(),
        "2001:db8::1".parse().expect("ip"),
        "2001:db8::10".parse().expect("ip"),
    );
}
