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

use crate::metrics::{self, KindLabel, Metrics, ModeLabel, SourceLabel};
use kvip_kube::election::Release;
use kvip_kube::{ClusterCache, Election, LeaseLock, discovery};
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DEBOUNCE: Duration = Duration::from_millis(50);
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The client, and the API server's URL.
pub(crate) async fn client(cfg: &AgentConfig) -> Result<(kube::Client, String)> {
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

/// `plan()`'s view of this node, from the configuration.
pub(crate) fn node_config(cfg: &AgentConfig, interface: String) -> NodeConfig {
    NodeConfig {
        node_name: cfg.node_name.clone(),
        interface,
        namespace: cfg.namespace.clone(),
        class_only: cfg.lb_class_only,
        class_name: cfg.lb_class_name.clone(),
    }
}

/// The rule backend `egress_withnftables` asks for.
pub(crate) fn backend_kind(cfg: &AgentConfig) -> BackendKind {
    match cfg.egress_with_nftables {
        Some(true) => BackendKind::Nftables,
        Some(false) => BackendKind::Iptables,
        None => BackendKind::Auto,
    }
}

/// The agent's own namespace: `POD_NAMESPACE`, else the service account's, else kube-system.
pub(crate) fn own_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "kube-system".into())
}

/// The API server's address, when the client talks to it by IP: always excluded from egress.
pub(crate) fn api_server_addresses(client_url: &str) -> Vec<IpAddr> {
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
    /// Stopped elections whose release waits until the sync has removed their VIPs.
    retiring: Vec<JoinHandle<Release>>,
    /// Services this node stopped being a candidate for, told once the sync is done.
    withdrawing: Vec<ServiceKey>,
    /// Bumped whenever any of them gains or loses its Lease.
    changed: watch::Sender<u64>,
    tasks: TaskTracker,
    root: CancellationToken,
}

struct ServiceElection {
    lease: String,
    task: JoinHandle<Release>,
    candidate: watch::Sender<bool>,
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
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
                if sp.candidate {
                    e.candidate
                        .send_if_modified(|c| !std::mem::replace(c, true));
                } else if *e.candidate.borrow() && !self.withdrawing.contains(key) {
                    // The plan already holds nothing for it; the election hears of it only
                    // once the sync has removed the VIPs (so the release comes after).
                    self.withdrawing.push(key.clone());
                }
                continue;
            }
            if let Some(old) = self.running.remove(key) {
                old.stop.cancel();
                self.retiring.push(old.task);
            }
            let lock = LeaseLock::new(self.client.clone(), &key.namespace, &lease);
            let (cand_tx, cand_rx) = watch::channel(sp.candidate);
            let (lead_tx, lead_rx) = watch::channel(false);
            let stop = self.root.child_token();
            let task = self
                .tasks
                .spawn(Election::new(lock, &self.identity, self.timings).run(
                    cand_rx,
                    lead_tx,
                    stop.clone(),
                ));
            // Ends with the election (its sender is dropped then).
            let mut forward = lead_rx.clone();
            let changed = self.changed.clone();
            self.tasks.spawn(async move {
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
                    stop,
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
                e.stop.cancel();
                self.retiring.push(e.task);
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

    /// After a successful sync (which has removed the VIPs of what this node no longer
    /// holds): tells elections their node is no longer a candidate, and writes the releases of
    /// stopped elections, in the background.
    fn after_sync(&mut self, limit: Duration) {
        for key in self.withdrawing.drain(..) {
            if let Some(e) = self.running.get(&key) {
                e.candidate
                    .send_if_modified(|c| std::mem::replace(c, false));
            }
        }
        for task in self.retiring.drain(..) {
            self.tasks.spawn(async move {
                if let Ok(r) = task.await {
                    r.write(limit).await;
                }
            });
        }
    }

    /// Every election's release (each has stopped by the root's cancellation).
    fn into_tasks(self) -> Vec<JoinHandle<Release>> {
        let mut v = self.retiring;
        v.extend(self.running.into_values().map(|e| e.task));
        v
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

/// The elections this node takes part in; each hands back a [`Release`] when it stops.
enum Elections {
    Global {
        task: JoinHandle<Release>,
        candidate: watch::Sender<bool>,
    },
    PerService(Box<PerServiceElections>),
    /// `vip_leaderelection=false`: this node holds every selected Service.
    Off,
}

impl Elections {
    fn into_tasks(self) -> Vec<JoinHandle<Release>> {
        match self {
            Elections::Global { task, .. } => vec![task],
            Elections::PerService(p) => (*p).into_tasks(),
            Elections::Off => vec![],
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT (exit 0) or a failure (an error). Whichever way it
/// ends: everything kvip owns is removed from the kernel, then the Leases are released, then
/// every task has stopped — within `shutdown_timeout` of the signal.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    // First of all: a SIGTERM from now on must lead to the shutdown path, never kill the
    // process with kvip's state still in the kernel.
    let signals = ShutdownSignals::install()?;
    let interface = cfg
        .services_interface
        .clone()
        .or_else(|| cfg.vip_interface.clone())
        .context("vip_interface is not set (kvip does not pick an interface by itself yet)")?;
    let mut dp = KernelDataplane::new(Config {
        instance: Instance::new(cfg.instance_name.as_deref())?,
        backend: backend_kind(&cfg),
        iptables_variant: None,
        no_conntrack_flush: false,
        announce: AnnounceConfig {
            count: if cfg.arp { 3 } else { 0 },
            ..AnnounceConfig::default()
        },
    })
    .await?;

    // One cancellation root: a signal cancels it; every task hangs off it.
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    let signalled = Arc::new(std::sync::OnceLock::new());
    tasks.spawn({
        let (root, signalled) = (root.clone(), signalled.clone());
        let mut signals = signals;
        async move {
            tokio::select! {
                _ = signals.recv() => {
                    let _ = signalled.set(tokio::time::Instant::now());
                    tracing::info!("signal received: shutting down");
                    root.cancel();
                }
                _ = root.cancelled() => {}
            }
        }
    });

    let mut elections = Elections::Off;
    let outcome = agent(&cfg, interface, &mut dp, &root, &tasks, &mut elections).await;
    if let Err(e) = &outcome {
        tracing::error!(error = format!("{e:#}"), "the agent stops");
    }

    // Shutdown: stop every task; remove kvip's kernel state; only then hand the Leases on,
    // so no other node can take a VIP while this one still has it.
    root.cancel();
    let started = signalled
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now);
    let deadline = started + cfg.shutdown_timeout;
    tracing::info!("removing kvip's kernel state, then releasing the leases");
    let release_tasks = elections.into_tasks();
    let (releases, teardown) = tokio::join!(
        tokio::time::timeout_at(deadline, futures_util::future::join_all(release_tasks)),
        dp.teardown()
    );
    for e in &teardown.errors {
        tracing::error!(error = %e, "teardown");
    }
    // Its netlink connection and announcement tasks end with it.
    drop(dp);
    let releases: Vec<Release> = releases
        .map(|v| v.into_iter().filter_map(Result::ok).collect())
        .unwrap_or_default();
    let limit = deadline.saturating_duration_since(tokio::time::Instant::now());
    let writes = releases
        .into_iter()
        .filter(Release::held)
        .map(|r| r.write(limit));
    let released = futures_util::future::join_all(writes).await;
    let not_released = released.iter().filter(|ok| !**ok).count();
    tasks.close();
    let finished = tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_ok();
    // Tasks of the libraries (connections, the client's buffer) end once their owners are
    // gone; wait for them too, so nothing outlives the shutdown.
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    while alive() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let left = alive();
    let took = started.elapsed();
    if finished && left == 0 {
        tracing::info!(
            ms = took.as_millis() as u64,
            tasks_alive = left,
            leases_not_released = not_released,
            "shutdown complete"
        );
    } else {
        tracing::warn!(
            ms = took.as_millis() as u64,
            tasks_alive = left,
            leases_not_released = not_released,
            "shutdown deadline (shutdown_timeout) reached: what is still running is abandoned"
        );
    }
    if !teardown.errors.is_empty() {
        bail!("teardown left errors: {}", teardown.errors.join("; "));
    }
    outcome
}

/// Awaits `fut` unless the root is cancelled first (`None` then). Cancellation wins a tie
/// and also what it caused (a watch that ended because of it reports an error, not a stop).
async fn unless_stopped<T>(root: &CancellationToken, fut: impl Future<Output = T>) -> Option<T> {
    let out = tokio::select! {
        biased;
        _ = root.cancelled() => None,
        out = fut => Some(out),
    };
    out.filter(|_| !root.is_cancelled())
}

/// Startup and the sync loop, until the root is cancelled (Ok) or startup fails (Err).
async fn agent(
    cfg: &AgentConfig,
    interface: String,
    dp: &mut KernelDataplane,
    root: &CancellationToken,
    tasks: &TaskTracker,
    elections: &mut Elections,
) -> Result<()> {
    // This process holds no Lease yet: anything an earlier run left in the kernel is stale.
    // Clear it now, before any wait on the API (which may be unreachable for a while).
    let cleared = dp
        .apply(&kvip_core::DesiredState::empty())
        .await
        .context("clearing kvip's kernel state left by an earlier run")?;
    if !cleared.vips_removed.is_empty() || cleared.mode != kvip_dataplane::SyncMode::Unchanged {
        tracing::info!(vips_removed = ?cleared.vips_removed, "cleared kvip's kernel state left by an earlier run");
    }
    if cfg.egress_clean {
        let r = kvip_dataplane::legacy::clean_legacy().await;
        for line in &r.removed {
            tracing::info!(removed = %line, "kube-vip leftover removed");
        }
        for e in &r.errors {
            tracing::warn!(error = %e, "kube-vip clean-up");
        }
    }
    let (client, api_url) = client(cfg).await?;
    let Some(found) = unless_stopped(
        root,
        discovery::discover(
            &client,
            cfg.egress_pod_cidr.clone(),
            cfg.egress_service_cidr.clone(),
        ),
    )
    .await
    else {
        return Ok(());
    };
    for d in &found.denied {
        tracing::warn!(permission = %d, "CIDR discovery: missing permission");
    }
    let m = Metrics::new();
    metrics::serve(
        metrics::listen_address(&cfg.prometheus_server)?,
        m.clone(),
        tasks,
        root.child_token(),
    )
    .await?;
    let mut pod = found.pod;
    let mut service = found.service;
    if cfg.egress_default_cidrs {
        for (kind, v, guess) in [
            ("pod", &mut pod, "10.0.0.0/16"),
            ("service", &mut service, "10.96.0.0/12"),
        ] {
            if v.is_none() {
                tracing::warn!(
                    kind,
                    cidr = guess,
                    "no CIDR configured or discovered: using kube-vip's guess (egress_default_cidrs); pods outside it are translated towards their own cluster"
                );
                let cidr = guess
                    .parse()
                    .map_err(|e: kvip_core::cidr::CidrParseError| anyhow::anyhow!(e.0))?;
                *v = Some((vec![cidr], discovery::Source::Guessed));
            }
        }
    }
    for (kind, v) in [("pod", &pod), ("service", &service)] {
        let source = v.as_ref().map_or("none", |(_, s)| s.as_str());
        m.cidr_source
            .get_or_create(&SourceLabel {
                kind: kind.into(),
                source: source.into(),
            })
            .set(1);
    }
    let networks = ClusterNetworks {
        pod: pod.map(|p| p.0).unwrap_or_default(),
        service: service.map(|s| s.0).unwrap_or_default(),
        api_server: api_server_addresses(&api_url),
    };
    let node = node_config(cfg, interface);

    let (dirty_tx, mut dirty) = watch::channel(0u64);
    let cache = ClusterCache::start(
        client.clone(),
        cfg.namespace.as_deref(),
        &cfg.node_name,
        dirty_tx,
        tasks,
        root,
    );
    let (leader_tx, mut leader) = watch::channel(!cfg.leader_election);
    let timings = Timings {
        lease_duration: cfg.lease_duration,
        renew_deadline: cfg.renew_deadline,
        retry_period: cfg.retry_period,
    };
    // Lives as long as the loop: a dropped sender would make `changed()` return at once.
    let (per_service_tx, mut per_service_changed) = watch::channel(0u64);
    match unless_stopped(
        root,
        tokio::time::timeout(Duration::from_secs(30), cache.ready()),
    )
    .await
    {
        None => return Ok(()),
        Some(r) => r
            .context(
                "the first list of Services, EndpointSlices and this Node did not complete in 30 s",
            )?
            .context("watches stopped")?,
    }
    // Without election this node always leads; the sender stays alive for the same reason.
    let mut _always_leader = None;
    *elections = if !cfg.leader_election {
        _always_leader = Some(leader_tx);
        Elections::Off
    } else if cfg.svc_election {
        Elections::PerService(Box::new(PerServiceElections {
            client: client.clone(),
            identity: cfg.node_name.clone(),
            timings,
            running: BTreeMap::new(),
            retiring: Vec::new(),
            withdrawing: Vec::new(),
            changed: per_service_tx.clone(),
            tasks: tasks.clone(),
            root: root.clone(),
        }))
    } else {
        let lock = LeaseLock::new(client.clone(), &own_namespace(), &cfg.lease_name);
        let (candidate, cand_rx) = watch::channel(!cache.node_excluded());
        let task = tasks.spawn(Election::new(lock, &cfg.node_name, timings).run(
            cand_rx,
            leader_tx,
            root.child_token(),
        ));
        Elections::Global { task, candidate }
    };
    if !cache.node_found() {
        tracing::warn!(node = %node.node_name, "no Node object of this name: check vip_nodename / NODE_NAME (kvip runs as if the node had no labels)");
    }
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
    let mut was_excluded = false;
    let mut next_resync = tokio::time::Instant::now() + cfg.resync_period;
    // Neighbours' entries of held VIPs refreshed every `vip_arpRate` (with vip_arp).
    let mut refresh = cfg.arp_refresh.filter(|_| cfg.arp).map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut last_sync;
    loop {
        last_sync = tokio::time::Instant::now();
        let leading = *leader.borrow_and_update();
        if leading != was_leading {
            m.leader_transitions.inc();
            tracing::info!(leader = leading, "leadership changed");
            was_leading = leading;
        }
        let generation = *dirty.borrow_and_update();
        m.generation_observed.set(generation as i64);
        let snapshot = cache.snapshot(networks.clone());
        if snapshot.node_excluded != was_excluded {
            was_excluded = snapshot.node_excluded;
            tracing::info!(
                excluded = was_excluded,
                label = kvip_kube::cluster::EXCLUDE_FROM_LB_LABEL,
                "this node's exclusion from load balancing changed"
            );
        }
        let leadership = match &*elections {
            Elections::PerService(e) => Leadership::PerService(e.held()),
            _ => Leadership::Global(leading),
        };
        let p = plan(&snapshot, &leadership, &node);
        if let Elections::PerService(e) = elections {
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
                m.generation_realised.set(generation as i64);
                if !r.vips_repaired.is_empty() {
                    tracing::warn!(vips = ?r.vips_repaired, "VIPs removed by someone else were added back");
                    m.drift_repairs
                        .get_or_create(&KindLabel {
                            kind: kvip_core::DriftKind::Address.as_str().into(),
                        })
                        .inc_by(r.vips_repaired.len() as u64);
                }
                // Only now, with the VIPs of what this node may no longer hold removed, do
                // the elections learn it (and release).
                match elections {
                    Elections::PerService(e) => e.after_sync(timings.retry_period),
                    Elections::Global { candidate, .. } => {
                        let c = !snapshot.node_excluded;
                        candidate.send_if_modified(|v| std::mem::replace(v, c) != c);
                    }
                    Elections::Off => {}
                }
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
        // Wait for a change (or the resync timer), then let a burst of changes settle. The
        // neighbours' refresh announces what is held without a sync.
        loop {
            tokio::select! {
                _ = dirty.changed() => {}
                _ = leader.changed() => {}
                _ = per_service_changed.changed() => {}
                // On its own clock: a steady stream of changes does not postpone it.
                _ = tokio::time::sleep_until(next_resync) => {
                    next_resync = tokio::time::Instant::now() + cfg.resync_period;
                    // Drift: someone changed kvip's objects by hand. Replace everything if so.
                    match dp.observe().await {
                        Ok(o) if o.state == p.desired && o.stray.is_empty() => {}
                        Ok(o) => {
                            let mut kinds = p.desired.drift(&o.state);
                            if !o.stray.is_empty() {
                                kinds.insert(kvip_core::DriftKind::Rule);
                            }
                            for k in &kinds {
                                m.drift_repairs
                                    .get_or_create(&KindLabel { kind: k.as_str().into() })
                                    .inc();
                            }
                            tracing::warn!(kinds = ?kinds, stray = ?o.stray, "kernel state drifted from the desired state; repairing");
                            dp.invalidate();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reading kvip's kernel state back");
                            dp.invalidate();
                        }
                    }
                }
                _ = async {
                    match refresh.as_mut() {
                        Some(i) => {
                            i.tick().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    match dp.reannounce().await {
                        Ok(n) => {
                            m.announcements.inc_by(n as u64);
                        }
                        Err(e) => tracing::warn!(error = %e, "announcing the held VIPs"),
                    }
                    continue;
                }
                _ = root.cancelled() => return Ok(()),
            }
            break;
        }
        // Debounce: at most one sync per DEBOUNCE. A change after a quiet spell is applied at
        // once; the changes of a burst wait for the rest of the interval and go together.
        tokio::time::sleep(DEBOUNCE.saturating_sub(last_sync.elapsed())).await;
    }
}
