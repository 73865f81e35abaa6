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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kvip_core::{Cidr, DesiredState, EgressPolicy, Family, PortMatch, Protocol};
use serde_json::{Value, json};

use crate::error::DataplaneError;
use crate::exec::{one_line, run_tool};
use crate::names::{fnv1a, nft_policy_chain, policy_comment, policy_from_comment};
use crate::nftjson::{Batch, Cmd, Elem, Lhs, Obj, SetType, Stmt};
use crate::rules::{EgressSync, SyncMode};

/// Priority of kvip's nat postrouting chain: srcnat (100) - 10.
pub const NAT_PRIORITY: i32 = 90;
const BASE_CHAIN: &str = "postrouting";

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
        cmds.push(Cmd::Add(element(f, elems)));
    }
    Some((Batch { cmds }, counts))
}

/// The table's content read back into the model, plus anything in the table kvip would not
/// have written (reported, so drift cannot hide).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedTable {
    pub egress: Vec<EgressPolicy>,
    pub stray: Vec<String>,
}

fn parse_addr_elem(v: &Value) -> Result<Vec<Cidr>, DataplaneError> {
    let bad = || DataplaneError::readback(format!("unexpected set element {v}"));
    match v {
        Value::String(s) => s.parse::<Cidr>().map(|c| vec![c]).map_err(|_| bad()),
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr: IpAddr = p["addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(bad)?;
                let len = p["len"]
                    .as_u64()
                    .and_then(|l| u8::try_from(l).ok())
                    .ok_or_else(bad)?;
                Cidr::new(addr, len).map(|c| vec![c]).map_err(|_| bad())
            } else if let Some(r) = o.get("range") {
                let a: IpAddr = r[0].as_str().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
                let b: IpAddr = r[1].as_str().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
                Cidr::from_range(a, b).ok_or_else(bad)
            } else if let Some(e) = o.get("elem") {
                parse_addr_elem(&e["val"])
            } else {
                Err(bad())
            }
        }
        _ => Err(bad()),
    }
}

fn parse_port_elem(v: &Value) -> Result<PortMatch, DataplaneError> {
    let bad = || DataplaneError::readback(format!("unexpected port element {v}"));
    let c = v.get("concat").and_then(Value::as_array).ok_or_else(bad)?;
    let protocol = match c.first().ok_or_else(bad)? {
        Value::String(s) => Protocol::parse(s),
        Value::Number(n) => match n.as_u64() {
            Some(6) => Some(Protocol::Tcp),
            Some(17) => Some(Protocol::Udp),
            Some(132) => Some(Protocol::Sctp),
            _ => None,
        },
        _ => None,
    }
    .ok_or_else(bad)?;
    let port = match c.get(1).ok_or_else(bad)? {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(PortMatch { protocol, port })
}

/// What one policy chain's rules say.
#[derive(Default)]
struct ChainRules {
    exclude: Option<String>,
    allow: Option<String>,
    ports: Option<String>,
    snat: Option<(String, IpAddr)>,
    unknown: usize,
}

fn set_ref(v: &Value) -> Option<String> {
    v.as_str()
        .and_then(|s| s.strip_prefix('@'))
        .map(str::to_string)
}

/// Reads `nft -j list table inet <table>` output back into egress policies.
pub fn parse_table(listing: &Value) -> Result<ParsedTable, DataplaneError> {
    let items = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| DataplaneError::readback("nft listing has no \"nftables\" array"))?;
    let mut sets: BTreeMap<String, &Value> = BTreeMap::new();
    let mut maps: BTreeMap<String, &Value> = BTreeMap::new();
    let mut chains: BTreeMap<String, ChainRules> = BTreeMap::new();
    for item in items {
        if let Some(s) = item.get("set") {
            sets.insert(s["name"].as_str().unwrap_or_default().to_string(), s);
        } else if let Some(m) = item.get("map") {
            maps.insert(m["name"].as_str().unwrap_or_default().to_string(), m);
        } else if let Some(c) = item.get("chain") {
            chains
                .entry(c["name"].as_str().unwrap_or_default().to_string())
                .or_default();
        } else if let Some(r) = item.get("rule") {
            let chain = r["chain"].as_str().unwrap_or_default();
            if chain == BASE_CHAIN {
                continue;
            }
            let cr = chains.entry(chain.to_string()).or_default();
            let exprs = r["expr"].as_array().cloned().unwrap_or_default();
            if let Some(nat) = exprs.iter().find_map(|e| e.get("snat")) {
                let name = r["comment"].as_str().and_then(policy_from_comment);
                let vip = nat["addr"].as_str().and_then(|a| a.parse::<IpAddr>().ok());
                match (name, vip) {
                    (Some(n), Some(v)) => cr.snat = Some((n.to_string(), v)),
                    _ => cr.unknown += 1,
                }
                continue;
            }
            let m = exprs.iter().find_map(|e| e.get("match"));
            let (op, left, right) = match m {
                Some(m) => (m["op"].as_str(), &m["left"], set_ref(&m["right"])),
                None => (None, &Value::Null, None),
            };
            let is_daddr = left["payload"]["field"] == "daddr";
            let is_ports = left.get("concat").is_some();
            match (op, right) {
                (Some("=="), Some(set)) if is_daddr => cr.exclude = Some(set),
                (Some("!="), Some(set)) if is_daddr => cr.allow = Some(set),
                (Some("!="), Some(set)) if is_ports => cr.ports = Some(set),
                _ => cr.unknown += 1,
            }
        }
    }
    let elems = |o: Option<&&Value>| -> Vec<Value> {
        o.and_then(|v| v.get("elem"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let mut stray = Vec::new();
    let mut sources: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for name in ["src4", "src6"] {
        for e in elems(maps.get(name)) {
            let key: Option<IpAddr> = e[0].as_str().and_then(|s| s.parse().ok());
            let target = e[1]["goto"]["target"].as_str();
            match (key, target) {
                (Some(k), Some(t)) => sources.entry(t.to_string()).or_default().push(k),
                _ => stray.push(format!("element {e} in map {name}")),
            }
        }
    }
    let mut used_sets: BTreeSet<String> = BTreeSet::new();
    let cidrs = |name: &Option<String>| -> Result<Option<Vec<Cidr>>, DataplaneError> {
        let Some(n) = name else { return Ok(None) };
        let set = sets
            .get(n)
            .ok_or_else(|| DataplaneError::readback(format!("rule refers to missing set {n}")))?;
        let mut out = Vec::new();
        for e in elems(Some(set)) {
            out.extend(parse_addr_elem(&e)?);
        }
        Ok(Some(out))
    };
    let mut egress = Vec::new();
    for (chain, cr) in &chains {
        if chain == BASE_CHAIN {
            continue;
        }
        for s in [&cr.exclude, &cr.allow, &cr.ports].into_iter().flatten() {
            used_sets.insert(s.clone());
        }
        let Some((name, vip)) = &cr.snat else {
            stray.push(format!("chain {chain} without a translation rule"));
            continue;
        };
        if nft_policy_chain(name) != *chain {
            stray.push(format!(
                "chain {chain} carries policy name {name:?} of another chain"
            ));
            continue;
        }
        if cr.unknown > 0 {
            stray.push(format!(
                "chain {chain} holds {} rule(s) kvip does not write",
                cr.unknown
            ));
        }
        let ex = cidrs(&cr.exclude)?.unwrap_or_default();
        let allow = cidrs(&cr.allow)?;
        let ports = match &cr.ports {
            Some(n) => Some(
                elems(sets.get(n))
                    .iter()
                    .map(parse_port_elem)
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let Some(srcs) = sources.remove(chain) else {
            stray.push(format!("chain {chain} (policy {name}) has no sources"));
            continue;
        };
        match EgressPolicy::new(name.clone(), *vip, srcs, ex, allow, ports) {
            Ok(p) => egress.push(p),
            Err(e) => stray.push(format!("chain {chain}: {e}")),
        }
    }
    for (chain, srcs) in sources {
        stray.push(format!(
            "{} sources point at missing chain {chain}",
            srcs.len()
        ));
    }
    for s in sets.keys().filter(|s| !used_sets.contains(*s)) {
        stray.push(format!("set {s} is not used by any policy"));
    }
    stray.extend(structure_drift(items, !egress.is_empty()));
    Ok(ParsedTable { egress, stray })
}

/// The `flags` line of a table's text listing (`table inet kvip {` then `flags dormant`).
fn table_flags(text: &str) -> Option<&str> {
    let mut lines = text.lines().map(str::trim);
    lines.next().filter(|l| l.starts_with("table "))?;
    lines.next()?.strip_prefix("flags ")
}

/// What in the table's own structure kvip would not have written (table flags are checked
/// before, see [`NftBackend::observe`]): the base chain's hook, priority and rules, hooked
/// policy chains, and the flags of its sets and maps. Each is drift: read back as stray, so `show` and the doctor name it and
/// the agent replaces the table.
fn structure_drift(items: &[Value], has_policies: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut base_seen = false;
    let mut base_rules = Vec::new();
    let flags = |v: &Value| -> Vec<String> {
        match &v["flags"] {
            Value::Array(a) => a
                .iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect(),
            Value::String(f) => vec![f.clone()],
            _ => Vec::new(),
        }
    };
    for item in items {
        if let Some(c) = item.get("chain") {
            let name = c["name"].as_str().unwrap_or_default();
            if name == BASE_CHAIN {
                base_seen = true;
                let ok = c["type"] == "nat"
                    && c["hook"] == "postrouting"
                    && c["prio"].as_i64() == Some(i64::from(NAT_PRIORITY))
                    && c["policy"] == "accept";
                if !ok {
                    out.push(format!(
                        "base chain {name} is type {} hook {} priority {} policy {} (kvip writes nat postrouting {NAT_PRIORITY} accept)",
                        c["type"], c["hook"], c["prio"], c["policy"]
                    ));
                }
            } else if c.get("hook").is_some() {
                out.push(format!(
                    "chain {name} is hooked (kvip's policy chains are not)"
                ));
            }
        } else if let Some(s) = item.get("set") {
            let name = s["name"].as_str().unwrap_or_default();
            let want: &[&str] = if name.starts_with("pt_") {
                &[]
            } else {
                &["interval"]
            };
            let f = flags(s);
            if f != want {
                out.push(format!("set {name} has flags {f:?} (kvip writes {want:?})"));
            }
        } else if let Some(m) = item.get("map") {
            let name = m["name"].as_str().unwrap_or_default();
            let f = flags(m);
            if !f.is_empty() || m["map"] != "verdict" {
                out.push(format!(
                    "map {name} has flags {f:?} and maps to {} (kvip writes a verdict map without flags)",
                    m["map"]
                ));
            }
        } else if let Some(r) = item.get("rule")
            && r["chain"] == BASE_CHAIN
        {
            base_rules.push(r["expr"].clone());
        }
    }
    if !has_policies {
        return out;
    }
    if !base_seen {
        out.push(format!(
            "base chain {BASE_CHAIN} is missing: no pod is translated"
        ));
        return out;
    }
    let dispatch = |proto: &str, map: &str| serde_json::json!([{"vmap": {"key": {"payload": {"protocol": proto, "field": "saddr"}}, "data": format!("@{map}")}}]);
    let want = [dispatch("ip", "src4"), dispatch("ip6", "src6")];
    if base_rules != want {
        out.push(format!(
            "base chain {BASE_CHAIN} holds {} rule(s) that are not kvip's dispatch by source (ip saddr vmap @src4, ip6 saddr vmap @src6)",
            base_rules.len()
        ));
    }
    out
}

/// How many objects (chains, rules, sets, maps) kvip's table holds for `state`.
pub fn object_count(state: &DesiredState) -> usize {
    if state.egress().is_empty() {
        return 0;
    }
    render_full("kvip", state).map_or(0, |b| b.cmds.len().saturating_sub(3))
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

/// `nft -j list table inet <table>`; `None` when the table does not exist.
pub async fn nft_list_table(table: &str) -> Result<Option<Value>, DataplaneError> {
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
    serde_json::from_str(&out.stdout)
        .map(Some)
        .map_err(|e| DataplaneError::readback(format!("nft printed invalid JSON: {e}")))
}

/// Human-readable listing of the table (`nft list table inet <table>`); empty when missing.
pub async fn nft_list_text(table: &str) -> Result<String, DataplaneError> {
    let out = run_tool("nft", &["list", "table", "inet", table], None).await?;
    if !out.status_ok {
        if out.stderr.contains("No such file or directory") {
            return Ok(String::new());
        }
        return Err(DataplaneError::ToolFailed {
            tool: "nft".into(),
            args: format!("list table inet {table}"),
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
}

impl NftBackend {
    pub fn new(table: String) -> Self {
        NftBackend {
            table,
            applied: None,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Forget what was applied: the next apply is a full replace.
    pub fn invalidate(&mut self) {
        self.applied = None;
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
                match nft_apply(&doc.to_json()).await {
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
        nft_apply(&doc.to_json()).await?;
        self.applied = Some(desired.clone());
        Ok(EgressSync {
            mode: SyncMode::Full,
            objects_written: objects,
            ..EgressSync::default()
        })
    }

    pub async fn observe(&self) -> Result<ParsedTable, DataplaneError> {
        // Table flags first, from the text listing: with flags set, nft's JSON listing is
        // not always valid (nft 1.0.6 prints `"flags": "ipv4_addr"` or stops short).
        let text = nft_list_text(&self.table).await?;
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
            Some(v) => parse_table(&v),
        }
    }
}
