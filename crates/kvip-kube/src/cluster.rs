//! Watches of the cluster objects `plan()` reads (Services, EndpointSlices, this node's Node),
//! kept in reflector stores, and their conversion into [`kvip_core::Snapshot`]. Every change bumps a generation
//! on a watch channel: the agent's loop recomputes the whole desired state from the stores
//! (level-triggered), so a missed or repeated event cannot leave anything behind.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kvip_core::Snapshot;
use kvip_core::plan::{ClusterNetworks, EndpointInfo, ServiceInfo, ServiceKey};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The label that takes a node out of load balancing (Kubernetes' own): a node carrying it
/// holds no VIP and competes for no Lease.
pub const EXCLUDE_FROM_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Reflector stores of the watched objects. The tasks feeding them run on the caller's
/// tracker and end when its token is cancelled.
pub struct ClusterCache {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    /// Conversions of the stored objects, by namespace/name, kept while the object's
    /// resourceVersion stays the same: a snapshot converts only what changed.
    converted: std::sync::Mutex<Converted>,
}

/// What was made of each stored object, by the object's identity: the store replaces an
/// object's `Arc` whenever it changes, so an `Arc` seen before is the same object. The memory
/// keeps the `Arc` (the store holds it anyway), so its address cannot be reused meanwhile.
type Memo<K, T> = std::collections::HashMap<usize, (Arc<K>, T)>;

/// A slice's Service and endpoints.
type SliceEndpoints = (ServiceKey, Arc<[EndpointInfo]>);

#[derive(Default)]
struct Converted {
    services: Memo<Service, Arc<ServiceInfo>>,
    slices: Memo<EndpointSlice, Option<SliceEndpoints>>,
}

/// `convert(obj)`, or the memory of it for an object seen before.
fn memoised<K, T: Clone>(
    memo: &mut Memo<K, T>,
    seen: &mut std::collections::HashSet<usize>,
    obj: &Arc<K>,
    convert: impl FnOnce(&K) -> T,
) -> T {
    let id = Arc::as_ptr(obj) as usize;
    seen.insert(id);
    if let Some((_, v)) = memo.get(&id) {
        return v.clone();
    }
    let v = convert(obj);
    memo.insert(id, (Arc::clone(obj), v.clone()));
    v
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    dirty: watch::Sender<u64>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, config))
        // Errors (500s, dropped or expired watches) restart the watch with backoff; the
        // store keeps serving its last state meanwhile.
        .backoff(crate::backoff::WatchBackoff::up_to(
            std::time::Duration::from_secs(30),
        ));
    let kind = K::kind(&());
    tasks.spawn(async move {
        futures_util::pin_mut!(stream);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.cancelled() => break,
            };
            match ev {
                Some(Ok(_)) => {
                    dirty.send_modify(|g| *g += 1);
                }
                Some(Err(e)) => tracing::warn!(%kind, error = %e, "watch failed; retrying"),
                None => break,
            }
        }
    });
    reader
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
            services: spawn_reflector(services, all(), dirty.clone(), tasks, stop.child_token()),
            slices: spawn_reflector(slices, all(), dirty.clone(), tasks, stop.child_token()),
            node: spawn_reflector(
                Api::<Node>::all(client),
                all().fields(&format!("metadata.name={node}")),
                dirty,
                tasks,
                stop.child_token(),
            ),
            converted: std::sync::Mutex::new(Converted::default()),
        }
    }

    /// Waits until every store holds a complete initial list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.node.wait_until_ready().await
    }

    /// Whether this node's Node object exists (it may be missing when `vip_nodename` is
    /// wrong; kvip then runs as a node without labels).
    pub fn node_found(&self) -> bool {
        !self.node.state().is_empty()
    }

    /// Whether this node's Node carries [`EXCLUDE_FROM_LB_LABEL`].
    pub fn node_excluded(&self) -> bool {
        self.node.state().iter().any(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key(EXCLUDE_FROM_LB_LABEL))
        })
    }

    /// The current state as `plan()` reads it.
    pub fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        // Poisoned only if a conversion panicked; the memory is then simply rebuilt.
        let mut memo = self.converted.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            *g = Converted::default();
            g
        });
        let Converted {
            services: svc_memo,
            slices: slice_memo,
        } = &mut *memo;
        let mut seen = std::collections::HashSet::new();
        let services = self
            .services
            .state()
            .iter()
            .map(|s| memoised(svc_memo, &mut seen, s, |s| Arc::new(service_info(s))))
            .collect();
        svc_memo.retain(|k, _| seen.contains(k));
        seen.clear();
        let mut endpoints: BTreeMap<ServiceKey, Arc<[EndpointInfo]>> = BTreeMap::new();
        for slice in self.slices.state() {
            let Some((key, eps)) = memoised(slice_memo, &mut seen, &slice, |s| {
                slice_endpoints(s).map(|(k, e)| (k, Arc::from(e)))
            }) else {
                continue;
            };
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
                    joined.sort_by(|a, b| (a.address, &a.node).cmp(&(b.address, &b.node)));
                    o.insert(joined.into());
                }
            }
        }
        slice_memo.retain(|k, _| seen.contains(k));
        drop(memo);
        Snapshot {
            services,
            endpoints,
            networks,
            node_excluded: self.node_excluded(),
        }
    }
}

/// What `plan()` needs of a Service.
pub fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.clone().unwrap_or_default();
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
        load_balancer: spec.type_.as_deref() == Some("LoadBalancer"),
        load_balancer_class: spec.load_balancer_class,
        load_balancer_ip: spec.load_balancer_ip,
        status_ips,
        traffic_policy_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        annotations: s.metadata.annotations.clone().unwrap_or_default(),
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
        for a in &ep.addresses {
            if let Ok(address) = a.parse::<IpAddr>() {
                out.push(EndpointInfo {
                    address,
                    node: ep.node_name.clone(),
                    ready,
                });
            }
        }
    }
    Some((key, out))
}
