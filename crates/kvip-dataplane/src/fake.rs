//! An in-memory [`Dataplane`]: a "kernel" that holds a [`DesiredState`], records every call,
//! and fails on request. It lets the agent's loop (leadership changes, debounce, drift
//! repair, invalid states, shutdown order) be tested without root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvip_core::DesiredState;

use crate::{
    ApplyReport, Dataplane, DataplaneError, FenceReport, FenceSink, Observed, SyncMode,
    TeardownReport,
};

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Apply(DesiredState),
    Observe,
    Teardown,
    Invalidate,
    Reannounce,
}

#[derive(Debug, Default)]
struct Kernel {
    state: DesiredState,
    calls: Vec<Call>,
    /// Applies still to fail (each failing one leaves `state` as it was).
    failures: usize,
    /// Every apply that claims this VIP fails (one that cannot be held).
    refused: Option<std::net::IpAddr>,
    /// A VIP someone else configured already: applies leave it alone, read-back omits it.
    foreign: Option<std::net::IpAddr>,
    /// How long a read-back takes (as listing a large table does).
    observe_delay: Option<std::time::Duration>,
    /// Every set of deadlines received, oldest first.
    fences: Vec<BTreeMap<IpAddr, Instant>>,
    /// Lifetimes moved on so far.
    refreshed: u64,
    /// VIPs to report lapsed at the next `fence` call.
    lapsed: Vec<IpAddr>,
    /// VIPs whose lifetime ran out (see [`FakeDataplane::lapse`]).
    ran_out: Vec<IpAddr>,
}

/// The fake; clones share one kernel, so a test keeps a clone to look and to meddle.
#[derive(Debug, Clone, Default)]
pub struct FakeDataplane {
    kernel: Arc<Mutex<Kernel>>,
    /// What this handle last applied (as the kernel dataplane remembers for deltas).
    applied: Option<DesiredState>,
}

impl FakeDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    fn kernel(&self) -> MutexGuard<'_, Kernel> {
        // A test that panicked while holding the lock has failed already; go on with its data.
        self.kernel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the "kernel" holds now.
    pub fn state(&self) -> DesiredState {
        self.kernel().state.clone()
    }

    /// Changes the "kernel" behind kvip's back (drift).
    pub fn set_state(&self, s: DesiredState) {
        self.kernel().state = s;
    }

    /// Makes the next `n` applies fail, changing nothing.
    pub fn fail_applies(&self, n: usize) {
        self.kernel().failures = n;
    }

    /// Makes every apply that claims `vip` fail, changing nothing (`None`: lifts it).
    pub fn refuse_vip(&self, vip: Option<std::net::IpAddr>) {
        self.kernel().refused = vip;
    }

    /// Makes `vip` one someone else configured already (`None`: lifts it).
    pub fn foreign_vip(&self, vip: Option<std::net::IpAddr>) {
        self.kernel().foreign = vip;
    }

    /// Makes each read-back take `d` (`None`: instant again).
    pub fn slow_observe(&self, d: Option<std::time::Duration>) {
        self.kernel().observe_delay = d;
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.kernel().calls.clone()
    }

    /// Makes `vip` gone before its deadline (its lifetime ran out while held): the next
    /// `fence` call reports it lapsed, and the "kernel" no longer holds it.
    pub fn lapse(&self, vip: IpAddr) {
        let mut k = self.kernel();
        let vips = k
            .state
            .vips()
            .iter()
            .filter(|v| v.address != vip)
            .cloned()
            .collect();
        if let Ok(s) = DesiredState::new(vips, k.state.egress().to_vec()) {
            k.state = s;
        }
        k.lapsed.push(vip);
        k.ran_out.push(vip);
    }

    /// Every set of deadlines received ([`Dataplane::fence`]), oldest first.
    pub fn fences(&self) -> Vec<BTreeMap<IpAddr, Instant>> {
        self.kernel().fences.clone()
    }

    /// The states applied so far, oldest first.
    pub fn applied(&self) -> Vec<DesiredState> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Apply(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

impl Dataplane for FakeDataplane {
    async fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport, DataplaneError> {
        let mut k = self.kernel();
        k.calls.push(Call::Apply(desired.clone()));
        let refused = k
            .refused
            .is_some_and(|r| desired.vips().iter().any(|v| v.address == r));
        if refused || k.failures > 0 {
            k.failures = k.failures.saturating_sub(usize::from(!refused));
            drop(k);
            self.applied = None;
            return Err(DataplaneError::Config("injected failure".into()));
        }
        let before = std::mem::replace(&mut k.state, desired.clone());
        let has = |s: &DesiredState, a| s.vips().iter().any(|v| v.address == a);
        let report = ApplyReport {
            backend: "fake",
            mode: if before == *desired {
                SyncMode::Unchanged
            } else {
                SyncMode::Full
            },
            vips_added: desired
                .vips()
                .iter()
                .map(|v| v.address)
                .filter(|a| !has(&before, *a))
                .collect(),
            vips_removed: before
                .vips()
                .iter()
                .map(|v| v.address)
                .filter(|a| !has(desired, *a))
                .collect(),
            vips_repaired: self
                .applied
                .as_ref()
                .map(|prev| {
                    prev.vips()
                        .iter()
                        .map(|v| v.address)
                        .filter(|a| !has(&before, *a) && has(desired, *a))
                        .collect()
                })
                .unwrap_or_default(),
            vips_foreign: k
                .foreign
                .filter(|f| desired.vips().iter().any(|v| v.address == *f))
                .into_iter()
                .collect(),
            duration: Duration::ZERO,
            ..ApplyReport::default()
        };
        drop(k);
        self.applied = Some(desired.clone());
        Ok(report)
    }

    async fn observe(&self) -> Result<Observed, DataplaneError> {
        let delay = {
            let mut k = self.kernel();
            k.calls.push(Call::Observe);
            k.observe_delay
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let k = self.kernel();
        let state = match k.foreign {
            Some(f) => DesiredState::new(
                k.state
                    .vips()
                    .iter()
                    .filter(|v| v.address != f)
                    .cloned()
                    .collect(),
                k.state.egress().to_vec(),
            )?,
            None => k.state.clone(),
        };
        Ok(Observed {
            state,
            stray: Vec::new(),
        })
    }

    async fn teardown(&mut self) -> TeardownReport {
        let mut k = self.kernel();
        k.calls.push(Call::Teardown);
        k.state = DesiredState::empty();
        drop(k);
        self.applied = None;
        TeardownReport::default()
    }

    fn invalidate(&mut self) {
        self.kernel().calls.push(Call::Invalidate);
        self.applied = None;
    }

    async fn reannounce(&mut self) -> Result<usize, DataplaneError> {
        let mut k = self.kernel();
        k.calls.push(Call::Reannounce);
        Ok(k.state.vips().len())
    }

    fn fence_sink(&mut self) -> Result<Arc<dyn FenceSink>, DataplaneError> {
        Ok(Arc::new(FakeSink(self.kernel.clone())))
    }

    fn backend_name(&self) -> &'static str {
        "fake"
    }
}

/// The fake's keeper: records the deadlines; a held VIP whose deadline moved counts as
/// refreshed; reports what [`FakeDataplane::lapse`] made lapse.
struct FakeSink(Arc<Mutex<Kernel>>);

impl FenceSink for FakeSink {
    fn set(&self, deadlines: BTreeMap<IpAddr, Instant>) -> FenceReport {
        let mut k = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let moved = k.fences.last().map(|last| {
            k.state
                .vips()
                .iter()
                .filter(|v| {
                    deadlines
                        .get(&v.address)
                        .is_some_and(|d| last.get(&v.address) != Some(d))
                })
                .count() as u64
        });
        k.refreshed += moved.unwrap_or(0);
        k.fences.push(deadlines);
        FenceReport {
            refreshed: k.refreshed,
            lapsed: std::mem::take(&mut k.lapsed),
            ..FenceReport::default()
        }
    }

    fn ran_out(&self, address: IpAddr) -> bool {
        let k = self.0.lock().unwrap_or_else(|p| p.into_inner());
        k.ran_out.contains(&address)
    }
}
