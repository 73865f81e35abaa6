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

mod planning {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use kvip_core::annotations as ann;
    use kvip_core::plan::{ClusterNetworks, EndpointInfo, ServiceInfo, ServiceKey};
    use kvip_core::{Leadership, NodeConfig, Snapshot, plan};
    use proptest::prelude::*;

    fn annotation_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("true".to_string()),
            Just("false".to_string()),
            Just("tcp:443,udp:53".to_string()),
            Just("tcp:99999".to_string()),
            Just("300.1.1.1/8".to_string()),
            Just("203.0.113.0/24".to_string()),
            "\\PC{0,12}",
        ]
    }

    fn service(i: usize) -> impl Strategy<Value = (ServiceInfo, Vec<EndpointInfo>)> {
        (
            0u8..4,
            proptest::collection::vec((0usize..6, annotation_value()), 0..5),
            proptest::collection::vec((0u8..8, 0u8..3, any::<bool>()), 0..6),
        )
            .prop_map(move |(vip, anns, eps)| {
                let keys = [
                    ann::EGRESS,
                    ann::EGRESS_IPV6,
                    ann::EGRESS_PORTS,
                    ann::EGRESS_ALLOWED,
                    ann::EGRESS_DENIED,
                    ann::IGNORE,
                ];
                let mut annotations: BTreeMap<String, String> = anns
                    .into_iter()
                    .map(|(k, v)| (keys[k].to_string(), v))
                    .collect();
                annotations.insert(
                    ann::LOADBALANCER_IPS.into(),
                    format!("198.51.100.{}", vip + 1),
                );
                let s = ServiceInfo {
                    namespace: "ns".into(),
                    name: format!("svc{i}"),
                    load_balancer: true,
                    annotations,
                    ..ServiceInfo::default()
                };
                let eps = eps
                    .into_iter()
                    .map(|(a, node, ready)| EndpointInfo {
                        address: IpAddr::V4(Ipv4Addr::new(10, 244, 1, a)),
                        node: Some(format!("n{node}")),
                        ready,
                    })
                    .collect();
                (s, eps)
            })
    }

    proptest! {
        /// Whatever the annotations and endpoints: no panic, a valid state, and only this
        /// node's ready endpoints are translated, each through one Service.
        #[test]
        fn plan_is_total_and_translates_only_local_ready_pods(
            svcs in (service(0), service(1), service(2), service(3)),
            held in any::<bool>(),
        ) {
            let list = [svcs.0, svcs.1, svcs.2, svcs.3];
            let snap = Snapshot {
                endpoints: list
                    .iter()
                    .map(|(s, e)| (ServiceKey { namespace: s.namespace.clone(), name: s.name.clone() }, e.clone()))
                    .collect(),
                services: list.iter().map(|(s, _)| s.clone()).collect(),
                networks: ClusterNetworks {
                    pod: vec!["10.244.0.0/16".parse().unwrap()],
                    service: vec!["10.96.0.0/12".parse().unwrap()],
                    api_server: vec![],
                },
            };
            let cfg = NodeConfig { node_name: "n0".into(), interface: "eth0".into(), ..NodeConfig::default() };
            let p = plan(&snap, &Leadership::Global(held), &cfg);
            let local_ready: Vec<IpAddr> = list
                .iter()
                .flat_map(|(_, e)| e.iter().filter(|e| e.ready && e.node.as_deref() == Some("n0")).map(|e| e.address))
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            for pol in p.desired.egress() {
                for s in pol.sources() {
                    prop_assert!(local_ready.contains(s));
                    prop_assert!(seen.insert(*s), "pod {} in two policies", s);
                }
            }
            if !held {
                prop_assert!(p.desired.is_empty());
            }
            let egress_services = p.services.values().filter(|s| !s.egress_pods.is_empty()).count();
            prop_assert_eq!(egress_services, p.desired.egress().len());
        }
    }
}
