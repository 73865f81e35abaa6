//! Reading kvip's nftables table back: `nft -j list table` into the model, and everything in
//! the table kvip would not have written, reported as stray so that drift cannot hide.
//!
//! The listing is read into a typed form that borrows from nft's output: the source maps
//! (one element per translated pod, the bulk of the listing) become pairs of strings, not a
//! JSON tree, so reading back 10,000 pods costs a few megabytes, not tens.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use kvip_core::{Cidr, EgressPolicy, PortMatch, Protocol};
use serde::Deserialize;
use serde_json::Value;

use crate::error::DataplaneError;
use crate::names::{nft_policy_chain, policy_from_comment};
use crate::nft::{BASE_CHAIN, NAT_PRIORITY};

/// `{"nftables": [...]}` as nft lists a table.
#[derive(Deserialize)]
struct Listing<'a> {
    #[serde(borrow)]
    nftables: Vec<Item<'a>>,
}

/// One object of the listing (`{"set": ...}`, `{"map": ...}`, …); the table and metainfo
/// objects are not read.
#[derive(Deserialize)]
struct Item<'a> {
    set: Option<Value>,
    #[serde(borrow)]
    map: Option<MapObj<'a>>,
    #[serde(borrow)]
    chain: Option<ChainObj<'a>>,
    #[serde(borrow)]
    rule: Option<RuleObj<'a>>,
}

/// A chain: its name and, for a base chain, its hook. Kept as values where a hand-made
/// change could put something of another type (shown as listed).
#[derive(Deserialize)]
struct ChainObj<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, rename = "type")]
    kind: Value,
    #[serde(default)]
    hook: Value,
    #[serde(default)]
    prio: Value,
    #[serde(default)]
    policy: Value,
}

/// A rule: its chain, comment and expressions.
#[derive(Deserialize)]
struct RuleObj<'a> {
    #[serde(borrow)]
    chain: Cow<'a, str>,
    #[serde(default, borrow)]
    comment: Option<Cow<'a, str>>,
    #[serde(default)]
    expr: Vec<Value>,
}

/// A map, its elements typed for kvip's `address : goto chain` and anything else kept as is.
#[derive(Deserialize)]
struct MapObj<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default)]
    flags: Value,
    #[serde(default)]
    map: Value,
    #[serde(default, borrow)]
    elem: Vec<MapElem<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MapElem<'a> {
    Goto(#[serde(borrow)] Cow<'a, str>, GotoVerdict<'a>),
    Other(Value),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GotoVerdict<'a> {
    #[serde(borrow)]
    goto: Target<'a>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target<'a> {
    #[serde(borrow)]
    target: Cow<'a, str>,
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

/// Reads `nft -j list table inet <table>` output (the JSON text) back into egress policies.
pub fn parse_table(listing: &str) -> Result<ParsedTable, DataplaneError> {
    let listing: Listing<'_> = serde_json::from_str(listing)
        .map_err(|e| DataplaneError::readback(format!("nft printed an unexpected listing: {e}")))?;
    let items = &listing.nftables;
    let mut sets: BTreeMap<String, &Value> = BTreeMap::new();
    let mut maps: BTreeMap<&str, &MapObj<'_>> = BTreeMap::new();
    let mut chains: BTreeMap<String, ChainRules> = BTreeMap::new();
    for item in items {
        if let Some(s) = &item.set {
            sets.insert(s["name"].as_str().unwrap_or_default().to_string(), s);
        } else if let Some(m) = &item.map {
            maps.insert(&m.name, m);
        } else if let Some(c) = &item.chain {
            chains.entry(c.name.to_string()).or_default();
        } else if let Some(r) = &item.rule {
            let chain: &str = &r.chain;
            if chain == BASE_CHAIN {
                continue;
            }
            let cr = chains.entry(chain.to_string()).or_default();
            let exprs = r.expr.as_slice();
            if let Some(nat) = exprs.iter().find_map(|e| e.get("snat")) {
                let name = r.comment.as_deref().and_then(policy_from_comment);
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
    fn elems<'v>(o: Option<&&'v Value>) -> &'v [Value] {
        o.and_then(|v| v.get("elem"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
    let mut stray = Vec::new();
    let mut sources: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for name in ["src4", "src6"] {
        for e in maps
            .get(name)
            .map(|m| m.elem.as_slice())
            .unwrap_or_default()
        {
            match e {
                MapElem::Goto(key, v) => match key.parse::<IpAddr>() {
                    Ok(k) => sources
                        .entry(v.goto.target.to_string())
                        .or_default()
                        .push(k),
                    Err(_) => stray.push(format!(
                        "element {key:?} : goto {} in map {name}",
                        v.goto.target
                    )),
                },
                MapElem::Other(e) => stray.push(format!("element {e} in map {name}")),
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
            out.extend(parse_addr_elem(e)?);
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
pub(crate) fn table_flags(text: &str) -> Option<&str> {
    let mut lines = text.lines().map(str::trim);
    lines.next().filter(|l| l.starts_with("table "))?;
    lines.next()?.strip_prefix("flags ")
}

/// What in the table's own structure kvip would not have written (table flags are checked
/// before, see [`crate::nft::NftBackend::observe`]): the base chain's hook, priority and rules, hooked
/// policy chains, and the flags of its sets and maps. Each is drift: read back as stray, so `show` and the doctor name it and
/// the agent replaces the table.
fn structure_drift(items: &[Item<'_>], has_policies: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut base_seen = false;
    let mut base_rules = Vec::new();
    let flags = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect(),
            Value::String(f) => vec![f.clone()],
            _ => Vec::new(),
        }
    };
    for item in items {
        if let Some(c) = &item.chain {
            let name: &str = &c.name;
            if name == BASE_CHAIN {
                base_seen = true;
                let ok = c.kind == "nat"
                    && c.hook == "postrouting"
                    && c.prio.as_i64() == Some(i64::from(NAT_PRIORITY))
                    && c.policy == "accept";
                if !ok {
                    out.push(format!(
                        "base chain {name} is type {} hook {} priority {} policy {} (kvip writes nat postrouting {NAT_PRIORITY} accept)",
                        c.kind, c.hook, c.prio, c.policy
                    ));
                }
            } else if !c.hook.is_null() {
                out.push(format!(
                    "chain {name} is hooked (kvip's policy chains are not)"
                ));
            }
        } else if let Some(s) = &item.set {
            let name = s["name"].as_str().unwrap_or_default();
            let want: &[&str] = if name.starts_with("pt_") {
                &[]
            } else {
                &["interval"]
            };
            let f = flags(&s["flags"]);
            if f != want {
                out.push(format!("set {name} has flags {f:?} (kvip writes {want:?})"));
            }
        } else if let Some(m) = &item.map {
            let f = flags(&m.flags);
            if !f.is_empty() || m.map != "verdict" {
                out.push(format!(
                    "map {} has flags {f:?} and maps to {} (kvip writes a verdict map without flags)",
                    m.name, m.map
                ));
            }
        } else if let Some(r) = &item.rule
            && r.chain == BASE_CHAIN
        {
            base_rules.push(Value::Array(r.expr.clone()));
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
