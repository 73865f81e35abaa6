use super::*;
use proptest::prelude::*;

fn one(bytes: &[u8]) -> Message {
    let (m, used) = decode(bytes).expect("valid").expect("complete");
    assert_eq!(used, bytes.len());
    m
}

fn routing() -> Routing {
    Routing {
        local_as: 64512,
        ibgp: false,
        four_octet: true,
        next_hop_v4: Some(Ipv4Addr::new(192, 0, 2, 10)),
        next_hop_v6: Some("2001:db8::10".parse().expect("v6")),
    }
}

fn hosts(n: usize, v6: bool) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            if v6 {
                IpAddr::V6(Ipv6Addr::new(
                    0x2001,
                    0xdb8,
                    0,
                    0,
                    0,
                    0,
                    (i >> 16) as u16,
                    i as u16,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 51, (i >> 8) as u8, i as u8))
            }
        })
        .collect()
}

/// Every prefix the UPDATEs announce (with their next hops) and withdraw.
fn contents(msgs: &[Vec<u8>]) -> (Vec<(IpAddr, IpAddr)>, Vec<IpAddr>) {
    let (mut ann, mut wd) = (Vec::new(), Vec::new());
    for m in msgs {
        assert!(m.len() <= MAX_LEN, "{} bytes", m.len());
        let Message::Update(u) = one(m) else {
            panic!("not an UPDATE")
        };
        wd.extend(u.withdrawn.iter().map(|p| p.addr));
        wd.extend(u.mp_unreach().expect("mp_unreach").iter().map(|p| p.addr));
        if let Some(nh) = u.next_hop() {
            ann.extend(u.nlri.iter().map(|p| (p.addr, IpAddr::V4(nh))));
        } else {
            assert!(u.nlri.is_empty());
        }
        if let Some(mp) = u.mp_reach().expect("mp_reach") {
            ann.extend(mp.prefixes.iter().map(|p| (p.addr, mp.next_hops[0])));
        }
    }
    (ann, wd)
}

#[test]
fn open_round_trip_with_a_4_octet_as() {
    let o = Open {
        asn: 4_200_000_000,
        hold_time: 9,
        id: Ipv4Addr::new(192, 0, 2, 10),
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(4_200_000_000),
        ],
    };
    let bytes = encode_open(&o);
    // The 2-octet field carries AS_TRANS.
    assert_eq!(u16::from_be_bytes([bytes[20], bytes[21]]), AS_TRANS);
    assert_eq!(one(&bytes), Message::Open(o.clone()));
    assert!(o.offers(AFI_IPV6, SAFI_UNICAST));
    let bare = Open {
        capabilities: vec![],
        asn: 65001,
        ..o
    };
    let Message::Open(b) = one(&encode_open(&bare)) else {
        panic!()
    };
    assert_eq!(b.asn, 65001);
    assert!(b.offers(AFI_IPV4, SAFI_UNICAST) && !b.offers(AFI_IPV6, SAFI_UNICAST));
}

#[test]
fn keepalive_and_notification_round_trip() {
    assert_eq!(one(&encode_keepalive()), Message::Keepalive);
    let n = Notification {
        code: 6,
        subcode: 2,
        data: b"bye".to_vec(),
    };
    assert_eq!(
        one(&encode_notification(&n)),
        Message::Notification(n.clone())
    );
    assert_eq!(n.to_string(), "cease: administrative shutdown (6/2)");
}

#[test]
fn updates_carry_every_route_with_its_next_hop_and_split_at_4096_bytes() {
    let r = routing();
    let mut announce = hosts(1000, false);
    announce.extend(hosts(1000, true));
    let withdraw = [hosts(900, false), hosts(300, true)].concat();
    let (msgs, skipped) = encode_updates(&r, &announce, &withdraw);
    assert!(skipped.is_empty());
    assert!(msgs.len() > 4, "{} messages", msgs.len());
    let (ann, wd) = contents(&msgs);
    assert_eq!(ann.len(), 2000);
    for (p, nh) in &ann {
        let want: IpAddr = if p.is_ipv4() {
            r.next_hop_v4.expect("v4").into()
        } else {
            r.next_hop_v6.expect("v6").into()
        };
        assert_eq!(*nh, want);
    }
    let got: Vec<IpAddr> = ann.iter().map(|(p, _)| *p).collect();
    assert_eq!(got, announce);
    assert_eq!(wd, withdraw);
}

#[test]
fn a_family_without_next_hop_is_returned_unannounced() {
    let r = Routing {
        next_hop_v6: None,
        ..routing()
    };
    let announce = [hosts(2, false), hosts(3, true)].concat();
    let (msgs, skipped) = encode_updates(&r, &announce, &[]);
    assert_eq!(skipped, hosts(3, true));
    assert_eq!(contents(&msgs).0.len(), 2);
}

#[test]
fn as_path_by_peer_kind() {
    let path = |r: &Routing| {
        let (m, _) = encode_updates(r, &hosts(1, false), &[]);
        let Message::Update(u) = one(&m[0]) else {
            panic!()
        };
        u.attributes
    };
    let ebgp = path(&routing());
    let p = &ebgp.iter().find(|a| a.code == 2).expect("AS_PATH").value;
    assert_eq!(p, &[2, 1, 0, 0, 0xfc, 0]);
    let ibgp = path(&Routing {
        ibgp: true,
        ..routing()
    });
    assert!(ibgp.iter().any(|a| a.code == 2 && a.value.is_empty()));
    assert!(ibgp.iter().any(|a| a.code == 5));
    // A 2-octet peer and a 4-octet local AS: AS_TRANS, and AS4_PATH with the real AS.
    let old = path(&Routing {
        four_octet: false,
        local_as: 4_200_000_000,
        ..routing()
    });
    let p = &old.iter().find(|a| a.code == 2).expect("AS_PATH").value;
    assert_eq!(p, &[2, 1, 0x5b, 0xa0]);
    assert!(old.iter().any(|a| a.code == 17));
}

#[test]
fn malformed_messages_are_errors_with_their_notification() {
    let mut k = encode_keepalive();
    k[0] = 0;
    assert_eq!(decode(&k).map(|_| ()), Err(WireError::Marker));
    let mut k = encode_keepalive();
    k[17] = 20;
    assert_eq!(
        decode(&k).map(|_| ()).map_err(|e| e.notification()),
        Err((1, 2))
    );
    let mut k = encode_keepalive();
    k[18] = 9;
    assert_eq!(
        decode(&k).map(|_| ()).map_err(|e| e.notification()),
        Err((1, 3))
    );
    let mut o = encode_open(&Open {
        asn: 1,
        hold_time: 3,
        id: Ipv4Addr::new(192, 0, 2, 1),
        capabilities: vec![],
    });
    o[19] = 3;
    assert_eq!(decode(&o).map(|_| ()), Err(WireError::Version(3)));
    // Incomplete: not an error, just not yet.
    let ka = encode_keepalive();
    assert_eq!(decode(&ka[..10]), Ok(None));
    let (m, _) = encode_updates(&routing(), &hosts(3, false), &[]);
    assert_eq!(decode(&m[0][..m[0].len() - 1]), Ok(None));
}

proptest! {
    /// Any bytes: an error, a message, or "incomplete" — never a panic, never a length past
    /// the input.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut b = bytes.clone();
        if b.len() >= 19 {
            b[..16].copy_from_slice(&[0xff; 16]);
            let len = (b.len() as u16).to_be_bytes();
            b[16] = len[0];
            b[17] = len[1];
            b[18] = 1 + b[18] % 4;
        }
        for input in [&bytes, &b] {
            if let Ok(Some((_, used))) = decode(input) {
                prop_assert!(used <= input.len());
            }
        }
    }
}

#[test]
fn received_updates_are_not_parsed() {
    // An UPDATE whose withdrawn-routes length runs past its body: malformed for `decode`,
    // an empty UPDATE for `decode_received` (kvip takes no routes).
    let mut body = vec![0u8, 200];
    body.extend_from_slice(&[0, 0]);
    let len = (HEADER_LEN + body.len()) as u16;
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&len.to_be_bytes());
    m.push(2);
    m.extend_from_slice(&body);
    assert_eq!(decode(&m).map(|_| ()), Err(WireError::Update));
    assert_eq!(
        decode_received(&m),
        Ok(Some((Message::Update(Update::default()), m.len())))
    );
    // The header is still checked.
    let mut bad = m.clone();
    bad[0] = 0;
    assert_eq!(decode_received(&bad).map(|_| ()), Err(WireError::Marker));
}
