//! Lease election through the real kube client against the test API server: one leader,
//! graceful handover, takeover after a crash, stepping down when the API is unreachable.

use std::time::{Duration, Instant};

use kvip_core::lease::Timings;
use kvip_kube::{Election, LeaseLock};
use kvip_testkit::apiserver::ApiServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const T: Timings = Timings {
    lease_duration: Duration::from_millis(1000),
    renew_deadline: Duration::from_millis(600),
    retry_period: Duration::from_millis(200),
};

struct Node {
    leader: watch::Receiver<Option<std::time::Instant>>,
    candidate: watch::Sender<bool>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<kvip_kube::election::Release>>,
}

impl Node {
    fn alive(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }
    fn leads(&self) -> bool {
        self.alive() && self.leader.borrow().is_some()
    }
}

fn spawn(server: &ApiServer, id: &str) -> Node {
    let lock = LeaseLock::new(server.client(), "kube-system", "plndr-svcs-lock");
    let (cand_tx, cand_rx) = watch::channel(true);
    let (lead_tx, lead_rx) = watch::channel(None);
    let stop = CancellationToken::new();
    let task = tokio::spawn(Election::new(lock, id, T).run(cand_rx, lead_tx, stop.clone()));
    Node {
        leader: lead_rx,
        candidate: cand_tx,
        stop,
        task: Some(task),
    }
}

/// Samples every 10 ms for `d`, failing if two live nodes ever lead at once; returns the
/// index of the leader at the end, if any.
async fn watch_for(nodes: &[Node], d: Duration) -> Option<usize> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let leaders: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i].leads()).collect();
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (0..nodes.len()).find(|i| nodes[*i].leads())
}

/// Waits until some live node other than `not` leads; returns it and how long it took.
async fn next_leader(nodes: &[Node], not: Option<usize>, limit: Duration) -> (usize, Duration) {
    let start = Instant::now();
    loop {
        let leaders: Vec<usize> = (0..nodes.len()).filter(|i| nodes[*i].leads()).collect();
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        if let Some(l) = leaders.first().filter(|l| Some(**l) != not) {
            return (*l, start.elapsed());
        }
        assert!(start.elapsed() < limit, "no new leader within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn lease(server: &ApiServer) -> serde_json::Value {
    server
        .object(
            "coordination.k8s.io/v1",
            "leases",
            "kube-system",
            "plndr-svcs-lock",
        )
        .expect("the lease exists")
}

#[tokio::test]
async fn one_leader_and_graceful_handover() {
    let server = ApiServer::start().expect("api server");
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| spawn(&server, n))
        .collect();
    let (first, _) = next_leader(&nodes, None, Duration::from_secs(3)).await;
    assert_eq!(
        watch_for(&nodes, Duration::from_millis(1500)).await,
        Some(first),
        "leadership is stable"
    );
    let l = lease(&server);
    assert_eq!(l["spec"]["holderIdentity"], format!("n{}", first + 1));
    assert_eq!(l["spec"]["leaseDurationSeconds"], 1);
    let transitions = l["spec"]["leaseTransitions"].as_i64().unwrap_or(0);

    // Graceful stop: the holder withdraws its leadership at once but keeps the Lease until
    // the caller (having removed its VIPs) writes the release; then another node takes over
    // within about a retry period.
    nodes[first].stop.cancel();
    let release = nodes[first]
        .task
        .take()
        .expect("the leader's task runs")
        .await
        .expect("election task");
    assert!(
        nodes[first].leader.borrow().is_none(),
        "leadership withdrawn on stop"
    );
    assert!(release.held());
    assert_eq!(
        watch_for(&nodes, Duration::from_millis(500)).await,
        None,
        "nobody leads while the stopped holder's release is pending"
    );
    assert_eq!(
        lease(&server)["spec"]["holderIdentity"],
        format!("n{}", first + 1)
    );
    assert!(release.write(Duration::from_secs(1)).await, "released");
    let (second, took) = next_leader(&nodes, Some(first), Duration::from_secs(2)).await;
    assert_ne!(second, first);
    // The others watch the Lease: a release is taken at once, not at their next poll.
    assert!(
        took < T.retry_period / 2,
        "handover took {took:?}, a retry period is {:?}",
        T.retry_period
    );
    let l = lease(&server);
    assert_eq!(l["spec"]["holderIdentity"], format!("n{}", second + 1));
    assert!(l["spec"]["leaseTransitions"].as_i64().unwrap_or(0) > transitions);
    let verbs: std::collections::BTreeSet<String> =
        server.calls().into_iter().map(|c| c.verb).collect();
    assert_eq!(
        verbs,
        ["create", "get", "list", "update", "watch"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}

#[tokio::test]
async fn crashed_leader_is_replaced_after_the_lease_expires() {
    let server = ApiServer::start().expect("api server");
    let mut nodes: Vec<Node> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| spawn(&server, n))
        .collect();
    let (first, _) = next_leader(&nodes, None, Duration::from_secs(3)).await;
    // A crash: no release, no further renewals.
    if let Some(t) = nodes[first].task.take() {
        t.abort();
    }
    let (_, took) = next_leader(&nodes, Some(first), Duration::from_secs(3)).await;
    // The others must wait for the lease to stay unchanged for its duration (the crashed node
    // may have renewed up to a retry period before the crash), and take it within a retry
    // period or two after that.
    assert!(
        took >= T.lease_duration - T.retry_period,
        "took over too early: {took:?}"
    );
    assert!(
        took <= T.lease_duration + 3 * T.retry_period,
        "took over too late: {took:?}"
    );
}

#[tokio::test]
async fn holder_cut_off_from_the_api_steps_down_before_the_lease_expires() {
    let server = ApiServer::start().expect("api server");
    let nodes: Vec<Node> = ["n1", "n2"].iter().map(|n| spawn(&server, n)).collect();
    let (first, _) = next_leader(&nodes, None, Duration::from_secs(3)).await;
    let _ = watch_for(&nodes, Duration::from_millis(300)).await;
    let cut = Instant::now();
    server.fail_for(Duration::from_millis(2500));
    let mut rx = nodes[first].leader.clone();
    tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|l| l.is_none()))
        .await
        .expect("the holder steps down")
        .expect("channel open");
    let stepped_down = cut.elapsed();
    assert!(
        stepped_down <= T.renew_deadline + Duration::from_millis(250),
        "stepped down after {stepped_down:?}, later than its renew deadline"
    );
    // Nobody leads while the API is down; someone does again once it is back.
    assert_eq!(watch_for(&nodes, Duration::from_millis(1500)).await, None);
    next_leader(&nodes, None, Duration::from_secs(3)).await;
}

#[tokio::test]
async fn only_candidates_lead_and_a_holder_that_stops_being_one_releases() {
    let server = ApiServer::start().expect("api server");
    let nodes: Vec<Node> = ["n1", "n2"].iter().map(|n| spawn(&server, n)).collect();
    nodes[1].candidate.send_replace(false);
    let (first, _) = next_leader(&nodes, None, Duration::from_secs(3)).await;
    assert_eq!(first, 0, "the non-candidate never leads");
    nodes[1].candidate.send_replace(true);
    nodes[0].candidate.send_replace(false);
    let (second, took) = next_leader(&nodes, Some(0), Duration::from_secs(2)).await;
    assert_eq!(second, 1);
    assert!(took < Duration::from_millis(800), "handover took {took:?}");
}

/// While leading, the published deadline is at most the renew deadline ahead (it counts from
/// when the renewal was sent) and each renewal moves it on; stepping down publishes none.
#[tokio::test]
async fn the_published_deadline_moves_on_with_each_renewal() {
    let server = ApiServer::start().expect("api server");
    let node = spawn(&server, "n1");
    next_leader(std::slice::from_ref(&node), None, Duration::from_secs(3)).await;
    let mut rx = node.leader.clone();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let d = rx.borrow_and_update().expect("leading");
        assert!(
            d <= Instant::now() + T.renew_deadline,
            "deadline {:?} ahead",
            d - Instant::now()
        );
        assert!(seen.last().is_none_or(|p| *p < d), "did not move on");
        seen.push(d);
        tokio::time::timeout(2 * T.retry_period, rx.changed())
            .await
            .expect("a renewal within two retry periods")
            .expect("channel open");
    }
    server.fail_for(Duration::from_secs(3));
    tokio::time::timeout(2 * T.renew_deadline, rx.wait_for(|l| l.is_none()))
        .await
        .expect("steps down")
        .expect("channel open");
    node.stop.cancel();
}
