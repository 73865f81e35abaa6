//! The elections this node takes part in, as one task: one global Lease, one Lease per
//! Service (`svc_election`), or none (`vip_leaderelection=false`). It publishes which
//! Services this node holds ([`LeadershipView`]) and learns after each successful sync
//! ([`Synced`]) which Services it may compete for.
//!
//! Ordering, the point of this module: a Lease is handed on only after a sync has removed the
//! VIPs held under it. An election that ends (its Service gone, its Lease renamed) first stops
//! counting as held; its release is written only once a sync computed without it has been
//! applied. A node that stops being a candidate hears of it only from a sync (which holds
//! nothing for that Service any more). At shutdown the caller tears the kernel state down
//! first and writes the releases this task hands back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kvip_core::Leadership;
use kvip_core::fence::Deadlines;
use kvip_core::lease::Timings;
use kvip_core::plan::{Plan, ServiceKey};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::election::Release;
use crate::election::{Election, Leader, LeaseLock};

/// kube-vip's Lease name for a Service without `kube-vip.io/leaseName`.
pub fn default_service_lease(service: &str) -> String {
    format!("kubevip-{service}")
}

/// Which elections run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// `vip_leaderelection=false`: this node holds every selected Service.
    Off,
    /// One Lease for every Service.
    Global { namespace: String, lease: String },
    /// One Lease per Service, in the Service's namespace.
    PerService,
}

/// What a sync tells the elections, once it is applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    /// The [`LeadershipView::seq`] the applied plan was computed from.
    pub seq: u64,
    /// This node is excluded from load balancing (competes for nothing).
    pub node_excluded: bool,
    /// Per selected Service: its Lease name and whether this node may compete for it.
    pub candidacy: BTreeMap<ServiceKey, Candidacy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidacy {
    pub lease: String,
    pub candidate: bool,
}

impl Synced {
    /// From an applied plan.
    pub fn from_plan(seq: u64, node_excluded: bool, plan: &Plan) -> Synced {
        Synced {
            seq,
            node_excluded,
            candidacy: plan
                .services
                .iter()
                .map(|(k, sp)| {
                    let lease = sp
                        .lease_name
                        .clone()
                        .unwrap_or_else(|| default_service_lease(&k.name));
                    (
                        k.clone(),
                        Candidacy {
                            lease,
                            candidate: sp.candidate,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Which Services this node holds, numbered: every change gets a higher `seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeadershipView {
    pub seq: u64,
    pub leadership: Leadership,
}

/// What the elections need to run.
#[derive(Clone)]
pub struct Settings {
    pub client: kube::Client,
    pub identity: String,
    pub timings: Timings,
    pub mode: Mode,
    /// Woken when an election's call is refused (403), so permissions are checked at once.
    pub forbidden: Arc<Notify>,
}

/// The running elections: their leadership and, when they end, their releases.
pub struct Handle {
    pub leadership: watch::Receiver<LeadershipView>,
    /// The renew deadlines of the Leases held, moved on by every renewal. Updated before
    /// the leadership view, so a Service seen held has its deadline known.
    pub deadlines: watch::Receiver<Deadlines>,
    /// Ends after the root is cancelled, with every release still to be written.
    pub releases: JoinHandle<Vec<Release>>,
}

/// Starts the elections on `tasks`; they stop when `root` is cancelled.
pub fn start(
    settings: Settings,
    synced: watch::Receiver<Option<Synced>>,
    tasks: &TaskTracker,
    root: CancellationToken,
) -> Handle {
    let initial = match settings.mode {
        Mode::Off => Leadership::Global(true),
        Mode::Global { .. } => Leadership::Global(false),
        Mode::PerService => Leadership::PerService(BTreeSet::new()),
    };
    let (tx, rx) = watch::channel(LeadershipView {
        seq: 0,
        leadership: initial,
    });
    let (dtx, drx) = watch::channel(match settings.mode {
        Mode::Off => Deadlines::Unfenced,
        Mode::Global { .. } => Deadlines::Global(None),
        Mode::PerService => Deadlines::PerService(BTreeMap::new()),
    });
    let out = Out {
        leadership: tx,
        deadlines: dtx,
    };
    let releases = match settings.mode.clone() {
        // The senders live as long as the task: a dropped sender would wake the loop at once.
        Mode::Off => tasks.spawn(async move {
            root.cancelled().await;
            drop(out);
            Vec::new()
        }),
        Mode::Global { namespace, lease } => {
            let t = tasks.clone();
            tasks.spawn(global(settings, namespace, lease, synced, out, t, root))
        }
        Mode::PerService => {
            let t = tasks.clone();
            tasks.spawn(PerService::new(settings, out, t, root).run(synced))
        }
    };
    Handle {
        leadership: rx,
        deadlines: drx,
        releases,
    }
}

/// What the elections publish.
struct Out {
    leadership: watch::Sender<LeadershipView>,
    deadlines: watch::Sender<Deadlines>,
}

impl Out {
    fn deadlines(&self, d: Deadlines) {
        self.deadlines
            .send_if_modified(|v| std::mem::replace(v, d.clone()) != d);
    }
}

fn publish(tx: &watch::Sender<LeadershipView>, l: Leadership) {
    tx.send_if_modified(|v| {
        if v.leadership == l {
            return false;
        }
        v.seq += 1;
        v.leadership = l;
        true
    });
}

async fn global(
    s: Settings,
    namespace: String,
    lease: String,
    mut synced: watch::Receiver<Option<Synced>>,
    out: Out,
    tasks: TaskTracker,
    root: CancellationToken,
) -> Vec<Release> {
    let lock = LeaseLock::new(s.client.clone(), &namespace, &lease);
    let (cand_tx, cand_rx) = watch::channel(false);
    let (lead_tx, mut lead_rx) = watch::channel(None);
    let election = tasks.spawn(
        Election::new(lock, &s.identity, s.timings)
            .on_forbidden(s.forbidden.clone())
            .run(cand_rx, lead_tx, root.child_token()),
    );
    loop {
        tokio::select! {
            r = lead_rx.changed() => {
                if r.is_err() { break; }
                let d = *lead_rx.borrow_and_update();
                out.deadlines(Deadlines::Global(d));
                publish(&out.leadership, Leadership::Global(d.is_some()));
            }
            r = synced.changed() => {
                if r.is_err() { break; }
                // A node excluded from load balancing competes for nothing; it hears of it
                // only after a sync, which has removed its VIPs.
                if let Some(sy) = &*synced.borrow_and_update() {
                    let c = !sy.node_excluded;
                    cand_tx.send_if_modified(|v| std::mem::replace(v, c) != c);
                }
            }
            _ = root.cancelled() => break,
        }
    }
    publish(&out.leadership, Leadership::Global(false));
    out.deadlines(Deadlines::Global(None));
    match election.await {
        Ok(r) => vec![r],
        Err(e) => {
            tracing::error!(error = %e, "the election task failed; its Lease will expire");
            Vec::new()
        }
    }
}

struct Running {
    lease: String,
    task: JoinHandle<Release>,
    candidate: watch::Sender<bool>,
    leader: watch::Receiver<Leader>,
    stop: CancellationToken,
}

/// A stopped election whose release waits: the Lease (namespace, name) and the leadership
/// seq that no longer counts it. The release is written once a sync computed from that seq
/// (or a later one) is applied — unless an election on the same Lease runs again by then
/// (the Service came back): that one keeps the Lease, and the old release is dropped.
struct Retiring {
    lease: (String, String),
    seq: u64,
    task: JoinHandle<Release>,
}

/// A Service this node stopped being a candidate for, while its election still leads: it no
/// longer counts as held from `seq` on, and its election hears of it (and releases) only once
/// a sync computed from `seq` is applied. It counts again only once its election has seen its
/// leadership end (`told` and then not leading), so a release in flight is never mistaken for
/// a Lease still held.
struct Withdrawal {
    seq: u64,
    told: bool,
}

/// One election per selected Service.
struct PerService {
    s: Settings,
    out: Out,
    running: BTreeMap<ServiceKey, Running>,
    retiring: Vec<Retiring>,
    withdrawing: BTreeMap<ServiceKey, Withdrawal>,
    /// Woken when any election gains or loses its Lease.
    changed: Arc<Notify>,
    tasks: TaskTracker,
    root: CancellationToken,
}

impl PerService {
    fn new(s: Settings, out: Out, tasks: TaskTracker, root: CancellationToken) -> Self {
        PerService {
            s,
            out,
            running: BTreeMap::new(),
            retiring: Vec::new(),
            withdrawing: BTreeMap::new(),
            changed: Arc::new(Notify::new()),
            tasks,
            root,
        }
    }

    /// The Services held, with their renew deadlines.
    fn held(&self) -> BTreeMap<ServiceKey, std::time::Instant> {
        self.running
            .iter()
            .filter(|(k, _)| !self.withdrawing.contains_key(*k))
            .filter_map(|(k, e)| e.leader.borrow().map(|d| (k.clone(), d)))
            .collect()
    }

    /// Publishes the deadlines, then the held set they belong to.
    fn publish_held(&mut self) {
        // A withdrawal is over once its election, told, no longer leads.
        let running = &self.running;
        self.withdrawing
            .retain(|k, w| !(w.told && running.get(k).is_none_or(|e| e.leader.borrow().is_none())));
        let held = self.held();
        let keys = held.keys().cloned().collect();
        self.out.deadlines(Deadlines::PerService(held));
        publish(&self.out.leadership, Leadership::PerService(keys));
    }

    /// Publishes the held set under a new seq, changed or not (what waits for a sync
    /// computed without something waits for this seq).
    fn publish_new_seq(&self) {
        let held = self.held();
        let keys: BTreeSet<ServiceKey> = held.keys().cloned().collect();
        self.out.deadlines(Deadlines::PerService(held));
        let held = Leadership::PerService(keys);
        self.out.leadership.send_modify(|v| {
            v.seq += 1;
            v.leadership = held;
        });
    }

    fn start_election(&mut self, key: &ServiceKey, c: &Candidacy) {
        // A release still waiting for the same Lease must never be written now: this
        // election takes the Lease over (same identity) and the release would hand it on.
        let lease = (key.namespace.clone(), c.lease.clone());
        let (dropped, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|r| r.lease == lease);
        self.retiring = keep;
        for r in dropped {
            self.tasks.spawn(async move {
                // The stopped election's own end; its release is not written.
                if let Err(e) = r.task.await {
                    tracing::error!(error = %e, "an election task failed");
                }
            });
        }
        let lock = LeaseLock::new(self.s.client.clone(), &key.namespace, &c.lease);
        let (cand_tx, cand_rx) = watch::channel(c.candidate);
        let (lead_tx, lead_rx) = watch::channel(None);
        let stop = self.root.child_token();
        let task = self.tasks.spawn(
            Election::new(lock, &self.s.identity, self.s.timings)
                .on_forbidden(self.s.forbidden.clone())
                .run(cand_rx, lead_tx, stop.clone()),
        );
        // Ends with the election (its sender is dropped then).
        let mut forward = lead_rx.clone();
        let changed = self.changed.clone();
        self.tasks.spawn(async move {
            while forward.changed().await.is_ok() {
                changed.notify_one();
            }
        });
        self.running.insert(
            key.clone(),
            Running {
                lease: c.lease.clone(),
                task,
                candidate: cand_tx,
                leader: lead_rx,
                stop,
            },
        );
    }

    /// Stops an election: it no longer counts as held from the next published seq on (the
    /// caller publishes it).
    fn retire(&mut self, key: &ServiceKey) {
        self.withdrawing.remove(key);
        if let Some(e) = self.running.remove(key) {
            e.stop.cancel();
            self.retiring.push(Retiring {
                lease: (key.namespace.clone(), e.lease.clone()),
                seq: self.out.leadership.borrow().seq + 1,
                task: e.task,
            });
        }
    }

    /// After a sync: start, update and stop elections to match its Services, and write the
    /// releases that sync made safe.
    fn apply(&mut self, sy: &Synced) {
        let mut new_seq = false;
        for (key, c) in &sy.candidacy {
            match self.running.get(key) {
                Some(e) if e.lease == c.lease => {
                    if c.candidate {
                        match self.withdrawing.get(key).map(|w| w.told) {
                            // A candidate again before its election heard: called off.
                            Some(false) => {
                                self.withdrawing.remove(key);
                                new_seq = true;
                            }
                            // Its election may be releasing: a new election takes the Lease
                            // over (the old one's release is dropped), starting as no leader.
                            Some(true) => {
                                self.retire(key);
                                self.start_election(key, c);
                                new_seq = true;
                                continue;
                            }
                            None => {}
                        }
                        e.candidate
                            .send_if_modified(|v| !std::mem::replace(v, true));
                    } else if let Some(w) = self.withdrawing.get_mut(key) {
                        if !w.told && w.seq <= sy.seq {
                            // The sync computed without it is applied: now it may release.
                            w.told = true;
                            e.candidate
                                .send_if_modified(|v| std::mem::replace(v, false));
                        }
                    } else if *e.candidate.borrow() {
                        if e.leader.borrow().is_some() {
                            let seq = self.out.leadership.borrow().seq + 1;
                            self.withdrawing
                                .insert(key.clone(), Withdrawal { seq, told: false });
                            new_seq = true;
                        } else {
                            e.candidate
                                .send_if_modified(|v| std::mem::replace(v, false));
                        }
                    }
                }
                Some(_) => {
                    self.retire(key);
                    new_seq = true;
                    self.start_election(key, c);
                }
                None => self.start_election(key, c),
            }
        }
        let gone: Vec<ServiceKey> = self
            .running
            .keys()
            .filter(|k| !sy.candidacy.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.retire(&k);
            new_seq = true;
        }
        if new_seq {
            self.publish_new_seq();
        }
        let (safe, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|r| r.seq <= sy.seq);
        self.retiring = wait;
        let limit = self.s.timings.retry_period;
        for r in safe {
            self.tasks.spawn(async move {
                match r.task.await {
                    Ok(release) => {
                        release.write(limit).await;
                    }
                    Err(e) => tracing::error!(error = %e, "an election task failed"),
                }
            });
        }
    }

    async fn run(mut self, mut synced: watch::Receiver<Option<Synced>>) -> Vec<Release> {
        loop {
            tokio::select! {
                _ = self.changed.notified() => self.publish_held(),
                r = synced.changed() => {
                    if r.is_err() { break; }
                    let sy = synced.borrow_and_update().clone();
                    if let Some(sy) = sy {
                        self.apply(&sy);
                    }
                }
                _ = self.root.cancelled() => break,
            }
        }
        publish(
            &self.out.leadership,
            Leadership::PerService(BTreeSet::new()),
        );
        self.out.deadlines(Deadlines::PerService(BTreeMap::new()));
        let tasks = self
            .retiring
            .into_iter()
            .map(|r| r.task)
            .chain(self.running.into_values().map(|e| e.task));
        let mut out = Vec::new();
        for t in tasks {
            match t.await {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(error = %e, "an election task failed"),
            }
        }
        out
    }
}
