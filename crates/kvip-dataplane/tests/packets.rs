//! Real packets: pod namespace → node namespace → external namespace, where a reporter tells
//! which source address it saw. Every scenario runs on each backend, IPv4 and IPv6.

mod common;

use common::{backends, state, with_dataplane};
use kvip_dataplane::Dataplane;
use kvip_testkit::lab::*;
use kvip_testkit::require_kernel;

fn policy_yaml(extra4: &str, extra6: &str) -> String {
    policy_yaml_ex(
        "[10.244.0.0/16, 10.96.0.0/12]",
        "[\"fd00:10:244::/48\"]",
        extra4,
        extra6,
    )
}

fn policy_yaml_ex(ex4: &str, ex6: &str, extra4: &str, extra6: &str) -> String {
    format!(
        r#"
vips:
  - {{address: 192.0.2.10, interface: eth0}}
  - {{address: "2001:db8:1::10", interface: eth0}}
egress:
  - name: default/web
    vip: 192.0.2.10
    sources: [10.244.1.5]
    exclude: {ex4}
{extra4}
  - name: default/web6
    vip: "2001:db8:1::10"
    sources: ["fd00:10:244:1::5"]
    exclude: {ex6}
{extra6}
"#
    )
}

#[test]
fn egress_uses_vip_and_wins_over_masquerade() {
    require_kernel!();
    for (name, cfg) in backends() {
        let lab = EgressLab::new("pkm", true).expect("lab");
        // Before kvip: the CNI-like MASQUERADE gives the node address.
        assert_eq!(lab.seen_tcp(EXT4, 80).unwrap(), NODE4, "{name}");
        assert_eq!(lab.seen_tcp(EXT6, 80).unwrap(), NODE6, "{name}");
        let s = state(&policy_yaml("", ""));
        with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&s).await.map(|_| ())
        })
        .expect("apply");
        assert_eq!(
            lab.seen_tcp(EXT4, 80).unwrap(),
            VIP4,
            "{name}: TCP v4 leaves with the VIP"
        );
        assert_eq!(
            lab.seen_tcp(EXT6, 80).unwrap(),
            VIP6,
            "{name}: TCP v6 leaves with the VIP"
        );
        assert_eq!(lab.seen_udp(DST4_B, 443).unwrap(), VIP4, "{name}: UDP v4");
        assert_eq!(lab.seen_udp(DST6_B, 443).unwrap(), VIP6, "{name}: UDP v6");
        // Removal: back to the node's masquerade, the VIP no longer appears.
        with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&kvip_core::DesiredState::empty())
                .await
                .map(|_| ())
        })
        .expect("apply empty");
        assert_eq!(
            lab.seen_tcp(EXT4, 80).unwrap(),
            NODE4,
            "{name}: after removal"
        );
        assert_eq!(
            lab.seen_tcp(EXT6, 80).unwrap(),
            NODE6,
            "{name}: after removal"
        );
    }
}

#[test]
fn exclusions_ports_and_networks_are_honoured() {
    require_kernel!();
    for (name, cfg) in backends() {
        let lab = EgressLab::new("pkf", false).expect("lab");
        // Excluded destination: the pod address goes out untranslated.
        let s = state(&policy_yaml_ex(
            "[10.244.0.0/16, 203.0.113.0/24]",
            "[\"fd00:10:244::/48\", \"2001:db8:3::/64\"]",
            "",
            "",
        ));
        with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&s).await.map(|_| ())
        })
        .expect("apply");
        assert_eq!(
            lab.seen_tcp(DST4_C, 80).unwrap(),
            POD4,
            "{name}: excluded v4"
        );
        assert_eq!(
            lab.seen_tcp(DST6_C, 80).unwrap(),
            POD6,
            "{name}: excluded v6"
        );
        assert_eq!(
            lab.seen_tcp(DST4_B, 80).unwrap(),
            VIP4,
            "{name}: not excluded v4"
        );
        assert_eq!(
            lab.seen_tcp(DST6_B, 80).unwrap(),
            VIP6,
            "{name}: not excluded v6"
        );

        // Ports: only tcp:443 and udp:8080 are translated.
        let s = state(&policy_yaml(
            "    ports: [\"tcp:443\", \"udp:8080\"]",
            "    ports: [\"tcp:443\", \"udp:8080\"]",
        ));
        with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&s).await.map(|_| ())
        })
        .expect("apply");
        for (dst, vip, pod) in [(EXT4, VIP4, POD4), (EXT6, VIP6, POD6)] {
            assert_eq!(
                lab.seen_tcp(dst, 443).unwrap(),
                vip,
                "{name}: tcp:443 to {dst}"
            );
            assert_eq!(
                lab.seen_tcp(dst, 80).unwrap(),
                pod,
                "{name}: tcp:80 to {dst}"
            );
            assert_eq!(
                lab.seen_udp(dst, 8080).unwrap(),
                vip,
                "{name}: udp:8080 to {dst}"
            );
            assert_eq!(
                lab.seen_udp(dst, 443).unwrap(),
                pod,
                "{name}: udp:443 to {dst}"
            );
        }

        // Allowed networks: only 198.51.100.0/24 (2001:db8:2::/64) is translated.
        let s = state(&policy_yaml(
            "    allow: [198.51.100.0/24]",
            "    allow: [\"2001:db8:2::/64\"]",
        ));
        with_dataplane(&lab.node, cfg.clone(), async |dp| {
            dp.apply(&s).await.map(|_| ())
        })
        .expect("apply");
        assert_eq!(
            lab.seen_tcp(DST4_B, 80).unwrap(),
            VIP4,
            "{name}: allowed v4"
        );
        assert_eq!(
            lab.seen_tcp(DST4_C, 80).unwrap(),
            POD4,
            "{name}: not allowed v4"
        );
        assert_eq!(
            lab.seen_tcp(DST6_B, 80).unwrap(),
            VIP6,
            "{name}: allowed v6"
        );
        assert_eq!(
            lab.seen_tcp(DST6_C, 80).unwrap(),
            POD6,
            "{name}: not allowed v6"
        );
    }
}
