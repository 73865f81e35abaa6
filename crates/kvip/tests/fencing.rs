//! The kernel fences every VIP held under a Lease: the address's lifetime ends at the Lease's
//! renew deadline and each renewal moves it on. A holder that is SIGKILLed or SIGSTOPped
//! renews no more, and its VIP leaves its node's kernel by itself before the Lease expires
//! for another node: a sampler every 50 ms never sees two holders. A SIGCONTed agent does
//! not take the VIP back. With one Lease for all Services and with one per Service.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kube::api::PostParams;
use kvip_testkit::require_kernel;

/// Renew deadline of the agents here (vip_renewdeadline=2) counted from the last renewal
/// (before the signal), plus less than 2 s (the lifetime rounded up to whole seconds, the
/// kernel's timer up to a second late), plus scheduling slack.
const GONE_WITHIN: Duration = Duration::from_millis(2000 + 2000 + 300);

/// What sampling every 50 ms saw after `old` stopped renewing (two holders in one sample
/// fail the test, so `gone` is never later than `taken`).
struct Handover {
    /// When `old`'s VIP left its kernel.
    gone: Duration,
    /// When another node held the VIP.
    taken: Duration,
    new: usize,
}

/// Samples the holders every 50 ms from `since` until a node other than `old` holds the
/// VIP, failing on two holders at any sample.
fn sample_handover(
    nodes: &[kvip_testkit::Netns],
    agents: &[Agent],
    old: usize,
    since: Instant,
) -> Handover {
    let mut gone = None;
    loop {
        let h = holders(nodes);
        assert!(h.len() <= 1, "two holders at once: {h:?}\n{}", logs(agents));
        let at = since.elapsed();
        if gone.is_none() && !h.contains(&old) {
            gone = Some(at);
        }
        if let Some(&new) = h.iter().find(|i| **i != old) {
            return Handover {
                gone: gone.expect("the old holder's VIP went first"),
                taken: at,
                new,
            };
        }
        assert!(
            at < Duration::from_secs(20),
            "no takeover within 20 s: holders {h:?}\n{}",
            logs(agents)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to `holder`'s agent: its VIP must leave its kernel within [`GONE_WITHIN`],
/// before another node holds it. Returns the new holder.
fn stop_holder(nodes: &[kvip_testkit::Netns], agents: &[Agent], holder: usize, sig: &str) -> usize {
    let since = Instant::now();
    signal(&agents[holder], sig);
    let h = sample_handover(nodes, agents, holder, since);
    assert!(
        h.gone <= GONE_WITHIN,
        "SIG{sig}: the holder's VIP went after {:?} (another node held it after {:?})",
        h.gone,
        h.taken
    );
    h.new
}

/// For `d`, every 50 ms: exactly `holder` holds the VIP.
fn steady(nodes: &[kvip_testkit::Netns], agents: &[Agent], holder: usize, d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        assert_eq!(holders(nodes), vec![holder], "{}", logs(agents));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn frozen_and_killed_holders_lose_their_vip_by_themselves(per_service: bool) {
    let tag = if per_service { "fps" } else { "fgl" };
    let (server, nodes, _peers, urls) = nodes_with_api(tag, 3);
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            start_agent_full(
                &nodes[i],
                &urls[i],
                &format!("{tag}{i}"),
                &format!("n{i}"),
                true,
                per_service,
            )
        })
        .collect();
    let (rt, services, _) = api(&server);
    rt.block_on(async {
        services
            .create(&PostParams::default(), &service(false))
            .await
            .expect("service");
    });
    wait_until(
        "a first holder",
        Duration::from_secs(15),
        || logs(&agents),
        || holders(&nodes).len() == 1,
    );
    let first = holders(&nodes)[0];
    steady(&nodes, &agents, first, Duration::from_secs(1));

    // SIGSTOP: the frozen agent renews no more; the kernel removes its VIP by itself, and
    // only then, once the Lease has expired, does another node take it.
    let second = stop_holder(&nodes, &agents, first, "STOP");
    // Thawed, it finds its deadline passed: it does not put the VIP back.
    signal(&agents[first], "CONT");
    steady(&nodes, &agents, second, Duration::from_secs(3));

    // The holder's lifetimes moved on with its renewals, and none ran out while it held its
    // Lease (the VIP never flickered; visible in its metrics).
    let metrics = http_get(&nodes[second], "/metrics");
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(
        metric("kvip_vip_lifetime_refreshes_total") >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric("kvip_vip_lifetime_expired_total"), 0.0, "{metrics}");
    assert!(
        !metrics.contains("kvip_drift_repairs_total{kind=\"address\"}"),
        "{metrics}"
    );

    // SIGKILL: the same, with no process left at all.
    let third = stop_holder(&nodes, &agents, second, "KILL");
    steady(&nodes, &agents, third, Duration::from_secs(1));
}

#[test]
fn one_lease_for_all_frozen_and_killed_holders_lose_their_vip_by_themselves() {
    require_kernel!();
    frozen_and_killed_holders_lose_their_vip_by_themselves(false);
}

#[test]
fn per_service_leases_frozen_and_killed_holders_lose_their_vip_by_themselves() {
    require_kernel!();
    frozen_and_killed_holders_lose_their_vip_by_themselves(true);
}
