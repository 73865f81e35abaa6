//! The control-plane VIP (`cp_enable`): the API server's highly available address, held by
//! one control-plane node at a time under its own Lease, and only while that node's own API
//! server answers `/readyz`.
//!
//! - Every call goes to the node's own API server (`127.0.0.1:<port>` or `kubernetes_addr`),
//!   whatever server the kubeconfig names (kubeadm writes the VIP there), with its certificate
//!   verified for the name `kubernetes` (kubeadm's has no 127.0.0.1 in it).
//! - Bootstrap: while the API refuses the kubeconfig's identity (the first `kubeadm init`
//!   since Kubernetes 1.29, when `admin.conf`'s group is not bound yet) and a non-empty
//!   `super-admin.conf` lies beside it, the Lease is written as that identity; the first one
//!   is asked again every [`IDENTITY_CHECK`] and used again once authorised.
//! - Health: [`health`] asks `/readyz` every period; that many failures in a row make the node
//!   unhealthy (the loop drops the VIP, then the election releases the Lease), as many
//!   successes in a row make it compete again. It never takes the VIP back from a holder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, PostParams};
use kvip_core::VipClaim;
use kvip_core::control_plane::{API_SERVER_NAME, ControlPlaneConfig};
use kvip_core::lease::Timings;
use kvip_kube::election::{Leader, Release};
use kvip_kube::{Election, LeaseLock};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{CallError, bounded};
use crate::metrics::Metrics;

/// How often the route is looked at again without a change of health: the kubeconfig's
/// identity asked (SelfSubjectAccessReview) and the other API servers listed.
const IDENTITY_CHECK: Duration = Duration::from_secs(10);

/// What the reconcile loop needs of the control-plane VIP.
pub(crate) struct ControlPlane {
    pub claim: VipClaim,
    /// The control-plane Lease's renew deadline while this node holds it.
    pub leader: watch::Receiver<Leader>,
    /// Whether the local API server is ready (see [`health`]).
    pub healthy: watch::Receiver<bool>,
    /// Set by the loop after each applied sync: whether this node competes (healthy). The
    /// election hears of a step-down only once the VIP is gone from the kernel.
    pub candidate: watch::Sender<bool>,
}

/// The kubeconfig at `path` with its server replaced by the local API server, verified for
/// the name `kubernetes` over TLS.
pub(crate) async fn local_config(
    path: &Path,
    cp: &ControlPlaneConfig,
) -> Result<Option<kube::Config>> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(m) if m.len() == 0 => return Ok(None),
        Ok(_) => {}
    }
    let kc = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("kubeconfig {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .with_context(|| format!("kubeconfig {}", path.display()))?;
    let url = cp.local_api_url();
    config.cluster_url = url
        .parse()
        .with_context(|| format!("kubernetes_addr {url:?} is not a URL"))?;
    if config.cluster_url.scheme_str() == Some("https") {
        config.tls_server_name = Some(API_SERVER_NAME.into());
    }
    config.connect_timeout = Some(Duration::from_secs(2));
    Ok(Some(config))
}

/// `super-admin.conf` beside `kubeconfig`.
pub(crate) fn super_admin_path(kubeconfig: &Path) -> PathBuf {
    kubeconfig.with_file_name("super-admin.conf")
}

/// The identities kvip may write the control-plane Lease as: the kubeconfig's, and
/// `super-admin.conf`'s while that one is refused. Both point at the local API server.
pub(crate) struct Credentials {
    pub primary: kube::Config,
    pub super_admin: Option<kube::Config>,
}

/// Starts the health check, the choice of identity and API server, and the control-plane
/// election.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    cp: &ControlPlaneConfig,
    claim: VipClaim,
    identity: &str,
    creds: Credentials,
    timings: Timings,
    m: &Arc<Metrics>,
    tasks: &TaskTracker,
    root: &CancellationToken,
) -> Result<(ControlPlane, JoinHandle<Release>)> {
    let local =
        kube::Client::try_from(creds.primary.clone()).context("creating the local API client")?;
    let (client_tx, client_rx) = watch::channel(local.clone());
    // The health check asks the local API server alone, whatever the election talks to. Its
    // verdict reaches the loop only after the route has followed it: a node that drops the
    // VIP then releases the Lease through an API server that answers.
    let (checked_tx, checked) = watch::channel(false);
    let (healthy_tx, healthy) = watch::channel(false);
    tasks.spawn(health(
        local,
        cp.clone(),
        checked_tx,
        m.clone(),
        root.child_token(),
    ));
    tasks.spawn(route(
        creds,
        cp.clone(),
        checked,
        healthy_tx,
        client_tx,
        m.clone(),
        root.child_token(),
    ));
    let (candidate, candidate_rx) = watch::channel(false);
    let (leader_tx, leader) = watch::channel(None);
    let lock = LeaseLock::switchable(client_rx, &cp.lease_namespace, &cp.lease_name);
    let release = tasks.spawn(Election::new(lock, identity, timings).run(
        candidate_rx,
        leader_tx,
        root.child_token(),
    ));
    Ok((
        ControlPlane {
            claim,
            leader,
            healthy,
            candidate,
        },
        release,
    ))
}

/// Whether `client`'s identity may update Leases in `namespace`.
async fn may_update_leases(client: &kube::Client, namespace: &str) -> Result<bool, CallError> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some("coordination.k8s.io".into()),
                resource: Some("leases".into()),
                verb: Some("update".into()),
                namespace: Some(namespace.into()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    match bounded(api.create(&PostParams::default(), &review)).await {
        Ok(r) => Ok(r.status.is_some_and(|s| s.allowed)),
        // Refused outright (no rights at all, or not authenticated): not authorised.
        Err(CallError::Api(kube::Error::Api(s))) if s.code == 401 || s.code == 403 => Ok(false),
        Err(e) => Err(e),
    }
}

/// `config` with its server replaced by `base` (another control-plane node's API server),
/// or as it is (the local one).
fn client_for(config: &kube::Config, base: Option<&str>) -> Result<kube::Client> {
    let mut c = config.clone();
    if let Some(b) = base {
        c.cluster_url = b.parse().with_context(|| format!("API server URL {b:?}"))?;
    }
    kube::Client::try_from(c).context("creating an API client")
}

/// The other API servers of the cluster: the endpoints of the `default/kubernetes` Service,
/// as URLs with the local one's scheme (their certificates carry the name `kubernetes` too).
async fn api_servers(client: &kube::Client, scheme: &str) -> Result<Vec<String>, CallError> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().labels("kubernetes.io/service-name=kubernetes");
    let slices = bounded(api.list(&lp)).await?;
    let mut out = Vec::new();
    for s in slices.items {
        let Some(port) = s.ports.iter().flatten().find_map(|p| p.port) else {
            continue;
        };
        for e in &s.endpoints {
            for a in &e.addresses {
                let host = match a.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                    _ => a.clone(),
                };
                out.push(format!("{scheme}://{host}:{port}"));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The first of `peers` whose `/readyz` answers.
async fn ready_peer(config: &kube::Config, peers: &[String], timeout: Duration) -> Option<String> {
    for p in peers {
        let c = match client_for(config, Some(p)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(api_server = %p, error = format!("{e:#}"), "a client for another API server");
                continue;
            }
        };
        match readyz(&c, timeout).await {
            Ok(()) => return Some(p.clone()),
            Err(e) => tracing::debug!(api_server = %p, error = %e, "another API server's /readyz"),
        }
    }
    None
}

/// Chooses what the control-plane Lease is written through:
/// - the identity: the kubeconfig's while it is authorised, `super-admin.conf`'s while it is
///   not and the file exists (a first `kubeadm init`), asked again every [`IDENTITY_CHECK`];
/// - the API server: the local one while it is ready; while it is not, another control-plane
///   node's (learnt from the `kubernetes` Service while the local one was ready), so that
///   the Lease is released at once instead of expiring.
#[allow(clippy::too_many_arguments)]
async fn route(
    creds: Credentials,
    cp: ControlPlaneConfig,
    mut checked: watch::Receiver<bool>,
    healthy: watch::Sender<bool>,
    client: watch::Sender<kube::Client>,
    m: Arc<Metrics>,
    stop: CancellationToken,
) {
    let scheme = creds
        .primary
        .cluster_url
        .scheme_str()
        .unwrap_or("https")
        .to_string();
    let mut using_super_admin = false;
    let mut peers: Vec<String> = Vec::new();
    let mut warned = false;
    let mut peers_failing = false;
    // The route the election's client follows now: (super-admin.conf, another API server).
    let mut current: (bool, Option<String>) = (false, None);
    let mut next_check = tokio::time::Instant::now();
    loop {
        let is_healthy = *checked.borrow_and_update();
        let base = if is_healthy {
            None
        } else {
            ready_peer(&creds.primary, &peers, cp.health_timeout).await
        };
        // Every IDENTITY_CHECK, and at once when the list of the other API servers is still
        // to be read while the local one is ready.
        if tokio::time::Instant::now() >= next_check || (is_healthy && peers.is_empty()) {
            next_check = tokio::time::Instant::now() + IDENTITY_CHECK;
            match client_for(&creds.primary, base.as_deref()) {
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "checking the kubeconfig's identity"
                ),
                Ok(c) => {
                    match may_update_leases(&c, &cp.lease_namespace).await {
                        Ok(true) if using_super_admin => {
                            tracing::info!(
                                "the kubeconfig's identity is authorised now: the control-plane Lease is written with it again, no longer with super-admin.conf"
                            );
                            using_super_admin = false;
                        }
                        Ok(false) if !using_super_admin && creds.super_admin.is_some() => {
                            tracing::warn!(
                                "the API refuses the kubeconfig's identity the control-plane Lease (a first kubeadm init): using super-admin.conf until it is authorised"
                            );
                            using_super_admin = true;
                        }
                        Ok(false) if !using_super_admin && !warned => {
                            warned = true;
                            tracing::error!(
                                namespace = %cp.lease_namespace,
                                "the kubeconfig's identity may not update Leases and there is no super-admin.conf beside it: this node cannot hold the control-plane VIP; grant it coordination.k8s.io leases in that namespace"
                            );
                        }
                        Ok(_) => {}
                        // No answer: nothing to decide now (the health check says so).
                        Err(e) => tracing::debug!(error = %e, "checking the kubeconfig's identity"),
                    }
                    if is_healthy {
                        match api_servers(&c, &scheme).await {
                            Ok(p) => {
                                peers = p;
                                peers_failing = false;
                            }
                            // Once per failing streak: without them, a node whose API server dies
                            // leaves its Lease to expire instead of releasing it.
                            Err(e) if !peers_failing => {
                                peers_failing = true;
                                tracing::warn!(error = %e, "listing the other API servers (the kubernetes Service's endpoints)");
                            }
                            Err(e) => tracing::debug!(error = %e, "listing the other API servers"),
                        }
                    }
                }
            }
        }
        let want = (using_super_admin, base);
        if current != want {
            let config = match (&creds.super_admin, want.0) {
                (Some(sa), true) => sa,
                _ => &creds.primary,
            };
            match client_for(config, want.1.as_deref()) {
                Ok(c) => {
                    if let Some(b) = &want.1 {
                        tracing::warn!(api_server = %b, "the local API server is not ready: the control-plane Lease is written through another control-plane node's");
                    } else if current.1.is_some() {
                        tracing::info!(
                            "the local API server is ready: the control-plane Lease is written through it again"
                        );
                    }
                    client.send_replace(c);
                    current = want;
                }
                Err(e) => tracing::error!(error = format!("{e:#}"), "choosing the API server"),
            }
        }
        m.control_plane_super_admin
            .set(i64::from(using_super_admin));
        // Only now, with the Lease's route set, does the loop hear of the health.
        healthy.send_if_modified(|v| std::mem::replace(v, is_healthy) != is_healthy);
        tokio::select! {
            _ = tokio::time::sleep_until(next_check) => {}
            _ = checked.changed() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Why `/readyz` did not answer `ok`.
#[derive(Debug, thiserror::Error)]
enum NotReady {
    #[error(transparent)]
    Request(#[from] http::Error),
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Whether `/readyz` answers within `timeout`.
async fn readyz(client: &kube::Client, timeout: Duration) -> Result<(), NotReady> {
    let req = http::Request::get("/readyz").body(Vec::new())?;
    tokio::time::timeout(timeout, client.request_text(req))
        .await
        .map_err(|_| NotReady::Timeout(timeout))??;
    Ok(())
}

/// Asks the local API server's `/readyz` every period; publishes whether it is ready, with
/// `health_failures` results in a row needed to change the answer either way.
async fn health(
    client: kube::Client,
    cp: ControlPlaneConfig,
    healthy: watch::Sender<bool>,
    m: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut streak = 0u32;
    // The last failure logged: each new reason is said once, at warn (a certificate that
    // does not name `kubernetes` fails every check the same way, and must not go unseen).
    let mut said: Option<String> = None;
    let mut tick = tokio::time::interval(cp.health_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let answer = readyz(&client, cp.health_timeout).await;
        match &answer {
            Err(e) => {
                m.control_plane_health_failures.inc();
                let why = kvip_kube::Causes(e).to_string();
                if said.as_ref() != Some(&why) {
                    tracing::warn!(error = %why, "the local API server's /readyz failed");
                    said = Some(why);
                }
            }
            Ok(()) => said = None,
        }
        let ok = answer.is_ok();
        let now = *healthy.borrow();
        if ok == now {
            streak = 0;
            continue;
        }
        streak += 1;
        if streak >= cp.health_failures {
            streak = 0;
            if ok {
                tracing::info!(
                    "the local API server is ready: competing for the control-plane VIP"
                );
            } else {
                tracing::warn!(
                    failures = cp.health_failures,
                    "the local API server does not answer /readyz: dropping the control-plane VIP and its Lease"
                );
            }
            m.control_plane_api_ready.set(i64::from(ok));
            healthy.send_replace(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(local_api: Option<&str>) -> ControlPlaneConfig {
        ControlPlaneConfig {
            address: "192.0.2.100".parse().expect("ip"),
            port: 6443,
            lease_namespace: "kube-system".into(),
            lease_name: "plndr-cp-lock".into(),
            local_api: local_api.map(str::to_string),
            health_period: Duration::from_secs(1),
            health_timeout: Duration::from_secs(1),
            health_failures: 3,
        }
    }

    #[tokio::test]
    async fn the_kubeconfigs_server_is_replaced_by_the_local_one_verified_as_kubernetes() {
        let dir = std::env::temp_dir().join(format!("kvip-cp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let admin = dir.join("admin.conf");
        // kubeadm writes the control-plane endpoint (the VIP) as the server.
        std::fs::write(
            &admin,
            "apiVersion: v1\nkind: Config\nclusters: [{name: k, cluster: {server: \"https://192.0.2.100:6443\"}}]\nusers: [{name: a, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: k, user: a}}]\ncurrent-context: c\n",
        )
        .expect("write");
        let c = local_config(&admin, &cp(None))
            .await
            .expect("config")
            .expect("present");
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(c.tls_server_name.as_deref(), Some("kubernetes"));
        let c = local_config(&admin, &cp(Some("http://127.0.0.1:8080")))
            .await
            .expect("config")
            .expect("present");
        assert_eq!(c.cluster_url.to_string(), "http://127.0.0.1:8080/");
        assert_eq!(c.tls_server_name, None);
        // A missing or empty super-admin.conf counts as absent.
        let sa = super_admin_path(&admin);
        assert_eq!(sa, dir.join("super-admin.conf"));
        assert!(
            local_config(&sa, &cp(None))
                .await
                .expect("absent")
                .is_none()
        );
        std::fs::write(&sa, "").expect("write");
        assert!(local_config(&sa, &cp(None)).await.expect("empty").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
