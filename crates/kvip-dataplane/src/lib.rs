//! kvip-dataplane: makes the kernel hold exactly a [`DesiredState`], touching only objects
//! kvip owns, and reads those objects back into the same model.
//!
//! - egress SNAT through nftables ([`nft`]) or iptables ([`iptables`]), atomically;
//! - VIP addresses through rtnetlink, marked with kvip's address protocol ([`addr`]);
//! - gratuitous ARP / unsolicited NA when a VIP is acquired ([`announce`]);
//! - conntrack flush for pods whose translation changed ([`conntrack`]);
//! - removal of kube-vip's leftovers, on request ([`legacy`]).

pub mod addr;
pub mod announce;
pub mod conntrack;
pub mod error;
pub mod exec;
pub mod fake;
mod fence;
pub mod iptables;
pub mod legacy;
pub mod names;
mod nfnl;
pub mod nft;
pub mod nftjson;
mod nftread;
mod ownership;
pub mod protocols;
pub mod rules;
pub mod run;
mod vips;
#[cfg(test)]
mod vips_tests;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use kvip_core::{DesiredState, Family, VipClaim};

pub use announce::AnnounceConfig;
pub use error::DataplaneError;
pub use fence::{FenceReport, FenceSink};
pub use iptables::Variant;
pub use names::Instance;
pub use rules::{EgressSync, RuleBackend, SyncMode};

use addr::AddrManager;
use iptables::IptBackend;
use nft::NftBackend;

/// Which rule backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    Nftables,
    Iptables,
    /// nftables when `nft` works, iptables otherwise.
    #[default]
    Auto,
}

impl FromStr for BackendKind {
    type Err = DataplaneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nftables" | "nft" => Ok(BackendKind::Nftables),
            "iptables" => Ok(BackendKind::Iptables),
            "auto" => Ok(BackendKind::Auto),
            o => Err(DataplaneError::Config(format!(
                "backend {o:?}: expected nftables, iptables or auto"
            ))),
        }
    }
}

/// Dataplane settings.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub instance: Instance,
    pub backend: BackendKind,
    /// iptables variant; detected from the host when `None`.
    pub iptables_variant: Option<Variant>,
    /// Skip flushing conntrack entries of pods whose translation changed.
    pub no_conntrack_flush: bool,
    pub announce: AnnounceConfig,
}

/// What one apply changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyReport {
    pub backend: &'static str,
    pub mode: SyncMode,
    /// Rules, chains, sets and maps written (full replace).
    pub objects_written: usize,
    /// Objects the full replace removed (the previous content of kvip's table or chains).
    pub objects_removed: usize,
    pub elements_added: usize,
    pub elements_removed: usize,
    pub vips_added: Vec<IpAddr>,
    pub vips_removed: Vec<IpAddr>,
    /// Of `vips_added`, those the previous apply had already added: removed meanwhile by
    /// someone else (drift), added back.
    pub vips_repaired: Vec<IpAddr>,
    /// Claimed VIPs already configured on the node by someone else (not kvip's: left alone,
    /// and not read back as kvip's).
    pub vips_foreign: Vec<IpAddr>,
    /// Claimed VIPs not held because their Lease's renew deadline had passed (removed, or
    /// not added): the caller syncs again once the deadline moves.
    pub vips_expired: Vec<IpAddr>,
    /// Pods whose conntrack entries were flushed.
    pub conntrack_flushed: usize,
    /// Problems that did not stop the apply (conntrack, announcements, other backend).
    pub warnings: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// kvip's kernel state read back, plus anything in kvip's objects it would not have written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub state: DesiredState,
    pub stray: Vec<String>,
}

/// What a teardown removed and every error it met (it never stops at the first one).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TeardownReport {
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

/// The dataplane as the agent sees it.
pub trait Dataplane {
    /// Makes kvip's kernel objects equal `desired`.
    fn apply(
        &mut self,
        desired: &DesiredState,
    ) -> impl Future<Output = Result<ApplyReport, DataplaneError>>;
    /// Reads kvip's kernel objects back.
    fn observe(&self) -> impl Future<Output = Result<Observed, DataplaneError>>;
    /// Removes everything kvip owns.
    fn teardown(&mut self) -> impl Future<Output = TeardownReport>;
    /// Forgets what was applied: the next apply reads the kernel and replaces everything.
    fn invalidate(&mut self);
    /// Announces every VIP held now (neighbour upkeep); returns how many were sent.
    fn reannounce(&mut self) -> impl Future<Output = Result<usize, DataplaneError>>;
    /// Where the deadlines of the VIPs held under a Lease go (see [`FenceSink`]): addresses
    /// are added with a lifetime that never reaches past their deadline, kept topped up by a
    /// keeper task while the deadline lasts; one whose deadline has passed is removed.
    fn fence_sink(&mut self) -> Result<std::sync::Arc<dyn FenceSink>, DataplaneError>;
    /// The rule backend in use, for logs.
    fn backend_name(&self) -> &'static str;
}

/// The kernel dataplane. Lives in the network namespace of the thread that created it.
pub struct KernelDataplane {
    cfg: Config,
    rules: Box<dyn RuleBackend>,
    addrs: AddrManager,
    applied: Option<DesiredState>,
    announcers: Vec<tokio::task::JoinHandle<()>>,
    lock: run::InstanceLock,
    registry: protocols::Registry,
    /// The address protocol marking this instance's VIPs, once known.
    protocol: Option<u8>,
    /// The writer token this process last put in the lock file.
    last_token: Option<String>,
    /// The deadlines of the VIPs held under a Lease ([`Dataplane::fence`]), shared with the
    /// keeper of their lifetimes.
    fence: std::sync::Arc<fence::Shared>,
    /// The keeper, from the first deadline on.
    keeper: Option<tokio::task::JoinHandle<()>>,
    /// Test seam: adding this address fails as if the kernel refused it.
    #[cfg(test)]
    fail_add: Option<IpAddr>,
}

impl Drop for KernelDataplane {
    fn drop(&mut self) {
        // The keeper ends with the dataplane: lifetimes then run down, as after a kill.
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
    }
}

/// Picks the rule backend for `cfg`.
pub async fn resolve_backend(cfg: &Config) -> Result<Box<dyn RuleBackend>, DataplaneError> {
    let use_nft = match cfg.backend {
        BackendKind::Nftables => {
            if !nft::nft_available().await {
                return Err(DataplaneError::ToolMissing {
                    tool: "nft".into(),
                    hint: "install the nftables package (apt-get install nftables) or use --backend iptables",
                });
            }
            true
        }
        BackendKind::Iptables => false,
        BackendKind::Auto => {
            let nft = nft::nft_available().await;
            // Falling back to iptables would leave kvip's nftables table translating: asked
            // of the kernel itself (no `nft` needed), not of a record that could be stale.
            if !nft && nfnl::inet_table_exists(&cfg.instance.nft_table())? {
                return Err(DataplaneError::ToolMissing {
                    tool: "nft".into(),
                    hint: "kvip's nftables table is in this namespace and may still translate pods: install nftables (apt-get install nftables), or remove the table (nft delete table inet kvip) before using iptables",
                });
            }
            nft
        }
    };
    if use_nft {
        return Ok(Box::new(NftBackend::new(cfg.instance.nft_table())));
    }
    let variant = match cfg.iptables_variant {
        Some(v) => v,
        None => iptables::detect_variant().await?,
    };
    Ok(Box::new(IptBackend::new(
        cfg.instance.chain_prefix(),
        variant,
    )))
}

impl KernelDataplane {
    /// Opens the dataplane in the calling thread's network namespace (on a tokio runtime).
    pub async fn new(cfg: Config) -> Result<Self, DataplaneError> {
        let rules = resolve_backend(&cfg).await?;
        Self::with_rules(cfg, rules)
    }

    /// A dataplane for a teardown: as [`KernelDataplane::new`], but when no rule tool can be
    /// run it still opens (without rules), so kvip's addresses are removed all the same.
    pub async fn for_teardown(cfg: Config) -> Result<Self, DataplaneError> {
        let rules = match resolve_backend(&cfg).await {
            Ok(r) => r,
            Err(e @ DataplaneError::ToolMissing { .. }) => {
                tracing::warn!(error = %e, "no rule tool: removing kvip's addresses only");
                Box::new(rules::NoRuleTool(e))
            }
            Err(e) => return Err(e),
        };
        Self::with_rules(cfg, rules)
    }

    fn with_rules(cfg: Config, rules: Box<dyn RuleBackend>) -> Result<Self, DataplaneError> {
        let addrs = AddrManager::new()?;
        let dir = run::netns_dir()?;
        Ok(KernelDataplane {
            lock: run::InstanceLock::new(&dir, &cfg.instance),
            registry: protocols::Registry::new(&dir),
            cfg,
            rules,
            addrs,
            applied: None,
            announcers: Vec::new(),
            protocol: None,
            last_token: None,
            fence: std::sync::Arc::default(),
            keeper: None,
            #[cfg(test)]
            fail_add: None,
        })
    }

    pub fn backend(&self) -> &dyn RuleBackend {
        self.rules.as_ref()
    }

    fn forget(&mut self) {
        self.applied = None;
        self.rules.invalidate();
    }

    /// Announces every VIP kvip holds now (one gratuitous ARP / unsolicited NA each), so a
    /// switch or router that aged its neighbour entry learns it again. Reads the addresses
    /// from the kernel, so it announces what is held, not what was meant to be. Nothing when
    /// announcements are off (count 0). Returns how many were sent.
    async fn announce_held(&mut self) -> Result<usize, DataplaneError> {
        if self.cfg.announce.count == 0 {
            return Ok(0);
        }
        let links: BTreeMap<u32, addr::Link> = self
            .addrs
            .links()
            .await?
            .into_iter()
            .map(|l| (l.index, l))
            .collect();
        let mut sent = 0;
        let protocol = self.address_protocol(false).await?;
        for o in self.owned_addresses(protocol).await? {
            let Some(link) = links.get(&o.ifindex) else {
                continue;
            };
            let Some(mac) = link.mac else {
                continue;
            };
            announce::LinkSender::open(link.index)?.send(&announce::frame_for(mac, o.address))?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Waits until every pending repeated announcement has been sent.
    pub async fn wait_announcements(&mut self) {
        for h in self.announcers.drain(..) {
            if let Err(e) = h.await {
                tracing::warn!(error = %e, "an announcement task ended abnormally");
            }
        }
    }

    async fn observe_egress(&self) -> Result<rules::ReadBack, DataplaneError> {
        self.rules.observe().await
    }

    async fn apply_egress(&mut self, desired: &DesiredState) -> Result<EgressSync, DataplaneError> {
        self.rules.apply(desired).await
    }

    /// kvip's objects held by a backend not in use (left by a run with the other backend):
    /// read back as stray, so `show`, the doctor and the agent's drift check see them.
    async fn other_backend_objects(&self) -> Vec<String> {
        let mut out = Vec::new();
        let in_use = self.rules.iptables_variant();
        for v in [Variant::Legacy, Variant::Nft] {
            if Some(v) == in_use {
                continue;
            }
            let other = IptBackend::new(self.cfg.instance.chain_prefix(), v);
            match other.holds_anything().await {
                Ok(true) => out.push(format!(
                    "kvip's chains in iptables-{} (not the backend in use)",
                    v.name()
                )),
                Ok(false) | Err(DataplaneError::ToolMissing { .. }) => {}
                Err(e) => {
                    tracing::warn!(variant = v.name(), error = %e, "looking for kvip's chains of the other backend")
                }
            }
        }
        if in_use.is_some()
            && let Ok(Some(_)) = nft::nft_list_table(&self.cfg.instance.nft_table()).await
        {
            out.push(format!(
                "kvip's nftables table inet {} (not the backend in use)",
                self.cfg.instance.nft_table()
            ));
        }
        out
    }

    /// Removes objects of the backend not in use (left by an earlier run with the other
    /// backend), so that only one backend ever holds kvip's rules.
    async fn remove_other_backend(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let prefix = self.cfg.instance.chain_prefix();
        let in_use = self.rules.iptables_variant();
        for v in [Variant::Legacy, Variant::Nft] {
            if Some(v) == in_use {
                continue;
            }
            let other = IptBackend::new(prefix.clone(), v);
            match other.holds_anything().await {
                Ok(true) => {
                    for f in [Family::V4, Family::V6] {
                        if let Err(e) = other.apply_family(f, &[]).await {
                            warnings
                                .push(format!("removing kvip's iptables-{} rules: {e}", v.name()));
                        }
                    }
                }
                Ok(false)
                | Err(DataplaneError::ToolMissing { .. })
                | Err(DataplaneError::ToolFailed { .. }) => {}
                Err(e) => warnings.push(e.to_string()),
            }
        }
        if in_use.is_some() {
            match nft::nft_delete_table("inet", &self.cfg.instance.nft_table()).await {
                Ok(_) | Err(DataplaneError::ToolMissing { .. }) => {}
                Err(e) => warnings.push(format!("removing kvip's nftables table: {e}")),
            }
        }
        warnings
    }

    fn announce(&mut self, vip: IpAddr, link: &addr::Link) -> Result<(), DataplaneError> {
        let cfg = self.cfg.announce;
        if cfg.count == 0 {
            return Ok(());
        }
        let Some(mac) = link.mac else {
            return Ok(()); // no link layer (e.g. a tunnel): nothing to announce
        };
        let sender = announce::LinkSender::open(link.index)?;
        let frame = announce::frame_for(mac, vip);
        sender.send(&frame)?;
        if cfg.count > 1 {
            self.announcers.retain(|h| !h.is_finished());
            self.announcers.push(tokio::spawn(async move {
                for _ in 1..cfg.count {
                    tokio::time::sleep(cfg.interval).await;
                    if let Err(e) = sender.send(&frame) {
                        tracing::warn!(%vip, error = %e, "repeating announcement failed");
                    }
                }
            }));
        }
        Ok(())
    }

    /// Raw listing of kvip's rule objects: nft text, or iptables-save lines of kvip's chains.
    pub async fn raw_listing(&self) -> Result<String, DataplaneError> {
        self.rules.raw_listing().await
    }
}

impl Dataplane for KernelDataplane {
    /// Order: take the instance's lock; check interfaces and that IPv6 VIPs can be held
    /// (nothing changes if not); rules in one transaction (nothing changes if the kernel
    /// rejects them); VIP addresses; conntrack. If the VIP step fails, the rules are put back
    /// as they were, the VIPs it added are removed (those it removed stay removed: putting
    /// one back could hold it on two nodes), and the VIP step's error is returned. The first apply of a
    /// process, and any apply after another process changed this instance's objects, reads
    /// the kernel first, so stale objects are removed and conntrack is flushed for exactly
    /// the pods whose translation changes.
    async fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport, DataplaneError> {
        let start = Instant::now();
        let _lock = self.begin_change().await?;
        let mut report = ApplyReport {
            backend: self.rules.name(),
            ..ApplyReport::default()
        };
        let links = self.validate(desired).await?;
        let protocol = self.address_protocol(!desired.vips().is_empty()).await?;
        self.fence.set_protocol(protocol);
        let first = self.applied.is_none();
        // The previous egress, exactly as the kernel holds it, when known: what a failed
        // VIP step rolls the rules back to.
        let (before, exact) = match &self.applied {
            Some(s) => (s.clone(), true),
            None => match self.observe_egress().await {
                Ok((egress, stray)) => match DesiredState::new(vec![], egress) {
                    Ok(s) => (s, stray.is_empty()),
                    Err(e) => {
                        report
                            .warnings
                            .push(format!("reading the previous state: {e}"));
                        (DesiredState::empty(), false)
                    }
                },
                Err(e) => {
                    report
                        .warnings
                        .push(format!("reading the previous state: {e}"));
                    (DesiredState::empty(), false)
                }
            },
        };
        self.applied = None;
        let sync = self.apply_egress(desired).await?;
        report.mode = sync.mode;
        report.objects_written = sync.objects_written;
        report.elements_added = sync.elements_added;
        report.elements_removed = sync.elements_removed;
        if sync.mode == SyncMode::Full {
            // A full replace removes the previous content and writes every element anew.
            report.elements_added = desired.source_count();
            report.elements_removed = before.source_count();
            report.objects_removed = self.rules.objects_removed(&before, &sync);
        }
        // VIPs kvip itself last removed for their deadline: adding one back is no repair.
        let expired_before: Vec<IpAddr> = before
            .vips()
            .iter()
            .map(|v| v.address)
            .filter(|a| self.fence.removed_for_deadline(*a))
            .collect();
        let mut changes = vips::VipChanges::default();
        if let Err(e) = self
            .apply_vips(desired, &links, protocol, &mut changes)
            .await
        {
            self.roll_back(exact.then_some(&before), protocol, &changes)
                .await;
            return Err(e);
        }
        if first {
            report.warnings.extend(self.remove_other_backend().await);
        }
        report.vips_removed = changes.removed.iter().map(|o| o.address).collect();
        report.vips_foreign = changes.foreign.clone();
        report.vips_expired = changes.expired.clone();
        for a in &changes.expired {
            report.warnings.push(format!(
                "{a}: its Lease's renew deadline has passed; the node does not hold it"
            ));
        }
        for (address, ifindex) in &changes.added {
            report.vips_added.push(*address);
            if let Some(link) = links.values().find(|l| l.index == *ifindex)
                && let Err(e) = self.announce(*address, link)
            {
                report.warnings.push(e.to_string());
            }
        }
        report.warnings.append(&mut changes.warnings);
        if !first {
            report.vips_repaired = report
                .vips_added
                .iter()
                .filter(|a| {
                    before.vips().iter().any(|v| v.address == **a) && !expired_before.contains(a)
                })
                .copied()
                .collect();
        }
        if !self.cfg.no_conntrack_flush {
            let changed = before.changed_sources(desired);
            match conntrack::flush_sources(&changed).await {
                Ok(n) => report.conntrack_flushed = n,
                Err(e) => report.warnings.push(format!("conntrack flush: {e}")),
            }
        }
        self.applied = Some(desired.clone());
        report.duration = start.elapsed();
        Ok(report)
    }

    async fn observe(&self) -> Result<Observed, DataplaneError> {
        let (egress, mut stray) = self.observe_egress().await?;
        stray.extend(self.other_backend_objects().await);
        let protocol = self
            .registry
            .lookup(&self.cfg.instance)
            .await?
            .or(self.protocol);
        let vips: Vec<VipClaim> = self
            .owned_addresses(protocol)
            .await?
            .into_iter()
            .filter_map(|o| match VipClaim::new(o.address, o.interface.clone()) {
                Ok(v) => Some(v),
                Err(e) => {
                    stray.push(format!("address {} on {}: {e}", o.address, o.interface));
                    None
                }
            })
            .collect();
        let state =
            DesiredState::new(vips, egress).map_err(|e| DataplaneError::readback(e.to_string()))?;
        Ok(Observed { state, stray })
    }

    fn invalidate(&mut self) {
        self.forget();
    }

    async fn reannounce(&mut self) -> Result<usize, DataplaneError> {
        self.announce_held().await
    }

    fn fence_sink(&mut self) -> Result<std::sync::Arc<dyn FenceSink>, DataplaneError> {
        KernelDataplane::fence_sink(self)
    }

    fn backend_name(&self) -> &'static str {
        self.rules.name()
    }

    async fn teardown(&mut self) -> TeardownReport {
        let mut r = TeardownReport::default();
        let _lock = match self.begin_change().await {
            Ok(l) => l,
            Err(e) => {
                r.errors.push(e.to_string());
                return r;
            }
        };
        // What was translated, to flush its conntrack entries afterwards.
        let before = match self.observe_egress().await {
            Ok((egress, _)) => DesiredState::new(vec![], egress).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let before = before.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the rules before teardown; flushing conntrack for the last applied state");
            self.applied.clone().unwrap_or_default()
        });
        self.applied = None;
        self.fence.clear();
        let table = self.cfg.instance.nft_table();
        match nft::nft_delete_table("inet", &table).await {
            Ok(true) => r.removed.push(format!("nftables table inet {table}")),
            Ok(false) | Err(DataplaneError::ToolMissing { .. }) => {}
            Err(e) => r.errors.push(e.to_string()),
        }
        self.rules.invalidate();
        let prefix = self.cfg.instance.chain_prefix();
        for v in [Variant::Legacy, Variant::Nft] {
            let b = IptBackend::new(prefix.clone(), v);
            for f in [Family::V4, Family::V6] {
                match b.apply_family(f, &[]).await {
                    Ok(s) if s.written => r.removed.push(format!(
                        "{} chains {prefix}*",
                        v.restore_cmd(f).trim_end_matches("-restore")
                    )),
                    Ok(_) | Err(DataplaneError::ToolMissing { .. }) => {}
                    Err(e) => r.errors.push(e.to_string()),
                }
            }
        }
        let owned = match self.address_protocol(false).await {
            Ok(p) => self.owned_addresses(p).await,
            Err(e) => Err(e),
        };
        match owned {
            Ok(owned) => {
                for o in owned {
                    match self.addrs.remove(&o).await {
                        Ok(()) => r
                            .removed
                            .push(format!("address {} on {}", o.address, o.interface)),
                        Err(e) => r.errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => r.errors.push(e.to_string()),
        }
        if !self.cfg.no_conntrack_flush {
            let changed = before.changed_sources(&DesiredState::empty());
            if let Err(e) = conntrack::flush_sources(&changed).await {
                r.errors.push(format!("conntrack flush: {e}"));
            }
        }
        for h in self.announcers.drain(..) {
            h.abort();
        }
        r
    }
}
