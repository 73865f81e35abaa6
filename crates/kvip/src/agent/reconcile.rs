//! The reconcile loop: snapshot → `plan()` → dataplane, and nothing else. It never waits on
//! the API: what it decided goes out on watch channels (to the elections, the reporter, the
//! permission checker), and a leadership change wakes it at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kvip_core::fence::{Deadlines, vip_deadlines};
use kvip_core::plan::{ClusterNetworks, still_held};
use kvip_core::{DesiredState, DriftKind, Leadership, NodeConfig, Plan, Snapshot};
use kvip_dataplane::{Dataplane, FenceReport, FenceSink, SyncMode};
use kvip_kube::elections::{LeadershipView, Synced};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::control_plane::ControlPlane;
use super::reporter::Report;
use crate::metrics::{KindLabel, Metrics, ModeLabel, NotReady};

/// How long after a failed sync the next one is tried, without a change.
const RETRY_FAILED: Duration = Duration::from_secs(1);

/// A read-back a change interrupted is tried again this soon.
const READBACK_RETRY: Duration = Duration::from_secs(1);

/// After this many interrupted read-backs in a row, the next one runs to its end whatever
/// arrives meanwhile: a steady stream of changes cannot postpone drift detection forever.
const READBACK_MAX_YIELDS: u32 = 3;

/// How a read-back ended.
enum ReadBack {
    Finished,
    /// A change interrupted it.
    Yielded,
    /// A leadership change interrupted it (not counted against READBACK_MAX_YIELDS).
    Leadership,
}

/// A channel's sender is gone: at shutdown (the watches and elections end first) that is
/// expected; otherwise it is a bug, and the loop stops rather than spin.
fn stopped(what: &str, root: &CancellationToken) {
    if !root.is_cancelled() {
        tracing::error!("the {what} stopped; the reconcile loop stops");
    }
}

/// Where the loop reads the cluster from.
pub(crate) trait SnapshotSource {
    fn snapshot(&self, networks: ClusterNetworks) -> Snapshot;
}

impl SnapshotSource for kvip_kube::ClusterCache {
    fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        kvip_kube::ClusterCache::snapshot(self, networks)
    }
}

/// The cluster without Services (`cp_enable` alone).
pub(crate) struct NoServices;

impl SnapshotSource for NoServices {
    fn snapshot(&self, networks: ClusterNetworks) -> Snapshot {
        Snapshot {
            networks,
            ..Snapshot::default()
        }
    }
}

/// The planner the loop calls: `kvip_core::plan::Planner` (the memoising `plan()`); tests
/// substitute it.
pub(crate) type Planner = Box<dyn FnMut(&Snapshot, &Leadership, &NodeConfig) -> Plan + Send>;

pub(crate) struct Settings {
    pub node: NodeConfig,
    pub networks: ClusterNetworks,
    pub resync_period: Duration,
    /// Re-announce held VIPs this often (`vip_arpRate` with `vip_arp`).
    pub arp_refresh: Option<Duration>,
    /// At most one sync per this interval (a lone change applies at once).
    pub debounce: Duration,
    pub planner: Planner,
}

/// The loop's inputs and outputs.
pub(crate) struct Channels {
    /// Bumped on every change of the watched objects.
    pub dirty: watch::Receiver<u64>,
    pub leadership: watch::Receiver<LeadershipView>,
    /// The renew deadlines of the Leases held: each held VIP's address lifetime ends at its
    /// Lease's, and is moved on as they move.
    pub deadlines: watch::Receiver<Deadlines>,
    /// Where the dataplane takes each VIP's deadline (its lifetime keeper).
    pub fences: Arc<dyn FenceSink>,
    /// Each applied plan, for the elections.
    pub synced: watch::Sender<Option<Synced>>,
    /// Each plan (applied, or refused as invalid), for the reporter.
    pub reports: watch::Sender<Option<Report>>,
    /// The namespaces of the selected Services (for per-Service Lease permissions).
    pub namespaces: watch::Sender<BTreeSet<String>>,
    /// The control-plane VIP (`cp_enable`).
    pub control_plane: Option<ControlPlane>,
    /// The VIPs to announce over BGP (`bgp_enable`): those in the kernel.
    pub routes: Option<watch::Sender<BTreeSet<std::net::IpAddr>>>,
}

/// What changed of the control-plane VIP's inputs.
enum CpChange {
    /// The Lease was won, lost or renewed.
    Leader,
    /// The local API server's health.
    Health,
}

/// Until an input of the control-plane VIP changes (never without `cp_enable`); `Err` when
/// its task is gone.
async fn control_plane_changed(cp: Option<&mut ControlPlane>) -> Result<CpChange, ()> {
    let Some(c) = cp else {
        return std::future::pending().await;
    };
    tokio::select! {
        r = c.leader.changed() => r.map(|_| CpChange::Leader).map_err(|_| ()),
        r = c.healthy.changed() => r.map(|_| CpChange::Health).map_err(|_| ()),
    }
}

/// The loop's own state between syncs.
#[derive(Default)]
struct Memory {
    was_leading: Option<Leadership>,
    was_excluded: bool,
    /// The state the kernel was last made to hold.
    applied: Option<DesiredState>,
    /// The plan it came from: which Lease each held VIP is held under.
    plan: Option<Arc<Plan>>,
    /// The lifetime keeper as the loop last saw it.
    fenced: Fenced,
    /// Whether the control-plane VIP was held (Lease and health) at the last sync.
    cp_held: bool,
    /// Of its VIPs, those someone else had configured already (not read back as kvip's).
    foreign: Vec<std::net::IpAddr>,
    last_invalid: Option<String>,
}

/// Runs until `root` is cancelled.
pub(crate) async fn run<D: Dataplane, S: SnapshotSource>(
    dp: &mut D,
    source: &S,
    s: &mut Settings,
    mut ch: Channels,
    m: &Metrics,
    root: &CancellationToken,
) {
    let mut mem = Memory::default();
    let mut next_resync = tokio::time::Instant::now() + s.resync_period;
    let mut yielded = 0u32;
    let mut refresh = s.arp_refresh.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let last_sync = tokio::time::Instant::now();
        let ok = sync_once(dp, source, s, &mut ch, m, &mut mem).await;
        // A failed sync is tried again after a pause, change or not.
        let retry = (!ok).then(|| last_sync + RETRY_FAILED);
        // Wait for a change (or the resync timer), then let a burst of changes settle. The
        // neighbours' refresh announces what is held without a sync. A closed channel means
        // its sender's task is gone (a bug): stop rather than spin.
        let mut leadership_changed = false;
        loop {
            tokio::select! {
                r = ch.dirty.changed() => if r.is_err() {
                    return stopped("watches", root);
                },
                r = ch.leadership.changed() => {
                    if r.is_err() {
                        return stopped("elections", root);
                    }
                    leadership_changed = true;
                }
                // A renewal: the held VIPs' lifetimes move on, without a sync.
                r = ch.deadlines.changed() => {
                    if r.is_err() {
                        return stopped("elections", root);
                    }
                    if refence(&mem.plan, mem.cp_held, &mut mem.fenced, &mut ch, m) {
                        // Gone before its deadline: the next sync adds it back.
                        dp.invalidate();
                        leadership_changed = true;
                        break;
                    }
                    continue;
                }
                // The control-plane Lease won or lost, or the API server's health changed: a
                // sync, at once. A renewal alone moves its VIP's lifetime on.
                r = control_plane_changed(ch.control_plane.as_mut()) => {
                    let change = match r {
                        Err(()) => return stopped("control-plane election", root),
                        Ok(c) => c,
                    };
                    let held = ch.control_plane.as_ref().is_some_and(|c| {
                        c.leader.borrow().is_some() && *c.healthy.borrow()
                    });
                    if matches!(change, CpChange::Leader) && held == mem.cp_held {
                        if refence(&mem.plan, mem.cp_held, &mut mem.fenced, &mut ch, m) {
                            dp.invalidate();
                            leadership_changed = true;
                            break;
                        }
                        continue;
                    }
                    leadership_changed = true;
                }
                _ = async {
                    match retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending::<()>().await,
                    }
                } => {}
                // On its own clock: a steady stream of changes does not postpone it. A change
                // waits for no read-back: the read-back is dropped (its tool killed) and tried
                // again shortly; after READBACK_MAX_YIELDS in a row one runs to its end, which
                // only a leadership change (a lost Lease waits for nothing) or the stop ends.
                _ = tokio::time::sleep_until(next_resync) => {
                    // The read-back borrows the dataplane until it ends or is dropped here.
                    let (outcome, lapsed) = {
                        let (fenced_vips, sink) = (mem.fenced.vips.clone(), ch.fences.clone());
                        let ran_out = move |a: std::net::IpAddr| fenced_vips.contains(&a) && sink.ran_out(a);
                        let drift = check_drift(dp, mem.applied.as_ref(), &mem.foreign, &ran_out, m);
                        tokio::pin!(drift);
                        let may_yield = yielded < READBACK_MAX_YIELDS;
                        let mut lapsed = false;
                        let outcome = loop {
                            tokio::select! {
                                _ = &mut drift => break ReadBack::Finished,
                                r = ch.dirty.changed(), if may_yield => {
                                    if r.is_err() {
                                        return stopped("watches", root);
                                    }
                                    break ReadBack::Yielded;
                                }
                                r = ch.leadership.changed() => {
                                    if r.is_err() {
                                        return stopped("elections", root);
                                    }
                                    leadership_changed = true;
                                    break ReadBack::Leadership;
                                }
                                // Renewals go on reaching the lifetimes during a long read-back.
                                r = ch.deadlines.changed() => {
                                    if r.is_err() {
                                        return stopped("elections", root);
                                    }
                                    lapsed |= refence(&mem.plan, mem.cp_held, &mut mem.fenced, &mut ch, m);
                                }
                                _ = root.cancelled() => return,
                            }
                        };
                        (outcome, lapsed)
                    };
                    if lapsed {
                        dp.invalidate();
                        leadership_changed = true;
                    }
                    let now = tokio::time::Instant::now();
                    next_resync = now + match outcome {
                        ReadBack::Finished => {
                            yielded = 0;
                            s.resync_period
                        }
                        ReadBack::Yielded => {
                            yielded += 1;
                            m.readbacks_interrupted.inc();
                            READBACK_RETRY.min(s.resync_period)
                        }
                        ReadBack::Leadership => {
                            m.readbacks_interrupted.inc();
                            READBACK_RETRY.min(s.resync_period)
                        }
                    };
                }
                _ = async {
                    match refresh.as_mut() {
                        Some(i) => { i.tick().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    match dp.reannounce().await {
                        Ok(n) => m.announcements.inc_by(n as u64),
                        Err(e) => {
                            tracing::warn!(error = %e, "announcing the held VIPs");
                            0
                        }
                    };
                    continue;
                }
                _ = root.cancelled() => return,
            }
            break;
        }
        // Debounce: at most one sync per interval. A change after a quiet spell is applied at
        // once; the changes of a burst wait for the rest of the interval and go together. A
        // leadership change waits for nothing.
        if !leadership_changed {
            let wait = tokio::time::sleep(s.debounce.saturating_sub(last_sync.elapsed()));
            tokio::select! {
                _ = wait => {}
                _ = ch.leadership.changed() => {}
                _ = root.cancelled() => return,
            }
        }
    }
}

/// Gives the dataplane's lifetime keeper the deadline of every VIP `plan` holds, from the
/// elections' latest deadlines, without waiting for the dataplane. Returns whether a held
/// VIP lapsed (gone before its deadline): the caller syncs to add it back.
/// The lifetime keeper as the loop last saw it.
#[derive(Default)]
struct Fenced {
    /// Its counts (it counts since the dataplane opened).
    counted: FenceReport,
    /// The VIPs given a deadline: one of them missing is a lapse, not drift.
    vips: std::collections::BTreeSet<std::net::IpAddr>,
}

fn fence(
    sink: &Arc<dyn FenceSink>,
    plan: &Plan,
    deadlines: &mut watch::Receiver<Deadlines>,
    control_plane: Option<&ControlPlane>,
    m: &Metrics,
    fenced: &mut Fenced,
) -> bool {
    let now = std::time::Instant::now();
    let mut deadlines = vip_deadlines(plan, &deadlines.borrow_and_update(), now);
    if let Some(c) = control_plane {
        // Held with no deadline known (the Lease just lost): passed already.
        let d = (*c.leader.borrow()).unwrap_or(now);
        deadlines.insert(c.claim.address, d);
    }
    fenced.vips = deadlines.keys().copied().collect();
    let counted = &mut fenced.counted;
    let r = sink.set(deadlines);
    // The keeper counts since the dataplane opened: add what is new.
    m.fence_refreshes
        .inc_by(r.refreshed.saturating_sub(counted.refreshed));
    m.fence_expired
        .inc_by(r.expired.saturating_sub(counted.expired));
    m.fence_errors
        .inc_by(r.errors.saturating_sub(counted.errors));
    m.fence_lapsed.inc_by(r.lapsed.len() as u64);
    if !r.lapsed.is_empty() {
        tracing::warn!(vips = ?r.lapsed, "held VIPs whose lifetime ran out before their Lease's renew deadline: adding them back");
    }
    if !r.removed.is_empty() {
        tracing::warn!(vips = ?r.removed, "held VIPs removed by someone else: adding them back");
        m.drift_repairs
            .get_or_create(&KindLabel {
                kind: DriftKind::Address.as_str().into(),
            })
            .inc_by(r.removed.len() as u64);
    }
    let lapsed = !r.lapsed.is_empty() || !r.removed.is_empty();
    *counted = r;
    lapsed
}

/// BGP (`bgp_enable`): publishes the routes to announce (`keep` those announced for which
/// it holds). The withdrawal of a VIP about to go is handed to the sessions before the apply
/// removes the address; it is written by them meanwhile, not awaited.
fn announce(ch: &Channels, keep: impl Fn(std::net::IpAddr) -> bool) {
    let Some(routes) = &ch.routes else { return };
    routes.send_if_modified(|r| {
        let before = r.len();
        r.retain(|a| keep(*a));
        r.len() != before
    });
}

/// After an apply: the routes to announce are the VIPs of `applied` now in the kernel (not
/// those whose deadline passed during the apply).
fn announce_held(ch: &Channels, applied: &DesiredState, expired: &[std::net::IpAddr]) {
    let Some(routes) = &ch.routes else { return };
    let next: BTreeSet<std::net::IpAddr> = applied
        .vips()
        .iter()
        .map(|v| v.address)
        .filter(|a| !expired.contains(a))
        .collect();
    routes.send_if_modified(|r| {
        if *r == next {
            return false;
        }
        *r = next;
        true
    });
}

/// [`fence`] from the last applied plan, on a renewal (nothing before the first sync).
fn refence(
    plan: &Option<Arc<Plan>>,
    cp_held: bool,
    fenced: &mut Fenced,
    ch: &mut Channels,
    m: &Metrics,
) -> bool {
    let Some(p) = plan else { return false };
    let cp = ch.control_plane.as_ref().filter(|_| cp_held);
    fence(&ch.fences, p, &mut ch.deadlines, cp, m, fenced)
}

/// After an applied sync: whether the control-plane VIP is held now, and (only now that the
/// kernel holds exactly that) whether the election competes: a node whose API server is not
/// ready releases the Lease once its VIP is gone, never before.
fn control_plane_synced(
    ch: &mut Channels,
    mem: &mut Memory,
    held: bool,
    healthy: bool,
    m: &Metrics,
) {
    let Some(c) = &ch.control_plane else { return };
    if held != mem.cp_held {
        tracing::info!(vip = %c.claim.address, held, "control-plane VIP");
    }
    mem.cp_held = held;
    m.control_plane_held.set(i64::from(held));
    c.candidate
        .send_if_modified(|v| std::mem::replace(v, healthy) != healthy);
}

/// The VIPs of `applied` that `observed` lacks.
fn missing_vips<'a>(
    applied: &'a DesiredState,
    observed: &'a DesiredState,
) -> impl Iterator<Item = std::net::IpAddr> + 'a {
    applied
        .vips()
        .iter()
        .filter(|v| !observed.vips().contains(v))
        .map(|v| v.address)
}

/// Drift: someone changed kvip's objects by hand. Count it and replace everything next time.
async fn check_drift<D: Dataplane>(
    dp: &mut D,
    applied: Option<&DesiredState>,
    foreign: &[std::net::IpAddr],
    ran_out: &(dyn Fn(std::net::IpAddr) -> bool + Sync),
    m: &Metrics,
) {
    let Some(applied) = applied else { return };
    // A VIP someone else had configured is held, but not as kvip's: not drift.
    let without_foreign;
    let applied = if foreign.is_empty() {
        applied
    } else {
        without_foreign = applied.subset(|v| !foreign.contains(&v.address), |_| true);
        &without_foreign
    };
    let started = std::time::Instant::now();
    let observed = dp.observe().await;
    m.readback_seconds.observe(started.elapsed().as_secs_f64());
    match observed {
        Ok(o) if o.state == *applied && o.stray.is_empty() => {}
        // Only VIPs held under a Lease are missing: their lifetime ran out while held (the
        // keeper was starved), which is not someone else's doing. Added back all the same.
        Ok(o)
            if o.stray.is_empty()
                && o.state.egress() == applied.egress()
                && o.state.vips().iter().all(|v| applied.vips().contains(v))
                && missing_vips(applied, &o.state).all(ran_out) =>
        {
            let lapsed: Vec<_> = missing_vips(applied, &o.state).collect();
            m.fence_lapsed.inc_by(lapsed.len() as u64);
            tracing::warn!(vips = ?lapsed, "held VIPs gone before their Lease's renew deadline: adding them back");
            dp.invalidate();
        }
        Ok(o) => {
            let mut kinds = applied.drift(&o.state);
            if !o.stray.is_empty() {
                kinds.insert(DriftKind::Rule);
            }
            for k in &kinds {
                m.drift_repairs
                    .get_or_create(&KindLabel {
                        kind: k.as_str().into(),
                    })
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

/// One sync; false when the dataplane failed.
async fn sync_once<D: Dataplane, S: SnapshotSource>(
    dp: &mut D,
    source: &S,
    s: &mut Settings,
    ch: &mut Channels,
    m: &Metrics,
    mem: &mut Memory,
) -> bool {
    let view = ch.leadership.borrow_and_update().clone();
    if mem.was_leading.as_ref() != Some(&view.leadership) {
        if mem.was_leading.is_some() {
            m.leader_transitions.inc();
        }
        tracing::info!(leadership = ?view.leadership, "leadership changed");
        mem.was_leading = Some(view.leadership.clone());
    }
    let generation = *ch.dirty.borrow_and_update();
    m.generation_observed.set(generation as i64);
    let started = std::time::Instant::now();
    let snapshot = Arc::new(source.snapshot(s.networks.clone()));
    let snapshot_took = started.elapsed();
    if snapshot.node_excluded != mem.was_excluded {
        mem.was_excluded = snapshot.node_excluded;
        tracing::info!(
            excluded = mem.was_excluded,
            label = kvip_kube::cluster::EXCLUDE_FROM_LB_LABEL,
            "this node's exclusion from load balancing changed"
        );
    }
    let p = Arc::new((s.planner)(&snapshot, &view.leadership, &s.node));
    let plan_took = started.elapsed() - snapshot_took;
    let namespaces: BTreeSet<&str> = p.services.keys().map(|k| k.namespace.as_str()).collect();
    ch.namespaces.send_if_modified(|v| {
        let same = v.len() == namespaces.len()
            && v.iter().map(String::as_str).eq(namespaces.iter().copied());
        if !same {
            *v = namespaces.iter().map(|n| n.to_string()).collect();
        }
        !same
    });
    let kept;
    let (desired, invalid) = match &p.desired {
        Ok(d) => (d, None),
        Err(e) => {
            // Keep the last good state, less anything whose Lease is gone.
            let error = e.to_string();
            m.plan_errors.inc();
            m.not_ready(
                NotReady::InvalidState,
                Some(format!(
                    "the desired state is invalid ({error}); keeping the last good state"
                )),
            );
            if mem.last_invalid.as_deref() != Some(error.as_str()) {
                tracing::error!(%error, "the desired state is invalid; keeping the last good kernel state (less what is no longer held)");
            }
            mem.last_invalid = Some(error.clone());
            kept = mem
                .applied
                .as_ref()
                .map(|last| still_held(last, &p))
                .unwrap_or_default();
            (&kept, Some(error))
        }
    };
    if invalid.is_none() && mem.last_invalid.take().is_some() {
        m.not_ready(NotReady::InvalidState, None);
        tracing::info!("the desired state is valid again");
    }
    // Each VIP is added (or kept) with a lifetime ending at its Lease's renew deadline.
    // The control-plane VIP, while this node holds its Lease and its API server is ready.
    let (cp_held, cp_healthy) = match &mut ch.control_plane {
        Some(c) => {
            let healthy = *c.healthy.borrow_and_update();
            (c.leader.borrow_and_update().is_some() && healthy, healthy)
        }
        None => (false, false),
    };
    let with_cp;
    let desired = match ch.control_plane.as_ref().filter(|_| cp_held) {
        Some(c) => {
            let mut vips = desired.vips().to_vec();
            vips.push(c.claim.clone());
            match DesiredState::new(vips, desired.egress().to_vec()) {
                Ok(s) => {
                    with_cp = s;
                    &with_cp
                }
                Err(e) => {
                    // plan() refuses Services the control-plane VIP: a bug if it happens.
                    tracing::error!(error = %e, "adding the control-plane VIP to the desired state");
                    desired
                }
            }
        }
        None => desired,
    };
    // Each VIP is added with a lifetime that ends by its Lease's renew deadline.
    fence(
        &ch.fences,
        &p,
        &mut ch.deadlines,
        ch.control_plane.as_ref().filter(|_| cp_held),
        m,
        &mut mem.fenced,
    );
    // Routes of VIPs about to go are withdrawn before the addresses leave the kernel; new
    // ones are announced once the addresses are in (below).
    announce(ch, |a| desired.vips().iter().any(|v| v.address == a));
    let expired;
    match dp.apply(desired).await {
        Ok(r) => {
            // Not held because its deadline passed during the sync: tried again shortly,
            // with the deadline the elections publish by then.
            expired = !r.vips_expired.is_empty();
            m.sync_seconds
                .get_or_create(&ModeLabel {
                    mode: format!("{:?}", r.mode).to_lowercase(),
                })
                .observe(r.duration.as_secs_f64());
            m.vips_held.set(desired.vips().len() as i64);
            m.egress_pods.set(desired.source_count() as i64);
            m.not_ready(NotReady::NotSynced, None);
            m.generation_realised.set(generation as i64);
            // A fenced VIP found missing lapsed (its lifetime ran out while held); any other
            // was removed by someone else.
            let (lapsed, removed): (Vec<std::net::IpAddr>, Vec<std::net::IpAddr>) = r
                .vips_repaired
                .iter()
                .copied()
                .partition(|a| mem.fenced.vips.contains(a) && ch.fences.ran_out(*a));
            if !lapsed.is_empty() {
                tracing::warn!(vips = ?lapsed, "held VIPs gone before their Lease's renew deadline were added back");
                m.fence_lapsed.inc_by(lapsed.len() as u64);
            }
            if !removed.is_empty() {
                tracing::warn!(vips = ?removed, "VIPs removed by someone else were added back");
                m.drift_repairs
                    .get_or_create(&KindLabel {
                        kind: DriftKind::Address.as_str().into(),
                    })
                    .inc_by(removed.len() as u64);
            }
            mem.applied = Some(desired.clone());
            mem.plan = Some(p.clone());
            mem.foreign = r.vips_foreign.clone();
            // Not a VIP whose deadline passed during the apply: it is not in the kernel.
            announce_held(ch, desired, &r.vips_expired);
            control_plane_synced(ch, mem, cp_held, cp_healthy, m);
            // Only now, with the VIPs of what this node may no longer hold removed, do the
            // elections learn it (and release).
            ch.synced.send_replace(Some(Synced::from_plan(
                view.seq,
                snapshot.node_excluded,
                &p,
            )));
            if r.mode != SyncMode::Unchanged
                || !r.vips_added.is_empty()
                || !r.vips_removed.is_empty()
            {
                tracing::info!(
                    mode = ?r.mode, pods = desired.source_count(),
                    vips_added = ?r.vips_added, vips_removed = ?r.vips_removed,
                    snapshot_ms = snapshot_took.as_secs_f64() * 1e3,
                    plan_ms = plan_took.as_secs_f64() * 1e3,
                    ms = r.duration.as_secs_f64() * 1e3, "synced"
                );
            }
            for w in &r.warnings {
                tracing::warn!("{w}");
            }
        }
        Err(e) => {
            m.sync_errors.inc();
            m.not_ready(
                NotReady::NotSynced,
                Some(format!("the last sync failed: {e}")),
            );
            tracing::error!(error = %e, "sync failed; the next sync replaces everything");
            dp.invalidate();
            // What cannot be added must not keep what has to go: remove, at least, what this
            // node no longer holds (a lost Lease's VIP), keeping the rest as it was.
            if let Some(last) = mem.applied.clone() {
                let fallback = last.retained_in(desired);
                if fallback != last {
                    match dp.apply(&fallback).await {
                        Ok(r) => {
                            tracing::warn!(vips_removed = ?r.vips_removed, "applied the removals alone");
                            m.vips_held.set(fallback.vips().len() as i64);
                            m.egress_pods.set(fallback.source_count() as i64);
                            announce_held(ch, &fallback, &r.vips_expired);
                            mem.applied = Some(fallback);
                            mem.plan = Some(p.clone());
                            control_plane_synced(ch, mem, cp_held, cp_healthy, m);
                            // The kernel holds nothing the plan does not: the elections may
                            // release what it no longer holds.
                            ch.synced.send_replace(Some(Synced::from_plan(
                                view.seq,
                                snapshot.node_excluded,
                                &p,
                            )));
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "applying the removals alone failed too");
                            dp.invalidate();
                        }
                    }
                }
            }
            // Nothing to report: the kernel does not hold what the plan says.
            return false;
        }
    }
    ch.reports.send_replace(Some(Report {
        snapshot,
        plan: p,
        invalid,
    }));
    !expired
}
