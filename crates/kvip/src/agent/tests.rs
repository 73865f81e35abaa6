//! The reconcile loop on the fake dataplane, in paused time: no root, no API, no kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvip_core::annotations as ann;
use kvip_core::fence::Deadlines;
use kvip_core::plan::{ClusterNetworks, EndpointInfo, ServiceInfo, ServiceKey};
use kvip_core::{Leadership, ModelError, NodeConfig, Plan, Snapshot};
use kvip_dataplane::Dataplane;
use kvip_dataplane::fake::{Call, FakeDataplane};
use kvip_kube::elections::{LeadershipView, Synced};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::reconcile::{self, Channels, Settings, SnapshotSource};
use super::reporter::Report;
use crate::metrics::Metrics;

#[derive(Default)]
struct Source(Mutex<Snapshot>);

impl SnapshotSource for Source {
    fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        let mut s = self.0.lock().unwrap().clone();
        s.networks = networks;
        s
    }
}

fn web(name: &str, vip: &str) -> ServiceInfo {
    ServiceInfo {
        namespace: "default".into(),
        name: name.into(),
        load_balancer: true,
        annotations: BTreeMap::from([
            (ann::LOADBALANCER_IPS.to_string(), vip.to_string()),
            (ann::EGRESS.to_string(), "true".to_string()),
        ]),
        ..ServiceInfo::default()
    }
}

fn snapshot(services: &[(&str, &str, &str)]) -> Snapshot {
    Snapshot {
        services: services
            .iter()
            .map(|(n, vip, _)| Arc::new(web(n, vip)))
            .collect(),
        endpoints: services
            .iter()
            .map(|(n, _, pod)| {
                (
                    ServiceKey {
                        namespace: "default".into(),
                        name: n.to_string(),
                    },
                    vec![EndpointInfo {
                        address: pod.parse().unwrap(),
                        node: Some("n1".into()),
                        ready: true,
                        serving: true,
                    }]
                    .into(),
                )
            })
            .collect(),
        ..Snapshot::default()
    }
}

/// The agent's planner, except that a Service named `break` makes the plan invalid, as a
/// bug in `plan()` would.
fn breakable() -> reconcile::Planner {
    let mut planner = kvip_core::plan::Planner::default();
    Box::new(move |s: &Snapshot, l: &Leadership, n: &NodeConfig| {
        let mut p: Plan = planner.plan(s, l, n);
        if s.services.iter().any(|x| x.name == "break") {
            p.desired = Err(ModelError::DuplicatePolicy {
                name: "default/break".into(),
            });
        }
        p
    })
}

struct Harness {
    fake: FakeDataplane,
    source: Arc<Source>,
    dirty: watch::Sender<u64>,
    leadership: watch::Sender<LeadershipView>,
    deadlines: watch::Sender<Deadlines>,
    synced: watch::Receiver<Option<Synced>>,
    reports: watch::Receiver<Option<Report>>,
    /// The VIPs to announce over BGP.
    routes: watch::Receiver<BTreeSet<std::net::IpAddr>>,
    metrics: Arc<Metrics>,
    root: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(snap: Snapshot, leading: bool) -> Harness {
        let fake = FakeDataplane::new();
        let source = Arc::new(Source(Mutex::new(snap)));
        let (dirty, dirty_rx) = watch::channel(0);
        let (leadership, leadership_rx) = watch::channel(LeadershipView {
            seq: 0,
            leadership: Leadership::Global(leading),
        });
        let (deadlines, deadlines_rx) = watch::channel(Deadlines::Global(None));
        let (synced_tx, synced) = watch::channel(None);
        let (reports_tx, reports) = watch::channel(None);
        let (namespaces, _) = watch::channel(BTreeSet::new());
        let (routes_tx, routes) = watch::channel(BTreeSet::new());
        let metrics = Metrics::new();
        let root = CancellationToken::new();
        let mut settings = Settings {
            node: NodeConfig {
                node_name: "n1".into(),
                interface: "eth0".into(),
                ..NodeConfig::default()
            },
            networks: ClusterNetworks {
                pod: vec!["10.244.0.0/16".parse().unwrap()],
                service: vec!["10.96.0.0/12".parse().unwrap()],
                api_server: vec![],
            },
            resync_period: Duration::from_secs(30),
            arp_refresh: None,
            debounce: Duration::from_millis(50),
            planner: breakable(),
        };
        let channels = Channels {
            dirty: dirty_rx,
            leadership: leadership_rx,
            deadlines: deadlines_rx,
            fences: fake.clone().fence_sink().expect("fake sink"),
            synced: synced_tx,
            reports: reports_tx,
            namespaces,
            control_plane: None,
            routes: Some(routes_tx),
        };
        let task = tokio::spawn({
            let (mut dp, source, m, root) =
                (fake.clone(), source.clone(), metrics.clone(), root.clone());
            async move { reconcile::run(&mut dp, &*source, &mut settings, channels, &m, &root).await }
        });
        Harness {
            fake,
            source,
            dirty,
            leadership,
            deadlines,
            synced,
            reports,
            routes,
            metrics,
            root,
            task,
        }
    }

    fn lead(&self, l: Leadership) {
        self.leadership.send_modify(|v| {
            v.seq += 1;
            v.leadership = l;
        });
    }

    fn change(&self, snap: Snapshot) {
        *self.source.0.lock().unwrap() = snap;
        self.dirty.send_modify(|g| *g += 1);
    }

    fn vips(&self) -> Vec<String> {
        self.fake
            .state()
            .vips()
            .iter()
            .map(|v| v.address.to_string())
            .collect()
    }

    fn applies(&self) -> usize {
        self.fake.applied().len()
    }
}

/// Waits (in paused time) until `f` holds; fails after 60 virtual seconds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn leadership_reaches_the_kernel_and_the_elections_hear_after() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), false);
    until("first sync", || h.applies() >= 1).await;
    assert!(h.vips().is_empty());
    h.lead(Leadership::Global(true));
    until("VIP held", || h.vips() == ["198.51.100.10"]).await;
    assert_eq!(h.fake.state().source_count(), 1);
    // The elections learn of the sync computed from seq 1 only once it is applied.
    until("synced seq 1", || {
        h.synced.borrow().as_ref().is_some_and(|s| s.seq == 1)
    })
    .await;
    let started = tokio::time::Instant::now();
    h.lead(Leadership::Global(false));
    until("VIP dropped", || h.vips().is_empty()).await;
    // At once, although the last sync was just now: no debounce, no wait on anything else.
    assert!(
        started.elapsed() < Duration::from_millis(5),
        "{:?}",
        started.elapsed()
    );
    until("synced seq 2", || {
        h.synced.borrow().as_ref().is_some_and(|s| s.seq == 2)
    })
    .await;
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_changes_is_one_or_two_syncs() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    let before = h.applies();
    for i in 0..20 {
        let pod = format!("10.244.1.{}", 10 + i);
        h.change(snapshot(&[("a", "198.51.100.10", &pod)]));
        tokio::task::yield_now().await;
    }
    until("last pod applied", || {
        h.fake.state().egress()[0].sources() == ["10.244.1.29".parse::<std::net::IpAddr>().unwrap()]
    })
    .await;
    let syncs = h.applies() - before;
    assert!((1..=2).contains(&syncs), "{syncs} syncs for one burst");
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn drift_is_found_by_the_resync_and_repaired() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    let good = h.fake.state();
    h.fake.set_state(kvip_core::DesiredState::empty());
    until("repaired", || h.fake.state() == good).await;
    assert!(h.fake.calls().contains(&Call::Observe));
    assert!(h.fake.calls().contains(&Call::Invalidate));
    let text = h.metrics_text();
    assert!(
        text.contains(r#"kvip_drift_repairs_total{kind="address"} 1"#),
        "{text}"
    );
    h.root.cancel();
    h.task.await.unwrap();
}

/// A change arriving during a slow read-back is applied at once (the read-back is dropped);
/// under a steady stream of changes the fourth read-back in a row runs to its end.
#[tokio::test(start_paused = true)]
async fn a_change_waits_for_no_read_back_and_a_steady_stream_cannot_starve_it() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    h.fake.slow_observe(Some(Duration::from_secs(5)));
    until("read-back started", || h.observes() == 1).await;
    let started = tokio::time::Instant::now();
    h.change(snapshot(&[("a", "198.51.100.10", "10.244.1.6")]));
    let pod = |ip: &str| ip.parse::<std::net::IpAddr>().unwrap();
    until("change applied", || {
        h.fake.state().egress()[0].sources() == [pod("10.244.1.6")]
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "the change waited {:?} for the read-back",
        started.elapsed()
    );
    assert_eq!(h.metric("kvip_readbacks_interrupted_total"), 1);
    assert_eq!(h.metric("kvip_readback_duration_seconds_count"), 0);

    // A change every 500 ms: read-backs keep being interrupted until one runs to its end.
    for i in 0..40 {
        if h.metric("kvip_readback_duration_seconds_count") == 1 {
            break;
        }
        h.change(snapshot(&[(
            "a",
            "198.51.100.10",
            &format!("10.244.2.{i}"),
        )]));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(h.metric("kvip_readback_duration_seconds_count"), 1);
    assert_eq!(h.metric("kvip_readbacks_interrupted_total"), 3);
    h.root.cancel();
    h.task.await.unwrap();
}

/// A lost Lease waits for no read-back, not even one that runs to its end after three
/// interrupted ones.
#[tokio::test(start_paused = true)]
async fn a_lost_lease_waits_for_no_read_back_even_a_forced_one() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    h.fake.slow_observe(Some(Duration::from_secs(5)));
    for i in 0..3 {
        until("read-back started", || h.observes() == i + 1).await;
        let pod = format!("10.244.3.{i}");
        h.change(snapshot(&[("a", "198.51.100.10", &pod)]));
        until("change applied", || {
            h.fake.state().egress()[0].sources()[0].to_string() == pod
        })
        .await;
    }
    until("the forced read-back started", || h.observes() == 4).await;
    let started = tokio::time::Instant::now();
    h.lead(Leadership::Global(false));
    until("VIP dropped", || h.vips().is_empty()).await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "the step-down waited {:?}",
        started.elapsed()
    );
    h.root.cancel();
    h.task.await.unwrap();
}

impl Harness {
    /// A harness whose node holds one Service's VIP under a Lease whose deadline is 3 s
    /// ahead: the harness, the VIP and the deadline.
    async fn held_with_deadline() -> (Harness, std::net::IpAddr, std::time::Instant) {
        let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), false);
        until("first sync", || h.applies() >= 1).await;
        let vip: std::net::IpAddr = "198.51.100.10".parse().unwrap();
        let t1 = std::time::Instant::now() + Duration::from_secs(3);
        // As the elections do: the deadline first, then the leadership it belongs to.
        h.deadlines.send_replace(Deadlines::Global(Some(t1)));
        h.lead(Leadership::Global(true));
        until("VIP held", || h.vips() == ["198.51.100.10"]).await;
        (h, vip, t1)
    }

    /// How many read-backs were started.
    fn observes(&self) -> usize {
        self.fake
            .calls()
            .iter()
            .filter(|c| **c == Call::Observe)
            .count()
    }

    /// A counter's value from the metrics (0 when absent).
    fn metric(&self, name: &str) -> u64 {
        self.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn metrics_text(&self) -> String {
        self.metrics.render().unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn an_invalid_state_keeps_the_last_good_one_less_what_is_not_held() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    let good = h.fake.state();
    h.change(snapshot(&[
        ("a", "198.51.100.10", "10.244.1.5"),
        ("break", "198.51.100.11", "10.244.1.6"),
    ]));
    until("reported invalid", || {
        h.reports
            .borrow()
            .as_ref()
            .is_some_and(|r| r.invalid.is_some())
    })
    .await;
    assert_eq!(h.fake.state(), good, "the last good state is kept");
    assert!(
        h.metrics
            .readiness()
            .iter()
            .any(|r| r.contains("desired state is invalid")),
        "{:?}",
        h.metrics.readiness()
    );
    // Losing the Lease still drops the VIP and its egress.
    h.lead(Leadership::Global(false));
    until("VIP dropped", || h.vips().is_empty()).await;
    assert!(h.fake.state().is_empty());
    // Valid again: ready again.
    h.lead(Leadership::Global(true));
    h.change(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]));
    until("held again", || h.fake.state() == good).await;
    until("ready", || h.metrics.readiness().is_empty()).await;
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_sync_is_retried_and_not_announced_to_the_elections() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), false);
    until("first sync", || h.applies() >= 1).await;
    let seen = h.synced.borrow().clone();
    h.fake.fail_applies(2);
    h.lead(Leadership::Global(true));
    until("two failures", || h.applies() >= 3).await;
    assert!(h.vips().is_empty());
    assert_eq!(*h.synced.borrow(), seen, "no sync was announced");
    assert!(!h.metrics.readiness().is_empty(), "not ready while failing");
    // Retried without any change, then announced.
    until("held", || h.vips().len() == 1).await;
    until("synced seq 1", || {
        h.synced.borrow().as_ref().is_some_and(|s| s.seq == 1)
    })
    .await;
    until("ready", || h.metrics.readiness().is_empty()).await;
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_loop_stops_on_cancel_even_while_changes_keep_coming() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), true);
    until("first sync", || h.vips().len() == 1).await;
    h.change(snapshot(&[("a", "198.51.100.10", "10.244.1.6")]));
    h.root.cancel();
    tokio::time::timeout(Duration::from_secs(1), h.task)
        .await
        .expect("the loop stops at once")
        .unwrap();
    // The loop itself never tears down: that is the shutdown path's job, after it.
    assert!(!h.fake.calls().contains(&Call::Teardown));
}

#[tokio::test(start_paused = true)]
async fn a_state_that_cannot_be_applied_still_removes_what_is_no_longer_held() {
    let h = Harness::start(
        snapshot(&[
            ("a", "198.51.100.10", "10.244.1.5"),
            ("b", "198.51.100.11", "10.244.1.6"),
        ]),
        false,
    );
    let key = |n: &str| ServiceKey {
        namespace: "default".into(),
        name: n.into(),
    };
    h.lead(Leadership::PerService([key("a")].into()));
    until("a held", || h.vips() == ["198.51.100.10"]).await;
    // b's VIP cannot be held on this node; the Lease of a is lost at the same time.
    h.fake.refuse_vip(Some("198.51.100.11".parse().unwrap()));
    h.lead(Leadership::PerService([key("b")].into()));
    until("a's VIP and egress removed", || h.fake.state().is_empty()).await;
    // The elections hear of the sync that removed it (seq 2), so they may release a's Lease.
    until("synced seq 2", || {
        h.synced.borrow().as_ref().is_some_and(|s| s.seq == 2)
    })
    .await;
    assert!(
        !h.metrics.readiness().is_empty(),
        "not ready: b is not held"
    );
    h.fake.refuse_vip(None);
    until("b held after the retry", || h.vips() == ["198.51.100.11"]).await;
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_vip_someone_else_configured_is_not_drift() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), false);
    h.fake.foreign_vip(Some("198.51.100.10".parse().unwrap()));
    h.lead(Leadership::Global(true));
    until("held", || h.vips() == ["198.51.100.10"]).await;
    // Two resyncs (30 s each): no drift counted, nothing replaced.
    let applies = h.applies();
    tokio::time::sleep(Duration::from_secs(65)).await;
    let observes = h
        .fake
        .calls()
        .iter()
        .filter(|c| **c == Call::Observe)
        .count();
    assert!(observes >= 2, "{observes} read-backs");
    assert!(
        !h.metrics_text().contains("kvip_drift_repairs_total{"),
        "{}",
        h.metrics_text()
    );
    assert!(!h.fake.calls().contains(&Call::Invalidate));
    assert!(
        h.applies() <= applies + 2,
        "resyncs only: {} → {}",
        applies,
        h.applies()
    );
    h.root.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn held_vips_get_their_leases_deadline_and_renewals_move_it_without_a_sync() {
    let (h, vip, t1) = Harness::held_with_deadline().await;
    // The apply that added the VIP had its deadline.
    let fences = h.fake.fences();
    assert_eq!(fences.last().and_then(|f| f.get(&vip)), Some(&t1));
    let applies = h.applies();
    // A renewal: the lifetime moves on, and nothing is applied.
    let t2 = t1 + Duration::from_secs(1);
    h.deadlines.send_replace(Deadlines::Global(Some(t2)));
    until("deadline moved on", || {
        h.fake.fences().last().and_then(|f| f.get(&vip).copied()) == Some(t2)
    })
    .await;
    assert_eq!(h.applies(), applies, "a renewal made a sync");
    assert!(h.metric("kvip_vip_lifetime_refreshes_total") >= 1);
    // Leadership lost: the next apply drops the VIP and its deadline.
    h.deadlines.send_replace(Deadlines::Global(None));
    h.lead(Leadership::Global(false));
    until("VIP dropped", || h.vips().is_empty()).await;
    assert!(h.fake.fences().last().is_some_and(|f| f.is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_held_vip_that_lapsed_is_added_back_at_the_next_renewal() {
    let (h, vip, t1) = Harness::held_with_deadline().await;
    // Its lifetime ran out while the Lease was held (the keeper was starved): gone.
    h.fake.lapse(vip);
    assert!(h.vips().is_empty());
    let applies = h.applies();
    // The next renewal reports it, and a sync adds it back.
    h.deadlines
        .send_replace(Deadlines::Global(Some(t1 + Duration::from_secs(1))));
    until("VIP back", || h.vips() == ["198.51.100.10"]).await;
    assert!(h.applies() > applies);
    assert_eq!(h.metric("kvip_vip_lifetime_lapsed_total"), 1);
}

#[tokio::test(start_paused = true)]
async fn renewals_reach_the_lifetimes_during_a_long_read_back() {
    let (h, vip, t1) = Harness::held_with_deadline().await;
    // A read-back that takes far longer than the renew deadline.
    h.fake.slow_observe(Some(Duration::from_secs(60)));
    until("read-back started", || h.observes() == 1).await;
    let t2 = t1 + Duration::from_secs(1);
    h.deadlines.send_replace(Deadlines::Global(Some(t2)));
    until("deadline moved on during the read-back", || {
        h.fake.fences().last().and_then(|f| f.get(&vip).copied()) == Some(t2)
    })
    .await;
    assert_eq!(h.observes(), 1, "the read-back went on");
    h.root.cancel();
    h.task.await.unwrap();
}

/// BGP: the routes announced are always among the VIPs in the kernel — withdrawn before an
/// address goes, announced after it came.
#[tokio::test(start_paused = true)]
async fn bgp_routes_are_withdrawn_before_the_vip_goes_and_announced_after_it_came() {
    let h = Harness::start(snapshot(&[("a", "198.51.100.10", "10.244.1.5")]), false);
    let violations = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let checker = tokio::spawn({
        let (mut routes, fake) = (h.routes.clone(), h.fake.clone());
        let (violations, seen) = (violations.clone(), seen.clone());
        async move {
            while routes.changed().await.is_ok() {
                // Both read in one step: the loop cannot run in between.
                let r = routes.borrow_and_update().clone();
                let kernel: BTreeSet<std::net::IpAddr> =
                    fake.state().vips().iter().map(|v| v.address).collect();
                if !r.is_subset(&kernel) {
                    violations.lock().unwrap().push((r.clone(), kernel));
                }
                seen.lock().unwrap().push(r);
            }
        }
    });
    until("first sync", || h.applies() >= 1).await;
    h.lead(Leadership::Global(true));
    until("the VIP announced", || h.routes.borrow().len() == 1).await;
    assert_eq!(h.vips(), ["198.51.100.10"]);
    h.lead(Leadership::Global(false));
    until("the VIP withdrawn and gone", || {
        h.routes.borrow().is_empty() && h.vips().is_empty()
    })
    .await;
    h.root.cancel();
    checker.abort();
    assert!(
        violations.lock().unwrap().is_empty(),
        "{:?}",
        violations.lock().unwrap()
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "announced once, withdrawn once"
    );
}
