//! The kernel's own fence on VIPs held under a Lease: each such address is given a valid and
//! preferred lifetime that ends at its Lease's renew deadline, and the lifetime is moved on
//! at every renewal. An agent that is killed or frozen stops moving it, and the kernel
//! removes the address by itself before any other node can take the Lease.
//!
//! Lifetimes are whole seconds, rounded up (rounding down would leave a 2 s renew deadline
//! a 1 s lifetime, and the VIP would flicker between renewals a second apart), and the kernel
//! removes an expired address up to a second late: an address given a deadline is gone less
//! than two seconds after it. The agent requires the Lease to outlast the renew deadline by
//! at least that (`vip_leaseduration` ≥ `vip_renewdeadline` + 2 s).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::{DataplaneError, KernelDataplane};

/// The lifetime an address gets now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Not held under a Lease (no election, or the CLI): no end.
    Forever,
    /// The time left before the deadline, rounded up to whole seconds.
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
            Lifetime::Secs(u32::try_from(secs).map_or(u32::MAX - 1, |s| s.min(u32::MAX - 1)))
        }
    }
}

/// What a [`crate::Dataplane::fence`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceReport {
    /// Addresses whose lifetime was moved on.
    pub refreshed: usize,
    /// Addresses removed because their deadline had passed.
    pub expired: Vec<IpAddr>,
}

impl KernelDataplane {
    /// The lifetime `address` gets now.
    pub(crate) fn lifetime_of(&self, address: IpAddr, now: Instant) -> Lifetime {
        lifetime(self.fences.get(&address).copied(), now)
    }

    /// Records that `address` (on `ifindex`) was written with the deadline it has now.
    pub(crate) fn fenced(&mut self, address: IpAddr, ifindex: u32) {
        self.held.insert(address, ifindex);
        match self.fences.get(&address) {
            Some(d) => self.written.insert(address, *d),
            None => self.written.remove(&address),
        };
    }

    /// Forgets an address this instance no longer holds.
    pub(crate) fn unfenced(&mut self, address: IpAddr) {
        self.held.remove(&address);
        self.written.remove(&address);
    }

    /// Sets the deadlines (see [`crate::Dataplane::fence`]) and moves on the lifetime of every
    /// held address whose deadline changed; removes those whose deadline has passed.
    pub(crate) async fn refresh_fences(
        &mut self,
        deadlines: BTreeMap<IpAddr, Instant>,
    ) -> Result<FenceReport, DataplaneError> {
        self.fences = deadlines;
        let mut report = FenceReport::default();
        let due: Vec<(IpAddr, u32)> = self
            .held
            .iter()
            .filter(|(a, _)| self.fences.get(a) != self.written.get(a))
            .map(|(a, i)| (*a, *i))
            .collect();
        if due.is_empty() {
            return Ok(report);
        }
        let _lock = self.begin_change().await?;
        let Some(protocol) = self.protocol.filter(|_| self.applied.is_some()) else {
            // Another process changed this instance's objects: the next apply reads the
            // kernel and gives every address its lifetime.
            return Ok(report);
        };
        let now = Instant::now();
        for (address, ifindex) in due {
            match self.lifetime_of(address, now) {
                // A deadline taken away (the Lease's mode changed): the next apply decides.
                Lifetime::Forever => {}
                Lifetime::Secs(secs) => {
                    self.addrs
                        .set_lifetime(address, ifindex, protocol, secs)
                        .await?;
                    self.fenced(address, ifindex);
                    report.refreshed += 1;
                }
                Lifetime::Expired => {
                    self.addrs.remove_at(address, ifindex).await?;
                    self.unfenced(address);
                    // The applied state holds it no more.
                    self.applied = None;
                    report.expired.push(address);
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lifetimes_round_up_and_a_passed_deadline_is_expired() {
        let now = Instant::now();
        let at = |ms: u64| Some(now + Duration::from_millis(ms));
        assert_eq!(lifetime(None, now), Lifetime::Forever);
        assert_eq!(lifetime(at(2001), now), Lifetime::Secs(3));
        assert_eq!(lifetime(at(3000), now), Lifetime::Secs(3));
        assert_eq!(lifetime(at(1), now), Lifetime::Secs(1));
        assert_eq!(lifetime(Some(now), now), Lifetime::Expired);
        assert_eq!(
            lifetime(Some(now), now + Duration::from_secs(5)),
            Lifetime::Expired
        );
        // u32::MAX is the kernel's "forever": a huge deadline stays finite.
        let far = now + Duration::from_secs(u64::from(u32::MAX) + 10);
        assert_eq!(lifetime(Some(far), now), Lifetime::Secs(u32::MAX - 1));
    }
}
