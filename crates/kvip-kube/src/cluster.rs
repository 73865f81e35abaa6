//! Watches of the cluster objects `plan()` reads (Services, EndpointSlices), kept in reflector
//! stores, and their conversion into [`kvip_core::Snapshot`]. Every change bumps a generation
//! on a watch channel: the agent's loop recomputes the whole desired state from the stores
//! (level-triggered), so a missed or repeated event cannot leave anything behind.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kvip_core::Snapshot;
use kvip_core::plan::{ClusterNetworks, EndpointInfo, ServiceInfo, ServiceKey};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Reflector stores of the watched objects, and the tasks feeding them.
pub struct ClusterCache {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ClusterCache {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn spawn_reflector<K>(api: Api<K>, dirty: watch::Sender<u64>) -> (Store<K>, JoinHandle<()>)
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
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        // Errors (500s, dropped or expired watches) restart the watch with backoff; the
        // store keeps serving its last state meanwhile.
        .default_backoff();
    let task = tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    dirty.send_modify(|g| *g += 1);
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying"),
            }
        }
    });
    (reader, task)
}

impl ClusterCache {
    /// Starts watching Services and EndpointSlices (in `namespace`, or all namespaces).
    pub fn start(
        client: Client,
        namespace: Option<&str>,
        dirty: watch::Sender<u64>,
    ) -> ClusterCache {
        let (services, t1) = match namespace {
            Some(ns) => spawn_reflector(
                Api::<Service>::namespaced(client.clone(), ns),
                dirty.clone(),
            ),
            None => spawn_reflector(Api::<Service>::all(client.clone()), dirty.clone()),
        };
        let (slices, t2) = match namespace {
            Some(ns) => spawn_reflector(Api::<EndpointSlice>::namespaced(client, ns), dirty),
            None => spawn_reflector(Api::<EndpointSlice>::all(client), dirty),
        };
        ClusterCache {
            services,
            slices,
            tasks: vec![t1, t2],
        }
    }

    /// Waits until both stores hold a complete initial list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await
    }

    /// The current state as `plan()` reads it.
    pub fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        let services = self
            .services
            .state()
            .iter()
            .map(|s| service_info(s))
            .collect();
        let mut endpoints: BTreeMap<ServiceKey, Vec<EndpointInfo>> = BTreeMap::new();
        for slice in self.slices.state() {
            let Some((key, eps)) = slice_endpoints(&slice) else {
                continue;
            };
            endpoints.entry(key).or_default().extend(eps);
        }
        Snapshot {
            services,
            endpoints,
            networks,
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
