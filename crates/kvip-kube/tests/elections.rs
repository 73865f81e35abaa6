//! Per-Service elections as the agent runs them (`kvip_kube::elections`), against the test
//! API server: a node that stops being a candidate stops counting as holder first and
//! releases only after a sync computed without it; a candidacy that comes back before that
//! keeps the Lease; a Service that goes and comes back keeps its Lease (the old release is
//! never written).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvip_core::Leadership;
use kvip_core::lease::Timings;
use kvip_core::plan::ServiceKey;
use kvip_kube::elections::{self, Candidacy, LeadershipView, Mode, Settings, Synced};
use kvip_testkit::apiserver::ApiServer;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const T: Timings = Timings {
    lease_duration: Duration::from_millis(1500),
    renew_deadline: Duration::from_millis(1000),
    retry_period: Duration::from_millis(200),
};

fn key() -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: "web".into(),
    }
}

fn synced(seq: u64, candidate: Option<bool>) -> Option<Synced> {
    let mut candidacy = BTreeMap::new();
    if let Some(candidate) = candidate {
        candidacy.insert(
            key(),
            Candidacy {
                lease: "kubevip-web".into(),
                candidate,
            },
        );
    }
    Some(Synced {
        seq,
        node_excluded: false,
        candidacy,
    })
}

fn holder(server: &ApiServer) -> Option<String> {
    server
        .object("coordination.k8s.io/v1", "leases", "default", "kubevip-web")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

fn holds(v: &LeadershipView) -> bool {
    matches!(&v.leadership, Leadership::PerService(s) if s.contains(&key()))
}

/// Every holder the Lease has had, in order, as its watch reports each write (a release is
/// seen however soon the Lease is taken back).
fn holders_seen(server: &ApiServer) -> Arc<std::sync::Mutex<Vec<String>>> {
    use futures_util::StreamExt;
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::runtime::{WatchStreamExt, watcher};
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let api: kube::Api<Lease> = kube::Api::namespaced(server.client(), "default");
    let stream = watcher(
        api,
        watcher::Config::default().fields("metadata.name=kubevip-web"),
    )
    .applied_objects();
    let out = seen.clone();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(Ok(l)) = stream.next().await {
            let h = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
            out.lock().unwrap().push(h);
        }
    });
    seen
}

/// Waits `d`, then checks that no write in it released the Lease.
async fn never_released(seen: &std::sync::Mutex<Vec<String>>, d: Duration, what: &str) {
    tokio::time::sleep(d).await;
    let all = seen.lock().unwrap().clone();
    assert!(
        !all.iter().any(String::is_empty),
        "{what}: holders seen {all:?}"
    );
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Running {
    synced: watch::Sender<Option<Synced>>,
    leadership: watch::Receiver<LeadershipView>,
    root: CancellationToken,
}

/// The server, every holder its Lease has had, and the elections of a node that holds the
/// Service's Lease.
async fn holding() -> (ApiServer, Arc<std::sync::Mutex<Vec<String>>>, Running) {
    let server = ApiServer::start().expect("api server");
    let seen = holders_seen(&server);
    let r = start(&server);
    r.synced.send_replace(synced(0, Some(true)));
    until("held", || holds(&r.leadership.borrow())).await;
    assert_eq!(holder(&server).as_deref(), Some("n1"));
    (server, seen, r)
}

fn start(server: &ApiServer) -> Running {
    let (synced, rx) = watch::channel(None);
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let h = elections::start(
        Settings {
            client: server.client(),
            identity: "n1".into(),
            timings: T,
            mode: Mode::PerService,
            forbidden: Arc::new(Notify::new()),
        },
        rx,
        &tasks,
        root.clone(),
    );
    Running {
        synced,
        leadership: h.leadership,
        root,
    }
}

#[tokio::test]
async fn a_withdrawal_releases_only_after_a_sync_without_the_service() {
    let (server, seen, r) = holding().await;

    // The sync at the current seq found this node no longer a candidate.
    let seq = r.leadership.borrow().seq;
    r.synced.send_replace(synced(seq, Some(false)));
    until("not counted as held", || !holds(&r.leadership.borrow())).await;
    let without = r.leadership.borrow().seq;
    assert!(without > seq);
    // Not released while no sync computed without it has been applied.
    never_released(&seen, 3 * T.retry_period, "released too early").await;
    r.synced.send_replace(synced(without, Some(false)));
    until("released", || holder(&server).as_deref() == Some("")).await;
    r.root.cancel();
}

#[tokio::test]
async fn a_candidacy_back_before_the_sync_keeps_the_lease() {
    let (_server, seen, r) = holding().await;
    let seq = r.leadership.borrow().seq;
    r.synced.send_replace(synced(seq, Some(false)));
    until("not counted as held", || !holds(&r.leadership.borrow())).await;
    // The endpoint is ready again before the sync without it.
    let without = r.leadership.borrow().seq;
    r.synced.send_replace(synced(without, Some(true)));
    until("held again", || holds(&r.leadership.borrow())).await;
    never_released(&seen, 3 * T.retry_period, "released").await;
    assert!(holds(&r.leadership.borrow()));
    r.root.cancel();
}

#[tokio::test]
async fn a_service_that_comes_back_keeps_its_lease() {
    let (_server, seen, r) = holding().await;
    // Gone (its election stops; its release waits for a sync without it)...
    let seq = r.leadership.borrow().seq;
    r.synced.send_replace(synced(seq, None));
    until("not counted as held", || !holds(&r.leadership.borrow())).await;
    // ...and back before that sync: the new election takes the Lease over, and the old
    // release, now safe by seq, must not be written.
    let without = r.leadership.borrow().seq;
    r.synced.send_replace(synced(without, Some(true)));
    never_released(&seen, 2 * T.retry_period, "the old release was written").await;
    until("held by the new election", || holds(&r.leadership.borrow())).await;
    let later = r.leadership.borrow().seq;
    r.synced.send_replace(synced(later, Some(true)));
    never_released(&seen, 3 * T.retry_period, "the old release was written").await;
    assert!(holds(&r.leadership.borrow()));
    r.root.cancel();
}
