//! Property tests: the parsers never panic, canonical forms are stable, and a valid state
//! survives a serialisation round trip unchanged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use kvip_core::{Cidr, DesiredState, DesiredStateSpec, EgressPolicy, PortMatch};
use proptest::prelude::*;

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ]
}

fn any_cidr() -> impl Strategy<Value = Cidr> {
    (any_ip(), 0u8..=128).prop_map(|(a, l)| Cidr::containing(a, l))
}

proptest! {
    #[test]
    fn cidr_parser_never_panics(s in "\\PC{0,40}") {
        let _ = s.parse::<Cidr>();
    }

    #[test]
    fn cidr_parser_on_near_misses(a in 0u32..400, b in 0u32..300, l in 0i32..200) {
        let s = format!("{a}.{b}.0.0/{l}");
        if let Ok(c) = s.parse::<Cidr>() {
            prop_assert!(a < 256 && b < 256 && l <= 32);
            prop_assert_eq!(c.to_string(), s);
        }
    }

    #[test]
    fn port_parser_never_panics(s in "\\PC{0,20}") {
        if let Ok(p) = s.parse::<PortMatch>() {
            prop_assert!(p.port != 0);
            let again: PortMatch = p.to_string().parse().unwrap();
            prop_assert_eq!(again, p);
        }
    }

    #[test]
    fn port_numbers(n in 0u64..200_000) {
        let r = format!("udp:{n}").parse::<PortMatch>();
        prop_assert_eq!(r.is_ok(), (1..=65535).contains(&n));
    }

    #[test]
    fn cidr_display_round_trip(c in any_cidr()) {
        let back: Cidr = c.to_string().parse().unwrap();
        prop_assert_eq!(back, c);
    }

    #[test]
    fn canonicalize_is_idempotent_and_preserves_membership(
        list in proptest::collection::vec(any_cidr(), 0..12),
        probes in proptest::collection::vec(any_ip(), 0..16),
    ) {
        let canon = Cidr::canonicalize(list.clone());
        prop_assert_eq!(Cidr::canonicalize(canon.clone()), canon.clone());
        for p in probes.iter().copied().chain(list.iter().map(|c| c.addr())) {
            let before = list.iter().any(|c| c.contains(p));
            let after = canon.iter().any(|c| c.contains(p));
            prop_assert_eq!(before, after);
        }
    }

    #[test]
    fn ranges_cover_exactly(c in any_cidr()) {
        let r = Cidr::from_range(c.addr(), c.last()).unwrap();
        prop_assert_eq!(r, vec![c]);
    }

    #[test]
    fn state_round_trips(
        n in 1usize..6,
        seed in any::<u16>(),
    ) {
        let mut egress = Vec::new();
        for i in 0..n {
            let sources = (0..(i + 1)).map(|j| IpAddr::V4(Ipv4Addr::new(10, 244, i as u8, (j as u8) + 1 + (seed % 100) as u8))).collect();
            let ports = if i % 2 == 0 { Some(vec!["tcp:443".parse().unwrap()]) } else { None };
            egress.push(EgressPolicy::new(format!("ns/svc{i}"), IpAddr::V4(Ipv4Addr::new(198, 51, 100, i as u8 + 1)), sources, vec!["10.244.0.0/16".parse().unwrap()], None, ports).unwrap());
        }
        let s = DesiredState::new(vec![], egress).unwrap();
        let spec: DesiredStateSpec = s.to_spec();
        let back = DesiredState::try_from(spec).unwrap();
        prop_assert_eq!(back, s);
    }

    #[test]
    fn state_parser_never_panics(json in "\\PC{0,200}") {
        let _ = serde_json::from_str::<DesiredState>(&json);
    }
}
