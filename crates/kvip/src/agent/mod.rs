//! `kvip run`: the node agent. Three parts joined by channels under one cancellation root:
//!
//! - the **elections** (`kvip_kube::elections`) publish which Services this node holds;
//! - **reconcile** ([`reconcile`]) turns the watched cluster and that leadership into
//!   `plan()` and the dataplane, and nothing else — it never waits on the API;
//! - the **reporter** ([`reporter`]) writes status, annotations and Events from the latest
//!   plan, and the **permission checker** ([`permissions`]) says what RBAC is missing.
//!
//! On SIGTERM or SIGINT everything stops, kvip's kernel state is removed, then the Leases
//! are released, then every task has ended.

mod bgp;
mod client;
mod control_plane;
mod events;
pub(crate) mod permissions;
mod reconcile;
mod reporter;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kvip_core::config::AgentConfig;
use kvip_core::lease::Timings;
use kvip_core::plan::ClusterNetworks;
use kvip_dataplane::{AnnounceConfig, Config, Dataplane, Instance, KernelDataplane};
use kvip_kube::elections::{self, Mode, Release};
use kvip_kube::{ClusterCache, discovery};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use client::{api_server_addresses, backend_kind, client, node_config, own_namespace};

use crate::metrics::{self, Metrics, SourceLabel};

const DEBOUNCE: Duration = Duration::from_millis(20);
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

/// What startup hands the shutdown path.
#[derive(Default)]
struct Running {
    /// The elections' releases, once they have stopped.
    releases: Option<tokio::task::JoinHandle<Vec<Release>>>,
    /// The control-plane election's release, once it has stopped.
    control_plane_release: Option<tokio::task::JoinHandle<Release>>,
    /// The BGP speaker (`bgp_enable`): its routes are withdrawn first at shutdown.
    bgp: Option<Arc<kvip_bgp::Speaker>>,
}

/// Runs the agent until SIGTERM or SIGINT (exit 0) or a failure (an error). Whichever way it
/// ends: everything kvip owns is removed from the kernel, then the Leases are released, then
/// every task has stopped — within `shutdown_timeout` of the signal.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    // First of all: a SIGTERM from now on must lead to the shutdown path, never kill the
    // process with kvip's state still in the kernel.
    let signals = ShutdownSignals::install()?;
    // Everything that can be checked without the API or the kernel is checked before the
    // kernel is touched: a bad setting must not cost the node its VIPs.
    let interface = cfg
        .interface()
        .map(str::to_string)
        .context("vip_interface is not set (kvip does not pick an interface by itself yet)")?;
    // With cp_enable every call goes to the node's own API server.
    let (client, api_url, cp_creds) = match &cfg.control_plane {
        Some(cp) => {
            let path = std::path::PathBuf::from(
                cfg.kubeconfig
                    .as_deref()
                    .unwrap_or(kvip_core::control_plane::ADMIN_CONF),
            );
            let primary = control_plane::local_config(&path, cp)
                .await?
                .with_context(|| format!("k8s_config_file {}: missing or empty", path.display()))?;
            let super_admin =
                control_plane::local_config(&control_plane::super_admin_path(&path), cp).await?;
            let url = primary.cluster_url.clone();
            let client =
                kube::Client::try_from(primary.clone()).context("creating the local API client")?;
            (
                client,
                url,
                Some(control_plane::Credentials {
                    primary,
                    super_admin,
                }),
            )
        }
        None => {
            let (c, u) = client(&cfg).await?;
            (c, u, None)
        }
    };
    let listen = metrics::listen_address(&cfg.prometheus_server)?;
    let metrics_listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} (prometheus_server)"))?;
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
    let m = Metrics::new();
    metrics::serve(metrics_listener, m.clone(), &tasks, root.child_token());

    let mut running = Running::default();
    let start = Start {
        cfg: &cfg,
        interface,
        client,
        api_url,
        cp_creds,
        m,
        root: &root,
        tasks: &tasks,
    };
    let outcome = start.run(&mut dp, &mut running).await;
    if let Err(e) = &outcome {
        tracing::error!(error = format!("{e:#}"), "the agent stops");
    }
    shutdown(&cfg, dp, running, &root, &tasks, signalled.get().copied()).await?;
    outcome
}

/// Stops every task; removes kvip's kernel state; only then hands the Leases on, so no other
/// node can take a VIP while this one still has it; waits for every task, within the
/// deadline.
async fn shutdown(
    cfg: &AgentConfig,
    mut dp: KernelDataplane,
    running: Running,
    root: &CancellationToken,
    tasks: &TaskTracker,
    signalled: Option<tokio::time::Instant>,
) -> Result<()> {
    root.cancel();
    let started = signalled.unwrap_or_else(tokio::time::Instant::now);
    let deadline = started + cfg.shutdown_timeout;
    if let Some(speaker) = &running.bgp {
        // Routers stop sending traffic here before the VIPs leave the kernel: explicit
        // withdrawals, then a Cease, on every session.
        let limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(Duration::from_secs(3));
        if speaker.shutdown(limit).await {
            tracing::info!("BGP routes withdrawn and sessions closed");
        } else {
            tracing::warn!(
                ?limit,
                "BGP sessions did not close in time: their routes go when the peers' hold time runs out"
            );
        }
    }
    tracing::info!("removing kvip's kernel state, then releasing the leases");
    let releases = async {
        let mut all = match running.releases {
            Some(h) => tokio::time::timeout_at(deadline, h).await,
            None => Ok(Ok(Vec::new())),
        };
        if let Some(h) = running.control_plane_release {
            let cp = tokio::time::timeout_at(deadline, h).await;
            all = match (all, cp) {
                (Ok(Ok(mut v)), Ok(Ok(r))) => {
                    v.push(r);
                    Ok(Ok(v))
                }
                (Ok(Ok(_)), Ok(Err(e))) => Ok(Err(e)),
                (Ok(Ok(_)), Err(e)) => Err(e),
                (other, _) => other,
            };
        }
        all
    };
    let teardown = async {
        match tokio::time::timeout_at(deadline, dp.teardown()).await {
            Ok(r) => r,
            Err(_) => kvip_dataplane::TeardownReport {
                errors: vec![
                    "removing kvip's kernel state did not finish by shutdown_timeout".into(),
                ],
                ..Default::default()
            },
        }
    };
    let (releases, teardown) = tokio::join!(releases, teardown);
    for e in &teardown.errors {
        tracing::error!(error = %e, "teardown");
    }
    // Whatever the teardown reported, the read-back decides whether anything of kvip's is
    // left (a conntrack failure, say, leaves nothing behind).
    let left = if teardown.errors.is_empty() {
        None
    } else {
        match tokio::time::timeout_at(deadline, dp.observe()).await {
            Ok(Ok(o)) if o.state.is_empty() => None,
            Ok(Ok(o)) => Some(format!(
                "{} VIP(s) and {} egress pod(s) are still in the kernel",
                o.state.vips().len(),
                o.state.source_count()
            )),
            Ok(Err(e)) => Some(format!("kvip's kernel state cannot be read back: {e}")),
            Err(_) => Some("reading kvip's kernel state back did not finish in time".into()),
        }
    };
    // Its netlink connection and announcement tasks end with it.
    drop(dp);
    let mut releases: Vec<Release> = match releases {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the elections task failed; its Leases will expire");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!("the elections did not stop in time; their Leases will expire");
            Vec::new()
        }
    };
    if let Some(why) = left
        && releases.iter().any(Release::held)
    {
        // A VIP may still be on this node: handing the Lease on could put it on two. The
        // Leases expire instead (lease duration).
        tracing::error!(
            reason = why,
            "kvip's kernel state may not be gone: the Leases are not released, they expire"
        );
        releases.clear();
    }
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
    Ok(())
}

/// Startup: everything up to the running loop.
struct Start<'a> {
    cfg: &'a AgentConfig,
    interface: String,
    client: kube::Client,
    api_url: http::Uri,
    /// The control-plane Lease's identities (`cp_enable`).
    cp_creds: Option<control_plane::Credentials>,
    m: Arc<Metrics>,
    root: &'a CancellationToken,
    tasks: &'a TaskTracker,
}

impl Start<'_> {
    fn needs(&self) -> permissions::Needs {
        permissions::Needs::for_config(self.cfg)
    }

    /// The cluster CIDRs: configured, discovered, or (with `egress_default_cidrs`) guessed.
    async fn networks(&self) -> Result<Option<ClusterNetworks>> {
        let cfg = self.cfg;
        let Some(found) = unless_stopped(
            self.root,
            discovery::discover(
                &self.client,
                cfg.egress_pod_cidr.clone(),
                cfg.egress_service_cidr.clone(),
            ),
        )
        .await
        else {
            return Ok(None);
        };
        for d in &found.denied {
            tracing::warn!(permission = %d, "CIDR discovery: missing permission");
        }
        for e in &found.errors {
            tracing::warn!(error = %e, "CIDR discovery");
        }
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
            self.m
                .cidr_source
                .get_or_create(&SourceLabel {
                    kind: kind.into(),
                    source: source.into(),
                })
                .set(1);
        }
        Ok(Some(ClusterNetworks {
            pod: pod.map(|p| p.0).unwrap_or_default(),
            service: service.map(|s| s.0).unwrap_or_default(),
            api_server: api_server_addresses(&self.api_url),
        }))
    }

    /// Startup, then the loop until the root is cancelled (Ok) or startup fails (Err).
    async fn run(mut self, dp: &mut KernelDataplane, running: &mut Running) -> Result<()> {
        let (cfg, root, tasks) = (self.cfg, self.root, self.tasks);
        // This process holds no Lease yet: anything an earlier run left in the kernel is
        // stale. Clear it now, before any wait on the API (which may be unreachable).
        let cleared = dp
            .apply(&kvip_core::DesiredState::empty())
            .await
            .context("clearing kvip's kernel state left by an earlier run")?;
        if !cleared.vips_removed.is_empty() || cleared.mode != kvip_dataplane::SyncMode::Unchanged {
            tracing::info!(vips_removed = ?cleared.vips_removed, "cleared kvip's kernel state left by an earlier run");
        }
        let timings = Timings {
            lease_duration: cfg.lease_duration,
            renew_deadline: cfg.renew_deadline,
            retry_period: cfg.retry_period,
        };
        let routes = match &cfg.bgp {
            Some(b) => {
                // A frozen holder's routes stay on the routers until its hold time runs out
                // (or BFD's detection time), while another node may take the Lease once it
                // expires: for that long both are announced.
                let slow: Vec<String> = b
                    .peers
                    .iter()
                    .filter(|p| p.bfd.is_none())
                    .map(|p| p.address.to_string())
                    .collect();
                if cfg.leader_election
                    && !slow.is_empty()
                    && (b.hold_time == 0
                        || Duration::from_secs(u64::from(b.hold_time)) > cfg.lease_duration)
                {
                    tracing::warn!(
                        peers = ?slow, hold_time = b.hold_time, lease_duration = ?cfg.lease_duration,
                        "with leader election, a frozen or cut-off holder stays announced for the BGP hold time, longer than the Lease: another node may announce the VIP meanwhile; enable BFD (the bfd field of bgp_peers) or lower bgp_hold_time"
                    );
                }
                let (speaker, routes) = bgp::start(b, &self.m, tasks, root).await?;
                running.bgp = Some(speaker);
                Some(routes)
            }
            None => None,
        };
        let control_plane = match (&cfg.control_plane, self.cp_creds.take()) {
            (Some(cp), Some(creds)) => {
                let interface = cfg
                    .control_plane_interface()
                    .map(str::to_string)
                    .context("vip_interface is not set: the control-plane VIP needs it")?;
                let claim = kvip_core::VipClaim::new(cp.address, interface)
                    .context("the control-plane VIP")?;
                let (c, release) = control_plane::start(
                    cp,
                    claim,
                    &cfg.node_name,
                    creds,
                    timings,
                    &self.m,
                    tasks,
                    root,
                )?;
                running.control_plane_release = Some(release);
                tracing::info!(vip = %cp.address, lease = %format!("{}/{}", cp.lease_namespace, cp.lease_name), api = %self.api_url, "control-plane VIP: competing while the local API server is ready");
                Some(c)
            }
            _ => None,
        };
        if !cfg.services {
            return self.run_control_plane_only(dp, control_plane, routes).await;
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
        // Permissions first: without the watches nothing can work, so their absence stops
        // the start with the fix; anything else missing degrades the agent (see
        // `permissions`) and is reported while it lasts.
        let needs = self.needs();
        let first_answer = match unless_stopped(
            root,
            permissions::check(&self.client, &needs, &BTreeSet::new()),
        )
        .await
        {
            None => return Ok(()),
            Some(Ok(missing)) => {
                let fatal = permissions::fatal(&missing);
                if !fatal.is_empty() {
                    let lines: Vec<String> = fatal.iter().map(ToString::to_string).collect();
                    bail!("cannot watch the cluster: {}", lines.join("; "));
                }
                Some(missing)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not check permissions at start; checking again in the background");
                None
            }
        };
        let Some(networks) = self.networks().await? else {
            return Ok(());
        };
        let (dirty_tx, dirty) = watch::channel(0u64);
        let cache = ClusterCache::start(
            self.client.clone(),
            cfg.namespace.as_deref(),
            &cfg.node_name,
            dirty_tx,
            tasks,
            root,
        );
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
        if !cache.node_found() {
            tracing::warn!(node = %cfg.node_name, "no Node object of this name: check vip_nodename / NODE_NAME (kvip runs as if the node had no labels)");
        }

        let forbidden = Arc::new(Notify::new());
        let (synced_tx, synced_rx) = watch::channel(None);
        let (reports_tx, reports_rx) = watch::channel(None);
        let (namespaces_tx, namespaces_rx) = watch::channel(BTreeSet::new());
        let (missing_tx, missing_rx) = watch::channel(Vec::new());
        let mode = if !cfg.leader_election {
            Mode::Off
        } else if cfg.svc_election {
            Mode::PerService
        } else {
            Mode::Global {
                namespace: own_namespace(),
                lease: cfg.lease_name.clone(),
            }
        };
        let handle = elections::start(
            elections::Settings {
                client: self.client.clone(),
                identity: cfg.node_name.clone(),
                timings,
                mode,
                forbidden: forbidden.clone(),
            },
            synced_rx,
            tasks,
            root.child_token(),
        );
        running.releases = Some(handle.releases);
        tasks.spawn(permissions::watch_permissions(
            self.client.clone(),
            needs,
            first_answer,
            namespaces_rx,
            forbidden,
            missing_tx,
            self.m.clone(),
            root.child_token(),
        ));
        tasks.spawn(reporter::run(
            self.client.clone(),
            cfg.node_name.clone(),
            reports_rx,
            missing_rx,
            root.child_token(),
        ));
        let node = node_config(cfg, self.interface.clone());
        tracing::info!(node = %node.node_name, interface = %node.interface, backend = dp.backend_name(), "kvip agent started");
        let mut planner = kvip_core::plan::Planner::default();
        let mut settings = reconcile::Settings {
            node,
            networks,
            resync_period: cfg.resync_period,
            arp_refresh: cfg.arp_refresh.filter(|_| cfg.arp),
            debounce: DEBOUNCE,
            planner: Box::new(move |s, l, n| planner.plan(s, l, n)),
        };
        let channels = reconcile::Channels {
            dirty,
            leadership: handle.leadership,
            deadlines: handle.deadlines,
            fences: dp
                .fence_sink()
                .context("starting the keeper of the VIPs' lifetimes")?,
            synced: synced_tx,
            reports: reports_tx,
            namespaces: namespaces_tx,
            control_plane,
            routes,
        };
        reconcile::run(dp, &cache, &mut settings, channels, &self.m, root).await;
        Ok(())
    }

    /// `cp_enable` without Services: the loop holds the control-plane VIP alone (no watches,
    /// no Service elections, no CIDR discovery).
    async fn run_control_plane_only(
        self,
        dp: &mut KernelDataplane,
        control_plane: Option<control_plane::ControlPlane>,
        routes: Option<watch::Sender<BTreeSet<std::net::IpAddr>>>,
    ) -> Result<()> {
        let node = node_config(self.cfg, self.interface.clone());
        tracing::info!(node = %node.node_name, backend = dp.backend_name(), "kvip agent started (control plane only)");
        let mut planner = kvip_core::plan::Planner::default();
        let mut settings = reconcile::Settings {
            node,
            networks: ClusterNetworks::default(),
            resync_period: self.cfg.resync_period,
            arp_refresh: self.cfg.arp_refresh.filter(|_| self.cfg.arp),
            debounce: DEBOUNCE,
            planner: Box::new(move |s, l, n| planner.plan(s, l, n)),
        };
        // The senders of the Service inputs live as long as the loop: none ever changes.
        let (_dirty_tx, dirty) = watch::channel(0u64);
        let (_leadership_tx, leadership) = watch::channel(elections::LeadershipView::default());
        let (_deadlines_tx, deadlines) = watch::channel(kvip_core::fence::Deadlines::Unfenced);
        let (synced, _synced_rx) = watch::channel(None);
        let (reports, _reports_rx) = watch::channel(None);
        let (namespaces, _namespaces_rx) = watch::channel(BTreeSet::new());
        let channels = reconcile::Channels {
            dirty,
            leadership,
            deadlines,
            fences: dp
                .fence_sink()
                .context("starting the keeper of the VIPs' lifetimes")?,
            synced,
            reports,
            namespaces,
            control_plane,
            routes,
        };
        reconcile::run(
            dp,
            &reconcile::NoServices,
            &mut settings,
            channels,
            &self.m,
            self.root,
        )
        .await;
        Ok(())
    }
}
