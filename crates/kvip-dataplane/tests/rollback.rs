//! An apply that cannot be carried out changes nothing: its VIPs are checked before the
//! kernel is touched.

mod common;

use common::{backends, kernel_listing, state, with_dataplane};
use kvip_dataplane::{Dataplane, DataplaneError};
use kvip_testkit::{Netns, require_kernel};

#[test]
fn ipv6_vip_on_a_link_without_ipv6_changes_nothing() {
    require_kernel!();
    let a = state(
        r#"
vips:
  - {address: 192.0.2.10, interface: eth0}
  - {address: "2001:db8:1::10", interface: eth1}
egress:
  - {name: a/one, vip: 192.0.2.10, sources: [10.244.1.1], exclude: [10.244.0.0/16]}
"#,
    );
    // B moves nothing it can hold before the one it cannot: a new IPv6 VIP on eth0, whose
    // IPv6 is disabled.
    let b = state(
        r#"
vips:
  - {address: 192.0.2.11, interface: eth0}
  - {address: "2001:db8:1::11", interface: eth0}
egress:
  - {name: b/one, vip: 192.0.2.11, sources: [10.244.2.1], exclude: []}
"#,
    );
    for (name, cfg) in backends() {
        let ns = Netns::new("v6off").expect("netns");
        let peer = Netns::new("v6offp").expect("netns");
        ns.veth("eth0", &peer, "eth0").expect("veth");
        ns.veth("eth1", &peer, "eth1").expect("veth");
        ns.sysctl("net.ipv6.conf.eth0.disable_ipv6", "1")
            .expect("sysctl");
        with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&a).await.expect("apply A");
        });
        let before = kernel_listing(&ns);
        let err = with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&b).await.expect_err("B cannot be held")
        });
        assert!(
            matches!(&err, DataplaneError::Ipv6Disabled { interface, .. } if interface == "eth0"),
            "{name}: {err}"
        );
        assert_eq!(kernel_listing(&ns), before, "{name}: the kernel changed");
        let o = common::apply_and_observe(&ns, cfg.clone(), &a);
        assert_eq!(o.state, a, "{name}");
    }
}
