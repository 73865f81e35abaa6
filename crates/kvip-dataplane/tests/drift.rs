//! Every object kvip owns is read back: a hand-made change to kvip's nftables table — its
//! flags, its base chain's rules — is reported as stray (what `kvip dataplane show`, the
//! agent's drift check and the doctor see) and the next apply puts the table back.

mod common;

use common::*;
use kvip_dataplane::{Dataplane, SyncMode};
use kvip_testkit::require_kernel;

const STATE: &str = r#"
vips: [{address: 192.0.2.10, interface: eth0}, {address: "2001:db8::10", interface: eth0}]
egress:
  - {name: a/b, vip: 192.0.2.10, sources: [10.244.1.5], exclude: [10.244.0.0/16], ports: ["tcp:443"]}
  - {name: c/d, vip: "2001:db8::10", sources: ["fd00::5"], exclude: ["fd00::/48"]}
"#;

#[test]
fn hand_made_changes_to_kvips_table_are_stray_and_repaired() {
    require_kernel!();
    let cases = [
        (
            "dormant table",
            "nft add table inet kvip '{ flags dormant; }'",
            "table flags",
        ),
        (
            "flushed base chain",
            "nft flush chain inet kvip postrouting",
            "base chain postrouting holds 0",
        ),
        (
            "a rule added to the base chain",
            "nft insert rule inet kvip postrouting accept",
            "base chain postrouting holds 3",
        ),
        (
            "base chain deleted",
            "nft flush chain inet kvip postrouting; nft delete chain inet kvip postrouting",
            "base chain postrouting is missing",
        ),
    ];
    for (i, (what, script, needle)) in cases.into_iter().enumerate() {
        let (ns, _peer) = node(&format!("dr{i}"));
        let cfg = backends().remove(0).1;
        let want = state(STATE);
        let clean = apply_and_observe(&ns, cfg.clone(), &want);
        assert!(clean.stray.is_empty(), "{what}: {:?}", clean.stray);
        let good = nft_table(&ns, &[], "kvip");
        ns.sh(script).expect(what);
        let seen = with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.observe()
                .await
                .unwrap_or_else(|e| panic!("{what}: observe: {e}"))
        });
        assert!(
            seen.stray.iter().any(|s| s.contains(needle)),
            "{what}: stray {:?}",
            seen.stray
        );
        let r = with_dataplane(&ns, cfg.clone(), async |dp| {
            dp.apply(&want).await.expect("apply")
        });
        assert_eq!(r.mode, SyncMode::Full, "{what}");
        let after = apply_and_observe(&ns, cfg, &want);
        assert!(after.stray.is_empty(), "{what}: {:?}", after.stray);
        assert_eq!(after.state, want, "{what}");
        let strip = |t: &str| -> String {
            t.lines()
                .map(|l| l.split(" # handle").next().unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(&nft_table(&ns, &[], "kvip")),
            strip(&good),
            "{what}: repaired"
        );
    }
}

/// kvip's objects in the backend not in use (an nftables table while iptables is in use) are
/// read back as stray, and the next first apply of a process removes them.
#[test]
fn the_other_backends_objects_are_stray_until_removed() {
    require_kernel!();
    let (ns, _peer) = node("drob");
    let ipt = backends().remove(1).1;
    let want = state(STATE);
    apply_and_observe(&ns, ipt.clone(), &want);
    ns.sh("nft add table inet kvip").expect("nft");
    let seen = with_dataplane(&ns, ipt.clone(), async |dp| {
        dp.observe().await.expect("observe")
    });
    assert!(
        seen.stray
            .iter()
            .any(|s| s.contains("nftables table inet kvip")),
        "{:?}",
        seen.stray
    );
    let after = apply_and_observe(&ns, ipt, &want);
    assert!(after.stray.is_empty(), "{:?}", after.stray);
    assert_eq!(
        nft_table(&ns, &[], "kvip"),
        "",
        "removed by the first apply"
    );
}
