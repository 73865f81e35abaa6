//! The kernel's own fence on VIPs held under a Lease: each such address has a valid and
//! preferred lifetime that never reaches past its Lease's renew deadline, kept topped up by a
//! keeper task of its own. An agent that is killed or frozen stops the keeper with it, and
//! the kernel removes the address by itself before another node can take the Lease.
//!
//! The bound: an address is gone less than 1.5 s after its deadline. A lifetime is the time
//! left until the deadline rounded up to whole seconds (< 1 s more; rounding down would give
//! a 2 s renew deadline a 1 s lifetime that flickers between renewals a second apart), and
//! never more than [`CAP`]: the kernel removes an expired address a little late (its check is
//! rounded to the second within a quarter second, and a timer of a few seconds fires at most
//! a quarter second late whatever the kernel's HZ; a long lifetime would let the timer wheel
//! add seconds). The agent requires the Lease to outlast the renew deadline by 2 s.
//!
//! Whether to write is decided from when the keeper (or an apply) last wrote the lifetime, not
//! from the kernel's count, which rounds the address's age down (see [`lasts_until`]).
//!
//! The keeper never adds an address of its own accord: it only moves the lifetime of one that
//! is there, carries kvip's mark and has a deadline (the kernel takes a lifetime write for an
//! address removed a moment before as an add, so one removed by hand between the keeper's
//! read and its write comes back, held under its Lease as before); it checks the time again after each write and
//! removes the address at once if the deadline passed meanwhile (the process was frozen
//! between its read and its write). A held address that is gone before its deadline is
//! reported as lapsed, so the agent syncs and adds it back (with its announcement).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::addr::AddrManager;
use crate::run::InstanceLock;
use crate::{DataplaneError, KernelDataplane};

/// The longest lifetime written: the keeper tops it up every [`TICK`].
pub const CAP: u32 = 4;

/// How often the keeper looks (and whenever the deadlines change).
const TICK: Duration = Duration::from_secs(1);

/// How long the keeper waits for the instance's lock before skipping a round (lifetimes then
/// run down: the safe direction).
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// The lifetime an address gets now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Not held under a Lease (no election, or the CLI): no end.
    Forever,
    /// Whole seconds: the time left, rounded up, at most [`CAP`].
    Secs(u32),
    /// The deadline has passed: the address must not be held.
    Expired,
}

/// The lifetime of an address whose deadline is `deadline` (none: forever), at `now`.
pub(crate) fn lifetime(deadline: Option<Instant>, now: Instant) -> Lifetime {
    match deadline {
        None => Lifetime::Forever,
        Some(d) => {
            let left = d.saturating_duration_since(now);
            if left.is_zero() {
                return Lifetime::Expired;
            }
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            Lifetime::Secs(u32::try_from(secs).map_or(CAP, |s| s.min(CAP)))
        }
    }
}

/// How much before `sent + secs` the kernel may remove an address written at `sent` with
/// `secs`: its lifetime check counts a fiftieth of a second ahead, and its timestamp is in
/// jiffies.
const KERNEL_EARLY: Duration = Duration::from_millis(50);

/// How late a lifetime write may be taken before it is written again: past this, the lifetime
/// computed before the write reaches more than its rounding past the deadline.
const WRITE_SLACK: Duration = Duration::from_millis(50);

/// Whether an address needs no write now: its kernel lifetime reads `valid_lft` (whole seconds
/// left; the kernel rounds the address's age down, so this is never less than what is really
/// left), `secs` is what would be written, and kvip's last write makes it run out at
/// `written_until`. It needs none when the kernel reads exactly `secs` (less: someone
/// shortened it; more: it is longer than kvip would write) and kvip's write lasts until the
/// deadline, or, for a deadline more than [`CAP`] away, for another [`TICK`]'s round and
/// more. The kernel's count alone cannot say: an address written less than a second ago still
/// reads as its whole lifetime, so a deadline moved on within that second would seem covered
/// while the address runs out before it.
fn lasts_until(
    valid_lft: Option<u32>,
    secs: u32,
    written_until: Option<Instant>,
    deadline: Instant,
    now: Instant,
) -> bool {
    let enough = deadline.min(now + Duration::from_secs(u64::from(CAP)) - TICK);
    valid_lft == Some(secs) && written_until.is_some_and(|e| e >= enough)
}

/// What a lifetime write of `secs` for `deadline`, finished at `now`, still needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterWrite {
    /// Nothing: the lifetime ends within its rounding of the deadline.
    Done,
    /// The write was taken late (the process stalled between computing `secs` and the
    /// kernel taking it), so the lifetime reaches too far past the deadline: write this one.
    Rewrite(u32),
    /// The deadline passed meanwhile: remove the address.
    Expired,
}

pub(crate) fn after_write(secs: u32, deadline: Instant, now: Instant) -> AfterWrite {
    match lifetime(Some(deadline), now) {
        Lifetime::Expired => AfterWrite::Expired,
        Lifetime::Secs(s)
            if now + Duration::from_secs(u64::from(secs))
                > deadline + Duration::from_secs(1) + WRITE_SLACK =>
        {
            AfterWrite::Rewrite(s)
        }
        _ => AfterWrite::Done,
    }
}

/// What the keeper has done, counted since the dataplane opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceReport {
    /// Lifetimes moved on.
    pub refreshed: u64,
    /// Addresses removed because their deadline had passed.
    pub expired: u64,
    /// Rounds or writes that failed (logged; the lifetimes run down meanwhile).
    pub errors: u64,
    /// Held addresses whose lifetime ran out before their deadline (the keeper was starved
    /// while their Lease was still held): the next sync adds them back.
    pub lapsed: Vec<IpAddr>,
    /// Held addresses removed by someone else while their lifetime still ran (drift): the
    /// next sync adds them back.
    pub removed: Vec<IpAddr>,
}

#[derive(Default)]
struct State {
    deadlines: BTreeMap<IpAddr, Instant>,
    protocol: Option<u8>,
    /// Addresses seen lapsed, and removed by someone, not yet reported.
    lapsed: BTreeSet<IpAddr>,
    removed: BTreeSet<IpAddr>,
    /// When each fenced address's lifetime, as last written, runs out.
    expiry: BTreeMap<IpAddr, Instant>,
    /// Fenced addresses last removed by kvip itself because their deadline had passed (by
    /// the keeper or an apply), not written since.
    expired: BTreeSet<IpAddr>,
}

/// What the dataplane and its keeper share.
#[derive(Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
    refreshed: AtomicU64,
    expired: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding it leaves consistent data (plain assignments).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn deadline(&self, address: IpAddr) -> Option<Instant> {
        self.state().deadlines.get(&address).copied()
    }

    pub(crate) fn set_protocol(&self, protocol: Option<u8>) {
        self.state().protocol = protocol;
    }

    /// Records that `address` was given `secs` of lifetime by a write sent at `sent` (0:
    /// removed for its deadline, which counts as run out). The kernel counts from when it
    /// took the write, a little after `sent`, and removes an address up to [`KERNEL_EARLY`]
    /// before its count ends: the expiry recorded is never later than the kernel's.
    pub(crate) fn written(&self, address: IpAddr, secs: u32, sent: Instant) {
        let end = sent + Duration::from_secs(u64::from(secs));
        let mut s = self.state();
        s.expiry
            .insert(address, end.checked_sub(KERNEL_EARLY).unwrap_or(sent));
        if secs == 0 {
            s.expired.insert(address);
        } else {
            s.expired.remove(&address);
        }
    }

    /// Whether kvip itself last removed `address` because its deadline had passed (adding it
    /// back under a new deadline is no repair of anyone's drift).
    pub(crate) fn removed_for_deadline(&self, address: IpAddr) -> bool {
        self.state().expired.contains(&address)
    }

    /// When `address`'s lifetime, as last written, runs out.
    fn written_until(&self, address: IpAddr) -> Option<Instant> {
        self.state().expiry.get(&address).copied()
    }

    /// Whether a fenced `address` gone now has run out of lifetime (rather than been
    /// removed by someone): a quarter of a second of the kernel's rounding allowed.
    fn ran_out(&self, address: IpAddr) -> bool {
        self.state()
            .expiry
            .get(&address)
            .is_some_and(|e| Instant::now() + Duration::from_millis(250) >= *e)
    }

    /// Forgets every deadline (teardown): the keeper touches nothing more.
    pub(crate) fn clear(&self) {
        let mut s = self.state();
        s.deadlines.clear();
        s.lapsed.clear();
        s.removed.clear();
        s.expiry.clear();
        s.expired.clear();
    }
}

/// The keeper: tops up fenced lifetimes every [`TICK`] and whenever the deadlines change.
pub(crate) async fn keep(shared: Arc<Shared>, addrs: AddrManager, lock: InstanceLock) {
    // The fenced addresses present at the last round: one of them gone since, before its
    // deadline, has lapsed (one not added yet has not).
    let mut seen: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shared.wake.notified() => {}
        }
        let (deadlines, protocol) = {
            let s = shared.state();
            (s.deadlines.clone(), s.protocol)
        };
        let Some(protocol) = protocol.filter(|_| !deadlines.is_empty()) else {
            continue;
        };
        // Other kvip processes of the instance take turns with this one; holding the lock
        // leaves the writer token alone (lifetimes are not objects a sync compares).
        let _guard = match lock.hold(LOCK_WAIT).await {
            Ok(g) => g,
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "VIP lifetimes: the instance lock is busy; trying again");
                continue;
            }
        };
        let owned = match addrs.owned(protocol).await {
            Ok(o) => o,
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "VIP lifetimes: listing kvip's addresses");
                continue;
            }
        };
        // The deadlines as they are now, not as before the wait for the lock: a sync that
        // held it may have added an address under a deadline renewed meanwhile, and the old
        // one would remove it at once.
        let deadlines = shared.state().deadlines.clone();
        let present: BTreeSet<IpAddr> = owned
            .iter()
            .map(|o| o.address)
            .filter(|a| deadlines.contains_key(a))
            .collect();
        for a in seen.difference(&present) {
            if deadlines.get(a).is_some_and(|d| *d > Instant::now()) {
                let ran_out = shared.ran_out(*a);
                let mut st = shared.state();
                if ran_out {
                    st.lapsed.insert(*a);
                } else {
                    st.removed.insert(*a);
                }
            }
        }
        seen = present;
        for o in owned {
            // Each address's deadline as of now (a renewal may arrive during the round).
            let Some(d) = shared.deadline(o.address) else {
                continue;
            };
            let result = match lifetime(Some(d), Instant::now()) {
                Lifetime::Forever => Ok(()),
                Lifetime::Expired => addrs.remove(&o).await.map(|()| {
                    shared.written(o.address, 0, Instant::now());
                    shared.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(address = %o.address, "VIP removed: its Lease's renew deadline passed");
                }),
                Lifetime::Secs(s)
                    if lasts_until(
                        o.valid_lft,
                        s,
                        shared.written_until(o.address),
                        d,
                        Instant::now(),
                    ) =>
                {
                    Ok(())
                }
                Lifetime::Secs(s) => write_lifetime(&addrs, &shared, &o, protocol, s, d).await,
            };
            if let Err(e) = result {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(address = %o.address, error = %e, "VIP lifetime");
            }
        }
    }
}

/// Writes `secs` of lifetime to the fenced address `o` (deadline `d`), and settles it: a
/// write taken past the deadline removes the address, one taken late is written again with
/// the lifetime of that moment (frozen between the read and the write).
async fn write_lifetime(
    addrs: &AddrManager,
    shared: &Shared,
    o: &crate::addr::OwnedAddress,
    protocol: u8,
    mut secs: u32,
    d: Instant,
) -> Result<(), DataplaneError> {
    loop {
        let sent = Instant::now();
        addrs
            .set_lifetime(o.address, o.ifindex, protocol, secs)
            .await?;
        match after_write(secs, d, Instant::now()) {
            AfterWrite::Done => {
                shared.written(o.address, secs, sent);
                shared.refreshed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            AfterWrite::Rewrite(s) => secs = s,
            AfterWrite::Expired => {
                addrs.remove(o).await?;
                shared.written(o.address, 0, Instant::now());
                shared.expired.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
    }
}

/// Where the agent hands the deadlines, without waiting for the dataplane (a long read-back
/// or apply does not hold them back).
pub trait FenceSink: Send + Sync {
    /// Sets the deadline of each VIP held under a Lease (its renew deadline; a VIP not in
    /// `deadlines` has none). Returns what the keeper has done so far, and the held addresses
    /// it found gone before their deadline (the caller syncs to add them back).
    fn set(&self, deadlines: BTreeMap<IpAddr, Instant>) -> FenceReport;

    /// Whether `address`, found gone, had run out of lifetime (a lapse) rather than been
    /// removed by someone (drift).
    fn ran_out(&self, address: IpAddr) -> bool;
}

impl FenceSink for Shared {
    fn set(&self, deadlines: BTreeMap<IpAddr, Instant>) -> FenceReport {
        let lapsed = {
            let mut s = self.state();
            if s.deadlines != deadlines {
                s.deadlines = deadlines;
                self.wake.notify_one();
            }
            let removed = std::mem::take(&mut s.removed).into_iter().collect();
            (std::mem::take(&mut s.lapsed).into_iter().collect(), removed)
        };
        FenceReport {
            refreshed: self.refreshed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            lapsed: lapsed.0,
            removed: lapsed.1,
        }
    }

    fn ran_out(&self, address: IpAddr) -> bool {
        Shared::ran_out(self, address)
    }
}

impl KernelDataplane {
    /// The lifetime `address` gets now (see [`lifetime`]).
    pub(crate) fn lifetime_of(&self, address: IpAddr, now: Instant) -> Lifetime {
        lifetime(self.fence.deadline(address), now)
    }

    /// The sink of the deadlines, starting the keeper on the first call (with its own
    /// netlink socket, in this namespace: the caller's thread is in it).
    pub(crate) fn fence_sink(&mut self) -> Result<Arc<dyn FenceSink>, DataplaneError> {
        if self.keeper.is_none() {
            let addrs = AddrManager::new()?;
            self.keeper = Some(tokio::spawn(keep(
                self.fence.clone(),
                addrs,
                self.lock.clone(),
            )));
        }
        Ok(self.fence.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_round_up_stay_short_and_a_passed_deadline_is_expired() {
        let now = Instant::now();
        let at = |ms: u64| Some(now + Duration::from_millis(ms));
        assert_eq!(lifetime(None, now), Lifetime::Forever);
        assert_eq!(lifetime(at(2001), now), Lifetime::Secs(3));
        assert_eq!(lifetime(at(3000), now), Lifetime::Secs(3));
        assert_eq!(lifetime(at(1), now), Lifetime::Secs(1));
        // Never more than CAP: the keeper tops it up.
        assert_eq!(lifetime(at(9500), now), Lifetime::Secs(CAP));
        assert_eq!(
            lifetime(
                Some(now + Duration::from_secs(u64::from(u32::MAX) + 10)),
                now
            ),
            Lifetime::Secs(CAP)
        );
        assert_eq!(lifetime(Some(now), now), Lifetime::Expired);
        assert_eq!(
            lifetime(Some(now), now + Duration::from_secs(5)),
            Lifetime::Expired
        );
    }

    #[test]
    fn a_deadline_moved_within_a_second_of_the_last_write_is_written() {
        let t0 = Instant::now();
        let s = |ms: u64| Duration::from_millis(ms);
        // Written at t0 with 2 s for a deadline at t0 + 2 s; renewed at t0 + 0.9 s: the
        // kernel still reads 2 s left and 2 s is what would be written, but the address
        // runs out at t0 + 2 s, before the new deadline (t0 + 2.9 s).
        let written = Some(t0 + s(2000));
        let renewal = t0 + s(900);
        assert!(!lasts_until(Some(2), 2, written, t0 + s(2900), renewal));
        // The deadline unchanged: nothing to write.
        assert!(lasts_until(Some(2), 2, written, t0 + s(2000), renewal));
        assert!(lasts_until(Some(1), 1, written, t0 + s(2000), t0 + s(1200)));
        // Longer in the kernel than kvip would write (forever, or set by hand): written.
        assert!(!lasts_until(None, 2, written, t0 + s(2000), renewal));
        assert!(!lasts_until(Some(3), 2, written, t0 + s(2000), renewal));
        // Shorter than kvip wrote (shortened by hand): written.
        assert!(!lasts_until(Some(1), 2, written, t0 + s(2000), renewal));
        // Never written by this keeper (added by a sync): written.
        assert!(!lasts_until(Some(2), 2, None, t0 + s(2000), renewal));
        // A deadline beyond CAP: the 4 s written last round still lasts another round ...
        let far = t0 + s(60_000);
        let capped = Some(t0 + s(4000));
        assert!(lasts_until(Some(4), 4, capped, far, t0 + s(500)));
        // ... and is written again once less than CAP - TICK is left.
        assert!(!lasts_until(Some(3), 4, capped, far, t0 + s(1100)));
    }

    #[test]
    fn a_write_taken_late_is_written_again_and_one_past_the_deadline_removed() {
        let t0 = Instant::now();
        let s = |ms: u64| Duration::from_millis(ms);
        // 3 s computed 2.1 s before the deadline, taken at once: within its rounding.
        assert_eq!(after_write(3, t0 + s(2100), t0), AfterWrite::Done);
        // The same write taken 0.8 s later: it would end 1.7 s past the deadline.
        assert_eq!(
            after_write(3, t0 + s(2100), t0 + s(800)),
            AfterWrite::Rewrite(2)
        );
        // Taken after the deadline.
        assert_eq!(
            after_write(3, t0 + s(2100), t0 + s(2100)),
            AfterWrite::Expired
        );
    }
}
