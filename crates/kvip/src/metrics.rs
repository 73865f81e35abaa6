//! `/metrics` (Prometheus text), `/healthz` and `/readyz` on `prometheus_server`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    pub sync_seconds: Family<ModeLabel, Histogram>,
    pub sync_errors: Counter,
    pub drift_repairs: Family<KindLabel, Counter>,
    pub announcements: Counter,
    pub generation_observed: Gauge,
    pub generation_realised: Gauge,
    pub vips_held: Gauge,
    pub egress_pods: Gauge,
    pub leader_transitions: Counter,
    pub cidr_source: Family<SourceLabel, Gauge>,
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut m = Metrics {
            registry: Registry::with_prefix("kvip"),
            sync_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            sync_errors: Counter::default(),
            drift_repairs: Family::default(),
            announcements: Counter::default(),
            generation_observed: Gauge::default(),
            generation_realised: Gauge::default(),
            vips_held: Gauge::default(),
            egress_pods: Gauge::default(),
            leader_transitions: Counter::default(),
            cidr_source: Family::default(),
            ready: AtomicBool::new(false),
        };
        // The registry keeps clones: each metric is shared, updated through `m`'s handles.
        let r = &mut m.registry;
        r.register(
            "sync_duration_seconds",
            "Time to make the kernel equal the desired state, by sync mode",
            m.sync_seconds.clone(),
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
        Arc::new(m)
    }

    fn render(&self) -> Result<String, std::fmt::Error> {
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

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
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

/// Binds `addr` and serves the endpoints on `tasks` until `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    m: Arc<Metrics>,
    tasks: &tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (prometheus_server)"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(m);
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
