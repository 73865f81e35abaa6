//! Until when this node may hold each VIP: the renew deadline of the Lease it holds the VIP
//! under. The dataplane gives each address a lifetime ending then, so the kernel removes the
//! VIP of an agent that stops renewing (killed, frozen) before another node can take the
//! Lease.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::plan::{Plan, ServiceKey};

/// The renew deadlines of the Leases this node holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Deadlines {
    /// No election (`vip_leaderelection=false`): VIPs are held without end.
    #[default]
    Unfenced,
    /// One Lease for every Service: its deadline while held.
    Global(Option<Instant>),
    /// One Lease per Service: the deadline of each one held.
    PerService(BTreeMap<ServiceKey, Instant>),
}

/// The deadline of every VIP `plan` holds, under `deadlines`. With an election, a VIP held
/// under no known deadline gets `now`: already passed, so it is not added (the leadership it
/// was planned with is being withdrawn). A VIP held under several Services' Leases keeps the
/// latest deadline. Without an election, no VIP has a deadline.
pub fn vip_deadlines(
    plan: &Plan,
    deadlines: &Deadlines,
    now: Instant,
) -> BTreeMap<IpAddr, Instant> {
    let mut out = BTreeMap::new();
    for (key, sp) in plan.services.iter().filter(|(_, sp)| sp.held) {
        let d = match deadlines {
            Deadlines::Unfenced => continue,
            Deadlines::Global(d) => d.unwrap_or(now),
            Deadlines::PerService(m) => m.get(key).copied().unwrap_or(now),
        };
        for vip in &sp.vips {
            out.entry(*vip)
                .and_modify(|e: &mut Instant| *e = (*e).max(d))
                .or_insert(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ServicePlan;
    use std::time::Duration;

    fn key(n: &str) -> ServiceKey {
        ServiceKey {
            namespace: "default".into(),
            name: n.into(),
        }
    }

    fn plan(services: &[(&str, &str, bool)]) -> Plan {
        Plan {
            desired: Ok(crate::DesiredState::empty()),
            services: services
                .iter()
                .map(|(n, vip, held)| {
                    (
                        key(n),
                        ServicePlan {
                            vips: vec![vip.parse().expect("ip")],
                            candidate: true,
                            held: *held,
                            egress_pods: BTreeMap::new(),
                            lease_name: None,
                            warnings: vec![],
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn every_held_vip_gets_its_leases_deadline_and_nothing_else_does() {
        let now = Instant::now();
        let (d1, d2) = (now + Duration::from_secs(3), now + Duration::from_secs(2));
        let p = plan(&[
            ("a", "192.0.2.1", true),
            ("b", "192.0.2.1", true),
            ("c", "192.0.2.3", true),
            ("d", "192.0.2.4", false),
        ]);
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        assert!(vip_deadlines(&p, &Deadlines::Unfenced, now).is_empty());
        let g = vip_deadlines(&p, &Deadlines::Global(Some(d1)), now);
        assert_eq!(
            g,
            BTreeMap::from([(ip("192.0.2.1"), d1), (ip("192.0.2.3"), d1)])
        );
        // Held under the global Lease but no deadline known: already passed.
        let none = vip_deadlines(&p, &Deadlines::Global(None), now);
        assert_eq!(none.get(&ip("192.0.2.3")), Some(&now));
        let per = Deadlines::PerService(BTreeMap::from([(key("a"), d2), (key("b"), d1)]));
        let m = vip_deadlines(&p, &per, now);
        // Shared by a and b: the later one; c has none known: passed; d is not held.
        assert_eq!(
            m,
            BTreeMap::from([(ip("192.0.2.1"), d1), (ip("192.0.2.3"), now)])
        );
    }
}
