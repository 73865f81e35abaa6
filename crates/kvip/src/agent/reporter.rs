//! The reporter: writes what the latest applied plan means to the API — each held Service's
//! status and kube-vip's annotations, and Events — and raises the Warnings for missing
//! permissions. It only ever reads the latest plan from a watch channel, so a slow or hanging
//! API delays the reporting, never the kernel; every call is bounded in time.

use std::collections::HashMap;
use std::sync::Arc;

use kvip_core::plan::{ServiceInfo, ServiceKey};
use kvip_core::{Plan, Snapshot};
use kvip_kube::publish::{self, HolderView};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::client::API_CALL_TIMEOUT;
use super::events::ServiceEvents;
use super::permissions::Missing;

/// What one sync decided, for the reporter.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub snapshot: Arc<Snapshot>,
    pub plan: Arc<Plan>,
    /// The desired state was invalid: the kernel keeps its last good state.
    pub invalid: Option<String>,
}

/// What was last written to each held Service, with the object it was compared with: while
/// both stay the same, there is nothing to compare again.
type Published = HashMap<ServiceKey, (Arc<ServiceInfo>, HolderView)>;

/// Writes, for each Service this node holds, its VIPs into the status and kube-vip's
/// annotations (only what differs). Failures are logged; the next report tries again.
async fn publish_held(client: &kube::Client, r: &Report, node: &str, done: &mut Published) {
    // One index per report: looking each held Service up by scanning would make every
    // report quadratic in the number of Services.
    let mut by_key: HashMap<(&str, &str), &Arc<ServiceInfo>> =
        HashMap::with_capacity(r.snapshot.services.len());
    for s in &r.snapshot.services {
        by_key.insert((s.namespace.as_str(), s.name.as_str()), s);
    }
    done.retain(|k, _| r.plan.services.get(k).is_some_and(|sp| sp.held));
    for (key, sp) in r.plan.services.iter().filter(|(_, sp)| sp.held) {
        let Some(svc) = by_key.get(&(key.namespace.as_str(), key.name.as_str())) else {
            continue;
        };
        let first_pod = |v6: bool| {
            sp.egress_pods
                .iter()
                .filter(|(vip, _)| vip.is_ipv6() == v6)
                .find_map(|(_, pods)| pods.first().copied())
        };
        let (active4, active6) = (first_pod(false), first_pod(true));
        if done.get(key).is_some_and(|(seen, v)| {
            Arc::ptr_eq(seen, svc)
                && v.vips == sp.vips
                && v.active4 == active4
                && v.active6 == active6
        }) {
            continue;
        }
        let view = HolderView {
            node: node.to_string(),
            vips: sp.vips.clone(),
            active4,
            active6,
        };
        // Two calls at most (status, annotations).
        match tokio::time::timeout(2 * API_CALL_TIMEOUT, publish::publish(client, svc, &view)).await
        {
            Ok(Ok(_)) => {
                done.insert(key.clone(), (Arc::clone(svc), view));
            }
            Ok(Err(e)) => {
                done.remove(key);
                tracing::warn!(service = %key, error = %e, "writing the Service's status and annotations")
            }
            Err(_) => {
                done.remove(key);
                tracing::warn!(service = %key, "writing the Service's status and annotations timed out")
            }
        }
    }
}

/// Runs until `root` is cancelled.
pub(crate) async fn run(
    client: kube::Client,
    node: String,
    mut reports: watch::Receiver<Option<Report>>,
    mut missing: watch::Receiver<Vec<Missing>>,
    root: CancellationToken,
) {
    let mut events = ServiceEvents::new(client.clone(), &node);
    let mut published = Published::new();
    loop {
        let report = reports.borrow_and_update().clone();
        let missing_now = missing.borrow_and_update().clone();
        if let Some(r) = report {
            let work = async {
                if r.invalid.is_none() {
                    publish_held(&client, &r, &node, &mut published).await;
                    events.report(&r.plan).await;
                }
                events.report_invalid(&r.plan, r.invalid.as_deref()).await;
                events.report_missing(&r.plan, &missing_now).await;
            };
            tokio::select! {
                _ = work => {}
                _ = root.cancelled() => return,
            }
        }
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            r = missing.changed() => if r.is_err() { return },
            _ = root.cancelled() => return,
        }
    }
}
