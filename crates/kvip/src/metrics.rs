//! `/metrics` (Prometheus text), `/healthz` and `/readyz` on `prometheus_server`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub kind: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PermissionLabel {
    pub verb: String,
    pub resource: String,
    /// Empty for a cluster-wide permission.
    pub namespace: String,
}

/// One BGP peer's session as `/bgp` shows it (read by `kvip doctor`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BgpPeerReport {
    pub peer: String,
    pub remote_as: u32,
    /// `idle`, `connect`, `open_sent`, `open_confirm` or `established`.
    pub state: String,
    /// Why the last session ended or the last attempt failed.
    pub last_error: Option<String>,
    pub routes_announced: usize,
    pub routes_unannounced: Vec<String>,
    /// The BFD session's state, for a peer with BFD.
    pub bfd: Option<String>,
}

/// Why `/readyz` answers not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotReady {
    /// No sync has succeeded yet (or the last one failed).
    NotSynced,
    /// A permission the configuration needs is missing.
    Permissions,
    /// The desired state could not be computed; the kernel keeps the last good one.
    InvalidState,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    pub sync_seconds: Family<ModeLabel, Histogram>,
    pub sync_errors: Counter,
    pub readback_seconds: Histogram,
    pub readbacks_interrupted: Counter,
    pub drift_repairs: Family<KindLabel, Counter>,
    pub announcements: Counter,
    pub fence_refreshes: Counter,
    pub fence_expired: Counter,
    pub fence_errors: Counter,
    pub fence_lapsed: Counter,
    pub control_plane_held: Gauge,
    pub control_plane_api_ready: Gauge,
    pub control_plane_health_failures: Counter,
    pub control_plane_super_admin: Gauge,
    pub generation_observed: Gauge,
    pub generation_realised: Gauge,
    pub vips_held: Gauge,
    pub egress_pods: Gauge,
    pub leader_transitions: Counter,
    pub cidr_source: Family<SourceLabel, Gauge>,
    pub permission_missing: Family<PermissionLabel, Gauge>,
    pub permission_check_errors: Counter,
    pub plan_errors: Counter,
    pub bgp_session_up: Family<PeerLabel, Gauge>,
    pub bgp_sessions_established: Family<PeerLabel, Counter>,
    pub bgp_routes_announced: Family<PeerLabel, Gauge>,
    pub bgp_routes_unannounced: Family<PeerLabel, Gauge>,
    pub bgp_updates_sent: Family<PeerLabel, Counter>,
    pub bgp_adj_rib_out_drift: Counter,
    pub bfd_session_up: Family<PeerLabel, Gauge>,
    pub bfd_session_downs: Family<PeerLabel, Counter>,
    /// Why the agent is not ready (empty: ready), with a line each for `/readyz`.
    not_ready: Mutex<BTreeMap<NotReady, String>>,
    /// The BGP sessions (`bgp_enable`), for `/bgp`; `None` without BGP.
    bgp_peers: Mutex<Option<Vec<BgpPeerReport>>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut m = Metrics {
            registry: Registry::with_prefix("kvip"),
            sync_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            sync_errors: Counter::default(),
            readback_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            readbacks_interrupted: Counter::default(),
            drift_repairs: Family::default(),
            announcements: Counter::default(),
            fence_refreshes: Counter::default(),
            fence_expired: Counter::default(),
            fence_errors: Counter::default(),
            fence_lapsed: Counter::default(),
            control_plane_held: Gauge::default(),
            control_plane_api_ready: Gauge::default(),
            control_plane_health_failures: Counter::default(),
            control_plane_super_admin: Gauge::default(),
            generation_observed: Gauge::default(),
            generation_realised: Gauge::default(),
            vips_held: Gauge::default(),
            egress_pods: Gauge::default(),
            leader_transitions: Counter::default(),
            cidr_source: Family::default(),
            permission_missing: Family::default(),
            permission_check_errors: Counter::default(),
            plan_errors: Counter::default(),
            bgp_session_up: Family::default(),
            bgp_sessions_established: Family::default(),
            bgp_routes_announced: Family::default(),
            bgp_routes_unannounced: Family::default(),
            bgp_updates_sent: Family::default(),
            bfd_session_downs: Family::default(),
            bgp_adj_rib_out_drift: Counter::default(),
            bfd_session_up: Family::default(),
            bgp_peers: Mutex::new(None),
            not_ready: Mutex::new(BTreeMap::from([(
                NotReady::NotSynced,
                "no sync has completed yet".to_string(),
            )])),
        };
        // The registry keeps clones: each metric is shared, updated through `m`'s handles.
        let r = &mut m.registry;
        r.register(
            "sync_duration_seconds",
            "Time to make the kernel equal the desired state, by sync mode",
            m.sync_seconds.clone(),
        );
        r.register(
            "readback_duration_seconds",
            "Time of each completed periodic read-back of kvip's kernel state (the drift check)",
            m.readback_seconds.clone(),
        );
        r.register(
            "readbacks_interrupted",
            "Read-backs dropped because a change arrived meanwhile (tried again after 1 s; the fourth in a row runs to its end)",
            m.readbacks_interrupted.clone(),
        );
        r.register(
            "sync_errors",
            "Syncs that failed (the next one replaces everything)",
            m.sync_errors.clone(),
        );
        r.register(
            "drift_repairs",
            "Resyncs that found kvip's kernel state changed by hand and repaired it, by kind of object (address, rule, set_element)",
            m.drift_repairs.clone(),
        );
        r.register(
            "announcements",
            "Gratuitous ARP / unsolicited NA sent to refresh neighbours' entries of held VIPs (vip_arpRate)",
            m.announcements.clone(),
        );
        r.register(
            "vip_lifetime_refreshes",
            "VIP address lifetimes moved on to their Lease's new renew deadline",
            m.fence_refreshes.clone(),
        );
        r.register(
            "vip_lifetime_expired",
            "VIPs the lifetime keeper removed because their Lease's renew deadline passed before the agent's step-down reached the kernel",
            m.fence_expired.clone(),
        );
        r.register(
            "vip_lifetime_errors",
            "Failed rounds or writes of the VIP lifetime keeper (lifetimes run down meanwhile)",
            m.fence_errors.clone(),
        );
        r.register(
            "vip_lifetime_lapsed",
            "Held VIPs found gone before their Lease's renew deadline (their lifetime ran out while the keeper was starved, or someone removed them) and added back",
            m.fence_lapsed.clone(),
        );
        r.register(
            "control_plane_held",
            "1 while this node holds the control-plane VIP (cp_enable)",
            m.control_plane_held.clone(),
        );
        r.register(
            "control_plane_api_ready",
            "1 while the node's own API server answers /readyz (cp_enable); 0 drops the control-plane VIP",
            m.control_plane_api_ready.clone(),
        );
        r.register(
            "control_plane_health_failures",
            "Checks of the local API server's /readyz that failed or timed out",
            m.control_plane_health_failures.clone(),
        );
        r.register(
            "control_plane_super_admin",
            "1 while the control-plane Lease is written with super-admin.conf (the kubeconfig's identity is refused: a first kubeadm init)",
            m.control_plane_super_admin.clone(),
        );
        r.register(
            "generation_observed",
            "Changes seen from the API (Services, EndpointSlices, this Node), counted since start",
            m.generation_observed.clone(),
        );
        r.register(
            "generation_realised",
            "The generation (see generation_observed) the kernel state last realised; equal when this node is in sync",
            m.generation_realised.clone(),
        );
        r.register(
            "vips_held",
            "VIP addresses this node holds",
            m.vips_held.clone(),
        );
        r.register(
            "egress_pods",
            "Pod addresses translated to a VIP on this node",
            m.egress_pods.clone(),
        );
        r.register(
            "leader_transitions",
            "Times this node gained or lost the lease",
            m.leader_transitions.clone(),
        );
        r.register(
            "cidr_source",
            "Where each cluster CIDR came from (1 = in use)",
            m.cidr_source.clone(),
        );
        r.register(
            "permission_missing",
            "Permissions the configuration needs and the agent's identity lacks (1 = missing), from SelfSubjectAccessReview",
            m.permission_missing.clone(),
        );
        r.register(
            "permission_check_errors",
            "Permission checks that could not be made (the API did not answer)",
            m.permission_check_errors.clone(),
        );
        r.register(
            "plan_errors",
            "Syncs whose desired state was invalid (the kernel kept the last good state)",
            m.plan_errors.clone(),
        );
        r.register(
            "bgp_session_up",
            "1 while the BGP session with the peer is Established (bgp_enable)",
            m.bgp_session_up.clone(),
        );
        r.register(
            "bgp_sessions_established",
            "Times the BGP session with the peer reached Established",
            m.bgp_sessions_established.clone(),
        );
        r.register(
            "bgp_routes_announced",
            "Host routes the peer has been told of and not told to withdraw (kvip's Adj-RIB-Out)",
            m.bgp_routes_announced.clone(),
        );
        r.register(
            "bgp_routes_unannounced",
            "Routes to announce that the session cannot carry (no next hop of their family, or the family not negotiated)",
            m.bgp_routes_unannounced.clone(),
        );
        r.register(
            "bgp_updates_sent",
            "UPDATE messages sent to the peer",
            m.bgp_updates_sent.clone(),
        );
        r.register(
            "bfd_session_downs",
            "BGP sessions with the peer that kvip ended because their BFD session went down",
            m.bfd_session_downs.clone(),
        );
        r.register(
            "bgp_adj_rib_out_drift",
            "Times an Established session's Adj-RIB-Out was found to differ from the routes to announce after it settled",
            m.bgp_adj_rib_out_drift.clone(),
        );
        r.register(
            "bfd_session_up",
            "1 while the BFD session with the BGP peer is Up (peers with the bfd field of bgp_peers)",
            m.bfd_session_up.clone(),
        );
        Arc::new(m)
    }

    /// Sets (`Some(reason)`) or clears (`None`) one cause of not being ready.
    pub fn not_ready(&self, cause: NotReady, reason: Option<String>) {
        let mut g = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
        match reason {
            Some(r) => g.insert(cause, r),
            None => g.remove(&cause),
        };
    }

    /// Sets what `/bgp` shows.
    pub fn set_bgp_peers(&self, peers: Vec<BgpPeerReport>) {
        *self.bgp_peers.lock().unwrap_or_else(|p| p.into_inner()) = Some(peers);
    }

    /// What `/bgp` shows: `None` without BGP.
    pub fn bgp_peers(&self) -> Option<Vec<BgpPeerReport>> {
        self.bgp_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The reasons the agent is not ready, one per line; empty when ready.
    pub fn readiness(&self) -> Vec<String> {
        let g = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
        g.values().cloned().collect()
    }

    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.render() {
        Ok(body) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The BGP sessions, as JSON; 404 when BGP mode is off.
async fn bgp(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.bgp_peers() {
        Some(p) => axum::Json(p).into_response(),
        None => (StatusCode::NOT_FOUND, "BGP mode is off (bgp_enable)\n").into_response(),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    let reasons = m.readiness();
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        let mut body = String::new();
        for r in reasons {
            body.push_str(&r);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

/// kube-vip's form `:2112` means every address; `host:port` otherwise.
pub fn listen_address(s: &str) -> Result<SocketAddr> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .with_context(|| format!("prometheus_server={s:?} is not host:port"))
}

/// Serves the endpoints on `listener`, on `tasks`, until `stop` is cancelled.
pub fn serve(
    listener: tokio::net::TcpListener,
    m: Arc<Metrics>,
    tasks: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/bgp", get(bgp))
        .with_state(m);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
}
