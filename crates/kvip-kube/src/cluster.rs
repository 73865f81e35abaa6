//! Watches of the cluster objects `plan()` reads (Services, EndpointSlices, this node's Node)
//! and their conversion into [`kvip_core::Snapshot`]. Each watched object is converted as it
//! arrives and only the conversion is kept (the object itself is dropped at once), so memory
//! follows what kvip reads, not the size of the API's objects. Every change of a conversion
//! bumps a generation on a watch channel: the agent's loop recomputes the whole desired state
//! from the stores (level-triggered), so a missed or repeated event cannot leave anything
//! behind; an event that changes nothing kvip reads (a status written back, a new
//! resourceVersion) bumps nothing.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use kvip_core::Snapshot;
use kvip_core::annotations::PREFIX as ANNOTATION_PREFIX;
use kvip_core::plan::{ClusterNetworks, EndpointInfo, ServiceInfo, ServiceKey};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The label that takes a node out of load balancing (Kubernetes' own): a node carrying it
/// holds no VIP and competes for no Lease.
pub const EXCLUDE_FROM_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// A watch ended before its first complete list.
#[derive(Debug, thiserror::Error)]
#[error("the watch of {kind} stopped before its first complete list")]
pub struct WatchStopped {
    pub kind: String,
}

/// A slice's Service and endpoints.
type SliceEndpoints = (ServiceKey, Arc<[EndpointInfo]>);

/// What is kept of one kind of object, by namespace and name.
struct Store<T> {
    kind: String,
    items: RwLock<HashMap<(String, String), T>>,
    ready: watch::Receiver<bool>,
}

impl<T: Clone> Store<T> {
    /// The values, in no particular order. A poisoned lock (a panic while holding it, which
    /// the code under it cannot do) still yields the map: its writes are single inserts.
    fn values(&self) -> Vec<T> {
        let items = self.items.read().unwrap_or_else(|p| p.into_inner());
        items.values().cloned().collect()
    }

    fn is_empty(&self) -> bool {
        self.items
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    async fn ready(&self) -> Result<(), WatchStopped> {
        let mut rx = self.ready.clone();
        rx.wait_for(|r| *r)
            .await
            .map(|_| ())
            .map_err(|_| WatchStopped {
                kind: self.kind.clone(),
            })
    }
}

/// Watches `api` and keeps `convert(object)` for each object (`None`: nothing to keep).
/// A changed conversion bumps `dirty`; the first complete list makes the store ready.
fn watch_converted<K, T>(
    api: Api<K>,
    config: watcher::Config,
    convert: fn(&K) -> Option<T>,
    dirty: watch::Sender<u64>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Arc<Store<T>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    T: PartialEq + Send + Sync + 'static,
{
    let (ready_tx, ready) = watch::channel(false);
    let kind = K::kind(&()).to_string();
    let store = Arc::new(Store {
        kind: kind.clone(),
        items: RwLock::new(HashMap::new()),
        ready,
    });
    // Errors (500s, dropped watches) restart the watch after a growing delay; the store keeps
    // serving its last state meanwhile. An expired watch (410 Gone: the API's history moved
    // on) is re-listed at once, as kube-apiserver expects: backing off there left the store
    // stale for up to 30 s after a burst of expiries.
    let stream = watcher(api, config);
    let mut backoff = crate::backoff::WatchBackoff::up_to(std::time::Duration::from_secs(30));
    let mut last_expiry: Option<tokio::time::Instant> = None;
    let writer = Arc::clone(&store);
    tasks.spawn(async move {
        futures_util::pin_mut!(stream);
        // A re-list is collected aside and replaces the store when complete.
        let mut relist: HashMap<(String, String), T> = HashMap::new();
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.cancelled() => break,
            };
            let changed = match ev {
                Some(Ok(ev)) => {
                    kube::runtime::utils::Backoff::reset(&mut backoff);
                    apply(&writer.items, &mut relist, ev, convert, &ready_tx)
                }
                Some(Err(e)) => {
                    tracing::warn!(%kind, error = %e, "watch failed; retrying");
                    let now = tokio::time::Instant::now();
                    let expired = matches!(&e, watcher::Error::WatchError(s) if s.code == 410);
                    // At once for an expiry, unless the last one was less than a second ago
                    // (a server that expires every watch must not make this spin).
                    let at_once = expired
                        && last_expiry.is_none_or(|t| {
                            now.duration_since(t) >= std::time::Duration::from_secs(1)
                        });
                    if expired {
                        last_expiry = Some(now);
                    }
                    if !at_once {
                        let d = backoff.next().unwrap_or(std::time::Duration::from_secs(30));
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = stop.cancelled() => break,
                        }
                    }
                    false
                }
                None => break,
            };
            if changed {
                dirty.send_modify(|g| *g += 1);
            }
        }
    });
    store
}

fn key_of<K: kube::Resource>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// One watch event into the store; whether what is kept changed.
fn apply<K: kube::Resource, T: PartialEq>(
    items: &RwLock<HashMap<(String, String), T>>,
    relist: &mut HashMap<(String, String), T>,
    ev: watcher::Event<K>,
    convert: fn(&K) -> Option<T>,
    ready: &watch::Sender<bool>,
) -> bool {
    let write = || items.write().unwrap_or_else(|p| p.into_inner());
    match ev {
        watcher::Event::Apply(obj) => {
            let key = key_of(&obj);
            match convert(&obj) {
                Some(v) => {
                    let mut items = write();
                    if items.get(&key) == Some(&v) {
                        false
                    } else {
                        items.insert(key, v);
                        true
                    }
                }
                None => write().remove(&key).is_some(),
            }
        }
        watcher::Event::Delete(obj) => write().remove(&key_of(&obj)).is_some(),
        watcher::Event::Init => {
            relist.clear();
            false
        }
        watcher::Event::InitApply(obj) => {
            if let Some(v) = convert(&obj) {
                relist.insert(key_of(&obj), v);
            }
            false
        }
        watcher::Event::InitDone => {
            // What the list found replaces the store; a value equal to the stored one keeps
            // the stored one (its `Arc`, by which the planner recognises it unchanged).
            let mut items = write();
            let mut old = std::mem::take(&mut *items);
            let mut changed = old.len() != relist.len();
            for (k, v) in relist.drain() {
                match old.remove(&k) {
                    Some(o) if o == v => {
                        items.insert(k, o);
                    }
                    _ => {
                        changed = true;
                        items.insert(k, v);
                    }
                }
            }
            *relist = HashMap::new();
            let first = !ready.send_replace(true);
            changed || first
        }
    }
}

/// What kvip keeps of the watched objects. The tasks feeding it run on the caller's tracker
/// and end when its token is cancelled.
pub struct ClusterCache {
    services: Arc<Store<Arc<ServiceInfo>>>,
    slices: Arc<Store<SliceEndpoints>>,
    /// This node's Node, if it exists: whether it carries [`EXCLUDE_FROM_LB_LABEL`].
    node: Arc<Store<bool>>,
}

impl ClusterCache {
    /// Starts watching Services and EndpointSlices (in `namespace`, or all namespaces) and
    /// the Node named `node`, on `tasks`, until `stop` is cancelled.
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        node: &str,
        dirty: watch::Sender<u64>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> ClusterCache {
        let all = watcher::Config::default;
        let services = match namespace {
            Some(ns) => Api::<Service>::namespaced(client.clone(), ns),
            None => Api::<Service>::all(client.clone()),
        };
        let slices = match namespace {
            Some(ns) => Api::<EndpointSlice>::namespaced(client.clone(), ns),
            None => Api::<EndpointSlice>::all(client.clone()),
        };
        ClusterCache {
            services: watch_converted(
                services,
                all(),
                |s| Some(Arc::new(service_info(s))),
                dirty.clone(),
                tasks,
                stop.child_token(),
            ),
            slices: watch_converted(
                slices,
                all(),
                |s| slice_endpoints(s).map(|(k, e)| (k, Arc::from(e))),
                dirty.clone(),
                tasks,
                stop.child_token(),
            ),
            node: watch_converted(
                Api::<Node>::all(client),
                all().fields(&format!("metadata.name={node}")),
                |n: &Node| {
                    Some(
                        n.metadata
                            .labels
                            .as_ref()
                            .is_some_and(|l| l.contains_key(EXCLUDE_FROM_LB_LABEL)),
                    )
                },
                dirty,
                tasks,
                stop.child_token(),
            ),
        }
    }

    /// Waits until every store holds a complete initial list.
    pub async fn ready(&self) -> Result<(), WatchStopped> {
        self.services.ready().await?;
        self.slices.ready().await?;
        self.node.ready().await
    }

    /// Whether this node's Node object exists (it may be missing when `vip_nodename` is
    /// wrong; kvip then runs as a node without labels).
    pub fn node_found(&self) -> bool {
        !self.node.is_empty()
    }

    /// Whether this node's Node carries [`EXCLUDE_FROM_LB_LABEL`].
    pub fn node_excluded(&self) -> bool {
        self.node.values().into_iter().any(|x| x)
    }

    /// The current state as `plan()` reads it. An unchanged object is the same `Arc` from
    /// one snapshot to the next, which the planner uses to skip it.
    pub fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        let services = self.services.values();
        let mut endpoints: BTreeMap<ServiceKey, Arc<[EndpointInfo]>> = BTreeMap::new();
        for (key, eps) in self.slices.values() {
            // One slice per Service is the common case: shared as it is. Several: joined.
            match endpoints.entry(key) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(eps);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => {
                    // In a stable order (the store's is not), so the planner sees an
                    // unchanged Service as unchanged.
                    let mut joined: Vec<EndpointInfo> =
                        o.get().iter().chain(eps.iter()).cloned().collect();
                    joined.sort_by(|a, b| {
                        (a.address, &a.node, a.ready).cmp(&(b.address, &b.node, b.ready))
                    });
                    o.insert(joined.into());
                }
            }
        }
        Snapshot {
            services,
            endpoints,
            networks,
            node_excluded: self.node_excluded(),
        }
    }
}

/// What `plan()` needs of a Service (of its annotations, kube-vip's only).
pub fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.as_ref();
    let status_ips = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| ing.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default();
    ServiceInfo {
        namespace: s.metadata.namespace.clone().unwrap_or_default(),
        name: s.metadata.name.clone().unwrap_or_default(),
        load_balancer: spec.and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer"),
        load_balancer_class: spec.and_then(|sp| sp.load_balancer_class.clone()),
        load_balancer_ip: spec.and_then(|sp| sp.load_balancer_ip.clone()),
        status_ips,
        traffic_policy_local: spec.and_then(|sp| sp.external_traffic_policy.as_deref())
            == Some("Local"),
        // Only kube-vip's: the others (a last-applied configuration, say) can be large and
        // nothing reads them.
        annotations: s
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The endpoints of one EndpointSlice, keyed by its Service. Addresses that are not IPs (FQDN
/// slices) are skipped; an unknown `ready` condition counts as ready, as the API defines.
pub fn slice_endpoints(slice: &EndpointSlice) -> Option<(ServiceKey, Vec<EndpointInfo>)> {
    let name = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .clone();
    let key = ServiceKey {
        namespace: slice.metadata.namespace.clone().unwrap_or_default(),
        name,
    };
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        // `serving` unset: as `ready` (the API's definition).
        let serving = ep
            .conditions
            .as_ref()
            .and_then(|c| c.serving)
            .unwrap_or(ready);
        for a in &ep.addresses {
            if let Ok(address) = a.parse::<IpAddr>() {
                out.push(EndpointInfo {
                    address,
                    node: ep.node_name.clone(),
                    ready,
                    serving,
                });
            }
        }
    }
    Some((key, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_endpoints_read_ready_and_serving_as_the_api_defines_them() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.1"], "nodeName": "n1"},
                {"addresses": ["10.244.1.2"], "nodeName": "n1",
                 "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.244.1.3"], "nodeName": "n1",
                 "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.244.1.4"], "conditions": {"ready": false}},
                {"addresses": ["not-an-ip"]}
            ]
        }))
        .expect("slice");
        let (key, eps) = slice_endpoints(&slice).expect("a Service's slice");
        assert_eq!(key.to_string(), "default/web");
        let got: Vec<(String, bool, bool)> = eps
            .iter()
            .map(|e| (e.address.to_string(), e.ready, e.serving))
            .collect();
        assert_eq!(
            got,
            [
                ("10.244.1.1".to_string(), true, true),
                ("10.244.1.2".to_string(), false, true),
                ("10.244.1.3".to_string(), false, false),
                ("10.244.1.4".to_string(), false, false),
            ]
        );
    }
}
