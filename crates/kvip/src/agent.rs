//! `kvip run`: the node agent. Watches Services and EndpointSlices, takes part in the Lease
//! election, and after every change (debounced) recomputes the whole desired state with the
//! pure `plan()` and makes the kernel equal to it. On SIGTERM or SIGINT it stops renewing,
//! removes everything it owns from the kernel, releases the Lease and exits.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kvip_core::config::AgentConfig;
use kvip_core::lease::Timings;
use kvip_core::plan::{ClusterNetworks, ServiceKey, ServiceWarning};
use kvip_core::{Leadership, NodeConfig, plan};
use kvip_dataplane::{AnnounceConfig, BackendKind, Config, Dataplane, Instance, KernelDataplane};
use kvip_kube::publish::{self, HolderView};

use crate::metrics::{self, Metrics, ModeLabel, SourceLabel};
use kvip_kube::{ClusterCache, Election, LeaseLock, discovery};
use tokio::sync::watch;

const DEBOUNCE: Duration = Duration::from_millis(50);
const RESYNC: Duration = Duration::from_secs(30);
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The client, and the API server's URL.
async fn client(cfg: &AgentConfig) -> Result<(kube::Client, String)> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("k8s_config_file {path}"))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("k8s_config_file {path}"))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no usable KUBECONFIG")?,
    };
    let url = config.cluster_url.to_string();
    Ok((
        kube::Client::try_from(config).context("creating the Kubernetes client")?,
        url,
    ))
}

/// The agent's own namespace: `POD_NAMESPACE`, else the service account's, else kube-system.
fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "kube-system".into())
}

/// The API server's address, when the client talks to it by IP: always excluded from egress.
fn api_server_addresses(client_url: &str) -> Vec<IpAddr> {
    let host = client_url
        .split("://")
        .nth(1)
        .unwrap_or(client_url)
        .split('/')
        .next()
        .unwrap_or("");
    let host = host
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    host.trim_matches(|c| c == '[' || c == ']')
        .parse()
        .into_iter()
        .collect()
}

/// SIGTERM and SIGINT, caught from the moment this is created: a signal that arrives while
/// the agent is still starting or in the middle of a sync is kept, not lost and not fatal, so
/// the shutdown path (teardown, lease release) always runs.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Events on Services, published on change only (and aggregated into series by the
/// recorder), so a steady state emits nothing.
struct ServiceEvents {
    recorder: Recorder,
    /// Per Service: held, translated pods, warnings, as last reported.
    last: BTreeMap<ServiceKey, (bool, usize, Vec<String>)>,
}

impl ServiceEvents {
    /// `action` is part of what the recorder aggregates by: distinct problems (one per
    /// annotation) stay distinct Events, repeats of one become a series.
    async fn emit(
        &self,
        key: &ServiceKey,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            ..ObjectReference::default()
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        match tokio::time::timeout(
            Duration::from_secs(2),
            self.recorder.publish(&ev, &reference),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(service = %key, reason, error = %e, "publishing an event"),
            Err(_) => tracing::warn!(service = %key, reason, "publishing an event timed out"),
        }
    }

    async fn report(&mut self, p: &kvip_core::Plan, node: &str) {
        for (key, sp) in &p.services {
            let pods: usize = sp.egress_pods.values().map(Vec::len).sum();
            let warnings: Vec<String> = sp.warnings.iter().map(ToString::to_string).collect();
            let (was_held, was_pods, was_warnings) =
                self.last.get(key).cloned().unwrap_or_default();
            if sp.held && !was_held {
                let vips: Vec<String> = sp.vips.iter().map(ToString::to_string).collect();
                self.emit(
                    key,
                    EventType::Normal,
                    "VIPAcquired",
                    "Hold",
                    format!("node {node} holds {}", vips.join(", ")),
                )
                .await;
            }
            if !sp.held && was_held {
                self.emit(
                    key,
                    EventType::Normal,
                    "VIPReleased",
                    "Release",
                    format!("node {node} released the VIPs"),
                )
                .await;
            }
            if sp.held && pods > 0 && pods != was_pods {
                self.emit(
                    key,
                    EventType::Normal,
                    "EgressApplied",
                    "Egress",
                    format!("{pods} pod(s) on node {node} egress through the VIP"),
                )
                .await;
            }
            for w in sp
                .warnings
                .iter()
                .filter(|w| !was_warnings.contains(&w.to_string()))
            {
                let (reason, action, note) = match w {
                    ServiceWarning::InvalidAnnotation(a) => {
                        ("InvalidAnnotation", a.annotation.clone(), a.to_string())
                    }
                    ServiceWarning::EgressRefused(r) => {
                        ("EgressRefused", "Egress".to_string(), r.clone())
                    }
                };
                tracing::warn!(service = %key, reason, "{note}");
                self.emit(key, EventType::Warning, reason, &action, note)
                    .await;
            }
            self.last.insert(
                key.clone(),
                (sp.held, if sp.held { pods } else { 0 }, warnings),
            );
        }
        // Services gone from the plan (deleted, deselected): forget them.
        self.last.retain(|k, _| p.services.contains_key(k));
    }
}

/// One Lease per Service (`svc_election`): an election per selected Service, competing only
/// while this node is a candidate for it (with `externalTrafficPolicy: Local` or egress: a
/// ready local endpoint). A holder that stops being a candidate releases its Lease.
struct PerServiceElections {
    client: kube::Client,
    identity: String,
    timings: Timings,
    running: BTreeMap<ServiceKey, ServiceElection>,
    /// Bumped whenever any of them gains or loses its Lease.
    changed: watch::Sender<u64>,
}

struct ServiceElection {
    lease: String,
    task: tokio::task::JoinHandle<()>,
    candidate: watch::Sender<bool>,
    leader: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

impl PerServiceElections {
    /// Starts, updates and stops elections to match the plan's Services.
    fn sync(&mut self, services: &BTreeMap<ServiceKey, kvip_core::plan::ServicePlan>) {
        for (key, sp) in services {
            let lease = sp
                .lease_name
                .clone()
                .unwrap_or_else(|| format!("kubevip-{}", key.name));
            if let Some(e) = self.running.get(key)
                && e.lease == lease
            {
                e.candidate
                    .send_if_modified(|c| std::mem::replace(c, sp.candidate) != sp.candidate);
                continue;
            }
            if let Some(old) = self.running.remove(key) {
                old.stop.send_replace(true);
            }
            let lock = LeaseLock::new(self.client.clone(), &key.namespace, &lease);
            let (cand_tx, cand_rx) = watch::channel(sp.candidate);
            let (lead_tx, lead_rx) = watch::channel(false);
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(
                Election::new(lock, &self.identity, self.timings).run(cand_rx, lead_tx, stop_rx),
            );
            let mut forward = lead_rx.clone();
            let changed = self.changed.clone();
            tokio::spawn(async move {
                while forward.changed().await.is_ok() {
                    changed.send_modify(|g| *g += 1);
                }
            });
            self.running.insert(
                key.clone(),
                ServiceElection {
                    lease,
                    task,
                    candidate: cand_tx,
                    leader: lead_rx,
                    stop: stop_tx,
                },
            );
        }
        let gone: Vec<ServiceKey> = self
            .running
            .keys()
            .filter(|k| !services.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(e) = self.running.remove(&k) {
                e.stop.send_replace(true);
            }
        }
    }

    fn held(&self) -> std::collections::BTreeSet<ServiceKey> {
        self.running
            .iter()
            .filter(|(_, e)| *e.leader.borrow())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Stops every election (holders release their Leases) and waits for them.
    async fn stop_all(&mut self) {
        for e in self.running.values() {
            e.stop.send_replace(true);
        }
        for (_, e) in std::mem::take(&mut self.running) {
            let _ = tokio::time::timeout(Duration::from_secs(5), e.task).await;
        }
    }
}

/// Writes, for each Service this node holds, its VIPs into the status and kube-vip's
/// annotations (only what differs). Failures are logged; the next sync tries again.
async fn publish_held(
    client: &kube::Client,
    snapshot: &kvip_core::Snapshot,
    p: &kvip_core::Plan,
    node: &str,
) {
    // One index per sync: looking each held Service up by scanning (and allocating keys)
    // would make every sync quadratic in the number of Services.
    let by_key: BTreeMap<(&str, &str), &kvip_core::plan::ServiceInfo> = snapshot
        .services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    for (key, sp) in p.services.iter().filter(|(_, sp)| sp.held) {
        let Some(svc) = by_key.get(&(key.namespace.as_str(), key.name.as_str())) else {
            continue;
        };
        let first_pod = |v6: bool| {
            sp.egress_pods
                .iter()
                .filter(|(vip, _)| vip.is_ipv6() == v6)
                .find_map(|(_, pods)| pods.first().copied())
        };
        let view = HolderView {
            node: node.to_string(),
            vips: sp.vips.clone(),
            active4: first_pod(false),
            active6: first_pod(true),
        };
        if let Err(e) = publish::publish(client, svc, &view).await {
            tracing::warn!(service = %key, error = %e, "writing the Service's status and annotations");
        }
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    // First of all: a SIGTERM from now on must lead to the shutdown path, never kill the
    // process with kvip's state still in the kernel.
    let mut signals = ShutdownSignals::install()?;
    let interface = cfg
        .services_interface
        .clone()
        .or_else(|| cfg.vip_interface.clone())
        .context("vip_interface is not set (kvip does not pick an interface by itself yet)")?;
    let (client, api_url) = client(&cfg).await?;
    let mut dp = KernelDataplane::new(Config {
        instance: Instance::new(cfg.instance_name.as_deref())?,
        backend: match cfg.egress_with_nftables {
            Some(true) => BackendKind::Nftables,
            Some(false) => BackendKind::Iptables,
            None => BackendKind::Auto,
        },
        iptables_variant: None,
        no_conntrack_flush: false,
        announce: AnnounceConfig {
            count: if cfg.arp { 3 } else { 0 },
            ..AnnounceConfig::default()
        },
    })
    .await?;
    if cfg.egress_clean {
        let r = kvip_dataplane::legacy::clean_legacy().await;
        for line in &r.removed {
            tracing::info!(removed = %line, "kube-vip leftover removed");
        }
        for e in &r.errors {
            tracing::warn!(error = %e, "kube-vip clean-up");
        }
    }
    let found = discovery::discover(
        &client,
        cfg.egress_pod_cidr.clone(),
        cfg.egress_service_cidr.clone(),
    )
    .await;
    for d in &found.denied {
        tracing::warn!(permission = %d, "CIDR discovery: missing permission");
    }
    let m = Metrics::new();
    let metrics_server =
        metrics::serve(metrics::listen_address(&cfg.prometheus_server)?, m.clone()).await?;
    for (kind, v) in [("pod", &found.pod), ("service", &found.service)] {
        let source = v.as_ref().map_or("none", |(_, s)| s.as_str());
        m.cidr_source
            .get_or_create(&SourceLabel {
                kind: kind.into(),
                source: source.into(),
            })
            .set(1);
    }
    let networks = ClusterNetworks {
        pod: found.pod.map(|p| p.0).unwrap_or_default(),
        service: found.service.map(|s| s.0).unwrap_or_default(),
        api_server: api_server_addresses(&api_url),
    };
    let node = NodeConfig {
        node_name: cfg.node_name.clone(),
        interface,
        namespace: cfg.namespace.clone(),
        class_only: cfg.lb_class_only,
        class_name: cfg.lb_class_name.clone(),
    };

    let (dirty_tx, mut dirty) = watch::channel(0u64);
    let cache = ClusterCache::start(client.clone(), cfg.namespace.as_deref(), dirty_tx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (leader_tx, mut leader) = watch::channel(!cfg.leader_election);
    // Without election this node always leads; the sender stays alive so the loop below does
    // not see a closed channel.
    let mut always_leader = None;
    let timings = Timings {
        lease_duration: cfg.lease_duration,
        renew_deadline: cfg.renew_deadline,
        retry_period: cfg.retry_period,
    };
    // The sender lives as long as the loop (held here even without per-Service elections):
    // a dropped sender would make `changed()` return at once, every time.
    let (per_service_tx, mut per_service_changed) = watch::channel(0u64);
    let mut per_service = (cfg.svc_election && cfg.leader_election).then(|| PerServiceElections {
        client: client.clone(),
        identity: cfg.node_name.clone(),
        timings,
        running: BTreeMap::new(),
        changed: per_service_tx.clone(),
    });
    let election = if cfg.leader_election && !cfg.svc_election {
        let lock = LeaseLock::new(client.clone(), &own_namespace(), &cfg.lease_name);
        let (_cand_tx, cand_rx) = watch::channel(true);
        let task = tokio::spawn(
            Election::new(lock, &cfg.node_name, timings).run(cand_rx, leader_tx, stop_rx),
        );
        Some((task, _cand_tx))
    } else {
        always_leader = Some(leader_tx);
        None
    };
    tokio::time::timeout(Duration::from_secs(30), cache.ready())
        .await
        .context("the first list of Services and EndpointSlices did not complete in 30 s")?
        .context("watches stopped")?;
    tracing::info!(node = %node.node_name, interface = %node.interface, backend = dp.backend().name(), "kvip agent started");

    let mut events = ServiceEvents {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kvip".into(),
                instance: Some(cfg.node_name.clone()),
            },
        ),
        last: BTreeMap::new(),
    };
    let mut was_leading = false;
    let mut last_sync;
    loop {
        last_sync = tokio::time::Instant::now();
        let leading = *leader.borrow_and_update();
        if leading != was_leading {
            m.leader_transitions.inc();
            tracing::info!(leader = leading, "leadership changed");
            was_leading = leading;
        }
        let snapshot = cache.snapshot(networks.clone());
        let leadership = match &per_service {
            Some(e) => Leadership::PerService(e.held()),
            None => Leadership::Global(leading),
        };
        let p = plan(&snapshot, &leadership, &node);
        if let Some(e) = per_service.as_mut() {
            e.sync(&p.services);
        }
        match dp.apply(&p.desired).await {
            Ok(r) => {
                m.sync_seconds
                    .get_or_create(&ModeLabel {
                        mode: format!("{:?}", r.mode).to_lowercase(),
                    })
                    .observe(r.duration.as_secs_f64());
                m.vips_held.set(p.desired.vips().len() as i64);
                m.egress_pods.set(p.desired.source_count() as i64);
                m.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                publish_held(&client, &snapshot, &p, &node.node_name).await;
                events.report(&p, &node.node_name).await;
                if r.mode != kvip_dataplane::SyncMode::Unchanged
                    || !r.vips_added.is_empty()
                    || !r.vips_removed.is_empty()
                {
                    tracing::info!(
                        leader = leading, mode = ?r.mode, pods = p.desired.source_count(),
                        vips_added = ?r.vips_added, vips_removed = ?r.vips_removed,
                        ms = r.duration.as_secs_f64() * 1e3, "synced"
                    );
                }
                for w in &r.warnings {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => {
                m.sync_errors.inc();
                tracing::error!(error = %e, "sync failed; the next sync replaces everything");
                dp.invalidate();
            }
        }
        // Wait for a change (or the resync timer), then let a burst of changes settle.
        tokio::select! {
            _ = dirty.changed() => {}
            _ = leader.changed() => {}
            _ = per_service_changed.changed() => {}
            _ = tokio::time::sleep(RESYNC) => {
                // Drift: someone changed kvip's objects by hand. Replace everything if so.
                match dp.observe().await {
                    Ok(o) if o.state == p.desired && o.stray.is_empty() => {}
                    Ok(o) => {
                        m.drift_repairs.inc();
                        tracing::warn!(stray = ?o.stray, "kernel state drifted from the desired state; repairing");
                        dp.invalidate();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading kvip's kernel state back");
                        dp.invalidate();
                    }
                }
            }
            _ = signals.recv() => break,
        }
        // Debounce: at most one sync per DEBOUNCE. A change after a quiet spell is applied at
        // once; the changes of a burst wait for the rest of the interval and go together.
        tokio::time::sleep(DEBOUNCE.saturating_sub(last_sync.elapsed())).await;
    }

    tracing::info!("shutting down: releasing the lease and removing kvip's kernel state");
    metrics_server.abort();
    let _ = stop_tx.send(true);
    if let Some(e) = per_service.as_mut() {
        e.stop_all().await;
    }
    if let Some((task, _cand)) = election {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    drop(cache);
    drop(always_leader);
    drop(per_service_tx);
    let r = dp.teardown().await;
    for e in &r.errors {
        tracing::error!(error = %e, "teardown");
    }
    if !r.errors.is_empty() {
        bail!("teardown left errors: {}", r.errors.join("; "));
    }
    Ok(())
}
