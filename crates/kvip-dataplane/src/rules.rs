//! The rule backends behind the dataplane: one trait, [`RuleBackend`], implemented by
//! nftables ([`crate::nft::NftBackend`]) and iptables ([`crate::iptables::IptBackend`]), and
//! the types they share. The dataplane holds one as `Box<dyn RuleBackend>`; addresses,
//! announcements, locking and rollback are the dataplane's, not the backends'.

use futures_util::future::BoxFuture;
use kvip_core::{DesiredState, EgressPolicy, Family};

use crate::DataplaneError;
use crate::iptables::{IptBackend, Variant, of_family};
use crate::nft::{self, NftBackend};

/// What a backend did in one apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Nothing to change.
    #[default]
    Unchanged,
    /// Only set and map elements changed.
    Incremental,
    /// The owned objects were replaced as a whole.
    Full,
}

/// Counts from one apply of egress rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EgressSync {
    pub mode: SyncMode,
    pub objects_written: usize,
    pub objects_removed: usize,
    pub elements_added: usize,
    pub elements_removed: usize,
}

/// Egress policies read back, and what in kvip's objects kvip would not have written.
pub type ReadBack = (Vec<EgressPolicy>, Vec<String>);

/// One way of holding kvip's egress rules in the kernel. Every change is one atomic
/// transaction per family (nftables: one for both).
pub trait RuleBackend: Send + Sync + std::fmt::Debug {
    /// `nftables`, `iptables-nft` or `iptables-legacy`.
    fn name(&self) -> &'static str;
    /// The iptables variant, for the iptables backend.
    fn iptables_variant(&self) -> Option<Variant>;
    /// Makes kvip's rules hold exactly `desired`'s egress policies.
    fn apply<'a>(
        &'a mut self,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<EgressSync, DataplaneError>>;
    /// Reads kvip's rules back.
    fn observe(&self) -> BoxFuture<'_, Result<ReadBack, DataplaneError>>;
    /// The raw listing of kvip's objects (nft text, or iptables-save lines).
    fn raw_listing(&self) -> BoxFuture<'_, Result<String, DataplaneError>>;
    /// Forgets what was applied: the next apply replaces everything.
    fn invalidate(&mut self);
    /// The objects a full replace removed, `before` being the state it replaced.
    fn objects_removed(&self, before: &DesiredState, sync: &EgressSync) -> usize;
}

impl RuleBackend for NftBackend {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn iptables_variant(&self) -> Option<Variant> {
        None
    }

    fn apply<'a>(
        &'a mut self,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<EgressSync, DataplaneError>> {
        Box::pin(NftBackend::apply(self, desired))
    }

    fn observe(&self) -> BoxFuture<'_, Result<ReadBack, DataplaneError>> {
        Box::pin(async move {
            let t = NftBackend::observe(self).await?;
            Ok((t.egress, t.stray))
        })
    }

    fn raw_listing(&self) -> BoxFuture<'_, Result<String, DataplaneError>> {
        Box::pin(nft::nft_list_text(self.table()))
    }

    fn invalidate(&mut self) {
        NftBackend::invalidate(self);
    }

    fn objects_removed(&self, before: &DesiredState, _sync: &EgressSync) -> usize {
        nft::object_count(before)
    }
}

impl RuleBackend for IptBackend {
    fn name(&self) -> &'static str {
        match self.variant {
            Variant::Legacy => "iptables-legacy",
            Variant::Nft => "iptables-nft",
        }
    }

    fn iptables_variant(&self) -> Option<Variant> {
        Some(self.variant)
    }

    fn apply<'a>(
        &'a mut self,
        desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<EgressSync, DataplaneError>> {
        Box::pin(async move {
            let mut sync = EgressSync::default();
            for f in [Family::V4, Family::V6] {
                let r = self
                    .apply_family(f, &of_family(desired.egress(), f))
                    .await?;
                if r.written {
                    sync.mode = SyncMode::Full;
                    sync.objects_written += r.rules;
                    sync.objects_removed += r.removed;
                }
            }
            Ok(sync)
        })
    }

    fn observe(&self) -> BoxFuture<'_, Result<ReadBack, DataplaneError>> {
        Box::pin(async move {
            let (mut p, mut s) = self.observe_family(Family::V4).await?;
            let (p6, s6) = self.observe_family(Family::V6).await?;
            p.extend(p6);
            s.extend(s6);
            Ok((p, s))
        })
    }

    fn raw_listing(&self) -> BoxFuture<'_, Result<String, DataplaneError>> {
        Box::pin(async move {
            let mut out = String::new();
            for f in [Family::V4, Family::V6] {
                let save = self.save(f).await?;
                out.push_str(&format!("# {} nat\n", self.variant.save_cmd(f)));
                let post = self.chains.post();
                for line in save.lines() {
                    let mentions = line
                        .split(|c: char| c.is_whitespace() || c == ':')
                        .any(|w| self.chains.owns(w) || w == post);
                    if mentions {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            Ok(out)
        })
    }

    fn invalidate(&mut self) {
        // It compares with the kernel on every apply: nothing remembered.
    }

    fn objects_removed(&self, _before: &DesiredState, sync: &EgressSync) -> usize {
        sync.objects_removed
    }
}

/// No rule tool on this node: what a teardown uses to remove kvip's addresses anyway (every
/// rule step of a teardown already skips a missing tool). Anything else fails, naming the
/// tool that is missing.
#[derive(Debug)]
pub struct NoRuleTool(pub DataplaneError);

impl NoRuleTool {
    fn missing(&self) -> DataplaneError {
        match &self.0 {
            DataplaneError::ToolMissing { tool, hint } => DataplaneError::ToolMissing {
                tool: tool.clone(),
                hint,
            },
            other => DataplaneError::Config(other.to_string()),
        }
    }
}

impl RuleBackend for NoRuleTool {
    fn name(&self) -> &'static str {
        "none"
    }

    fn iptables_variant(&self) -> Option<Variant> {
        None
    }

    fn apply<'a>(
        &'a mut self,
        _desired: &'a DesiredState,
    ) -> BoxFuture<'a, Result<EgressSync, DataplaneError>> {
        Box::pin(async move { Err(self.missing()) })
    }

    fn observe(&self) -> BoxFuture<'_, Result<ReadBack, DataplaneError>> {
        Box::pin(async move { Err(self.missing()) })
    }

    fn raw_listing(&self) -> BoxFuture<'_, Result<String, DataplaneError>> {
        Box::pin(async move { Err(self.missing()) })
    }

    fn invalidate(&mut self) {}

    fn objects_removed(&self, _before: &DesiredState, _sync: &EgressSync) -> usize {
        0
    }
}
