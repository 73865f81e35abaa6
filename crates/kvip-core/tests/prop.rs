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

    /// Two random states over a small space of names, VIPs and sources (so that policies
    /// are often equal, differ by a source or by translation, and sources move): the changed
    /// sources are exactly those whose owner's translation differs, found source by source.
    #[test]
    fn changed_sources_equals_the_per_source_definition(
        a in proptest::collection::vec((0u8..4, 0u8..2, proptest::collection::btree_set(0u8..12, 0..5)), 0..4),
        b in proptest::collection::vec((0u8..4, 0u8..2, proptest::collection::btree_set(0u8..12, 0..5)), 0..4),
    ) {
        let build = |ps: &[(u8, u8, std::collections::BTreeSet<u8>)]| {
            let mut taken = std::collections::BTreeSet::new();
            let mut names = std::collections::BTreeSet::new();
            let egress: Vec<EgressPolicy> = ps
                .iter()
                .filter(|(name, _, _)| names.insert(*name))
                .filter_map(|(name, vip, srcs)| {
                    let sources: Vec<IpAddr> = srcs
                        .iter()
                        .filter(|s| taken.insert(**s))
                        .map(|s| IpAddr::V4(Ipv4Addr::new(10, 244, 0, *s + 1)))
                        .collect();
                    (!sources.is_empty()).then(|| {
                        EgressPolicy::new(format!("ns/p{name}"), IpAddr::V4(Ipv4Addr::new(198, 51, 100, *vip + 1)), sources, vec![], None, None).unwrap()
                    })
                })
                .collect();
            DesiredState::new(vec![], egress).unwrap()
        };
        let (x, y) = (build(&a), build(&b));
        let owners = |s: &DesiredState| -> std::collections::BTreeMap<IpAddr, EgressPolicy> {
            s.egress().iter().flat_map(|p| p.sources().iter().map(move |src| (*src, p.clone()))).collect()
        };
        let (ox, oy) = (owners(&x), owners(&y));
        let want: std::collections::BTreeSet<IpAddr> = ox
            .keys()
            .chain(oy.keys())
            .filter(|s| match (ox.get(s), oy.get(s)) {
                (Some(p), Some(q)) => !p.same_translation(q),
                _ => true,
            })
            .copied()
            .collect();
        prop_assert_eq!(x.changed_sources(&y), want);
    }

    #[test]
    fn state_parser_never_panics(json in "\\PC{0,200}") {
        let _ = serde_json::from_str::<DesiredState>(&json);
    }
}

mod planning {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

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
            // Extra VIPs: none, a second IPv4 one, an IPv6 one.
            0u8..3,
            proptest::collection::vec((0usize..6, annotation_value()), 0..5),
            proptest::collection::vec((0u8..8, 0u8..3, any::<bool>()), 0..6),
        )
            .prop_map(move |(vip, extra, anns, eps)| {
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
                let vips = match extra {
                    0 => format!("198.51.100.{}", vip + 1),
                    1 => format!("198.51.100.{},198.51.100.{}", vip + 1, vip + 11),
                    _ => format!("198.51.100.{},2001:db8::{}", vip + 1, vip + 1),
                };
                annotations.insert(ann::LOADBALANCER_IPS.into(), vips);
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
                        // Some pods dual-stack: the IPv6 VIPs get sources too.
                        address: if a % 3 == 2 {
                            IpAddr::V6(format!("fd00:10:244::{a}").parse().unwrap())
                        } else {
                            IpAddr::V4(Ipv4Addr::new(10, 244, 1, a))
                        },
                        node: Some(format!("n{node}")),
                        ready,
                        serving: ready,
                    })
                    .collect();
                (s, eps)
            })
    }

    /// A Service and its endpoints, as a snapshot shares them.
    type Shared = (Arc<ServiceInfo>, Arc<[EndpointInfo]>);

    fn networks() -> ClusterNetworks {
        ClusterNetworks {
            pod: vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/48".parse().unwrap(),
            ],
            service: vec!["10.96.0.0/12".parse().unwrap()],
            api_server: vec![],
        }
    }

    proptest! {
        /// The memoising planner, fed a sequence of snapshots (Services changing, appearing
        /// and going, leadership and exclusion changing), always equals a fresh `plan()`.
        #[test]
        fn the_planner_equals_plan_at_every_step(
            steps in proptest::collection::vec(
                (
                    (service(0), service(1), service(2), service(3)),
                    0u8..16,
                    0u8..16,
                    0u8..16,
                    any::<bool>(),
                    0u8..10,
                ),
                1..12,
            ),
        ) {
            let cfg = NodeConfig { node_name: "n0".into(), interface: "eth0".into(), ..NodeConfig::default() };
            let mut planner = kvip_core::plan::Planner::default();
            // The Services as the cluster holds them: a step replaces some (new content),
            // copies some (same content, new allocation) and keeps the rest (same `Arc`).
            let mut current: Vec<Option<Shared>> = vec![None; 4];
            for (svcs, replace, copy, present, excluded, lead) in steps {
                for (i, (s, e)) in [svcs.0, svcs.1, svcs.2, svcs.3].into_iter().enumerate() {
                    let slot = &mut current[i];
                    if slot.is_none() || replace & (1 << i) != 0 {
                        *slot = Some((Arc::new(s), e.into()));
                    } else if copy & (1 << i) != 0
                        && let Some((s, e)) = slot.take()
                    {
                        *slot = Some((Arc::new((*s).clone()), e.to_vec().into()));
                    }
                }
                let list: Vec<Shared> = current
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| present & (1 << i) != 0)
                    .filter_map(|(_, x)| x.clone())
                    .collect();
                let snap = Snapshot {
                    endpoints: list
                        .iter()
                        .map(|(s, e)| (ServiceKey { namespace: s.namespace.clone(), name: s.name.clone() }, e.clone()))
                        .collect(),
                    services: list.iter().map(|(s, _)| s.clone()).collect(),
                    networks: networks(),
                    node_excluded: excluded && lead == 0,
                };
                let leadership = match lead {
                    0..=3 => Leadership::Global(lead % 2 == 0),
                    _ => Leadership::PerService(
                        list.iter()
                            .filter(|(s, _)| s.name.len() % 2 == usize::from(lead) % 2)
                            .map(|(s, _)| ServiceKey { namespace: s.namespace.clone(), name: s.name.clone() })
                            .collect(),
                    ),
                };
                prop_assert_eq!(planner.plan(&snap, &leadership, &cfg), plan(&snap, &leadership, &cfg));
            }
        }

        /// Whatever the annotations and endpoints: no panic, a valid state, and only this
        /// node's ready endpoints are translated, each through one Service; a node excluded
        /// from load balancing holds nothing.
        #[test]
        fn plan_is_total_and_translates_only_local_ready_pods(
            svcs in (service(0), service(1), service(2), service(3)),
            held in any::<bool>(),
            excluded in any::<bool>(),
        ) {
            let list = [svcs.0, svcs.1, svcs.2, svcs.3];
            let snap = Snapshot {
                endpoints: list
                    .iter()
                    .map(|(s, e)| (ServiceKey { namespace: s.namespace.clone(), name: s.name.clone() }, e.clone().into()))
                    .collect(),
                services: list.iter().map(|(s, _)| Arc::new(s.clone())).collect(),
                networks: networks(),
                node_excluded: excluded,
            };
            let cfg = NodeConfig { node_name: "n0".into(), interface: "eth0".into(), ..NodeConfig::default() };
            let p = plan(&snap, &Leadership::Global(held), &cfg);
            prop_assert!(p.desired.is_ok(), "invalid desired state: {:?}", p.desired);
            let local_ready: Vec<IpAddr> = list
                .iter()
                .flat_map(|(_, e)| e.iter().filter(|e| e.ready && e.node.as_deref() == Some("n0")).map(|e| e.address))
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            for pol in p.desired.as_ref().unwrap().egress() {
                for s in pol.sources() {
                    prop_assert!(local_ready.contains(s));
                    prop_assert!(seen.insert(*s), "pod {} in two policies", s);
                }
            }
            if !held || excluded {
                prop_assert!(p.desired.as_ref().unwrap().is_empty());
            }
            if excluded {
                prop_assert!(p.services.values().all(|s| !s.candidate));
            }
            // One policy per VIP with pods (a dual-stack Service has one per family).
            let vips_with_pods: usize = p.services.values().map(|s| s.egress_pods.len()).sum();
            prop_assert_eq!(vips_with_pods, p.desired.as_ref().unwrap().egress().len());
        }
    }
}

mod election {
    use std::time::Duration;

    use kvip_core::lease::{Action, Elector, LeaseRecord, Now, Timings};
    use proptest::prelude::*;

    const STEP_MS: u64 = 100;

    #[derive(Debug, Clone)]
    struct NodeEvents {
        /// Per step: 0 = act normally, 1 = cut off from the API, 2 = restart.
        what: Vec<u8>,
        /// Per step: answer delay of a write, in steps.
        delay: Vec<u8>,
        /// Per step: how long a cut-off starting then lasts, in steps.
        cut_len: Vec<u8>,
    }

    fn node_events(steps: usize) -> impl Strategy<Value = NodeEvents> {
        (
            proptest::collection::vec(
                prop_oneof![300 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8)],
                steps,
            ),
            proptest::collection::vec(0u8..25, steps),
            proptest::collection::vec(10u8..120, steps),
        )
            .prop_map(|(what, delay, cut_len)| NodeEvents {
                what,
                delay,
                cut_len,
            })
    }

    struct Sim {
        elector: Elector,
        /// A write in flight: (answer arrives at step, stored record or failure, sent at).
        pending: Option<(usize, Option<LeaseRecord>, Now)>,
        /// Steps of a cut-off left.
        cut: usize,
    }

    fn now(step: usize) -> Now {
        let ms = step as u64 * STEP_MS;
        Now {
            mono: Duration::from_millis(ms),
            wall_us: ms as i64 * 1000,
        }
    }

    /// Runs three nodes through `events` against one Lease store with resourceVersion-guarded
    /// writes. Returns, per 100 ms step, the nodes that believed they held the Lease.
    fn simulate(events: &[NodeEvents], steps: usize) -> Vec<Vec<usize>> {
        let timings = Timings {
            lease_duration: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(3),
            retry_period: Duration::from_secs(1),
        };
        let mut store: Option<LeaseRecord> = None;
        let mut rv = 0u64;
        let mut nodes: Vec<Sim> = (0..events.len())
            .map(|i| Sim {
                elector: Elector::new(format!("n{i}"), timings),
                pending: None,
                cut: 0,
            })
            .collect();
        let mut out = Vec::with_capacity(steps);
        for step in 0..steps {
            let t = now(step);
            for (i, n) in nodes.iter_mut().enumerate() {
                let ev = &events[i];
                if ev.what[step] == 2 {
                    // Restart: a new process knows nothing (an in-flight answer is lost).
                    n.elector = Elector::new(format!("n{i}"), timings);
                    n.pending = None;
                } else if ev.what[step] == 1 && n.cut == 0 {
                    n.cut = usize::from(ev.cut_len[step]);
                }
                if let Some((at, stored, sent)) = n.pending.clone() {
                    if step >= at {
                        match stored {
                            Some(r) if n.cut == 0 => n.elector.written(r, sent),
                            _ => n.elector.write_failed(),
                        }
                        n.pending = None;
                    }
                    continue;
                }
                if n.cut > 0 {
                    n.cut -= 1;
                    continue;
                }
                // Act once per retry period (10 steps), staggered by node.
                if (step + i * 3) % 10 != 0 {
                    continue;
                }
                n.elector.observe(store.clone(), t);
                let write = match n.elector.next_action(t, true) {
                    Action::Create(r) if store.is_none() => Some(r),
                    Action::Replace(r)
                        if store
                            .as_ref()
                            .is_some_and(|s| s.resource_version == r.resource_version) =>
                    {
                        Some(r)
                    }
                    Action::Create(_) | Action::Replace(_) => {
                        n.elector.write_failed();
                        None
                    }
                    Action::Wait(_) => None,
                };
                if let Some(mut r) = write {
                    rv += 1;
                    r.resource_version = rv.to_string();
                    store = Some(r.clone());
                    let arrives = step + usize::from(ev.delay[step]);
                    n.pending = Some((arrives, Some(r), t));
                }
            }
            out.push(
                (0..nodes.len())
                    .filter(|i| nodes[*i].elector.is_leader(t))
                    .collect(),
            );
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Writes whose answers arrive late, nodes cut off from the API and restarted: at no
        /// instant do two nodes believe they hold the Lease (invariant 6 in docs/design.md).
        #[test]
        fn never_two_leaders(events in proptest::collection::vec(node_events(400), 3)) {
            for (step, leaders) in simulate(&events, 400).iter().enumerate() {
                prop_assert!(leaders.len() <= 1, "step {}: leaders {:?}", step, leaders);
            }
        }
    }

    /// Without faults one node leads; cut off from the API, it steps down and another takes
    /// over within lease duration plus a retry period.
    #[test]
    fn leader_emerges_and_fails_over() {
        let quiet = |steps: usize| NodeEvents {
            what: vec![0; steps],
            delay: vec![1; steps],
            cut_len: vec![30; steps],
        };
        let leaders = simulate(&[quiet(300), quiet(300), quiet(300)], 300);
        assert!(
            leaders[20..].iter().all(|l| l.len() == 1),
            "a stable leader after 2 s"
        );
        let first = leaders[50][0];
        let mut events = vec![quiet(300), quiet(300), quiet(300)];
        // Cut off from the API from 10 s to 20 s (a cut-off shorter than the lease duration
        // rightly ends with the same leader renewing).
        for s in 100..200 {
            events[first].what[s] = 1;
        }
        let leaders = simulate(&events, 300);
        let gone = (100..300)
            .find(|s| !leaders[*s].contains(&first))
            .expect("the cut-off leader steps down");
        assert!(
            gone <= 100 + 30,
            "stepped down within its renew deadline (at step {gone})"
        );
        let next = (100..300).find(|s| leaders[*s].len() == 1 && leaders[*s][0] != first);
        let next = next.expect("another node takes over");
        assert!(
            next <= 100 + 50 + 10 + 10,
            "takeover at step {next}: within lease duration + retry period of the last renewal"
        );
    }
}
