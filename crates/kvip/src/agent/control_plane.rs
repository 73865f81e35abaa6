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
use kube::Api;
use kube::api::PostParams;
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

/// How often the kubeconfig's own identity is asked again while `super-admin.conf` is used.
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

/// A client of the kubeconfig at `path`, pointed at the local API server. `None` when the
/// file is missing or empty (a joined node's `super-admin.conf`, created empty by its volume).
pub(crate) async fn local_client(
    path: &Path,
    cp: &ControlPlaneConfig,
) -> Result<Option<kube::Client>> {
    local_config(path, cp)
        .await?
        .map(|c| kube::Client::try_from(c).context("creating the local API client"))
        .transpose()
}

/// The kubeconfig at `path` with its server replaced by the local API server, verified for
/// the name `kubernetes` over TLS.
async fn local_config(path: &Path, cp: &ControlPlaneConfig) -> Result<Option<kube::Config>> {
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

/// Starts the health check, the identity choice and the control-plane election.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    cp: &ControlPlaneConfig,
    claim: VipClaim,
    identity: &str,
    primary: kube::Client,
    super_admin: Option<kube::Client>,
    timings: Timings,
    m: &Arc<Metrics>,
    tasks: &TaskTracker,
    root: &CancellationToken,
) -> (ControlPlane, JoinHandle<Release>) {
    let (client_tx, client_rx) = watch::channel(primary.clone());
    tasks.spawn(choose_identity(
        primary,
        super_admin,
        client_tx,
        cp.lease_namespace.clone(),
        m.clone(),
        root.child_token(),
    ));
    let (healthy_tx, healthy) = watch::channel(false);
    tasks.spawn(health(
        client_rx.clone(),
        cp.clone(),
        healthy_tx,
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
    (
        ControlPlane {
            claim,
            leader,
            healthy,
            candidate,
        },
        release,
    )
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

/// Keeps the Lease's client on the kubeconfig's identity while it is authorised, on
/// `super-admin.conf`'s while it is not (and that file exists).
async fn choose_identity(
    primary: kube::Client,
    super_admin: Option<kube::Client>,
    client: watch::Sender<kube::Client>,
    namespace: String,
    m: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut using_super_admin = false;
    let mut warned = false;
    loop {
        match may_update_leases(&primary, &namespace).await {
            Ok(true) if using_super_admin => {
                tracing::info!(
                    "the kubeconfig's identity is authorised now: the control-plane Lease is written with it again, no longer with super-admin.conf"
                );
                client.send_replace(primary.clone());
                using_super_admin = false;
            }
            Ok(true) => {}
            Ok(false) if !using_super_admin => match &super_admin {
                Some(sa) => {
                    tracing::warn!(
                        "the API refuses the kubeconfig's identity the control-plane Lease (a first kubeadm init): using super-admin.conf until it is authorised"
                    );
                    client.send_replace(sa.clone());
                    using_super_admin = true;
                }
                None if !warned => {
                    warned = true;
                    tracing::error!(
                        namespace,
                        "the kubeconfig's identity may not update Leases and there is no super-admin.conf beside it: this node cannot hold the control-plane VIP; grant it coordination.k8s.io leases in that namespace"
                    );
                }
                None => {}
            },
            Ok(false) => {}
            // The API does not answer: nothing to decide now (the health check says so).
            Err(e) => tracing::debug!(error = %e, "checking the kubeconfig's identity"),
        }
        m.control_plane_super_admin
            .set(i64::from(using_super_admin));
        tokio::select! {
            _ = tokio::time::sleep(IDENTITY_CHECK) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Asks the local API server's `/readyz` every period; publishes whether it is ready, with
/// `health_failures` results in a row needed to change the answer either way.
async fn health(
    client: watch::Receiver<kube::Client>,
    cp: ControlPlaneConfig,
    healthy: watch::Sender<bool>,
    m: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut streak = 0u32;
    let mut tick = tokio::time::interval(cp.health_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let c = client.borrow().clone();
        let req = http::Request::get("/readyz").body(Vec::new());
        let ok = match req {
            Ok(req) => matches!(
                tokio::time::timeout(cp.health_timeout, c.request_text(req)).await,
                Ok(Ok(_))
            ),
            Err(e) => {
                tracing::error!(error = %e, "building the /readyz request");
                false
            }
        };
        if !ok {
            m.control_plane_health_failures.inc();
        }
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
