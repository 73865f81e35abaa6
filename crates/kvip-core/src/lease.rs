//! Leader election over a Kubernetes Lease, as a pure state machine: the caller reads and
//! writes the Lease (with resourceVersion-guarded replaces) and passes the time in. Keeping the
//! decisions here, free of I/O, lets tests drive many electors through adversarial schedules.
//!
//! The rule that keeps a VIP on at most one node (invariant 6 in docs/design.md): a holder counts itself
//! leader only until `renew_deadline` after its last *successful* renewal, and another node
//! takes over only after the Lease has stayed unchanged for `lease_duration` *as that node
//! observed it*. With `renew_deadline < lease_duration`, the old holder has stepped down before
//! anyone may step up — without trusting clocks to agree across nodes.

use std::time::Duration;

/// The fields of `coordination.k8s.io/v1` Lease that election uses (those client-go uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// Empty: released (anyone may take it at once).
    pub holder: String,
    pub lease_duration_seconds: u32,
    /// Wall-clock times, microseconds since the Unix epoch (the agent converts to MicroTime).
    pub acquire_time_us: i64,
    pub renew_time_us: i64,
    pub transitions: u32,
    /// The object's resourceVersion: writes are guarded by it (409 when it moved).
    pub resource_version: String,
}

/// Election timings (kube-vip's vip_leaseduration, vip_renewdeadline, vip_retryperiod).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// The time as the elector needs it: a monotonic reading for decisions, the wall clock only
/// to stamp the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Duration,
    pub wall_us: i64,
}

/// What the caller must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the Lease with this content.
    Create(LeaseRecord),
    /// Replace the Lease with this content, guarded by its `resource_version`.
    Replace(LeaseRecord),
    /// Nothing to write; read the Lease again after this long.
    Wait(Duration),
}

/// One node's view of one Lease.
#[derive(Debug, Clone)]
pub struct Elector {
    me: String,
    t: Timings,
    /// The last record read, and when (monotonic) it was first seen in that version.
    observed: Option<(LeaseRecord, Duration)>,
    /// Whether the Lease was read and found absent.
    absent: bool,
    /// When this node last wrote the Lease successfully as its holder.
    last_renew: Option<Duration>,
}

impl Elector {
    pub fn new(me: impl Into<String>, t: Timings) -> Elector {
        Elector {
            me: me.into(),
            t,
            observed: None,
            absent: false,
            last_renew: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.me
    }

    /// Records what a read of the Lease returned (`None`: it does not exist).
    pub fn observe(&mut self, record: Option<LeaseRecord>, now: Now) {
        match record {
            None => {
                self.absent = true;
                self.observed = None;
            }
            Some(r) => {
                self.absent = false;
                let changed = self
                    .observed
                    .as_ref()
                    .is_none_or(|(o, _)| o.resource_version != r.resource_version);
                if changed {
                    self.observed = Some((r, now.mono));
                }
                if let Some((o, _)) = &self.observed
                    && o.holder != self.me
                {
                    // Someone else holds it now: whatever this node believed, it is not leader.
                    self.last_renew = None;
                }
            }
        }
    }

    /// Whether this node may hold the VIPs now: it holds the Lease and renewed it less than
    /// `renew_deadline` ago.
    pub fn is_leader(&self, now: Now) -> bool {
        self.last_renew
            .is_some_and(|t| now.mono.saturating_sub(t) < self.t.renew_deadline)
    }

    /// Until when (monotonic) this node may count itself leader without another renewal.
    pub fn leader_until(&self) -> Option<Duration> {
        self.last_renew.map(|t| t + self.t.renew_deadline)
    }

    fn record(&self, prev: Option<&LeaseRecord>, now: Now, keep_acquire: bool) -> LeaseRecord {
        let transitions = match prev {
            Some(p) if p.holder != self.me => p.transitions.saturating_add(1),
            Some(p) => p.transitions,
            None => 0,
        };
        LeaseRecord {
            holder: self.me.clone(),
            lease_duration_seconds: self.t.lease_duration.as_secs().max(1) as u32,
            acquire_time_us: match prev {
                Some(p) if keep_acquire => p.acquire_time_us,
                _ => now.wall_us,
            },
            renew_time_us: now.wall_us,
            transitions,
            resource_version: prev.map(|p| p.resource_version.clone()).unwrap_or_default(),
        }
    }

    /// What to do now. `candidate` is whether this node may compete (e.g. it has a ready local
    /// endpoint); a holder that is no longer a candidate releases the Lease.
    pub fn next_action(&self, now: Now, candidate: bool) -> Action {
        if self.absent {
            return if candidate {
                Action::Create(self.record(None, now, false))
            } else {
                Action::Wait(self.t.retry_period)
            };
        }
        let Some((rec, seen_at)) = &self.observed else {
            return Action::Wait(self.t.retry_period);
        };
        if rec.holder == self.me {
            if !candidate {
                return Action::Replace(self.released(rec));
            }
            return Action::Replace(self.record(Some(rec), now, true));
        }
        if !candidate {
            return Action::Wait(self.t.retry_period);
        }
        let expired = now.mono.saturating_sub(*seen_at) >= self.t.lease_duration;
        if rec.holder.is_empty() || expired {
            return Action::Replace(self.record(Some(rec), now, false));
        }
        Action::Wait(self.t.retry_period)
    }

    fn released(&self, rec: &LeaseRecord) -> LeaseRecord {
        released(rec)
    }

    /// The write this node's shutdown makes: an empty holder, so the next node takes over
    /// without waiting for the Lease to expire. `None` when it does not hold the Lease.
    pub fn release(&mut self) -> Option<LeaseRecord> {
        let rec = self.observed.as_ref().map(|(r, _)| r.clone())?;
        self.last_renew = None;
        (rec.holder == self.me).then(|| self.released(&rec))
    }

    /// The write succeeded; `stored` is the record as the API returned it (new
    /// resourceVersion). `started` is when the write was sent: leadership counts from then,
    /// never from the (later) answer.
    pub fn written(&mut self, stored: LeaseRecord, started: Now) {
        let mine = stored.holder == self.me;
        self.absent = false;
        self.observed = Some((stored, started.mono));
        self.last_renew = mine.then_some(started.mono);
    }

    /// The write failed (409: someone else wrote first; or any error). The next read decides.
    /// Leadership keeps counting from the last successful renewal, so a holder that cannot
    /// write steps down at its renew deadline.
    pub fn write_failed(&mut self) {
        self.observed = None;
    }
}

/// `rec` handed on: an empty holder (the next node takes over at once), the rest unchanged.
pub fn released(rec: &LeaseRecord) -> LeaseRecord {
    LeaseRecord {
        holder: String::new(),
        lease_duration_seconds: 1,
        ..rec.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Timings {
        Timings {
            lease_duration: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(3),
            retry_period: Duration::from_secs(1),
        }
    }

    fn at(s: u64) -> Now {
        Now {
            mono: Duration::from_secs(s),
            wall_us: (1_700_000_000 + s as i64) * 1_000_000,
        }
    }

    #[test]
    fn create_renew_and_release() {
        let mut e = Elector::new("n1", t());
        e.observe(None, at(0));
        let Action::Create(r) = e.next_action(at(0), true) else {
            panic!("expected create")
        };
        assert_eq!((r.holder.as_str(), r.transitions), ("n1", 0));
        e.written(
            LeaseRecord {
                resource_version: "1".into(),
                ..r
            },
            at(0),
        );
        assert!(e.is_leader(at(2)));
        assert!(
            !e.is_leader(at(3)),
            "no renewal within the renew deadline: not leader"
        );
        let Action::Replace(r) = e.next_action(at(1), true) else {
            panic!("expected renew")
        };
        assert_eq!(r.resource_version, "1");
        let released = e.release().expect("holder releases");
        assert!(released.holder.is_empty());
        assert!(!e.is_leader(at(1)));
    }

    #[test]
    fn takeover_waits_for_an_unchanged_lease() {
        let other = LeaseRecord {
            holder: "n2".into(),
            lease_duration_seconds: 5,
            resource_version: "7".into(),
            transitions: 2,
            ..LeaseRecord::default()
        };
        let mut e = Elector::new("n1", t());
        e.observe(Some(other.clone()), at(10));
        assert!(matches!(e.next_action(at(14), true), Action::Wait(_)));
        e.observe(Some(other.clone()), at(14));
        let Action::Replace(r) = e.next_action(at(15), true) else {
            panic!("expected takeover")
        };
        assert_eq!(
            (
                r.holder.as_str(),
                r.transitions,
                r.resource_version.as_str()
            ),
            ("n1", 3, "7")
        );
        // A renewal by n2 (new resourceVersion) restarts the wait.
        let mut e = Elector::new("n1", t());
        e.observe(Some(other.clone()), at(10));
        e.observe(
            Some(LeaseRecord {
                resource_version: "8".into(),
                ..other.clone()
            }),
            at(13),
        );
        assert!(matches!(e.next_action(at(15), true), Action::Wait(_)));
        // Released (empty holder): at once. Not a candidate: never.
        let mut e = Elector::new("n1", t());
        e.observe(
            Some(LeaseRecord {
                holder: String::new(),
                ..other
            }),
            at(10),
        );
        assert!(matches!(e.next_action(at(10), true), Action::Replace(_)));
        assert!(matches!(e.next_action(at(10), false), Action::Wait(_)));
    }

    #[test]
    fn holder_that_is_no_longer_a_candidate_releases() {
        let mut e = Elector::new("n1", t());
        e.observe(None, at(0));
        let Action::Create(r) = e.next_action(at(0), true) else {
            panic!()
        };
        e.written(
            LeaseRecord {
                resource_version: "1".into(),
                ..r
            },
            at(0),
        );
        let Action::Replace(r) = e.next_action(at(1), false) else {
            panic!()
        };
        assert!(r.holder.is_empty());
    }
}
