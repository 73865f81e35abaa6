//! The iptables backend: kvip-owned chains in the nat table, written with
//! `iptables-restore --noflush` (one atomic commit per family), one jump at the top of
//! POSTROUTING. Works with the legacy and the nf_tables variant; the variant the host uses is
//! detected unless configured.
//!
//! Chains (prefix `KVIP-`, or `KVIP-<INSTANCE>-`):
//! - `POST`: one rule per pod address, `-s <pod> -j E-<id>` (linear: the iptables limit);
//! - `E-<id>`: `-d <excluded> -j RETURN`, then `-d <allowed> -j S-<id>` (or `-j S-<id>`);
//! - `S-<id>`: the SNAT rule(s), one per port match, carrying the policy name as comment.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::str::FromStr;

use kvip_core::{Cidr, EgressPolicy, Family, PortMatch, Protocol};

use crate::error::DataplaneError;
use crate::exec::{run_ok, run_tool};
use crate::names::{ipt_policy_id, policy_comment, policy_from_comment};

/// Which iptables implementation the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Legacy,
    Nft,
}

impl FromStr for Variant {
    type Err = DataplaneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "legacy" => Ok(Variant::Legacy),
            "nft" | "nf_tables" => Ok(Variant::Nft),
            other => Err(DataplaneError::Config(format!(
                "iptables variant {other:?}: expected legacy or nft"
            ))),
        }
    }
}

impl Variant {
    pub fn save_cmd(self, f: Family) -> &'static str {
        match (self, f) {
            (Variant::Legacy, Family::V4) => "iptables-legacy-save",
            (Variant::Legacy, Family::V6) => "ip6tables-legacy-save",
            (Variant::Nft, Family::V4) => "iptables-nft-save",
            (Variant::Nft, Family::V6) => "ip6tables-nft-save",
        }
    }

    pub fn restore_cmd(self, f: Family) -> &'static str {
        match (self, f) {
            (Variant::Legacy, Family::V4) => "iptables-legacy-restore",
            (Variant::Legacy, Family::V6) => "ip6tables-legacy-restore",
            (Variant::Nft, Family::V4) => "iptables-nft-restore",
            (Variant::Nft, Family::V6) => "ip6tables-nft-restore",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Legacy => "legacy",
            Variant::Nft => "nft",
        }
    }
}

/// Number of rules (`-A` lines) a variant holds, or `None` when its tools do not run.
pub async fn rule_count(v: Variant) -> Option<usize> {
    let mut total = 0;
    let mut any = false;
    for f in [Family::V4, Family::V6] {
        if let Ok(out) = run_tool(v.save_cmd(f), &[], None).await
            && out.status_ok
        {
            any = true;
            total += out.stdout.lines().filter(|l| l.starts_with("-A ")).count();
        }
    }
    any.then_some(total)
}

/// Picks the variant the host already uses: the one holding more rules (kube-proxy, the CNI);
/// nf_tables when neither holds any or only it runs.
pub async fn detect_variant() -> Result<Variant, DataplaneError> {
    match (
        rule_count(Variant::Nft).await,
        rule_count(Variant::Legacy).await,
    ) {
        (Some(n), Some(l)) => Ok(if l > n { Variant::Legacy } else { Variant::Nft }),
        (Some(_), None) => Ok(Variant::Nft),
        (None, Some(_)) => Ok(Variant::Legacy),
        (None, None) => Err(DataplaneError::ToolMissing {
            tool: "iptables-save".into(),
            hint: "install the iptables package (apt-get install iptables)",
        }),
    }
}

/// Chain names of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chains {
    prefix: String,
}

impl Chains {
    pub fn new(prefix: String) -> Self {
        Chains { prefix }
    }
    pub fn post(&self) -> String {
        format!("{}POST", self.prefix)
    }
    fn e(&self, id: &str) -> String {
        format!("{}E-{id}", self.prefix)
    }
    fn s(&self, id: &str) -> String {
        format!("{}S-{id}", self.prefix)
    }
    /// Whether `name` is a chain of exactly this instance.
    pub fn owns(&self, name: &str) -> bool {
        if name == self.post() {
            return true;
        }
        self.policy_id(name).is_some()
    }
    fn policy_id<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        let id = rest
            .strip_prefix("E-")
            .or_else(|| rest.strip_prefix("S-"))?;
        (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
    fn jump_rule(&self) -> String {
        format!("-A POSTROUTING -j {}", self.post())
    }
}

fn host_or_cidr(c: &Cidr) -> String {
    c.to_string()
}

fn src_spec(a: IpAddr) -> String {
    Cidr::host(a).to_string()
}

fn quote_comment(c: &str) -> String {
    if c.chars()
        .all(|ch| ch.is_ascii_alphanumeric() || "-_./:".contains(ch))
    {
        c.to_string()
    } else {
        format!("\"{c}\"")
    }
}

/// The rules of kvip's chains for one family, in the exact form `iptables-save` prints them,
/// so what is in the kernel can be compared line by line. Returns (chains, rules).
pub fn render_rules(
    chains: &Chains,
    policies: &[&EgressPolicy],
) -> Result<(Vec<String>, Vec<String>), DataplaneError> {
    if policies.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut owner: BTreeMap<String, &str> = BTreeMap::new();
    let mut names = vec![chains.post()];
    let mut post = Vec::new();
    let mut body = Vec::new();
    for p in policies {
        let id = ipt_policy_id(p.name());
        if let Some(first) = owner.insert(id.clone(), p.name()) {
            return Err(DataplaneError::NameCollision {
                kind: "iptables chain",
                name: chains.e(&id),
                first: first.to_string(),
                second: p.name().to_string(),
            });
        }
        let (e, s) = (chains.e(&id), chains.s(&id));
        names.push(e.clone());
        names.push(s.clone());
        for src in p.sources() {
            post.push(format!("-A {} -s {} -j {e}", chains.post(), src_spec(*src)));
        }
        for c in p.exclude() {
            // iptables-save prints no `-d` for the catch-all: neither does kvip.
            match c.prefix_len() {
                0 => body.push(format!("-A {e} -j RETURN")),
                _ => body.push(format!("-A {e} -d {} -j RETURN", host_or_cidr(c))),
            }
        }
        match p.allow() {
            Some(allow) => {
                for c in allow {
                    body.push(format!("-A {e} -d {} -j {s}", host_or_cidr(c)));
                }
            }
            None => body.push(format!("-A {e} -j {s}")),
        }
        let comment = quote_comment(&policy_comment(p.name()));
        let target = format!(
            "-m comment --comment {comment} -j SNAT --to-source {}",
            p.vip()
        );
        match p.ports() {
            Some(ports) => {
                for pm in ports {
                    let proto = pm.protocol.as_str();
                    body.push(format!(
                        "-A {s} -p {proto} -m {proto} --dport {} {target}",
                        pm.port
                    ));
                }
            }
            None => body.push(format!("-A {s} {target}")),
        }
    }
    post.extend(body);
    Ok((names, post))
}

/// What `iptables-save -t nat` shows of kvip's objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatView {
    /// kvip's chains, in listing order.
    pub chains: Vec<String>,
    /// Rules of kvip's chains, in listing order.
    pub rules: Vec<String>,
    /// Positions (0-based) of jumps to kvip's POST chain within POSTROUTING.
    pub jumps: Vec<usize>,
    /// Number of POSTROUTING rules.
    pub postrouting_rules: usize,
}

/// Extracts kvip's part of an `iptables-save -t nat` listing.
pub fn parse_nat(chains: &Chains, save: &str) -> NatView {
    let mut v = NatView::default();
    let mut in_nat = false;
    let jump = chains.jump_rule();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if chains.owns(name) {
                v.chains.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or_default();
            if chain == "POSTROUTING" {
                if line == jump {
                    v.jumps.push(v.postrouting_rules);
                }
                v.postrouting_rules += 1;
            } else if chains.owns(chain) {
                v.rules.push(line.to_string());
            }
        }
    }
    v
}

/// The `iptables-restore --noflush` input that turns `current` into the rendered state:
/// declared chains are created or flushed, refilled, stale chains flushed and deleted, and
/// the jump placed once at the top of POSTROUTING. `None` when nothing needs to change.
pub fn render_restore(
    chains: &Chains,
    policies: &[&EgressPolicy],
    current: &NatView,
) -> Result<Option<String>, DataplaneError> {
    let (names, rules) = render_rules(chains, policies)?;
    let want_jump = !names.is_empty();
    let jump_ok = if want_jump {
        current.jumps == [0]
    } else {
        current.jumps.is_empty()
    };
    let mut have: Vec<String> = current.chains.clone();
    have.sort();
    let mut want = names.clone();
    want.sort();
    // iptables-save lists chains in its own order (legacy sorts them): compare rule lists
    // chain by chain, where order matters.
    if jump_ok && have == want && by_chain(&current.rules) == by_chain(&rules) {
        return Ok(None);
    }
    let stale: Vec<&String> = current
        .chains
        .iter()
        .filter(|c| !names.contains(c))
        .collect();
    let mut out = String::from("*nat\n");
    for c in names.iter().chain(stale.iter().copied()) {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in &rules {
        out.push_str(r);
        out.push('\n');
    }
    if !jump_ok {
        for _ in &current.jumps {
            out.push_str(&format!("-D POSTROUTING -j {}\n", chains.post()));
        }
        if want_jump {
            out.push_str(&format!("-I POSTROUTING 1 -j {}\n", chains.post()));
        }
    }
    for c in stale {
        out.push_str(&format!("-X {c}\n"));
    }
    out.push_str("COMMIT\n");
    Ok(Some(out))
}

fn by_chain(rules: &[String]) -> BTreeMap<&str, Vec<&str>> {
    let mut m: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in rules {
        let chain = r.split_whitespace().nth(1).unwrap_or_default();
        m.entry(chain).or_default().push(r);
    }
    m
}

/// Splits a saved rule into words, honouring double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

fn opt<'a>(w: &'a [String], flag: &str) -> Option<&'a str> {
    w.iter()
        .position(|x| x == flag)
        .and_then(|i| w.get(i + 1))
        .map(String::as_str)
}

/// Read-back: kvip's rules (of one family) into egress policies, plus stray objects.
pub fn parse_policies(chains: &Chains, view: &NatView) -> (Vec<EgressPolicy>, Vec<String>) {
    #[derive(Default)]
    struct Acc {
        sources: Vec<IpAddr>,
        exclude: Vec<Cidr>,
        /// `-j RETURN` without `-d`: iptables-save writes `-d 0.0.0.0/0` (`::/0`) so.
        exclude_all: bool,
        allow: Vec<Cidr>,
        direct: bool,
        ports: Vec<PortMatch>,
        any_port_rule: bool,
        all_ports: bool,
        name: Option<String>,
        vip: Option<IpAddr>,
    }
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    let mut stray = Vec::new();
    let parse_net = |s: &str| s.parse::<Cidr>().ok();
    for line in &view.rules {
        let w = words(line);
        let Some(chain) = w.get(1) else { continue };
        let jump = opt(&w, "-j").unwrap_or_default();
        if *chain == chains.post() {
            match (opt(&w, "-s").and_then(parse_net), chains.policy_id(jump)) {
                (Some(c), Some(id)) if c.is_host() => acc
                    .entry(id.to_string())
                    .or_default()
                    .sources
                    .push(c.addr()),
                _ => stray.push(line.clone()),
            }
            continue;
        }
        let Some(id) = chains.policy_id(chain) else {
            continue;
        };
        let a = acc.entry(id.to_string()).or_default();
        if chain.starts_with(&format!("{}E-", chains.prefix)) {
            match (opt(&w, "-d").and_then(parse_net), jump) {
                (Some(c), "RETURN") => a.exclude.push(c),
                (None, "RETURN") => a.exclude_all = true,
                (Some(c), j) if chains.policy_id(j) == Some(id) => a.allow.push(c),
                (None, j) if chains.policy_id(j) == Some(id) => a.direct = true,
                _ => stray.push(line.clone()),
            }
        } else if jump == "SNAT" {
            let name = opt(&w, "--comment")
                .and_then(policy_from_comment)
                .map(str::to_string);
            let vip = opt(&w, "--to-source").and_then(|v| v.parse::<IpAddr>().ok());
            a.name = name.or(a.name.take());
            a.vip = vip.or(a.vip);
            match (
                opt(&w, "-p").and_then(Protocol::parse),
                opt(&w, "--dport").and_then(|p| p.parse::<u16>().ok()),
            ) {
                (Some(protocol), Some(port)) => {
                    a.any_port_rule = true;
                    a.ports.push(PortMatch { protocol, port });
                }
                _ => a.all_ports = true,
            }
        } else {
            stray.push(line.clone());
        }
    }
    let mut out = Vec::new();
    for (id, a) in acc {
        let (Some(name), Some(vip)) = (a.name.clone(), a.vip) else {
            stray.push(format!("policy chains {id} without a translation rule"));
            continue;
        };
        if ipt_policy_id(&name) != id {
            stray.push(format!(
                "policy chains {id} carry the name {name:?} of another policy"
            ));
            continue;
        }
        if a.sources.is_empty() {
            stray.push(format!("policy chains {id} ({name}) have no sources"));
            continue;
        }
        if a.direct != a.allow.is_empty() || a.any_port_rule == a.all_ports {
            stray.push(format!(
                "policy chains {id} ({name}) are not in the form kvip writes"
            ));
            continue;
        }
        let allow = (!a.direct).then_some(a.allow);
        let ports = a.any_port_rule.then_some(a.ports);
        let mut exclude = a.exclude;
        if a.exclude_all {
            exclude.push(Cidr::containing(vip, 0));
        }
        match EgressPolicy::new(name, vip, a.sources, exclude, allow, ports) {
            Ok(p) => out.push(p),
            Err(e) => stray.push(format!("policy chains {id}: {e}")),
        }
    }
    (out, stray)
}

/// Whether the kernel has loaded the legacy nat table of family `f` in this thread's network
/// namespace (`/proc/net/ip_tables_names`, `ip6_tables_names`; absent when the legacy
/// modules are not loaded).
fn legacy_nat_loaded(f: Family) -> Result<bool, DataplaneError> {
    let path = match f {
        Family::V4 => "/proc/thread-self/net/ip_tables_names",
        Family::V6 => "/proc/thread-self/net/ip6_tables_names",
    };
    match std::fs::read_to_string(path) {
        Ok(names) => Ok(names.lines().any(|l| l.trim() == "nat")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DataplaneError::Io {
            tool: path.into(),
            source,
        }),
    }
}

/// The iptables backend for one instance and variant.
#[derive(Debug, Clone)]
pub struct IptBackend {
    pub chains: Chains,
    pub variant: Variant,
}

/// What one apply did to one family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IptSync {
    pub written: bool,
    pub rules: usize,
    /// kvip's rules of this family before the write (all replaced by it).
    pub removed: usize,
}

impl IptBackend {
    pub fn new(prefix: String, variant: Variant) -> Self {
        IptBackend {
            chains: Chains::new(prefix),
            variant,
        }
    }

    /// `iptables-save -t nat` of this variant and family. For iptables-legacy, a nat table
    /// the kernel has not loaded in this namespace holds nothing, and is not listed: listing
    /// it would load it (a side effect on a node that never used iptables-legacy).
    pub async fn save(&self, f: Family) -> Result<String, DataplaneError> {
        if self.variant == Variant::Legacy && !legacy_nat_loaded(f)? {
            return Ok(String::new());
        }
        run_ok(self.variant.save_cmd(f), &["-t", "nat"], None).await
    }

    /// Makes kvip's chains of family `f` hold exactly `policies`; writes only when they differ.
    pub async fn apply_family(
        &self,
        f: Family,
        policies: &[&EgressPolicy],
    ) -> Result<IptSync, DataplaneError> {
        let view = parse_nat(&self.chains, &self.save(f).await?);
        match render_restore(&self.chains, policies, &view)? {
            None => Ok(IptSync {
                written: false,
                rules: view.rules.len(),
                removed: 0,
            }),
            Some(input) => {
                run_ok(
                    self.variant.restore_cmd(f),
                    &["--noflush"],
                    Some(input.as_bytes()),
                )
                .await?;
                Ok(IptSync {
                    written: true,
                    rules: input.lines().filter(|l| l.starts_with("-A ")).count(),
                    removed: view.rules.len(),
                })
            }
        }
    }

    pub async fn observe_family(
        &self,
        f: Family,
    ) -> Result<(Vec<EgressPolicy>, Vec<String>), DataplaneError> {
        let view = parse_nat(&self.chains, &self.save(f).await?);
        let (p, mut stray) = parse_policies(&self.chains, &view);
        if !view.chains.is_empty() && view.jumps != [0] {
            stray.push(format!(
                "jump to {} is not (only) the first rule of POSTROUTING (positions {:?})",
                self.chains.post(),
                view.jumps
            ));
        }
        Ok((p, stray))
    }

    /// Whether this variant holds any object of this instance.
    pub async fn holds_anything(&self) -> Result<bool, DataplaneError> {
        for f in [Family::V4, Family::V6] {
            let view = parse_nat(&self.chains, &self.save(f).await?);
            if !view.chains.is_empty() || !view.jumps.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Policies of one family, in name order.
pub fn of_family(policies: &[EgressPolicy], f: Family) -> Vec<&EgressPolicy> {
    policies.iter().filter(|p| p.family() == f).collect()
}
