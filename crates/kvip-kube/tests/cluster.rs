//! The watches behind the snapshot, through the real kube client against the test API server:
//! changes arrive, and keep arriving after dropped watches, expired history and a 500 outage.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use kvip_core::plan::{ClusterNetworks, ServiceKey};
use kvip_kube::ClusterCache;
use kvip_testkit::apiserver::ApiServer;
use serde_json::json;
use tokio::sync::watch;

fn service() -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default",
                     "annotations": {"kube-vip.io/egress": "true", "kube-vip.io/loadbalancerIPs": "198.51.100.10"}},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}
    }))
    .expect("service")
}

fn slice(pods: &[(&str, &str, Option<bool>)]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = pods
        .iter()
        .map(|(ip, node, ready)| {
            let mut e = json!({"addresses": [ip], "nodeName": node});
            if let Some(r) = ready {
                e["conditions"] = json!({"ready": r});
            }
            e
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "endpoints": endpoints
    }))
    .expect("slice")
}

fn key() -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: "web".into(),
    }
}

/// The endpoint addresses the snapshot holds for default/web.
fn addresses(cache: &ClusterCache) -> Vec<IpAddr> {
    let s = cache.snapshot(ClusterNetworks::default());
    let mut v: Vec<IpAddr> = s
        .endpoints
        .get(&key())
        .map(|e| e.iter().map(|e| e.address).collect())
        .unwrap_or_default();
    v.sort();
    v
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not seen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Replaces the slice with new pods (reads it first for its resourceVersion).
async fn set_pods(slices: &Api<EndpointSlice>, pods: &[(&str, &str, Option<bool>)]) {
    let cur = slices.get("web-abc").await.expect("get slice");
    let mut next = slice(pods);
    next.metadata.resource_version = cur.metadata.resource_version;
    slices
        .replace("web-abc", &PostParams::default(), &next)
        .await
        .expect("replace slice");
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// Creates the test Service under another name.
async fn create_named(services: &Api<Service>, name: &str) {
    let mut svc = service();
    svc.metadata.name = Some(name.into());
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
}

/// A test API server and a cache watching it, ready.
struct Setup {
    server: ApiServer,
    c: kube::Client,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    dirty_rx: watch::Receiver<u64>,
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
    cache: ClusterCache,
}

impl Setup {
    async fn start() -> Setup {
        let server = ApiServer::start().expect("api server");
        let c = server.client();
        let (dirty_tx, dirty_rx) = watch::channel(0u64);
        let tasks = tokio_util::task::TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let cache = ClusterCache::start(c.clone(), None, "n1", dirty_tx, &tasks, &stop);
        tokio::time::timeout(Duration::from_secs(5), cache.ready())
            .await
            .expect("ready in time")
            .expect("ready");
        Setup {
            services: Api::namespaced(c.clone(), "default"),
            slices: Api::namespaced(c.clone(), "default"),
            server,
            c,
            dirty_rx,
            tasks,
            stop,
            cache,
        }
    }
}

/// Creates the test Service and its slice with `pods`.
async fn create_web(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    pods: &[(&str, &str, Option<bool>)],
) {
    services
        .create(&PostParams::default(), &service())
        .await
        .expect("create service");
    slices
        .create(&PostParams::default(), &slice(pods))
        .await
        .expect("create slice");
}

#[tokio::test]
async fn snapshot_follows_the_api_through_faults() {
    let Setup {
        server,
        c,
        services,
        slices,
        dirty_rx,
        tasks,
        stop,
        cache,
    } = Setup::start().await;

    create_web(
        &services,
        &slices,
        &[("10.244.1.5", "n1", Some(true)), ("10.244.2.5", "n2", None)],
    )
    .await;
    // Two watches: the slice may arrive before the Service.
    until("service and endpoints", Duration::from_secs(5), || {
        addresses(&cache).len() == 2
            && !cache
                .snapshot(ClusterNetworks::default())
                .services
                .is_empty()
    })
    .await;
    let snap = cache.snapshot(ClusterNetworks::default());
    let svc = &snap.services[0];
    assert!(svc.load_balancer && svc.traffic_policy_local);
    assert_eq!(
        svc.annotations
            .get("kube-vip.io/egress")
            .map(String::as_str),
        Some("true")
    );
    let eps = &snap.endpoints[&key()];
    assert!(
        eps.iter().all(|e| e.ready),
        "an unknown ready condition counts as ready"
    );
    assert_eq!(
        eps.iter()
            .find(|e| e.address == ip("10.244.1.5"))
            .and_then(|e| e.node.clone())
            .as_deref(),
        Some("n1")
    );
    assert!(*dirty_rx.borrow() > 0, "changes mark the state dirty");

    // The endpoint pod is replaced (kube-vip's cause 2): the snapshot follows.
    set_pods(&slices, &[("10.244.1.7", "n1", Some(true))]).await;
    until("replaced pod", Duration::from_secs(5), || {
        addresses(&cache) == vec![ip("10.244.1.7")]
    })
    .await;

    server.drop_watches();
    set_pods(&slices, &[("10.244.1.8", "n1", Some(false))]).await;
    until("after dropped watches", Duration::from_secs(10), || {
        addresses(&cache) == vec![ip("10.244.1.8")]
    })
    .await;

    let lists = |server: &ApiServer| {
        server
            .calls()
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "endpointslices")
            .count()
    };
    let lists_before = lists(&server);
    server.expire_history();
    set_pods(&slices, &[("10.244.1.9", "n1", Some(true))]).await;
    until(
        "after expired history (410)",
        Duration::from_secs(10),
        || addresses(&cache) == vec![ip("10.244.1.9")],
    )
    .await;
    assert!(
        lists(&server) > lists_before,
        "a 410 makes the watcher list again"
    );

    server.fail_for(Duration::from_millis(1500));
    server.drop_watches();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    set_pods(&slices, &[("10.244.1.10", "n1", Some(true))]).await;
    until("after 500s", Duration::from_secs(15), || {
        addresses(&cache) == vec![ip("10.244.1.10")]
    })
    .await;

    services
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete service");
    until("service deleted", Duration::from_secs(5), || {
        cache
            .snapshot(ClusterNetworks::default())
            .services
            .is_empty()
    })
    .await;
    let watched: std::collections::BTreeSet<(String, String)> = server
        .calls()
        .into_iter()
        .filter(|c| c.verb == "watch" || c.verb == "list")
        .map(|c| (c.verb, c.resource))
        .collect();
    assert!(
        watched.contains(&("watch".into(), "endpointslices".into())),
        "{watched:?}"
    );
    assert!(
        watched.contains(&("list".into(), "services".into())),
        "{watched:?}"
    );

    // This node's Node, and only it: its exclusion label reaches the snapshot.
    assert!(!cache.node_found());
    let nodes: Api<Node> = Api::all(c.clone());
    let node = |name: &str, excluded: bool| -> Node {
        let labels = if excluded {
            serde_json::json!({ "node.kubernetes.io/exclude-from-external-load-balancers": "" })
        } else {
            serde_json::json!({})
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels}
        }))
        .expect("node")
    };
    nodes
        .create(&PostParams::default(), &node("n2", true))
        .await
        .expect("create n2");
    nodes
        .create(&PostParams::default(), &node("n1", false))
        .await
        .expect("create n1");
    until("this Node", Duration::from_secs(5), || cache.node_found()).await;
    assert!(
        !cache.snapshot(ClusterNetworks::default()).node_excluded,
        "another node's label does not count"
    );
    let mut n1 = nodes.get("n1").await.expect("get n1");
    n1.metadata.labels = node("n1", true).metadata.labels;
    nodes
        .replace("n1", &PostParams::default(), &n1)
        .await
        .expect("label n1");
    until("excluded", Duration::from_secs(5), || {
        cache.snapshot(ClusterNetworks::default()).node_excluded
    })
    .await;

    // Cancelling the token stops every watch task.
    stop.cancel();
    tasks.close();
    tokio::time::timeout(Duration::from_secs(2), tasks.wait())
        .await
        .expect("the watch tasks end on cancellation");
}

/// Only what kvip reads is kept: other annotations are dropped, a change of nothing kvip
/// reads does not mark the state dirty, and a slice that stops naming a Service leaves it.
#[tokio::test]
async fn only_what_kvip_reads_is_kept_and_marks_the_state_dirty() {
    let Setup {
        server,
        c: _,
        services,
        slices,
        dirty_rx,
        tasks,
        stop,
        cache,
    } = Setup::start().await;
    let mut svc = service();
    svc.metadata
        .annotations
        .get_or_insert_default()
        .insert("example.com/config".into(), "x".repeat(10_000));
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create service");
    let count = |cache: &ClusterCache| cache.snapshot(ClusterNetworks::default()).services.len();
    until("service", Duration::from_secs(5), || count(&cache) == 1).await;
    let kept: Vec<String> = cache.snapshot(ClusterNetworks::default()).services[0]
        .annotations
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        kept,
        vec!["kube-vip.io/egress", "kube-vip.io/loadbalancerIPs"]
    );

    // A change kvip does not read, then one it does: the watch delivers them in order, so
    // once the second is seen the first was handled, and only the second marked the state.
    let before = *dirty_rx.borrow();
    services
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"example.com/config": "y"}}}),
            ),
        )
        .await
        .expect("patch");
    create_named(&services, "web2").await;
    until("second service", Duration::from_secs(5), || {
        count(&cache) == 2
    })
    .await;
    assert_eq!(
        *dirty_rx.borrow(),
        before + 1,
        "only web2 marked the state dirty"
    );

    // A list again (410 Gone) that finds the same objects keeps what was stored (the same
    // `Arc`, by which the planner knows them unchanged) and marks nothing; what follows the
    // list (web3) is seen after it.
    let web_of = |cache: &ClusterCache| {
        cache
            .snapshot(ClusterNetworks::default())
            .services
            .into_iter()
            .find(|s| s.name == "web")
            .expect("web")
    };
    let stored = web_of(&cache);
    let before = *dirty_rx.borrow();
    let lists = || {
        server
            .calls()
            .iter()
            .filter(|c| c.verb == "list" && c.resource == "services")
            .count()
    };
    let lists_before = lists();
    server.expire_history();
    until("listed again", Duration::from_secs(10), || {
        lists() > lists_before
    })
    .await;
    create_named(&services, "web3").await;
    until("third service", Duration::from_secs(10), || {
        count(&cache) == 3
    })
    .await;
    assert!(std::sync::Arc::ptr_eq(&stored, &web_of(&cache)));
    assert_eq!(
        *dirty_rx.borrow(),
        before + 1,
        "only web3 marked the state dirty"
    );

    slices
        .create(
            &PostParams::default(),
            &slice(&[("10.244.1.5", "n1", Some(true))]),
        )
        .await
        .expect("create slice");
    until("endpoints", Duration::from_secs(5), || {
        addresses(&cache) == vec![ip("10.244.1.5")]
    })
    .await;
    let mut unlabelled = slices.get("web-abc").await.expect("get slice");
    unlabelled.metadata.labels = None;
    slices
        .replace("web-abc", &PostParams::default(), &unlabelled)
        .await
        .expect("unlabel slice");
    until("endpoints gone", Duration::from_secs(5), || {
        addresses(&cache).is_empty()
    })
    .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}

/// Once errors have grown the watches' backoff, an expired watch (410 Gone) is still listed
/// again at once: backing off there too left the store stale for up to the backoff's maximum
/// (30 s) after a burst of errors and expiries.
#[tokio::test]
async fn an_expired_watch_is_listed_again_at_once_whatever_the_backoff() {
    let Setup {
        server,
        services,
        slices,
        tasks,
        stop,
        cache,
        ..
    } = Setup::start().await;
    create_web(&services, &slices, &[("10.244.1.5", "n1", Some(true))]).await;
    until("endpoints", Duration::from_secs(5), || {
        addresses(&cache) == vec![ip("10.244.1.5")]
    })
    .await;

    // 500s for 2.5 s with the watches ended: the watches fail at once and a second later
    // (and maybe 2 s after that), so their backoff now stands at 4 s or more (and stays there:
    // no quiet spell follows).
    server.fail_for(Duration::from_millis(2500));
    server.drop_watches();
    let end = Instant::now() + Duration::from_secs(5);
    while slices.get("web-abc").await.is_err() {
        assert!(Instant::now() < end, "the server answers again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_pods(&slices, &[("10.244.1.6", "n1", Some(true))]).await;
    until("after the 500s", Duration::from_secs(10), || {
        addresses(&cache) == vec![ip("10.244.1.6")]
    })
    .await;

    // The history expires: the next watch gets 410 and must list again now, not 4 s later
    // (even a backoff that had grown only once would be 2 s).
    server.expire_history();
    set_pods(&slices, &[("10.244.1.7", "n1", Some(true))]).await;
    until(
        "after expired history (410), before the backoff",
        Duration::from_millis(1500),
        || addresses(&cache) == vec![ip("10.244.1.7")],
    )
    .await;
    stop.cancel();
    tasks.close();
    tasks.wait().await;
}
