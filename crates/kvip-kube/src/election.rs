//! Lease election against the API server. Reads and writes go through [`LeaseLock`]; every
//! decision is [`Elector`]'s. Leadership is published on a watch channel and withdrawn at the
//! renew deadline even while an API call hangs.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kvip_core::lease::{Action, Elector, LeaseRecord, Now, Timings, released};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum ElectionError {
    /// Another writer changed the Lease first (409).
    #[error("lease {0} was changed by another node")]
    Conflict(String),
    #[error("lease {0}: the API did not answer in time")]
    Timeout(String),
    #[error("lease {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ElectionError {
    /// The API refused the call (403): a missing permission, not a passing fault.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, ElectionError::Api { source: kube::Error::Api(s), .. } if s.code == 403)
    }
}

/// One Lease object, read and written with resourceVersion guards.
#[derive(Clone)]
pub struct LeaseLock {
    /// The client of each call: it may change (a control-plane node's bootstrap identity).
    client: watch::Receiver<kube::Client>,
    namespace: String,
    name: String,
}

fn micros(t: &Option<MicroTime>) -> i64 {
    t.as_ref().map_or(0, |m| m.0.as_microsecond())
}

fn micro_time(us: i64) -> Option<MicroTime> {
    Timestamp::from_microsecond(us).ok().map(MicroTime)
}

fn to_record(l: &Lease) -> LeaseRecord {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity.unwrap_or_default(),
        lease_duration_seconds: spec.lease_duration_seconds.unwrap_or(0).max(0) as u32,
        acquire_time_us: micros(&spec.acquire_time),
        renew_time_us: micros(&spec.renew_time),
        transitions: spec.lease_transitions.unwrap_or(0).max(0) as u32,
        resource_version: l.metadata.resource_version.clone().unwrap_or_default(),
    }
}

impl LeaseLock {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> LeaseLock {
        Self::switchable(watch::channel(client).1, namespace, name)
    }

    /// A lock whose calls use the latest client `client` holds.
    pub fn switchable(
        client: watch::Receiver<kube::Client>,
        namespace: &str,
        name: &str,
    ) -> LeaseLock {
        LeaseLock {
            client,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.borrow().clone(), &self.namespace)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn to_lease(&self, r: &LeaseRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: (!r.resource_version.is_empty())
                    .then(|| r.resource_version.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(r.holder.clone()),
                lease_duration_seconds: Some(r.lease_duration_seconds as i32),
                acquire_time: micro_time(r.acquire_time_us),
                renew_time: micro_time(r.renew_time_us),
                lease_transitions: Some(r.transitions as i32),
                ..LeaseSpec::default()
            }),
        }
    }

    fn err(&self, e: kube::Error) -> ElectionError {
        match &e {
            kube::Error::Api(s) if s.code == 409 => ElectionError::Conflict(self.name.clone()),
            _ => ElectionError::Api {
                name: self.name.clone(),
                source: e,
            },
        }
    }

    /// The Lease, or `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<LeaseRecord>, ElectionError> {
        self.api()
            .get_opt(&self.name)
            .await
            .map(|o| o.as_ref().map(to_record))
            .map_err(|e| self.err(e))
    }

    pub async fn create(&self, r: &LeaseRecord) -> Result<LeaseRecord, ElectionError> {
        self.api()
            .create(&PostParams::default(), &self.to_lease(r))
            .await
            .map(|l| to_record(&l))
            .map_err(|e| self.err(e))
    }

    /// Replaces the Lease if its resourceVersion is still `r.resource_version` (409 otherwise).
    pub async fn replace(&self, r: &LeaseRecord) -> Result<LeaseRecord, ElectionError> {
        self.api()
            .replace(&self.name, &PostParams::default(), &self.to_lease(r))
            .await
            .map(|l| to_record(&l))
            .map_err(|e| self.err(e))
    }
}

/// Waits until the watched Lease is seen released (empty holder). Errors of the watch are
/// retried with backoff by the stream; an ended stream never wakes.
async fn seen_released(
    events: &mut (impl futures_util::Stream<Item = Result<Lease, watcher::Error>> + Unpin),
) {
    while let Some(ev) = events.next().await {
        if let Ok(l) = ev
            && l.spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                .is_none_or(str::is_empty)
        {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// The least time between two warnings about one Lease's failing calls.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One node's participation in one Lease's election.
pub struct Election {
    lock: LeaseLock,
    elector: Elector,
    timings: Timings,
    start: Instant,
    forbidden: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// When a failing call was last logged as a warning (at most one a minute).
    warned: Option<Instant>,
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// What an election publishes: while this node leads, until when (its renew deadline,
/// moved on by every renewal); `None` while it does not.
pub type Leader = Option<Instant>;

impl Election {
    pub fn new(lock: LeaseLock, identity: &str, timings: Timings) -> Election {
        Election {
            lock,
            elector: Elector::new(identity, timings),
            timings,
            start: Instant::now(),
            forbidden: None,
            warned: None,
        }
    }

    /// Wakes `n` whenever a call about the Lease is refused (403), so the agent checks its
    /// permissions at once instead of retrying in silence.
    pub fn on_forbidden(mut self, n: std::sync::Arc<tokio::sync::Notify>) -> Election {
        self.forbidden = Some(n);
        self
    }

    /// A failed call: a refusal wakes the permission check (which names it); anything else
    /// is a warning, at most once a minute per Lease (every failure at debug level).
    fn failed(&mut self, what: &str, e: &ElectionError) {
        if e.is_forbidden() {
            if let Some(n) = &self.forbidden {
                n.notify_one();
            }
        } else if matches!(e, ElectionError::Conflict(_)) {
            // Another node wrote first: the election's ordinary course.
        } else if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.warned = Some(Instant::now());
            tracing::warn!(lease = self.lock.name(), error = %crate::Causes(e), "{what} failed; retrying every retry period");
        }
        tracing::debug!(lease = self.lock.name(), error = %e, "{what}");
    }

    fn now(&self) -> Now {
        Now {
            mono: self.start.elapsed(),
            wall_us: wall_us(),
        }
    }

    /// Publishes the renew deadline while leader (it moves on with every renewal), `None`
    /// otherwise.
    fn publish(&self, leader: &watch::Sender<Leader>) {
        let l = if self.elector.is_leader(self.now()) {
            self.elector.leader_until().map(|u| self.start + u)
        } else {
            None
        };
        leader.send_if_modified(|v| std::mem::replace(v, l) != l);
    }

    /// Awaits `fut` (at most a retry period), withdrawing leadership at the renew deadline if
    /// it is still pending then.
    async fn guarded<T>(
        &self,
        fut: impl Future<Output = Result<T, ElectionError>>,
        leader: &watch::Sender<Leader>,
    ) -> Result<T, ElectionError> {
        let timed_out = || ElectionError::Timeout(self.lock.name.clone());
        let fut = tokio::time::timeout(self.timings.retry_period, fut);
        tokio::pin!(fut);
        if let Some(until) = self.elector.leader_until() {
            let deadline = tokio::time::Instant::from_std(self.start + until);
            tokio::select! {
                out = &mut fut => return out.unwrap_or_else(|_| Err(timed_out())),
                _ = tokio::time::sleep_until(deadline) => {
                    leader.send_replace(None);
                }
            }
        }
        fut.await.unwrap_or_else(|_| Err(timed_out()))
    }

    /// Runs until `stop` is cancelled: competes while `candidate` is true, publishes on
    /// `leader` until when this node may hold the Service's VIPs ([`Leader`]). On stop it withdraws leadership
    /// at once and returns the [`Release`] still to be written: the caller removes the VIPs
    /// first and releases after, so no other node can take the Lease while this one still
    /// holds an address.
    pub async fn run(
        mut self,
        mut candidate: watch::Receiver<bool>,
        leader: watch::Sender<Leader>,
        stop: CancellationToken,
    ) -> Release {
        let released_events = watcher(
            self.lock.api(),
            watcher::Config::default().fields(&format!("metadata.name={}", self.lock.name)),
        )
        // Only a shortcut (the polling finds a released Lease too): back off long on errors.
        .backoff(crate::backoff::WatchBackoff::up_to(
            std::time::Duration::from_secs(60),
        ))
        .applied_objects();
        let mut released_events = Box::pin(released_events);
        while !stop.is_cancelled() {
            // A call in flight is abandoned on stop (shutdown must not wait a retry period
            // for a hanging API); the release below re-reads if it then conflicts.
            let read = tokio::select! {
                out = self.guarded(self.lock.read(), &leader) => out,
                _ = stop.cancelled() => break,
            };
            match read {
                Ok(r) => self.elector.observe(r, self.now()),
                Err(e) => self.failed("reading the lease", &e),
            }
            if stop.is_cancelled() {
                break;
            }
            let action = self.elector.next_action(self.now(), *candidate.borrow());
            let sent = self.now();
            let call = async {
                match &action {
                    Action::Create(r) => Some(self.guarded(self.lock.create(r), &leader).await),
                    Action::Replace(r) => Some(self.guarded(self.lock.replace(r), &leader).await),
                    Action::Wait(_) => None,
                }
            };
            let result = tokio::select! {
                out = call => out,
                _ = stop.cancelled() => break,
            };
            match result {
                Some(Ok(stored)) => self.elector.written(stored, sent),
                Some(Err(e)) => {
                    self.failed("writing the lease", &e);
                    self.elector.write_failed();
                }
                None => {}
            }
            self.publish(&leader);
            // Sleep a retry period, but wake to withdraw leadership at the deadline and at
            // once on stop.
            let next = tokio::time::Instant::now() + self.timings.retry_period;
            let deadline = self
                .elector
                .leader_until()
                .map(|u| tokio::time::Instant::from_std(self.start + u));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = async {
                    match deadline {
                        Some(d) if d < next => tokio::time::sleep_until(d).await,
                        _ => std::future::pending::<()>().await,
                    }
                } => self.publish(&leader),
                // Becoming (or ceasing to be) a candidate acts at once, not a period later.
                _ = async {
                    if candidate.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                } => {}
                // A released Lease (empty holder) is taken at once, not a period later.
                _ = seen_released(&mut released_events) => {}
                _ = stop.cancelled() => {}
            }
        }
        leader.send_replace(None);
        Release {
            me: self.elector.identity().to_string(),
            record: self.elector.release(),
            lock: self.lock,
            timeout: self.timings.retry_period,
        }
    }
}

/// The write that hands a Lease on at shutdown (empty holder), made after this node has
/// removed the VIPs it held under it.
pub struct Release {
    me: String,
    lock: LeaseLock,
    record: Option<LeaseRecord>,
    timeout: std::time::Duration,
}

impl Release {
    /// Whether this node held the Lease when it stopped (and so has a release to write).
    pub fn held(&self) -> bool {
        self.record.is_some()
    }

    /// Writes the empty holder, guarded by the resourceVersion last seen. On a conflict it
    /// reads the Lease again: held by another node, there is nothing to hand on; still this
    /// node's (a renewal abandoned in flight landed), it releases that version. Bounded by a
    /// retry period per call and by `limit` overall. Returns whether the Lease is no longer
    /// this node's.
    pub async fn write(self, limit: std::time::Duration) -> bool {
        let Some(r) = self.record.clone() else {
            return true;
        };
        let per_call = self.timeout.min(limit);
        let attempt = async {
            match self.lock.replace(&r).await {
                Err(ElectionError::Conflict(_)) => match self.lock.read().await? {
                    Some(cur) if cur.holder == self.me => {
                        self.lock.replace(&released(&cur)).await.map(|_| ())
                    }
                    _ => Ok(()),
                },
                other => other.map(|_| ()),
            }
        };
        match tokio::time::timeout(per_call, attempt).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(lease = self.lock.name(), error = %e, "could not release the lease; it will expire");
                false
            }
            Err(_) => {
                tracing::warn!(
                    lease = self.lock.name(),
                    "releasing the lease timed out; it will expire"
                );
                false
            }
        }
    }
}
