//! The nftables backend: one `inet` table owned by kvip, written with `nft -j -f -` as one
//! transaction, read back with `nft -j list table`.
//!
//! Layout (see docs/dataplane.md):
//! - maps `src4` / `src6`: pod address → `goto` the policy's chain (one lookup per packet,
//!   whatever the number of pods or policies);
//! - per policy: chain `eg_<name>_<hash>` and sets `<chain>_ex` (excluded destinations,
//!   interval), `<chain>_al` (allowed destinations, interval, only when the policy has an
//!   allow list), `<chain>_pt` (protocol . port, only when it filters ports);
//! - base chain `postrouting`: nat hook at priority srcnat - 10, so kvip's SNAT is decided
//!   before any nat chain at srcnat (iptables-nft, iptables-legacy, a CNI's own table).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use kvip_core::{Cidr, DesiredState, EgressPolicy, Family, PortMatch};
use serde_json::json;

use crate::error::DataplaneError;
use crate::exec::{one_line, run_tool};
use crate::names::{fnv1a, nft_policy_chain, policy_comment};
use crate::nftjson::{Batch, Cmd, Elem, Lhs, Obj, SetType, Stmt};
use crate::nftread::table_flags;
pub use crate::nftread::{ParsedTable, parse_table};
use crate::rules::{EgressSync, SyncMode};

/// Priority of kvip's nat postrouting chain: srcnat (100) - 10.
pub const NAT_PRIORITY: i32 = 90;
pub(crate) const BASE_CHAIN: &str = "postrouting";

fn fam_proto(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

fn src_map(f: Family) -> &'static str {
    match f {
        Family::V4 => "src4",
        Family::V6 => "src6",
    }
}

fn cidr_elem(c: &Cidr) -> Elem {
    if c.is_host() {
        Elem::Addr(c.addr().to_string())
    } else {
        Elem::Prefix {
            addr: c.addr().to_string(),
            len: c.prefix_len(),
        }
    }
}

fn port_elem(p: &PortMatch) -> Elem {
    Elem::ProtoPort(p.protocol.as_str(), p.port)
}

fn goto_elem(src: IpAddr, chain: &str) -> Elem {
    Elem::Goto {
        key: src.to_string(),
        chain: chain.to_string(),
    }
}

/// A named set shared by every policy with the same list: the name is derived from the
/// content, so identical exclusion lists (typically the cluster's pod and service CIDRs) are
/// one set however many policies use them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SharedSet {
    name: String,
    set_type: SetType,
    interval: bool,
    elems: Vec<Elem>,
}

fn cidr_set(kind: &str, f: Family, list: &[Cidr]) -> SharedSet {
    let key: Vec<String> = list.iter().map(Cidr::to_string).collect();
    let fam = match f {
        Family::V4 => "4",
        Family::V6 => "6",
    };
    SharedSet {
        name: format!("{kind}{fam}_{:016x}", fnv1a(&key.join(","))),
        set_type: SetType::One(addr_type(f)),
        interval: true,
        elems: list.iter().map(cidr_elem).collect(),
    }
}

fn port_set(list: &[PortMatch]) -> SharedSet {
    let key: Vec<String> = list.iter().map(PortMatch::to_string).collect();
    SharedSet {
        name: format!("pt_{:016x}", fnv1a(&key.join(","))),
        set_type: SetType::Concat(vec!["inet_proto", "inet_service"]),
        interval: false,
        elems: list.iter().map(port_elem).collect(),
    }
}

/// The sets one policy's chain refers to: (exclude, allow, ports).
fn policy_sets(p: &EgressPolicy) -> (Option<SharedSet>, Option<SharedSet>, Option<SharedSet>) {
    let f = p.family();
    (
        (!p.exclude().is_empty()).then(|| cidr_set("ex", f, p.exclude())),
        p.allow().map(|a| cidr_set("al", f, a)),
        p.ports().map(port_set),
    )
}

/// Renders the whole table as one transaction: the table is created (if missing), deleted
/// and created again with its full content, so the result never depends on what was there.
/// Fails (rather than merging two policies' objects) if two names hash to one object name.
pub fn render_full(table: &str, state: &DesiredState) -> Result<Batch, DataplaneError> {
    let tbl = || Obj::Table {
        family: "inet",
        name: table.to_string(),
    };
    let chain_obj = |name: &str, base: bool| Obj::Chain {
        family: "inet",
        table: table.to_string(),
        name: name.to_string(),
        chain_type: base.then_some("nat"),
        hook: base.then_some("postrouting"),
        prio: base.then_some(NAT_PRIORITY),
        policy: base.then_some("accept"),
    };
    let rule = |chain: &str, comment: Option<String>, expr: Vec<Stmt>| {
        Cmd::Add(Obj::Rule {
            family: "inet",
            table: table.to_string(),
            chain: chain.to_string(),
            comment,
            expr,
        })
    };
    let mut cmds: Vec<Cmd> = vec![Cmd::Add(tbl()), Cmd::Delete(tbl()), Cmd::Add(tbl())];
    let mut sets: BTreeMap<String, SharedSet> = BTreeMap::new();
    let mut rules: Vec<Cmd> = Vec::new();
    let mut map_elems: BTreeMap<Family, Vec<Elem>> = BTreeMap::new();
    let mut chain_owner: BTreeMap<String, &str> = BTreeMap::new();
    let mut set_owner: BTreeMap<String, &str> = BTreeMap::new();
    for p in state.egress() {
        let chain = nft_policy_chain(p.name());
        if let Some(first) = chain_owner.insert(chain.clone(), p.name()) {
            return Err(DataplaneError::NameCollision {
                kind: "chain",
                name: chain,
                first: first.to_string(),
                second: p.name().to_string(),
            });
        }
        let fp = fam_proto(p.family());
        cmds.push(Cmd::Add(chain_obj(&chain, false)));
        let (ex, al, pt) = policy_sets(p);
        let daddr = || Lhs::Payload {
            protocol: fp,
            field: "daddr",
        };
        for (set, op, left) in [
            (ex, "==", daddr()),
            (al, "!=", daddr()),
            (pt, "!=", Lhs::L4ProtoDport),
        ] {
            if let Some(set) = set {
                if let Some(existing) = sets.get(&set.name)
                    && *existing != set
                {
                    return Err(DataplaneError::NameCollision {
                        kind: "set",
                        name: set.name.clone(),
                        first: set_owner
                            .get(&set.name)
                            .copied()
                            .unwrap_or_default()
                            .to_string(),
                        second: p.name().to_string(),
                    });
                }
                set_owner.entry(set.name.clone()).or_insert(p.name());
                rules.push(rule(
                    &chain,
                    None,
                    vec![
                        Stmt::MatchSet {
                            op,
                            left,
                            set: set.name.clone(),
                        },
                        Stmt::Return,
                    ],
                ));
                sets.insert(set.name.clone(), set);
            }
        }
        rules.push(rule(
            &chain,
            Some(policy_comment(p.name())),
            vec![Stmt::Snat {
                family: fp,
                addr: p.vip().to_string(),
            }],
        ));
        let elems = map_elems.entry(p.family()).or_default();
        elems.extend(p.sources().iter().map(|s| goto_elem(*s, &chain)));
    }
    for set in sets.into_values() {
        cmds.push(Cmd::Add(Obj::Set {
            family: "inet",
            table: table.to_string(),
            name: set.name,
            set_type: set.set_type,
            flags: if set.interval {
                vec!["interval"]
            } else {
                vec![]
            },
            elem: set.elems,
        }));
    }
    for f in [Family::V4, Family::V6] {
        cmds.push(Cmd::Add(Obj::Map {
            family: "inet",
            table: table.to_string(),
            name: src_map(f).to_string(),
            set_type: SetType::One(addr_type(f)),
            map: "verdict",
            elem: map_elems.remove(&f).unwrap_or_default(),
        }));
    }
    cmds.push(Cmd::Add(chain_obj(BASE_CHAIN, true)));
    for f in [Family::V4, Family::V6] {
        cmds.push(rule(
            BASE_CHAIN,
            None,
            vec![Stmt::Vmap {
                key: Lhs::Payload {
                    protocol: fam_proto(f),
                    field: "saddr",
                },
                map: src_map(f).to_string(),
            }],
        ));
    }
    cmds.extend(rules);
    Ok(Batch { cmds })
}

/// Whether two states differ only in pod addresses (the elements of the source maps): same
/// policies, each translating the same way.
fn same_structure(a: &DesiredState, b: &DesiredState) -> bool {
    a.egress().len() == b.egress().len()
        && a.egress()
            .iter()
            .zip(b.egress())
            .all(|(p, q)| p.name() == q.name() && p.same_translation(q))
}

/// Element changes of an incremental update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaCounts {
    pub added: usize,
    pub removed: usize,
}

/// Renders the source-map element deletions and additions that turn `old` into `new`, as
/// one transaction; `None` when anything but pod addresses differs (a full replace).
pub fn render_delta(
    table: &str,
    old: &DesiredState,
    new: &DesiredState,
) -> Option<(Batch, DeltaCounts)> {
    if !same_structure(old, new) {
        return None;
    }
    // Policies pair up in order and their source lists are sorted: one merge pass per
    // policy finds what left and what came, so the cost follows the number of pods. A pod
    // that moved between policies is deleted from one and added to the other in the same
    // transaction (deletions go first).
    let mut del: BTreeMap<Family, Vec<Elem>> = BTreeMap::new();
    let mut add: BTreeMap<Family, Vec<Elem>> = BTreeMap::new();
    for (p, q) in old.egress().iter().zip(new.egress()) {
        let chain = nft_policy_chain(q.name());
        let (a, b) = (p.sources(), q.sources());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x == y => {
                    i += 1;
                    j += 1;
                }
                (Some(x), y) if y.is_none_or(|y| x < y) => {
                    del.entry(Family::of(*x))
                        .or_default()
                        .push(Elem::Addr(x.to_string()));
                    i += 1;
                }
                (_, Some(y)) => {
                    add.entry(Family::of(*y))
                        .or_default()
                        .push(goto_elem(*y, &chain));
                    j += 1;
                }
                _ => break,
            }
        }
    }
    let mut counts = DeltaCounts::default();
    let mut cmds = Vec::new();
    let element = |f: Family, elem: Vec<Elem>| Obj::Element {
        family: "inet",
        table: table.to_string(),
        name: src_map(f).to_string(),
        elem,
    };
    for (f, elems) in del {
        counts.removed += elems.len();
        cmds.push(Cmd::Delete(element(f, elems)));
    }
    for (f, elems) in add {
        counts.added += elems.len();
        // `create`: an element someone else added meanwhile fails the batch (and the next
        // apply replaces everything) instead of being a silent no-op, so a batch that succeeds
        // always commits something (see `NftBackend::write`).
        cmds.push(Cmd::Create(element(f, elems)));
    }
    Some((Batch { cmds }, counts))
}

/// How many objects (chains, rules, sets, maps) kvip's table holds for `state`.
pub fn object_count(state: &DesiredState) -> usize {
    if state.egress().is_empty() {
        return 0;
    }
    render_full("kvip", state).map_or(0, |b| b.cmds.len().saturating_sub(3))
}

/// The nftables generation, or `None` (logged) when the kernel does not answer: kvip then
/// knows nothing without listing, as before it asked.
fn generation_or_unknown() -> Option<u32> {
    crate::nfnl::generation()
        .inspect_err(|e| tracing::debug!(error = %e, "reading the nftables generation"))
        .ok()
}

/// Runs `nft -j -f -` with a JSON document.
pub async fn nft_apply(json: &str) -> Result<(), DataplaneError> {
    let out = run_tool("nft", &["-j", "-f", "-"], Some(json.as_bytes())).await?;
    if !out.status_ok {
        return Err(DataplaneError::ToolFailed {
            tool: "nft".into(),
            args: "-j -f -".into(),
            stderr: one_line(&out.stderr),
        });
    }
    Ok(())
}

/// `nft -j list table inet <table>` (the JSON text); `None` when the table does not exist.
pub async fn nft_list_table(table: &str) -> Result<Option<String>, DataplaneError> {
    let out = run_tool("nft", &["-j", "list", "table", "inet", table], None).await?;
    if !out.status_ok {
        if out.stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(DataplaneError::ToolFailed {
            tool: "nft".into(),
            args: format!("-j list table inet {table}"),
            stderr: one_line(&out.stderr),
        });
    }
    Ok(Some(out.stdout))
}

/// Human-readable listing of the table (`nft list table inet <table>`); empty when missing.
pub async fn nft_list_text(table: &str) -> Result<String, DataplaneError> {
    nft_list_text_with(table, false).await
}

/// The same, `terse`: without the elements of sets and maps.
async fn nft_list_text_with(table: &str, terse: bool) -> Result<String, DataplaneError> {
    let args: &[&str] = if terse {
        &["-t", "list", "table", "inet", table]
    } else {
        &["list", "table", "inet", table]
    };
    let out = run_tool("nft", args, None).await?;
    if !out.status_ok {
        if out.stderr.contains("No such file or directory") {
            return Ok(String::new());
        }
        return Err(DataplaneError::ToolFailed {
            tool: "nft".into(),
            args: args.join(" "),
            stderr: one_line(&out.stderr),
        });
    }
    Ok(out.stdout)
}

/// Deletes the table if it exists (idempotent).
pub async fn nft_delete_table(family: &str, table: &str) -> Result<bool, DataplaneError> {
    let doc = json!({"nftables": [
        {"add": {"table": {"family": family, "name": table}}},
        {"delete": {"table": {"family": family, "name": table}}}
    ]})
    .to_string();
    // Probe first so that a missing table is not reported as a change.
    let exists = run_tool("nft", &["list", "table", family, table], None)
        .await?
        .status_ok;
    if !exists {
        return Ok(false);
    }
    nft_apply(&doc).await?;
    Ok(true)
}

/// Whether the `nft` binary runs and talks to the kernel.
pub async fn nft_available() -> bool {
    matches!(run_tool("nft", &["list", "tables"], None).await, Ok(o) if o.status_ok)
}

/// The nftables backend's memory of what it last made the kernel hold.
#[derive(Debug)]
pub struct NftBackend {
    table: String,
    applied: Option<DesiredState>,
    /// The nftables generation at which the kernel is known to hold exactly `applied`:
    /// after a transaction of kvip's that was the only one since the last known generation,
    /// or after a read-back that found `applied`. While the generation stays there, nothing
    /// in nftables changed, and a read-back has nothing to list. [`UNKNOWN`] otherwise.
    verified: AtomicU64,
}

const UNKNOWN: u64 = u64::MAX;

/// What a write does to kvip's table (see [`NftBackend::write`]).
#[derive(Clone, Copy)]
enum Write {
    Whole,
    Delta,
}

impl NftBackend {
    pub fn new(table: String) -> Self {
        NftBackend {
            table,
            applied: None,
            verified: AtomicU64::new(UNKNOWN),
        }
    }

    fn verified(&self) -> Option<u32> {
        u32::try_from(self.verified.load(Ordering::Acquire)).ok()
    }

    fn set_verified(&self, generation: Option<u32>) {
        self.verified
            .store(generation.map_or(UNKNOWN, u64::from), Ordering::Release);
    }

    /// Writes `doc` as one transaction. `Whole`: it replaces the table (so the result does
    /// not depend on what was there); `Delta`: it changes a table whose content must be known
    /// for the result to be.
    ///
    /// The generation moving by exactly one proves kvip's transaction was the only one
    /// because kvip's batches always commit something when they succeed: a replace deletes
    /// the table; a delta deletes elements (a missing one fails the batch) or creates them
    /// (`create`: an existing one fails the batch), never a no-op `add`.
    async fn write(&self, doc: &Batch, kind: Write) -> Result<(), DataplaneError> {
        let before = generation_or_unknown();
        let base_known = match kind {
            Write::Whole => true,
            Write::Delta => before.is_some() && before == self.verified(),
        };
        self.set_verified(None);
        nft_apply(&doc.to_json()?).await?;
        let after = generation_or_unknown();
        // Only kvip's transaction in between: the kernel holds what was written.
        if base_known
            && let (Some(b), Some(a)) = (before, after)
            && a == b.wrapping_add(1)
        {
            self.set_verified(Some(a));
        }
        Ok(())
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Forget what was applied: the next apply is a full replace.
    pub fn invalidate(&mut self) {
        self.applied = None;
        self.set_verified(None);
    }

    /// Makes the table hold exactly `desired`'s egress policies: nothing when unchanged,
    /// element changes only when the structure is the same, else a full replace. Any failure
    /// leaves the previous ruleset in place (one transaction) and forces a full replace next.
    pub async fn apply(&mut self, desired: &DesiredState) -> Result<EgressSync, DataplaneError> {
        if let Some(old) = &self.applied {
            // Only egress policies live in the table; VIP changes are not its business.
            if old.egress() == desired.egress() {
                return Ok(EgressSync::default());
            }
            if let Some((doc, counts)) = render_delta(&self.table, old, desired) {
                if doc.is_empty() {
                    self.applied = Some(desired.clone());
                    return Ok(EgressSync::default());
                }
                match self.write(&doc, Write::Delta).await {
                    Ok(()) => {
                        self.applied = Some(desired.clone());
                        return Ok(EgressSync {
                            mode: SyncMode::Incremental,
                            objects_written: 0,
                            objects_removed: 0,
                            elements_added: counts.added,
                            elements_removed: counts.removed,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "incremental nftables update failed; replacing the table");
                        self.applied = None;
                    }
                }
            }
        }
        self.applied = None;
        self.set_verified(None);
        if desired.egress().is_empty() {
            // No policy: kvip owns no nftables object at all.
            let removed = nft_delete_table("inet", &self.table).await?;
            self.applied = Some(desired.clone());
            return Ok(EgressSync {
                mode: if removed {
                    SyncMode::Full
                } else {
                    SyncMode::Unchanged
                },
                ..EgressSync::default()
            });
        }
        let doc = render_full(&self.table, desired)?;
        let objects = doc.cmds.len().saturating_sub(3);
        self.write(&doc, Write::Whole).await?;
        self.applied = Some(desired.clone());
        Ok(EgressSync {
            mode: SyncMode::Full,
            objects_written: objects,
            ..EgressSync::default()
        })
    }

    /// Reads the table back. When no nftables transaction happened since the kernel was
    /// known to hold what kvip applied, that is what it holds: nothing is listed.
    pub async fn observe(&self) -> Result<ParsedTable, DataplaneError> {
        let start = generation_or_unknown();
        if let (Some(g), Some(applied)) = (start, &self.applied)
            && self.verified() == Some(g)
        {
            return Ok(ParsedTable {
                egress: applied.egress().to_vec(),
                stray: Vec::new(),
            });
        }
        let parsed = self.list().await?;
        // Listed within one generation and equal to what was applied: known again.
        if let Some(applied) = &self.applied
            && start.is_some()
            && generation_or_unknown() == start
            && parsed.stray.is_empty()
            && DesiredState::new(vec![], parsed.egress.clone())
                .is_ok_and(|s| s.egress() == applied.egress())
        {
            self.set_verified(start);
        }
        Ok(parsed)
    }

    async fn list(&self) -> Result<ParsedTable, DataplaneError> {
        // Table flags first, from the text listing: with flags set, nft's JSON listing is
        // not always valid (nft 1.0.6 prints `"flags": "ipv4_addr"` or stops short).
        let text = nft_list_text_with(&self.table, true).await?;
        if let Some(flags) = table_flags(&text) {
            return Ok(ParsedTable {
                egress: Vec::new(),
                stray: vec![format!(
                    "table flags {flags} (kvip sets none): nothing in the table is in effect"
                )],
            });
        }
        match nft_list_table(&self.table).await? {
            None => Ok(ParsedTable::default()),
            Some(listing) => parse_table(&listing),
        }
    }
}
