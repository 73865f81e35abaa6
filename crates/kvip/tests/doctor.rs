//! `kvip doctor`: each finding, from a condition made in a network namespace of its own (and,
//! for the checks that need the API, the test API server), with its fix; and a healthy node
//! with no finding and exit status 0.

mod common;

use common::{KVIP, node_pair, service, write_kubeconfig};
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::{Netns, require_kernel};
use serde_json::{Value, json};

/// A healthy node: `eth0` up (its peer in another namespace), forwarding on, loose
/// reverse-path filtering.
fn node(tag: &str) -> (Netns, Netns) {
    let (ns, peer) = node_pair(tag);
    ns.sysctl("net.ipv4.ip_forward", "1").expect("sysctl");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "2")
        .expect("sysctl");
    (ns, peer)
}

/// Runs `kvip doctor --output json` in `ns` with `settings`: exit code and report.
fn doctor(ns: &Netns, settings: &[&str], kubeconfig: Option<&std::path::Path>) -> (i32, Value) {
    let mut cmd = ns.clean_env_command();
    cmd.args([
        "NODE_NAME=n1",
        "vip_interface=eth0",
        "POD_NAMESPACE=kube-system",
    ]);
    if let Some(k) = kubeconfig {
        cmd.arg(format!("k8s_config_file={}", k.display()));
    }
    cmd.args(settings)
        .args([KVIP, "doctor", "--output", "json"]);
    let out = cmd.output().expect("kvip doctor");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The findings of `check`.
fn findings<'a>(report: &'a Value, check: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .map(|f| f.iter().filter(|x| x["check"] == check).collect())
        .unwrap_or_default()
}

/// Asserts exactly the findings `checks` (in any order), each with a fix, and exit status 1.
fn expect(report: &(i32, Value), checks: &[&str], fix_contains: &str) {
    let (code, r) = report;
    let got: std::collections::BTreeSet<&str> = r["findings"]
        .as_array()
        .map(|f| f.iter().filter_map(|x| x["check"].as_str()).collect())
        .unwrap_or_default();
    let want: std::collections::BTreeSet<&str> = checks.iter().copied().collect();
    assert_eq!(got, want, "{r:#}");
    assert_eq!(*code, 1, "problems found → exit status 1");
    assert!(
        findings(r, checks[0])
            .iter()
            .any(|f| f["fix"].as_str().is_some_and(|x| x.contains(fix_contains))),
        "no fix mentioning {fix_contains:?}: {r:#}"
    );
}

#[test]
fn a_healthy_node_has_no_finding() {
    require_kernel!();
    let (ns, _peer) = node("dok");
    let (code, r) = doctor(&ns, &[], None);
    assert_eq!(r["findings"], json!([]), "{r:#}");
    assert_eq!(code, 0);
    let facts = r["facts"].to_string();
    assert!(
        facts.contains("eth0") && facts.contains("nftables"),
        "{r:#}"
    );
}

#[test]
fn vip_interface_missing_or_down() {
    require_kernel!();
    let (ns, _peer) = node("dif");
    expect(
        &doctor(&ns, &["vip_interface=eth9"], None),
        &["vip-interface"],
        "existing interface",
    );
    ns.exec_ok("ip", &["link", "set", "eth0", "down"])
        .expect("down");
    expect(
        &doctor(&ns, &[], None),
        &["vip-interface"],
        "ip link set eth0 up",
    );
}

#[test]
fn forwarding_off() {
    require_kernel!();
    let (ns, _peer) = node("dfw");
    ns.sysctl("net.ipv4.ip_forward", "0").expect("sysctl");
    expect(
        &doctor(&ns, &[], None),
        &["ip-forward"],
        "net.ipv4.ip_forward=1",
    );
}

#[test]
fn strict_reverse_path_filtering() {
    require_kernel!();
    let (ns, _peer) = node("drp");
    // The kernel applies the larger of `all` and the interface's value: 2 anywhere is loose.
    ns.sysctl("net.ipv4.conf.eth0.rp_filter", "1")
        .expect("sysctl");
    assert_eq!(doctor(&ns, &[], None).0, 0, "all=2 keeps eth0 loose");
    ns.sysctl("net.ipv4.conf.all.rp_filter", "1")
        .expect("sysctl");
    expect(&doctor(&ns, &[], None), &["rp-filter"], "rp_filter=2");
}

#[test]
fn kube_vip_leftovers() {
    require_kernel!();
    let (ns, _peer) = node("dkv");
    ns.sh("printf '*mangle\\n:KUBE-VIP-EGRESS - [0:0]\\n-A PREROUTING -j KUBE-VIP-EGRESS\\n-A KUBE-VIP-EGRESS -s 172.30.3.22/32 -j MARK --set-xmark 0x40/0x40\\nCOMMIT\\n' | iptables-nft-restore --noflush")
        .expect("kube-vip's rules");
    let r = doctor(&ns, &[], None);
    expect(&r, &["kube-vip-leftovers"], "clean-legacy");
    assert!(r.1.to_string().contains("KUBE-VIP-EGRESS"), "{:#}", r.1);
}

#[test]
fn rules_in_both_iptables_variants() {
    require_kernel!();
    let (ns, _peer) = node("dsp");
    ns.exec_ok(
        "iptables-legacy",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.9.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    )
    .expect("legacy rule");
    ns.exec_ok(
        "iptables-nft",
        &["-A", "INPUT", "-s", "10.8.0.0/16", "-j", "ACCEPT"],
    )
    .expect("nft rule");
    expect(
        &doctor(&ns, &[], None),
        &["iptables-split"],
        "update-alternatives",
    );
}

/// With kvip's nftables table: another nat chain hooked before it that masquerades. With the
/// iptables backend: a masquerade inserted above kvip's jump.
#[test]
fn a_masquerade_before_kvips_snat() {
    require_kernel!();
    let (ns, _peer) = node("dmq");
    ns.sh("nft add table inet kvip
           nft add table ip cni
           nft add chain ip cni post '{ type nat hook postrouting priority 50; }'
           nft add rule ip cni post ip saddr 10.244.0.0/16 masquerade")
        .expect("nft");
    let r = doctor(&ns, &[], None);
    expect(&r, &["masquerade-first"], "priority srcnat (100) or later");
    assert!(r.1.to_string().contains("ip cni post"), "{:#}", r.1);

    // At kvip's own priority (the order between the two is not defined), and through a jump.
    let (ns, _peer) = node("dmj");
    ns.sh("nft add table inet kvip
           nft add table ip cni
           nft add chain ip cni post '{ type nat hook postrouting priority 90; }'
           nft add chain ip cni masq
           nft add rule ip cni masq masquerade
           nft add rule ip cni post ip saddr 10.244.0.0/16 jump masq")
        .expect("nft");
    let r = doctor(&ns, &[], None);
    expect(&r, &["masquerade-first"], "priority srcnat (100) or later");
    assert!(r.1.to_string().contains("ip cni post"), "{:#}", r.1);

    let (ns, _peer) = node("dmi");
    ns.sh("iptables-nft -t nat -N KVIP-POST
           iptables-nft -t nat -A POSTROUTING -j KVIP-POST
           iptables-nft -t nat -I POSTROUTING 1 -s 10.244.0.0/16 -j MASQUERADE")
        .expect("iptables");
    // With the iptables backend the misplaced (then missing) jump is also kvip's own chain
    // out of the form it writes.
    expect(
        &doctor(&ns, &["egress_withnftables=false"], None),
        &["masquerade-first", "kvip-stray"],
        "keeps its jump first",
    );
    ns.exec_ok("iptables-nft", &["-t", "nat", "-F", "POSTROUTING"])
        .expect("flush");
    expect(
        &doctor(&ns, &["egress_withnftables=false"], None),
        &["masquerade-first", "kvip-stray"],
        "puts the jump back",
    );
}

#[test]
fn stray_objects_in_kvips_table() {
    require_kernel!();
    let (ns, _peer) = node("dst");
    ns.sh("nft add table inet kvip
           nft add set inet kvip ex4_0000000000000000 '{ type ipv4_addr; flags interval; }'")
        .expect("nft");
    expect(&doctor(&ns, &[], None), &["kvip-stray"], "next read-back");

    // kvip's base chain emptied by hand: nothing is translated, and the doctor says so.
    let (ns, _peer) = node("dsb");
    let state = "vips: [{address: 192.0.2.10, interface: eth0}]\negress:\n  - {name: a/b, vip: 192.0.2.10, sources: [10.244.1.5], exclude: [10.244.0.0/16]}\n";
    ns.sh(&format!(
        "printf '{state}' > /tmp/kvip-dsb-{pid}.yaml
         {KVIP} dataplane apply --state /tmp/kvip-dsb-{pid}.yaml >/dev/null
         rm /tmp/kvip-dsb-{pid}.yaml
         nft flush chain inet kvip postrouting",
        pid = std::process::id()
    ))
    .expect("apply, then flush the base chain");
    let r = doctor(&ns, &[], None);
    expect(&r, &["kvip-stray"], "next read-back");
    assert!(
        r.1.to_string().contains("base chain postrouting holds 0"),
        "{:#}",
        r.1
    );
}

/// With the API: no CIDR anywhere and pods denied → `cidrs` and `rbac` (through
/// SelfSubjectAccessReview); leases denied → `rbac` naming them.
#[test]
fn cidrs_and_rbac_through_the_api() {
    require_kernel!();
    let (ns, _peer) = node("dap");
    let server = ApiServer::start().expect("api server");
    server.deny("pods");
    let url = server.listen_in(&ns).expect("listen");
    let kubeconfig = write_kubeconfig("dap", &url);
    let r = doctor(&ns, &[], Some(&kubeconfig));
    expect(&r, &["cidrs", "rbac"], "egress_podcidr");
    let rbac = findings(&r.1, "rbac")[0].to_string();
    assert!(
        rbac.contains("list pods in namespace kube-system"),
        "{rbac}"
    );
    assert!(rbac.contains("kvip manifest rbac"), "{rbac}");

    let server = ApiServer::start().expect("api server");
    server.deny("leases");
    let url = server.listen_in(&ns).expect("listen");
    let kubeconfig = write_kubeconfig("dap2", &url);
    let r = doctor(
        &ns,
        &[
            "egress_podcidr=10.244.0.0/16",
            "egress_servicecidr=10.96.0.0/12",
        ],
        Some(&kubeconfig),
    );
    expect(&r, &["rbac"], "kvip manifest rbac --namespace kube-system");
    let facts = r.1["facts"].to_string();
    assert!(
        facts.contains("10.244.0.0/16 (from config)")
            && facts.contains("10.96.0.0/12 (from config)"),
        "the CIDRs and where they came from: {facts}"
    );
    assert!(
        r.1.to_string().contains("leases.coordination.k8s.io"),
        "{:#}",
        r.1
    );
    let _ = std::fs::remove_file(kubeconfig);
}

/// The node holds the Lease but the kernel holds nothing (no agent is running): the state
/// differs. With the Lease another node's, this node should hold nothing: no finding.
#[test]
fn kernel_state_differs_from_what_the_node_should_hold() {
    require_kernel!();
    let (ns, _peer) = node("dsd");
    let server = ApiServer::start().expect("api server");
    let url = server.listen_in(&ns).expect("listen");
    let kubeconfig = write_kubeconfig("dsd", &url);
    let (rt, client) = server.runtime_and_client();
    let lease = |holder: &str| -> k8s_openapi::api::coordination::v1::Lease {
        let now = k8s_openapi::jiff::Timestamp::now();
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "plndr-svcs-lock", "namespace": "kube-system"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600,
                     "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}
        }))
        .expect("lease")
    };
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-system");
    rt.block_on(async {
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
            .create(&PostParams::default(), &service(false))
            .await
            .expect("service");
        leases
            .create(&PostParams::default(), &lease("n2"))
            .await
            .expect("lease");
    });
    let cidrs = [
        "egress_podcidr=10.244.0.0/16",
        "egress_servicecidr=10.96.0.0/12",
    ];
    let (code, r) = doctor(&ns, &cidrs, Some(&kubeconfig));
    assert_eq!((code, &r["findings"]), (0, &json!([])), "{r:#}");
    rt.block_on(async {
        let cur = leases.get("plndr-svcs-lock").await.expect("get");
        let mut next = lease("n1");
        next.metadata.resource_version = cur.metadata.resource_version;
        leases
            .replace("plndr-svcs-lock", &PostParams::default(), &next)
            .await
            .expect("replace");
    });
    let r = doctor(&ns, &cidrs, Some(&kubeconfig));
    expect(&r, &["state-differs"], "the agent runs on this node");
    assert!(
        r.1.to_string().contains("should be [192.0.2.10]"),
        "{:#}",
        r.1
    );
    let _ = std::fs::remove_file(kubeconfig);
}
