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
            "an element with a verdict kvip does not write",
            "nft add element inet kvip src4 '{ 10.244.9.9 : accept }'",
            "in map src4",
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

/// A read-back lists the table only when some nftables transaction happened since the
/// kernel was known to hold what kvip applied; whenever one did, the change is seen. Shown by
/// taking `nft` off `PATH`: a read-back that needs no listing still succeeds, one that needs
/// it fails for want of the tool.
#[test]
fn read_back_lists_only_after_another_transaction_and_then_sees_the_change() {
    require_kernel!();
    let (ns, _peer) = node("drg");
    let cfg = backends().remove(0).1;
    let want = state(STATE);
    let nft = which("nft");
    let path = std::env::var("PATH").expect("PATH");
    let empty = tempfile_dir("kvip-no-tools");
    // SAFETY: nextest runs this test alone in its process, and nothing else here reads the
    // environment while it changes.
    let tools = |on: bool| unsafe {
        std::env::set_var("PATH", if on { path.as_str() } else { empty.as_str() })
    };
    let run = |script: &str| {
        let st = std::process::Command::new(&nft)
            .arg(script)
            .status()
            .expect("nft");
        assert!(st.success(), "{script}");
    };
    with_dataplane(&ns, cfg, async |dp| {
        dp.apply(&want).await.expect("apply");
        tools(false);
        let o = dp
            .observe()
            .await
            .expect("nothing changed: no listing needed");
        assert_eq!(o.state, want);
        assert!(o.stray.is_empty(), "{:?}", o.stray);

        // Another program's transaction, elsewhere: the table must be listed again.
        tools(true);
        run("add table inet someone_else");
        tools(false);
        assert!(
            dp.observe().await.is_err(),
            "a transaction since: the read-back lists (and cannot, without nft)"
        );
        tools(true);
        let o = dp.observe().await.expect("observe");
        assert!(o.stray.is_empty() && o.state == want, "{o:?}");
        // Listed and equal: known again, no listing needed.
        tools(false);
        assert_eq!(dp.observe().await.expect("known again").state, want);

        // A hand-made change to kvip's table is a transaction too: seen.
        tools(true);
        run("add element inet kvip src4 { 10.244.9.9 : accept }");
        let o = dp.observe().await.expect("observe");
        assert!(
            o.stray.iter().any(|s| s.contains("in map src4")),
            "{:?}",
            o.stray
        );
        // Replacing the table makes it known again.
        dp.invalidate();
        dp.apply(&want).await.expect("repair");
        tools(false);
        assert_eq!(dp.observe().await.expect("repaired, known").state, want);

        // Pods added (kvip `create`s elements, so its batch always commits something): known.
        tools(true);
        let grown = state(&STATE.replace("[10.244.1.5]", "[10.244.1.5, 10.244.1.7]"));
        let r = dp.apply(&grown).await.expect("add a pod");
        assert_eq!(r.mode, SyncMode::Incremental);
        tools(false);
        assert_eq!(
            dp.observe().await.expect("after additions: known").state,
            grown
        );
        // An element kvip is about to add, added by someone else first: kvip's `create`
        // fails and the table is replaced, not taken as written.
        tools(true);
        let chain = nft_chain_of(&ns, "10.244.1.5");
        run(&format!(
            "add element inet kvip src4 {{ 10.244.1.8 : goto {chain} }}"
        ));
        let more = state(&STATE.replace("[10.244.1.5]", "[10.244.1.5, 10.244.1.7, 10.244.1.8]"));
        let r = dp.apply(&more).await.expect("apply");
        assert_eq!(r.mode, SyncMode::Full, "{r:?}");
        tools(false);
        assert_eq!(dp.observe().await.expect("replaced: known").state, more);
        tools(true);
    });
    let _ = std::fs::remove_dir(&empty);
}

/// The chain kvip's source map sends `pod` to.
fn nft_chain_of(ns: &kvip_testkit::Netns, pod: &str) -> String {
    let listing = ns
        .exec_ok("nft", &["list", "map", "inet", "kvip", "src4"])
        .expect("nft list map");
    listing
        .split(',')
        .flat_map(|e| e.split('{'))
        .find_map(|e| {
            let (k, v) = e.split_once(':')?;
            (k.trim() == pod).then(|| v.trim().trim_start_matches("goto ").to_string())
        })
        .map(|c| c.split_whitespace().next().unwrap_or_default().to_string())
        .expect("pod in the map")
}

fn which(tool: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    assert!(out.status.success(), "{tool} not found");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn tempfile_dir(tag: &str) -> String {
    let d = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d.display().to_string()
}
