//! The agent under a hostile API: permissions missing, writes that never answer, a frozen
//! server. Real `kvip run` processes in node namespaces against the test API server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvip_kube::rbac::{Scope, rules_for};
use kvip_testkit::apiserver::Grant;

/// What `kvip manifest rbac --namespace kube-system [--svc-election]` grants.
fn grants(per_service_leases: bool) -> Vec<Grant> {
    rules_for(false, per_service_leases)
        .into_iter()
        .map(|r| Grant {
            group: r.group.into(),
            resource: r.resource.into(),
            verb: r.verb.into(),
            namespace: match r.scope {
                Scope::Cluster => None,
                Scope::OwnNamespace | Scope::KubeSystem => Some("kube-system".into()),
            },
        })
        .collect()
}

fn ready(ns: &kvip_testkit::Netns) -> Option<bool> {
    try_http_get(ns, "/readyz").map(|r| r.starts_with("HTTP/1.0 200"))
}

#[test]
fn svc_election_without_its_rbac_is_named_at_once_and_ready_once_granted() {
    kvip_testkit::require_kernel!();
    let (ns, _peer, server, url) = node_with_api("hrb");
    server.enforce(grants(false));
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    let agent = start_agent_env(&ns, &url, "hrb", "n1", true, true, &[]);
    let started = Instant::now();
    let missing = "missing permission: get leases.coordination.k8s.io in namespace default; fix: kvip manifest rbac --namespace kube-system --svc-election";
    until(
        "the missing permission named",
        &agent,
        Duration::from_secs(10),
        || agent.log().contains(missing),
    );
    until(
        "not ready, saying why",
        &agent,
        Duration::from_secs(10),
        || {
            try_http_get(&ns, "/readyz").is_some_and(|r| {
                r.starts_with("HTTP/1.0 503") && r.contains("get leases.coordination.k8s.io")
            })
        },
    );
    until(
        "a Warning Event on the Service",
        &agent,
        Duration::from_secs(10),
        || {
            server
                .objects("events.k8s.io/v1", "events", "default")
                .iter()
                .any(|e| {
                    e["reason"] == "PermissionMissing"
                        && e["type"] == "Warning"
                        && e["note"]
                            .as_str()
                            .is_some_and(|n| n.contains("leases.coordination.k8s.io"))
                })
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "all within 10 s of the start"
    );
    let metrics = http_get(&ns, "/metrics");
    assert!(
        metrics.contains(r#"kvip_permission_missing{verb="get",resource="leases.coordination.k8s.io",namespace="default"} 1"#),
        "{metrics}"
    );
    assert!(!has_vip(&ns), "no Lease, no VIP");

    // Granted: the same agent, without a restart, becomes ready and holds the VIP.
    server.enforce(grants(true));
    until("ready", &agent, Duration::from_secs(20), || {
        ready(&ns) == Some(true)
    });
    until("VIP held", &agent, Duration::from_secs(10), || has_vip(&ns));
    let log = agent.log();
    assert_eq!(
        log.matches(missing).count(),
        1,
        "a missing permission is logged once per interval, not per retry:\n{log}"
    );
    assert!(log.contains("permission granted now"), "{log}");
}

#[test]
fn without_the_watches_the_start_fails_with_the_fix() {
    kvip_testkit::require_kernel!();
    let (ns, _peer, server, url) = node_with_api("hrw");
    let mut g = grants(false);
    g.retain(|g| g.resource != "endpointslices");
    server.enforce(g);
    let mut agent = start_agent_env(&ns, &url, "hrw", "n1", true, false, &[]);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = agent.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("cannot watch the cluster: missing permission: list endpointslices.discovery.k8s.io in all namespaces; fix: kvip manifest rbac --namespace kube-system"),
        "{log}"
    );
}

/// Creates the web Service and its pod, and waits until the node holds the VIP and its egress.
/// The node, its link's peer (kept: dropping it removes `eth0`), the server and the agent.
type Holding = (
    kvip_testkit::Netns,
    kvip_testkit::Netns,
    kvip_testkit::apiserver::ApiServer,
    Agent,
);

fn holding(tag: &str, extra: &[&str]) -> Holding {
    let (ns, peer, server, url) = node_with_api(tag);
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    let agent = start_agent_env(&ns, &url, tag, "n1", true, false, extra);
    until(
        "VIP and egress held",
        &agent,
        Duration::from_secs(15),
        || has_vip(&ns) && rules(&ns).contains("10.244.1.5"),
    );
    (ns, peer, server, agent)
}

#[test]
fn a_status_write_that_never_answers_does_not_delay_the_step_down() {
    kvip_testkit::require_kernel!();
    let (ns, _peer, server, url) = node_with_api("hhs");
    // Every write of the Service hangs from the start: the holder's first status patch never
    // returns.
    server.hang("patch", "services/status");
    server.hang("patch", "services");
    let (rt, services, slices) = api(&server);
    create_web(&rt, &services, &slices, "10.244.1.5");
    let agent = start_agent_env(&ns, &url, "hhs", "n1", true, false, &[]);
    until(
        "VIP and egress held",
        &agent,
        Duration::from_secs(15),
        || has_vip(&ns) && rules(&ns).contains("10.244.1.5"),
    );
    until(
        "the status write is hanging",
        &agent,
        Duration::from_secs(5),
        || {
            server
                .calls()
                .iter()
                .any(|c| c.verb == "patch" && c.resource == "services/status")
        },
    );
    // Now the Lease cannot be renewed either: dropped before the Lease (3 s) could expire.
    server.fail_resource("leases");
    until(
        "VIP and egress dropped",
        &agent,
        Duration::from_secs(3),
        || !has_vip(&ns) && !rules(&ns).contains("10.244.1.5"),
    );
    server.heal();
    until("held again", &agent, Duration::from_secs(10), || {
        has_vip(&ns)
    });
}

#[test]
fn a_frozen_api_drops_everything_by_the_deadline_and_the_agent_recovers() {
    kvip_testkit::require_kernel!();
    let (ns, _peer, server, mut agent) = holding("hfz", &[]);
    server.freeze();
    let frozen = Instant::now();
    until(
        "VIP and egress dropped",
        &agent,
        Duration::from_secs(3),
        || !has_vip(&ns) && !rules(&ns).contains("10.244.1.5"),
    );
    // Frozen for longer than the Lease (3 s): the agent stays up and holds nothing.
    let hold = Duration::from_secs(5);
    while frozen.elapsed() < hold {
        assert!(!has_vip(&ns), "no VIP while the API is frozen");
        assert!(
            agent.child.try_wait().expect("wait").is_none(),
            "{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.thaw();
    until(
        "held again after the thaw",
        &agent,
        Duration::from_secs(15),
        || has_vip(&ns) && rules(&ns).contains("10.244.1.5"),
    );
}
