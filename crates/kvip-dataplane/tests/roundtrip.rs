//! Edge values make the round trip: what is applied reads back as the same state, and
//! applying it again (by a fresh process, which reads the kernel first) changes nothing.
//! Catch-all networks, IPv6 prefixes of every length, the longest policy name, every port
//! form.

mod common;

use common::*;
use kvip_dataplane::{Dataplane, SyncMode};
use kvip_testkit::require_kernel;

fn edge_state() -> kvip_core::DesiredState {
    let long = format!("ns/{}", "n".repeat(kvip_core::model::MAX_NAME_LEN - 3));
    state(&format!(
        r#"
vips:
  - {{address: 192.0.2.10, interface: eth0}}
  - {{address: "2001:db8:1::10", interface: eth0}}
egress:
  - name: "{long}"
    vip: 192.0.2.10
    sources: [10.244.1.5]
    exclude: [10.244.0.0/16, 10.96.0.0/12, 192.0.2.1/32]
    allow: [0.0.0.0/0]
  - name: catch/all
    vip: 192.0.2.10
    sources: [10.244.1.6]
    exclude: [0.0.0.0/0]
  - name: six/prefixes
    vip: "2001:db8:1::10"
    sources: ["fd00:10:244::5", "fd00:10:244:1::6"]
    exclude: ["fd00:10:244::/48", "2001:db8:ffff::1/128", "2001:db8:8000::/33", "fe80::/10"]
    allow: ["::/0"]
    ports: ["tcp:443", "udp:53", "sctp:9", "tcp:1", "udp:65535"]
  - name: six/catch-all
    vip: "2001:db8:1::10"
    sources: ["fd00:10:244::7"]
    exclude: ["::/0"]
"#
    ))
}

/// Applied, the state reads back as itself (so the agent's drift check stays quiet), and
/// applying it again changes nothing: in the same process, and for iptables (which compares
/// with the kernel) in a fresh one too. nftables' first apply in a process always replaces
/// the table (it is how stale objects of an earlier run go).
#[test]
fn edge_values_read_back_and_reapply_unchanged() {
    require_kernel!();
    for (i, (backend, cfg)) in backends().into_iter().enumerate() {
        let (ns, _peer) = node(&format!("rt{i}"));
        let want = edge_state();
        let (got, again) = with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&want).await.expect("apply");
            let got = dp.observe().await.expect("observe");
            (got, dp.apply(&want).await.expect("apply again"))
        });
        assert_eq!(got.state, want, "{backend}: read back");
        assert!(got.stray.is_empty(), "{backend}: {:?}", got.stray);
        assert_eq!(again.mode, SyncMode::Unchanged, "{backend}: {again:?}");
        let listing = || kernel_listing(&ns);
        let before = listing();
        let fresh = apply_and_observe(&ns, cfg.clone(), &want);
        assert_eq!(fresh.state, want, "{backend}: read back by a fresh process");
        if backend.starts_with("iptables") {
            let r = with_dataplane(&ns, cfg, async |dp| dp.apply(&want).await.expect("apply"));
            assert_eq!(r.mode, SyncMode::Unchanged, "{backend}: rewritten: {r:?}");
            assert_eq!(listing(), before, "{backend}: the kernel changed");
        }
    }
}
