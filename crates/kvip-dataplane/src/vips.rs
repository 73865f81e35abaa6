//! The VIP step of an apply: the checks made before anything changes, the address changes,
//! and putting rules and addresses back when the address changes fail.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

use kvip_core::{DesiredState, VipClaim};

use crate::addr::{Link, OwnedAddress};
use crate::fence::{AfterWrite, Lifetime, after_write};
use crate::{DataplaneError, KernelDataplane};

/// Address additions sent to the kernel together (see `apply_vips`).
const ADD_BATCH: usize = 64;

/// What the VIP step changed so far.
#[derive(Debug, Default)]
pub(crate) struct VipChanges {
    /// (address, interface index) added.
    pub added: Vec<(IpAddr, u32)>,
    pub removed: Vec<OwnedAddress>,
    /// Claimed, but already configured by someone else: left alone.
    pub foreign: Vec<IpAddr>,
    /// Claimed, but not held (removed, or not added) because their Lease's deadline passed.
    pub expired: Vec<IpAddr>,
    pub warnings: Vec<String>,
}

impl KernelDataplane {
    /// What the kernel must allow, checked before anything changes: every claimed interface
    /// exists, and one claimed by an IPv6 VIP can hold IPv6. Returns the links by name.
    pub(crate) async fn validate(
        &self,
        desired: &DesiredState,
    ) -> Result<BTreeMap<String, Link>, DataplaneError> {
        let links: BTreeMap<String, Link> = self
            .addrs
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        for v in desired.vips() {
            let link = links
                .get(&v.interface)
                .ok_or_else(|| DataplaneError::InterfaceNotFound(v.interface.clone()))?;
            if v.address.is_ipv6() && !link.ipv6 {
                return Err(DataplaneError::Ipv6Disabled {
                    interface: v.interface.clone(),
                    address: v.address,
                });
            }
        }
        Ok(links)
    }

    /// Removes this instance's addresses that `desired` does not hold, then adds the missing
    /// ones, recording each change in `changes` as it is made.
    pub(crate) async fn apply_vips(
        &mut self,
        desired: &DesiredState,
        links: &BTreeMap<String, Link>,
        protocol: Option<u8>,
        changes: &mut VipChanges,
    ) -> Result<(), DataplaneError> {
        let owned = self.owned_addresses(protocol).await?;
        let want: BTreeMap<IpAddr, &VipClaim> =
            desired.vips().iter().map(|v| (v.address, v)).collect();
        for o in &owned {
            let keep = want
                .get(&o.address)
                .is_some_and(|v| links.get(&v.interface).map(|l| l.index) == Some(o.ifindex));
            // A held address whose Lease's deadline has passed goes too. (The lifetimes of
            // those kept are the keeper's: see `fence`.)
            let expired = self.lifetime_of(o.address, Instant::now()) == Lifetime::Expired;
            if !keep || expired {
                self.addrs.remove(o).await?;
                changes.removed.push(o.clone());
                if keep {
                    self.fence.written(o.address, 0, Instant::now());
                    changes.expired.push(o.address);
                }
            }
        }
        let Some(protocol) = protocol else {
            // No protocol is allocated only when no VIP is wanted.
            return Ok(());
        };
        // The addresses to add, in order.
        let mut missing: Vec<(&VipClaim, u32)> = Vec::new();
        for v in desired.vips() {
            let link = links
                .get(&v.interface)
                .ok_or_else(|| DataplaneError::InterfaceNotFound(v.interface.clone()))?;
            if owned
                .iter()
                .any(|o| o.address == v.address && o.ifindex == link.index)
            {
                continue;
            }
            missing.push((v, link.index));
        }
        // Sent ADD_BATCH at a time without waiting for each answer (one netlink round trip per
        // batch, not per address); each result is then handled in order, as one at a time
        // would be. A failure still records every address its batch added (for the
        // rollback) before it is returned.
        for batch in missing.chunks(ADD_BATCH) {
            // The lifetimes as of right now, not as of the start of the apply.
            let mut sends = Vec::with_capacity(batch.len());
            for &(v, ifindex) in batch {
                match self.lifetime_of(v.address, Instant::now()) {
                    Lifetime::Forever => sends.push((v, ifindex, None)),
                    Lifetime::Secs(s) => sends.push((v, ifindex, Some(s))),
                    Lifetime::Expired => {
                        self.fence.written(v.address, 0, Instant::now());
                        changes.expired.push(v.address);
                    }
                }
            }
            let sent = Instant::now();
            let results =
                futures_util::future::join_all(sends.iter().map(|&(v, ifindex, lifetime)| {
                    self.add_address(v.address, ifindex, protocol, lifetime)
                }))
                .await;
            let mut failed = None;
            for (&(v, ifindex, lifetime), r) in sends.iter().zip(results) {
                match r {
                    // Frozen between the check and the add: the deadline may have passed
                    // since.
                    Ok(()) if self.lifetime_of(v.address, Instant::now()) == Lifetime::Expired => {
                        if let Err(e) = self.addrs.remove_at(v.address, ifindex, protocol).await {
                            tracing::error!(address = %v.address, error = %e, "removing a VIP added past its deadline");
                        }
                        self.fence.written(v.address, 0, Instant::now());
                        changes.expired.push(v.address);
                    }
                    Ok(()) => {
                        if let Some(secs) = lifetime {
                            self.settle_lifetime(v.address, ifindex, protocol, secs, sent)
                                .await;
                        }
                        changes.added.push((v.address, ifindex));
                    }
                    Err(e) if e.errno() == Some(libc::EEXIST) => {
                        // The same address is already configured, not by this instance: it
                        // is held, and kvip leaves it alone (it will never remove it either).
                        changes.foreign.push(v.address);
                        changes.warnings.push(format!(
                            "{} is already on {} and not this kvip instance's: leaving it as it is",
                            v.address, v.interface
                        ));
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    async fn add_address(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
        lifetime: Option<u32>,
    ) -> Result<(), DataplaneError> {
        #[cfg(test)]
        if self.fail_add == Some(address) {
            return Err(DataplaneError::netlink(
                format!("adding {address} (refused by the test seam)"),
                rtnetlink::Error::RequestFailed,
            ));
        }
        self.addrs.add(address, ifindex, protocol, lifetime).await
    }

    /// Records the lifetime `secs` just given to the new VIP `address` (sent at `sent`); one
    /// taken so late that it reaches too far past its deadline is written again (the process
    /// stalled between computing it and the kernel taking it). The deadline passing meanwhile
    /// is handled by the caller's check before this.
    async fn settle_lifetime(
        &self,
        address: IpAddr,
        ifindex: u32,
        protocol: u8,
        secs: u32,
        sent: Instant,
    ) {
        let Some(d) = self.fence.deadline(address) else {
            return;
        };
        let (mut secs, mut sent) = (secs, sent);
        while let AfterWrite::Rewrite(s) = after_write(secs, d, Instant::now()) {
            sent = Instant::now();
            if let Err(e) = self.addrs.set_lifetime(address, ifindex, protocol, s).await {
                // Written with the longer lifetime: the keeper shortens it at its next round.
                tracing::error!(%address, error = %e, "shortening a VIP lifetime taken late");
                return;
            }
            secs = s;
        }
        self.fence.written(address, secs, sent);
    }

    /// Puts back what an apply changed before its VIP step failed: the addresses it added
    /// are removed, those it removed stay removed (see below), and the rules are replaced by `before`'s
    /// egress (when it is known exactly). Each failure is logged; whatever happens, the next
    /// apply reads the kernel and replaces everything.
    pub(crate) async fn roll_back(
        &mut self,
        before: Option<&DesiredState>,
        protocol: Option<u8>,
        changes: &VipChanges,
    ) {
        self.forget();
        if let Some(p) = protocol
            && !changes.added.is_empty()
        {
            match self.addrs.owned(p).await {
                Ok(owned) => {
                    for o in owned
                        .iter()
                        .filter(|o| changes.added.contains(&(o.address, o.ifindex)))
                    {
                        if let Err(e) = self.addrs.remove(o).await {
                            tracing::error!(address = %o.address, error = %e, "rollback: removing an added VIP failed");
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "rollback: listing VIPs failed"),
            }
        }
        // VIPs removed stay removed: removing one is always safe, while putting it back
        // could hold it on two nodes (the change may be a lost Lease).
        if !changes.removed.is_empty() {
            tracing::warn!(
                vips = ?changes.removed.iter().map(|o| o.address).collect::<Vec<_>>(),
                "rollback: the VIPs this apply removed stay removed"
            );
        }
        match before {
            Some(b) => {
                if let Err(e) = self.apply_egress(b).await {
                    tracing::error!(error = %e, "rollback: restoring the previous rules failed");
                }
            }
            None => tracing::error!(
                "rollback: the previous rules were not known exactly; they are left as applied"
            ),
        }
        self.forget();
    }
}
