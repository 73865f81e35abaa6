//! The real `kvip run` process in a node namespace against the test API server: a Service's
//! VIP and egress appear, follow endpoint changes (kube-vip's cause 2), go with the annotation
//! or the Service, and SIGTERM leaves nothing behind and releases the Lease (cause 3).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kvip_testkit::apiserver::ApiServer;
use kvip_testkit::require_kernel;
use serde_json::json;

#[test]
fn agent_follows_the_cluster_and_leaves_nothing_on_sigterm() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("agt");
    // kube-vip's cause 1: pods in kube-system may not be listed, but the CIDRs are
    // configured: those are excluded (asserted below), and nothing is asked or guessed.
    server.deny("pods");
    let mut agent = start_agent(&ns, &url, "a");

    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    // A Service with bad annotations next to it: a Warning Event naming the annotation and
    // value; the good Service is unaffected.
    let mut bad = service(true);
    bad.metadata.name = Some("bad".into());
    if let Some(a) = bad.metadata.annotations.as_mut() {
        // An IPv6 VIP without egress-ipv6: no IPv6 egress, and a warning saying so.
        a.insert(
            "kube-vip.io/loadbalancerIPs".into(),
            "192.0.2.11,2001:db8::11".into(),
        );
        a.insert(
            "kube-vip.io/egress-destination-ports".into(),
            "tcp:99999,tcp:443".into(),
        );
        a.insert(
            "kube-vip.io/egress-denied-networks".into(),
            "300.1.1.1/8".into(),
        );
    }
    // With a ready endpoint here, so this node holds it and plans its egress.
    let bad_slice = {
        let mut sl = slice("10.244.1.9");
        sl.metadata.name = Some("bad-1".into());
        if let Some(l) = sl.metadata.labels.as_mut() {
            l.insert("kubernetes.io/service-name".into(), "bad".into());
        }
        sl
    };
    rt.block_on(async {
        services
            .create(&PostParams::default(), &bad)
            .await
            .expect("bad service");
        slices
            .create(&PostParams::default(), &bad_slice)
            .await
            .expect("bad slice");
    });
    until("VIP and egress", &agent, Duration::from_secs(15), || {
        let r = rules(&ns);
        has_vip(&ns) && r.contains("10.244.1.5 : goto") && r.contains("10.244.1.9 : goto")
    });
    let r = rules(&ns);
    // The holder writes the VIP into the Service's status and kube-vip's annotations.
    let published = |pod: &str| {
        server
            .object("v1", "services", "default", "web")
            .is_some_and(|svc| {
                svc["status"]["loadBalancer"]["ingress"] == json!([{"ip": "192.0.2.10"}])
                    && svc["metadata"]["annotations"]["kube-vip.io/vipHost"] == "n1"
                    && svc["metadata"]["annotations"]["kube-vip.io/active-endpoint"] == pod
            })
    };
    until(
        "status and annotations",
        &agent,
        Duration::from_secs(5),
        || published("10.244.1.5"),
    );
    let metrics = http_get(&ns, "/metrics");
    for line in [
        "kvip_vips_held 3",
        "kvip_egress_pods 2",
        "kvip_leader_transitions_total 1",
    ] {
        assert!(
            metrics.contains(line),
            "/metrics lacks {line:?}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("kvip_cidr_source{kind=\"pod\",source=\"config\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kvip_sync_duration_seconds_count{mode=\"full\"}"),
        "{metrics}"
    );
    assert!(
        http_get(&ns, "/readyz").starts_with("HTTP/1.0 200"),
        "ready after the first sync"
    );
    assert!(http_get(&ns, "/healthz").starts_with("HTTP/1.0 200"));
    let events = |server: &ApiServer| -> Vec<(String, String, String, String)> {
        server
            .objects("events.k8s.io/v1", "events", "default")
            .iter()
            .map(|e| {
                let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                (
                    s(&e["regarding"]["name"]),
                    s(&e["type"]),
                    s(&e["reason"]),
                    s(&e["note"]),
                )
            })
            .collect()
    };
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "CALLS {:?}",
        server
            .calls()
            .iter()
            .filter(|c| c.resource.contains("event"))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "EVENTS {:?}",
        server.objects("events.k8s.io/v1", "events", "default")
    );
    until("events", &agent, Duration::from_secs(5), || {
        let ev = events(&server);
        ev.iter().any(|e| e.0 == "web" && e.2 == "VIPAcquired")
            && ev
                .iter()
                .any(|e| e.0 == "web" && e.2 == "EgressApplied" && e.3.starts_with("1 pod"))
            && ev.iter().any(|e| {
                e.0 == "bad"
                    && e.1 == "Warning"
                    && e.2 == "InvalidAnnotation"
                    && e.3.contains("tcp:99999")
            })
            && ev
                .iter()
                .any(|e| e.0 == "bad" && e.2 == "InvalidAnnotation" && e.3.contains("300.1.1.1/8"))
            && ev.iter().any(|e| {
                e.0 == "bad"
                    && e.1 == "Warning"
                    && e.3.contains("2001:db8::11")
                    && e.3.contains("egress-ipv6")
            })
    });
    assert!(
        !events(&server)
            .iter()
            .any(|e| e.0 == "web" && e.1 == "Warning"),
        "the good Service has no warning: {:?}",
        events(&server)
    );
    // The good Service keeps its VIP and egress; the bad one gets what is valid of it: its
    // IPv4 egress (the bad port and network dropped).
    let r2 = rules(&ns);
    assert!(has_vip(&ns) && r2.contains("10.244.1.5 : goto"), "{r2}");
    assert!(r2.contains("10.244.1.9 : goto"), "{r2}");
    rt.block_on(async {
        services
            .delete("bad", &DeleteParams::default())
            .await
            .expect("delete bad");
    });
    assert!(
        r.contains("10.96.0.0/12") && r.contains("10.244.0.0/16"),
        "configured CIDRs excluded:\n{r}"
    );

    // The endpoint pod is replaced while the leader stays (kube-vip's cause 2).
    set_web_pod(&rt, &slices, "10.244.1.7");
    until("replaced pod", &agent, Duration::from_secs(5), || {
        let r = rules(&ns);
        r.contains("10.244.1.7 : goto") && !r.contains("10.244.1.5")
    });
    until(
        "active endpoint follows",
        &agent,
        Duration::from_secs(5),
        || published("10.244.1.7"),
    );

    // Egress annotation removed: egress goes, the VIP stays.
    rt.block_on(put(&services, "web", service(false)));
    until("egress removed", &agent, Duration::from_secs(5), || {
        !rules(&ns).contains("table inet kvip")
    });
    assert!(has_vip(&ns), "the VIP stays without egress");

    // Service deleted: the VIP goes.
    rt.block_on(async {
        services
            .delete("web", &DeleteParams::default())
            .await
            .expect("delete");
    });
    until("VIP removed", &agent, Duration::from_secs(5), || {
        !has_vip(&ns)
    });

    // Back, then SIGTERM: nothing of kvip's left, the Lease released, exit 0 (cause 3).
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(true))
            .await
            .expect("service");
    });
    until(
        "VIP and egress again",
        &agent,
        Duration::from_secs(5),
        || has_vip(&ns) && rules(&ns).contains("10.244.1.7 : goto"),
    );
    let lease = server
        .object(
            "coordination.k8s.io/v1",
            "leases",
            "kube-system",
            "plndr-svcs-lock",
        )
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "n1");
    let pid = agent.child.id().to_string();
    let start = Instant::now();
    // `ip netns exec` execs `env`, which execs kvip: the child's pid is kvip's.
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = loop {
        if let Some(s) = agent.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit within 10 s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    // One cancellation root: every task, the libraries' included, ended before the exit.
    let log = agent.log();
    let done = log
        .lines()
        .find(|l| l.contains("shutdown complete"))
        .unwrap_or_else(|| panic!("no shutdown line:\n{log}"));
    assert!(
        done.contains("tasks_alive=0") && done.contains("leases_not_released=0"),
        "{done}"
    );
    assert!(!rules(&ns).contains("kvip"), "rules left:\n{}", rules(&ns));
    assert!(!has_vip(&ns), "VIP left");
    let lease = server
        .object(
            "coordination.k8s.io/v1",
            "leases",
            "kube-system",
            "plndr-svcs-lock",
        )
        .expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "", "lease released");

    // Every call the agent made is allowed by `kvip manifest rbac`, and the RBAC allows
    // nothing the agent never called.
    let used = used_permissions(&server, 1);
    let granted = granted_permissions(false, false);
    let not_granted: Vec<_> = used.difference(&granted).collect();
    let never_used: Vec<_> = granted.difference(&used).collect();
    assert!(
        not_granted.is_empty(),
        "calls the RBAC does not allow: {not_granted:?}"
    );
    assert!(
        never_used.is_empty(),
        "permissions never used: {never_used:?}"
    );
}

/// Three agents, one per node namespace, one global Lease: exactly one node holds the VIP;
/// SIGKILL of the holder hands it over within lease duration + retry period (+ the debounce and
/// a sync); the killed node, restarted, removes its stale VIP; SIGTERM hands over in under 2 s.
#[test]
fn three_agents_one_holder_and_failover() {
    require_kernel!();
    let (server, nodes, _peers, urls) = nodes_with_api("fo", 3);
    let mut agents: Vec<Option<Agent>> = (0..3)
        .map(|i| {
            Some(start_agent_as(
                &nodes[i],
                &urls[i],
                &format!("fo{i}"),
                &format!("n{i}"),
            ))
        })
        .collect();
    let (rt, services, _) = api(&server);
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(false))
            .await
            .expect("service");
    });
    let log = |agents: &[Option<Agent>]| logs(agents.iter().flatten());
    let wait_for = |what: &str,
                    agents: &[Option<Agent>],
                    limit: Duration,
                    f: &dyn Fn(&[usize]) -> bool|
     -> Duration {
        wait_until(
            what,
            limit,
            || format!("holders {:?}\n{}", holders(&nodes), log(agents)),
            || f(&holders(&nodes)),
        )
    };
    wait_for("a first holder", &agents, Duration::from_secs(15), &|h| {
        h.len() == 1
    });
    // Stable: exactly one holder throughout.
    let start = Instant::now();
    let first = holders(&nodes)[0];
    while start.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            holders(&nodes),
            vec![first],
            "exactly one holder\n{}",
            log(&agents)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGKILL the holder: its VIP leaves its (dead) node by itself; another node takes over.
    if let Some(a) = agents[first].as_mut() {
        a.sigkill();
    }
    let took = wait_for(
        "takeover after SIGKILL",
        &agents,
        Duration::from_secs(10),
        &|h| h.iter().any(|i| *i != first),
    );
    assert!(
        took <= Duration::from_millis(4000 + 1000 + 1500),
        "takeover after SIGKILL took {took:?}"
    );
    let second = *holders(&nodes)
        .iter()
        .find(|i| **i != first)
        .expect("second holder");

    // The killed node comes back: its first sync removes the stale VIP (it does not lead).
    agents[first] = Some(start_agent_as(
        &nodes[first],
        &urls[first],
        &format!("fo{first}b"),
        &format!("n{first}"),
    ));
    wait_for(
        "stale VIP removed",
        &agents,
        Duration::from_secs(10),
        &|h| h == [second],
    );

    // SIGTERM the holder: it releases the Lease, another takes over in under 2 s.
    let start = Instant::now();
    if let Some(a) = agents[second].as_mut() {
        Command::new("kill")
            .args(["-TERM", &a.child.id().to_string()])
            .status()
            .expect("kill");
    }
    let took = wait_for(
        "takeover after SIGTERM",
        &agents,
        Duration::from_secs(10),
        &|h| h.len() == 1 && h[0] != second,
    );
    assert!(
        took < Duration::from_secs(2),
        "takeover after SIGTERM took {took:?}"
    );
    if let Some(a) = agents[second].as_mut() {
        let status = a.child.wait().expect("wait");
        assert!(status.success(), "exit status {status}");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A holder cut off from the API drops its VIP before its lease can expire for anyone else
/// (invariant 6), and holds it again once the API is back; dropped watches and expired
/// history do not stop the agent from following changes.
#[test]
fn agent_survives_api_faults_and_steps_down_when_cut_off() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("flt");
    let mut agent = start_agent(&ns, &url, "flt");
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    until("held", &agent, Duration::from_secs(15), || {
        has_vip(&ns) && rules(&ns).contains("10.244.1.5 : goto")
    });

    // Watches dropped, then history expired: changes still arrive.
    for (i, fault) in ["drop", "expire"].iter().enumerate() {
        match *fault {
            "drop" => server.drop_watches(),
            _ => server.expire_history(),
        }
        let pod = format!("10.244.1.{}", 20 + i);
        set_web_pod(&rt, &slices, &pod);
        until(
            &format!("change after {fault}"),
            &agent,
            Duration::from_secs(10),
            || rules(&ns).contains(&format!("{pod} : goto")),
        );
    }

    // Cut off: every call answers 500 for 30 s. The VIP and the egress rules go within the
    // renew deadline (2 s) plus a sync, before the 4 s lease could expire for another node.
    let cut = Instant::now();
    server.fail_for(Duration::from_secs(30));
    until("stepped down", &agent, Duration::from_secs(5), || {
        !has_vip(&ns) && !rules(&ns).contains("kvip")
    });
    let took = cut.elapsed();
    assert!(
        took < Duration::from_millis(2700),
        "dropped the VIP after {took:?}: later than the renew deadline allows"
    );
    until(
        "held again after the outage",
        &agent,
        Duration::from_secs(45),
        || has_vip(&ns) && rules(&ns).contains("10.244.1.21 : goto"),
    );
    assert!(cut.elapsed() >= Duration::from_secs(30));
    // And it follows changes again, without a restart.
    set_web_pod(&rt, &slices, "10.244.1.30");
    until(
        "converged after the outage",
        &agent,
        Duration::from_secs(10),
        || {
            let r = rules(&ns);
            r.contains("10.244.1.30 : goto") && !r.contains("10.244.1.21")
        },
    );
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent kept running through the outage"
    );
}

/// kube-vip's cause 1: the agent may not list pods in kube-system and no CIDR is configured.
/// Discovery tries every source, names the missing permission, guesses nothing: egress is
/// refused with a Warning Event while the VIP keeps working.
#[test]
fn denied_discovery_refuses_egress_and_keeps_the_vip() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("dsc");
    server.deny("pods");
    let agent = start_agent_with(&ns, &url, "dsc", "n1", false);
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    until("VIP held", &agent, Duration::from_secs(15), || has_vip(&ns));
    let refused = || {
        server
            .objects("events.k8s.io/v1", "events", "default")
            .iter()
            .any(|e| {
                e["reason"] == "EgressRefused"
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("nothing is guessed"))
            })
    };
    until(
        "EgressRefused event",
        &agent,
        Duration::from_secs(5),
        refused,
    );
    assert!(
        !rules(&ns).contains("table inet kvip"),
        "no egress rule with guessed CIDRs:\n{}",
        rules(&ns)
    );
    assert!(
        agent.log().contains("list pods in kube-system"),
        "the missing permission is named:\n{}",
        agent.log()
    );
    // The discovery permissions the RBAC grants are exactly those discovery used.
    let used = used_permissions(&server, 1);
    let discovery_only: Vec<_> = granted_permissions(true, false)
        .difference(&granted_permissions(false, false))
        .cloned()
        .collect();
    for p in &discovery_only {
        assert!(used.contains(p), "discovery never used {p:?}");
    }
    let granted = granted_permissions(true, false);
    let not_granted: Vec<_> = used.difference(&granted).collect();
    assert!(
        not_granted.is_empty(),
        "calls the RBAC does not allow: {not_granted:?}"
    );
}

/// `svc_election`: one Lease per Service. An egress Service is held by the node with its
/// ready endpoint (only it competes); when the endpoint moves, the old holder releases and the
/// new node takes over. A plain Service is held by exactly one node.
#[test]
fn per_service_election_follows_local_endpoints() {
    require_kernel!();
    let (server, nodes, _peers, urls) = nodes_with_api("ps", 3);
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let url = &urls[i];
            start_agent_full(
                &nodes[i],
                url,
                &format!("ps{i}"),
                &format!("n{i}"),
                true,
                true,
            )
        })
        .collect();
    let log = || logs(&agents);
    let (rt, services, slices) = api(&server);
    rt.block_on(async {
        services
            .create(
                &PostParams::default(),
                &named_service("eg", "192.0.2.21", true),
            )
            .await
            .expect("svc");
        slices
            .create(
                &PostParams::default(),
                &named_slice("eg", "10.244.1.5", "n2"),
            )
            .await
            .expect("slice");
        services
            .create(
                &PostParams::default(),
                &named_service("plain", "192.0.2.22", false),
            )
            .await
            .expect("svc");
    });
    let wait = |what: &str, limit: Duration, f: &dyn Fn() -> bool| {
        wait_until(what, limit, log, f);
    };
    wait(
        "egress Service held by the endpoint's node",
        Duration::from_secs(15),
        &|| holders_of(&nodes, "192.0.2.21") == [2],
    );
    wait(
        "plain Service held by one node",
        Duration::from_secs(15),
        &|| holders_of(&nodes, "192.0.2.22").len() == 1,
    );
    assert!(
        nodes[2]
            .exec_ok("nft", &["list", "ruleset"])
            .unwrap_or_default()
            .contains("10.244.1.5 : goto")
    );
    let lease = server
        .object("coordination.k8s.io/v1", "leases", "default", "kubevip-eg")
        .expect("per-Service lease");
    assert_eq!(lease["spec"]["holderIdentity"], "n2");
    // The endpoint moves to n0: n2 is no longer a candidate and releases; n0 takes over.
    rt.block_on(async {
        let cur = slices.get("eg-1").await.expect("get");
        let mut next = named_slice("eg", "10.244.1.6", "n0");
        next.metadata.resource_version = cur.metadata.resource_version;
        slices
            .replace("eg-1", &PostParams::default(), &next)
            .await
            .expect("replace");
    });
    let start = Instant::now();
    // The old holder removes its VIP before it releases the Lease: never two holders.
    wait(
        "handover to the endpoint's new node",
        Duration::from_secs(10),
        &|| {
            let h = holders_of(&nodes, "192.0.2.21");
            assert!(h.len() <= 1, "two holders during the handover: {h:?}");
            h == [0]
        },
    );
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "handover took {:?}",
        start.elapsed()
    );
    assert!(
        !nodes[2]
            .exec_ok("nft", &["list", "ruleset"])
            .unwrap_or_default()
            .contains("kvip")
    );
    assert_eq!(
        holders_of(&nodes, "192.0.2.22").len(),
        1,
        "the plain Service still has exactly one holder"
    );
    // `kvip manifest rbac --svc-election` allows every call the three agents made.
    let granted = granted_permissions(false, true);
    for listener in 1..=3 {
        let used = used_permissions(&server, listener);
        let not_granted: Vec<_> = used.difference(&granted).collect();
        assert!(
            not_granted.is_empty(),
            "agent {listener} made calls the RBAC does not allow: {not_granted:?}"
        );
    }
}

/// Real packets with real agents: two nodes (each an egress lab: pod, node with a CNI-like
/// masquerade, external host), one egress Service with a ready endpoint on each. The holder's
/// pod leaves with the VIP, the other node's pod with its node address; after the holder's
/// SIGTERM the other node takes over and its pod leaves with the VIP.
#[test]
fn holder_pod_egresses_with_the_vip_and_the_other_with_the_node_address() {
    use kvip_testkit::lab::{EXT4, EgressLab, NODE4, VIP4};
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    let labs: Vec<EgressLab> = (0..2)
        .map(|i| EgressLab::new(&format!("pk{i}"), true).expect("lab"))
        .collect();
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| {
            let url = server.listen_in(&labs[i].node).expect("listen");
            start_agent_as(&labs[i].node, &url, &format!("pk{i}"), &format!("n{i}"))
        })
        .collect();
    let log = |agents: &[Agent]| logs(agents);
    let (rt, services, slices) = api(&server);
    let mut both = slice("10.244.1.5");
    let mut second = both.endpoints[0].clone();
    second.node_name = Some("n1".into());
    both.endpoints[0].node_name = Some("n0".into());
    both.endpoints.push(second);
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(true))
            .await
            .expect("service");
        slices
            .create(&PostParams::default(), &both)
            .await
            .expect("slice");
    });
    let seen = |i: usize| labs[i].seen_tcp(EXT4, 8080).ok();
    let start = Instant::now();
    let holder = loop {
        let vip_on: Vec<usize> = (0..2).filter(|i| has_vip(&labs[*i].node)).collect();
        if vip_on.len() == 1 && seen(vip_on[0]) == Some(VIP4) {
            break vip_on[0];
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no holder egressing with the VIP\n{}",
            log(&agents)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let other = 1 - holder;
    assert_eq!(
        seen(other),
        Some(NODE4),
        "the non-holder's pod leaves with its node address"
    );
    Command::new("kill")
        .args(["-TERM", &agents[holder].child.id().to_string()])
        .status()
        .expect("kill");
    let status = agents[holder].child.wait().expect("wait");
    assert!(status.success(), "exit status {status}\n{}", log(&agents));
    let start = Instant::now();
    while seen(other) != Some(VIP4) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no takeover\n{}",
            log(&agents)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The stopped node's pod is masqueraded again, at once: the SIGTERM (sent as soon as the
    // VIP was seen, possibly in the middle of the agent's first sync) ran the teardown.
    assert_eq!(
        seen(holder),
        Some(NODE4),
        "the stopped node's pod still leaves with the VIP\n{}",
        log(&agents)
    );
    agents.clear();
}

/// kube-vip's cause 4: its teardown deleted rule by rule and stopped at the first rule already
/// missing. Here parts of kvip's state are removed by hand before SIGTERM — the VIP address,
/// and the pod's map element (nftables) or the jump from POSTROUTING, the pod's rule and the
/// SNAT rules (iptables) — and the shutdown still removes all the rest and exits 0.
#[test]
fn teardown_goes_on_past_state_removed_by_hand() {
    require_kernel!();
    for (i, nftables) in [true, false].into_iter().enumerate() {
        let (ns, _peer, server, url) = node_with_api(&format!("td{i}"));
        let backend = format!("egress_withnftables={nftables}");
        let mut agent =
            start_agent_env(&ns, &url, &format!("td{i}"), "n1", true, false, &[&backend]);
        let (rt, services, slices) = api(&server);
        create_web(&rt, &services, &slices, "10.244.1.5");
        until("held", &agent, Duration::from_secs(15), || {
            has_vip(&ns) && kvip_state(&ns).contains("10.244.1.5")
        });
        ns.exec_ok("ip", &["addr", "del", "192.0.2.10/32", "dev", "eth0"])
            .expect("VIP removed by hand");
        if nftables {
            ns.exec_ok(
                "nft",
                &[
                    "delete",
                    "element",
                    "inet",
                    "kvip",
                    "src4",
                    "{ 10.244.1.5 }",
                ],
            )
            .expect("element removed by hand");
        } else {
            let variant = if agent.log().contains("iptables-legacy") {
                "legacy"
            } else {
                "nft"
            };
            let ipt = format!("iptables-{variant}");
            let save = ns
                .exec_ok(&format!("iptables-{variant}-save"), &["-t", "nat"])
                .expect("save");
            let mut removed = 0;
            for line in save.lines() {
                let by_hand = line.starts_with("-A POSTROUTING -j KVIP-POST")
                    || (line.starts_with("-A KVIP-POST") && line.contains("10.244.1.5"));
                if by_hand {
                    let mut args = vec!["-t", "nat", "-D"];
                    args.extend(line.split_whitespace().skip(1));
                    ns.exec_ok(&ipt, &args).expect("rule removed by hand");
                    removed += 1;
                }
                if let Some(chain) = line
                    .strip_prefix(":KVIP-S-")
                    .and_then(|c| c.split_whitespace().next())
                {
                    ns.exec_ok(&ipt, &["-t", "nat", "-F", &format!("KVIP-S-{chain}")])
                        .expect("chain flushed by hand");
                    removed += 1;
                }
            }
            assert_eq!(removed, 3, "jump, pod rule, SNAT chain:\n{save}");
        }
        let left = kvip_state(&ns);
        assert!(!left.is_empty(), "some of kvip's state is still there");
        let (status, _) = sigterm(&mut agent, Duration::from_secs(10));
        assert!(status.success(), "exit status {status}:\n{}", agent.log());
        assert_eq!(
            kvip_state(&ns),
            "",
            "left after teardown (was:\n{left})\n{}",
            agent.log()
        );
    }
}

/// `svc_election` with three agents and an egress Service with a ready endpoint on every
/// node: exactly one holder at every check; SIGKILL of the holder → another node holds the
/// VIP and translates its own pod within lease duration + retry period (+ a sync); the killed
/// node, restarted, removes its stale VIP and rules at its first sync; SIGTERM → takeover in
/// under 2 s.
#[test]
fn per_service_leases_fail_over_on_sigkill_and_sigterm() {
    require_kernel!();
    let (server, nodes, _peers, urls) = nodes_with_api("pf", 3);
    let start_node = |i: usize, tag: &str| {
        start_agent_full(&nodes[i], &urls[i], tag, &format!("n{i}"), true, true)
    };
    let mut agents: Vec<Agent> = (0..3).map(|i| start_node(i, &format!("pf{i}"))).collect();
    let (rt, services, slices) = api(&server);
    let mut all = slice("10.244.0.5");
    all.endpoints = (0..3)
        .map(|i| {
            let mut e = all.endpoints[0].clone();
            e.addresses = vec![format!("10.244.{i}.5")];
            e.node_name = Some(format!("n{i}"));
            e
        })
        .collect();
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(true))
            .await
            .expect("service");
        slices
            .create(&PostParams::default(), &all)
            .await
            .expect("slice");
    });
    let log = |agents: &[Agent]| logs(agents);
    // The one holder, once it holds the VIP and translates its own pod (and nobody else
    // holds anything).
    let holder = || -> Option<usize> {
        let h = holders(&nodes);
        let translating: Vec<usize> = (0..3)
            .filter(|i| rules(&nodes[*i]).contains("table inet kvip"))
            .collect();
        (h.len() == 1
            && translating == h
            && rules(&nodes[h[0]]).contains(&format!("10.244.{}.5 : goto", h[0])))
        .then(|| h[0])
    };
    let wait = |what: &str, agents: &[Agent], limit: Duration, f: &dyn Fn() -> bool| {
        wait_until(
            what,
            limit,
            || format!("holders {:?}\n{}", holders(&nodes), log(agents)),
            f,
        )
    };
    wait("a first holder", &agents, Duration::from_secs(15), &|| {
        holder().is_some()
    });
    let first = holder().expect("holder");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(holders(&nodes).len() <= 1, "two holders\n{}", log(&agents));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        holder(),
        Some(first),
        "stable: holders {:?}, tables {:?}\n{}",
        holders(&nodes),
        (0..3)
            .filter(|i| rules(&nodes[*i]).contains("table inet kvip"))
            .collect::<Vec<_>>(),
        log(&agents)
    );
    // Held all along: its lifetime never ran out between renewals.
    let metrics = http_get(&nodes[first], "/metrics");
    assert!(
        metrics.contains("kvip_vip_lifetime_lapsed_total 0"),
        "{metrics}\n{}",
        log(&agents)
    );
    let lease = server
        .object("coordination.k8s.io/v1", "leases", "default", "kubevip-web")
        .expect("the Service's lease");
    assert_eq!(lease["spec"]["holderIdentity"], format!("n{first}"));

    // SIGKILL: the dead node's VIP leaves by itself; another node takes over within lease duration (4
    // s) + retry period (1 s), plus the debounce and a sync.
    agents[first].sigkill();
    let took = wait(
        "takeover after SIGKILL",
        &agents,
        Duration::from_secs(10),
        &|| {
            (0..3).any(|i| {
                i != first
                    && has_vip(&nodes[i])
                    && rules(&nodes[i]).contains(&format!("10.244.{i}.5 : goto"))
            })
        },
    );
    assert!(
        took <= Duration::from_millis(4000 + 1000 + 500),
        "takeover after SIGKILL took {took:?}"
    );
    let second = (0..3)
        .find(|i| *i != first && has_vip(&nodes[*i]))
        .expect("second holder");

    // The killed node restarts: its first sync removes the stale VIP and rules.
    agents[first] = start_node(first, &format!("pf{first}b"));
    wait(
        "stale state removed",
        &agents,
        Duration::from_secs(10),
        &|| holder() == Some(second),
    );

    // SIGTERM the holder: kernel state removed, then the Lease released: takeover < 2 s.
    let start = Instant::now();
    let (status, _) = sigterm(&mut agents[second], Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    wait(
        "takeover after SIGTERM",
        &agents,
        Duration::from_secs(10),
        &|| holder().is_some_and(|h| h != second),
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "takeover after SIGTERM took {took:?}"
    );
}

/// What an earlier run left is stale the moment a new agent starts (it holds no Lease yet):
/// the new agent removes it at once, even while the API is unreachable, and a SIGTERM during
/// that startup stops it cleanly.
#[test]
fn startup_clears_stale_state_without_the_api_and_stops_on_sigterm() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("stl");
    let mut first = start_agent(&ns, &url, "stl");
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    until("held", &first, Duration::from_secs(15), || {
        has_vip(&ns) && rules(&ns).contains("10.244.1.5 : goto")
    });
    first.sigkill();
    assert!(!kvip_state(&ns).is_empty(), "SIGKILL leaves the state");

    // Nothing listens on this port in the node's namespace: the API is unreachable.
    let mut second = start_agent(&ns, "http://127.0.0.1:9", "stl2");
    until(
        "stale state cleared",
        &second,
        Duration::from_secs(3),
        || kvip_state(&ns).is_empty(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let (status, took) = sigterm(&mut second, Duration::from_secs(5));
    assert!(status.success(), "exit status {status}:\n{}", second.log());
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert!(
        second.log().contains("shutdown complete"),
        "{}",
        second.log()
    );
    assert_eq!(kvip_state(&ns), "");
}

/// `shutdown_timeout` bounds the exit even when the API hangs and a renewal is in flight
/// with a 10 s retry period: kernel state removed first, the Lease release abandoned at the
/// deadline (the Lease then expires), exit 0.
#[test]
fn shutdown_timeout_bounds_the_exit_when_the_api_hangs() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("sdt");
    let mut agent = start_agent_env(
        &ns,
        &url,
        "sdt",
        "n1",
        true,
        false,
        &[
            "vip_leaseduration=30",
            "vip_renewdeadline=20",
            "vip_retryperiod=10",
            "shutdown_timeout=2",
        ],
    );
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    until("held", &agent, Duration::from_secs(15), || {
        has_vip(&ns) && rules(&ns).contains("10.244.1.5 : goto")
    });
    server.stall(Duration::from_secs(60));
    // Let a renewal start and hang.
    std::thread::sleep(Duration::from_millis(500));
    let (status, took) = sigterm(&mut agent, Duration::from_secs(8));
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    assert!(
        took < Duration::from_millis(2800),
        "exit took {took:?} with shutdown_timeout=2\n{}",
        agent.log()
    );
    assert_eq!(kvip_state(&ns), "", "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("leases_not_released=1"),
        "the hanging release is reported:\n{log}"
    );
}

/// The watch of this node's Node: labelled `node.kubernetes.io/exclude-from-external-load-
/// balancers`, the holder stops competing, releases the Lease and drops its VIP; another node
/// takes over. The label removed, the node competes again without taking the VIP back.
#[test]
fn a_node_excluded_from_load_balancers_hands_its_vips_over() {
    use k8s_openapi::api::core::v1::Node;
    require_kernel!();
    let (server, nodes, _peers, urls) = nodes_with_api("ex", 2);
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            let url = &urls[i];
            start_agent_as(&nodes[i], url, &format!("ex{i}"), &format!("n{i}"))
        })
        .collect();
    let log = || logs(&agents);
    let (rt, services, _) = api(&server);
    let node_api: Api<Node> = {
        let _in = rt.enter();
        Api::all(server.client())
    };
    let set_excluded = |name: &str, excluded: bool| {
        let labels = if excluded {
            json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"})
        } else {
            json!({})
        };
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("node");
        rt.block_on(async {
            match node_api.get_opt(name).await.expect("get node") {
                None => {
                    node_api
                        .create(&PostParams::default(), &node)
                        .await
                        .expect("create node");
                }
                Some(cur) => {
                    let mut next = node;
                    next.metadata.resource_version = cur.metadata.resource_version;
                    node_api
                        .replace(name, &PostParams::default(), &next)
                        .await
                        .expect("replace node");
                }
            }
        });
    };
    set_excluded("n0", false);
    set_excluded("n1", false);
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(false))
            .await
            .expect("service");
    });
    let wait = |what: &str, limit: Duration, f: &dyn Fn() -> bool| wait_until(what, limit, log, f);
    wait("a holder", Duration::from_secs(15), &|| {
        holders(&nodes).len() == 1
    });
    let first = holders(&nodes)[0];
    set_excluded(&format!("n{first}"), true);
    let took = wait(
        "handover from the excluded node",
        Duration::from_secs(10),
        &|| holders(&nodes) == [1 - first],
    );
    assert!(took < Duration::from_secs(3), "handover took {took:?}");
    // The label removed: it competes again, but the holder keeps its Lease (no flapping).
    set_excluded(&format!("n{first}"), false);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(holders(&nodes), [1 - first], "no flapping back");
    assert!(
        agents[first]
            .log()
            .contains("exclusion from load balancing changed"),
        "{}",
        log()
    );
}

/// kvip's objects changed by hand are repaired and each repair counted by kind: a VIP removed
/// (added back by the next sync or read-back), a pod's element removed, the whole table
/// deleted (found by the periodic read-back, `resync_period`).
#[test]
fn resync_repairs_drift_and_counts_it_by_kind() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("dft");
    let agent = start_agent_env(&ns, &url, "dft", "n1", true, false, &["resync_period=1"]);
    let (rt, services, slices) = api(&server);
    // Two pods: removing one element leaves the policy's rules in place.
    let mut two = slice("10.244.1.5");
    let mut second = two.endpoints[0].clone();
    second.addresses = vec!["10.244.1.6".into()];
    two.endpoints.push(second);
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(true))
            .await
            .expect("service");
        slices
            .create(&PostParams::default(), &two)
            .await
            .expect("slice");
    });
    let held = || {
        let r = rules(&ns);
        has_vip(&ns) && r.contains("10.244.1.5 : goto") && r.contains("10.244.1.6 : goto")
    };
    until("held", &agent, Duration::from_secs(15), held);
    // Settled: the writes to the Service (status, annotations) have come back as events.
    std::thread::sleep(Duration::from_millis(500));
    let repairs = |kind: &str| -> u64 {
        let m = http_get(&ns, "/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("kvip_drift_repairs_total{{kind=\"{kind}\"}} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    for (what, kind, by_hand) in [
        (
            "VIP removed",
            "address",
            &["ip", "addr", "del", "192.0.2.10/32", "dev", "eth0"][..],
        ),
        (
            "element removed",
            "set_element",
            &[
                "nft",
                "delete",
                "element",
                "inet",
                "kvip",
                "src4",
                "{ 10.244.1.5 }",
            ][..],
        ),
        (
            "table deleted",
            "rule",
            &["nft", "delete", "table", "inet", "kvip"][..],
        ),
    ] {
        let before = repairs(kind);
        ns.exec_ok(by_hand[0], &by_hand[1..]).expect(what);
        // (Any sync adds a missing VIP back at once; the read-back finds the rest.)
        until(
            &format!("{what}: repaired"),
            &agent,
            Duration::from_secs(4),
            held,
        );
        until(
            &format!("{what}: counted"),
            &agent,
            Duration::from_secs(2),
            || repairs(kind) > before,
        );
    }
    let m = http_get(&ns, "/metrics");
    let value = |name: &str| -> Option<i64> {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    let (seen, realised) = (
        value("kvip_generation_observed"),
        value("kvip_generation_realised"),
    );
    assert!(
        seen.is_some_and(|g| g > 0) && seen == realised,
        "in sync: observed {seen:?}, realised {realised:?}\n{m}"
    );
}

/// The holder repeats its announcements every `vip_arpRate` ms, seen on the other end of the
/// link; with `vip_arpRate=0`, only the announcements at acquisition.
#[test]
fn the_holder_refreshes_its_neighbours_periodically() {
    use kvip_testkit::capture::{Capture, parse_garp};
    require_kernel!();
    let run = |tag: &str, rate: &str| -> (usize, usize) {
        let (ns, peer) = node_pair(tag);
        let capture = Capture::start(&peer, "eth0").expect("capture");
        let server = ApiServer::start().expect("api server");
        let url = server.listen_in(&ns).expect("listen");
        let agent = start_agent_env(&ns, &url, tag, "n1", true, false, &[rate]);
        let (rt, services, _) = api(&server);
        rt.block_on(async {
            services
                .create(&PostParams::default(), &service(false))
                .await
                .expect("service");
        });
        until("held", &agent, Duration::from_secs(15), || has_vip(&ns));
        let garps = |c: &Capture| {
            c.snapshot()
                .iter()
                .filter_map(|f| parse_garp(f))
                .filter(|a| a.address.to_string() == "192.0.2.10")
                .count()
        };
        // The three announcements at acquisition are 500 ms apart: over after 1.2 s.
        std::thread::sleep(Duration::from_millis(1200));
        let initial = garps(&capture);
        std::thread::sleep(Duration::from_millis(1500));
        let later = garps(&capture) - initial;
        let metrics = http_get(&ns, "/metrics");
        if later > 0 {
            assert!(!metrics.contains("kvip_announcements_total 0"), "{metrics}");
        }
        drop(agent);
        (initial, later)
    };
    let (initial, later) = run("arf", "vip_arpRate=300");
    assert!(initial >= 3, "announced at acquisition: {initial}");
    assert!(later >= 3, "refreshed every 300 ms: {later} in 1.5 s");
    let (initial, later) = run("arz", "vip_arpRate=0");
    assert!(initial >= 3, "announced at acquisition: {initial}");
    assert_eq!(later, 0, "no refresh with vip_arpRate=0");
}

/// `egress_default_cidrs` (`--egress-default-cidrs`): for those who insist, kube-vip's guessed
/// CIDRs when discovery finds none — with a warning and the source exported as `guessed`.
#[test]
fn guessed_cidrs_only_when_asked() {
    require_kernel!();
    let (ns, _peer, server, url) = node_with_api("gss");
    server.deny("pods");
    let agent = start_agent_env(
        &ns,
        &url,
        "gss",
        "n1",
        false,
        false,
        &["egress_default_cidrs=true"],
    );
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    until(
        "egress with guessed CIDRs",
        &agent,
        Duration::from_secs(15),
        || {
            let r = rules(&ns);
            r.contains("10.244.1.5 : goto")
                && r.contains("10.0.0.0/16")
                && r.contains("10.96.0.0/12")
        },
    );
    assert!(agent.log().contains("kube-vip's guess"), "{}", agent.log());
    let m = http_get(&ns, "/metrics");
    assert!(
        m.contains("kvip_cidr_source{kind=\"pod\",source=\"guessed\"} 1"),
        "{m}"
    );
}
