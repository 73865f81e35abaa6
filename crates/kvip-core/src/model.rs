//! `DesiredState`: what this node must hold. Keyed by stable names so that backends can diff
//! two states and read their own objects back into the same model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::error::ModelError;
use crate::port::{PortMatch, PortParseError};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A virtual IP this node must hold on an interface.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VipClaim {
    pub address: IpAddr,
    pub interface: String,
}

/// Source NAT of a set of pods to a VIP, for destinations outside `exclude` (and, when given,
/// inside `allow` and on one of `ports`). Always valid: built only by [`EgressPolicy::new`].
///
/// Its content is shared: a clone is a reference count, so the states a node keeps (planned,
/// applied, cached by the backend) hold one copy of each policy, and comparing a policy with
/// its clone costs nothing.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EgressPolicy(Arc<PolicyData>);

impl std::ops::Deref for EgressPolicy {
    type Target = PolicyData;
    fn deref(&self) -> &PolicyData {
        &self.0
    }
}

impl fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The content of an [`EgressPolicy`], read through its accessors.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PolicyData {
    name: String,
    vip: IpAddr,
    sources: Vec<IpAddr>,
    exclude: Vec<Cidr>,
    allow: Option<Vec<Cidr>>,
    ports: Option<Vec<PortMatch>>,
}

/// The serialised form of an egress policy (the state file schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicySpec {
    pub name: String,
    pub vip: String,
    #[serde(default)]
    pub sources: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<String>>,
}

/// The serialised form of a VIP claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipClaimSpec {
    pub address: String,
    pub interface: String,
}

/// The serialised form of a desired state (YAML or JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredStateSpec {
    #[serde(default)]
    pub vips: Vec<VipClaimSpec>,
    #[serde(default)]
    pub egress: Vec<EgressPolicySpec>,
}

/// Maximum length of a policy name. The name travels in a rule comment (`kvip egress
/// <name>`), which nftables stores in at most 254 bytes and iptables in at most 255; 228
/// leaves room for the prefix with a margin. A Service's policy name (`namespace/name`, at
/// most 63 + 1 + 63 bytes, plus `/ipv6`) fits.
pub const MAX_NAME_LEN: usize = 228;

fn parse_addr(field: &str, value: &str) -> Result<IpAddr, ModelError> {
    value
        .trim()
        .parse()
        .map_err(|_| ModelError::InvalidAddress {
            field: field.to_string(),
            value: value.to_string(),
        })
}

fn parse_cidr(field: &str, value: &str) -> Result<Cidr, ModelError> {
    value
        .parse()
        .map_err(|e: crate::cidr::CidrParseError| ModelError::InvalidCidr {
            field: field.to_string(),
            value: value.to_string(),
            reason: e.0,
        })
}

fn check_family(field: &str, value: IpAddr, vip: IpAddr) -> Result<(), ModelError> {
    let (found, expected) = (Family::of(value), Family::of(vip));
    if found != expected {
        return Err(ModelError::MixedFamily {
            field: field.to_string(),
            value: value.to_string(),
            vip: vip.to_string(),
            found: found.name(),
            expected: expected.name(),
        });
    }
    Ok(())
}

fn check_name(field: &str, name: &str) -> Result<(), ModelError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 228 bytes (it is carried in a rule comment)")
    } else if name
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        Some("contains a control character, a quote or a backslash")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ModelError::InvalidName {
            field: field.to_string(),
            value: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_usable(field: &str, addr: IpAddr) -> Result<(), ModelError> {
    let reason = if addr.is_unspecified() {
        Some("unspecified address")
    } else if addr.is_multicast() {
        Some("multicast address")
    } else if addr.is_loopback() {
        Some("loopback address")
    } else if matches!(addr, IpAddr::V4(a) if a.is_broadcast()) {
        Some("broadcast address")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ModelError::UnusableAddress {
            field: field.to_string(),
            value: addr.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', no whitespace, not "." or "..".
pub fn check_interface(field: &str, name: &str) -> Result<(), ModelError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 15 {
        Some("longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("reserved name")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("contains '/', ':', whitespace or a control character")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ModelError::InvalidName {
            field: field.to_string(),
            value: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

impl VipClaim {
    pub fn new(address: IpAddr, interface: impl Into<String>) -> Result<Self, ModelError> {
        let interface = interface.into();
        check_usable("vips.address", address)?;
        check_interface("vips.interface", &interface)?;
        Ok(VipClaim { address, interface })
    }

    pub fn family(&self) -> Family {
        Family::of(self.address)
    }
}

impl EgressPolicy {
    /// Validates and canonicalises a policy: sources sorted and deduplicated, CIDR lists
    /// without duplicates or contained networks, ports sorted. Every address must be of the
    /// VIP's family.
    pub fn new(
        name: impl Into<String>,
        vip: IpAddr,
        sources: Vec<IpAddr>,
        exclude: Vec<Cidr>,
        allow: Option<Vec<Cidr>>,
        ports: Option<Vec<PortMatch>>,
    ) -> Result<Self, ModelError> {
        let name = name.into();
        check_name("egress.name", &name)?;
        let f = |field: &str| format!("egress[{name}].{field}");
        check_usable(&f("vip"), vip)?;
        if sources.is_empty() {
            return Err(ModelError::EmptyList {
                field: f("sources"),
            });
        }
        for s in &sources {
            check_family(&f("sources"), *s, vip)?;
            check_usable(&f("sources"), *s)?;
        }
        for c in &exclude {
            check_family(&f("exclude"), c.addr(), vip)?;
        }
        if let Some(allow) = &allow {
            if allow.is_empty() {
                return Err(ModelError::EmptyList { field: f("allow") });
            }
            for c in allow {
                check_family(&f("allow"), c.addr(), vip)?;
            }
        }
        if let Some(ports) = &ports
            && ports.is_empty()
        {
            return Err(ModelError::EmptyList { field: f("ports") });
        }
        let sources: Vec<IpAddr> = sources
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let ports = ports.map(|p| p.into_iter().collect::<BTreeSet<_>>().into_iter().collect());
        Ok(EgressPolicy(Arc::new(PolicyData {
            name,
            vip,
            sources,
            exclude: Cidr::canonicalize(exclude),
            // Allowing every destination is no restriction at all: one form for both, so
            // every backend reads it back the same (iptables-save drops `-d 0.0.0.0/0`).
            allow: allow
                .map(Cidr::canonicalize)
                .filter(|a| !a.iter().any(|c| c.prefix_len() == 0)),
            ports,
        })))
    }

    /// Parses the serialised form, naming the field and value of the first problem.
    pub fn from_spec(spec: &EgressPolicySpec) -> Result<Self, ModelError> {
        check_name("egress.name", &spec.name)?;
        let f = |field: &str| format!("egress[{}].{field}", spec.name);
        let vip = parse_addr(&f("vip"), &spec.vip)?;
        let sources = spec
            .sources
            .iter()
            .map(|s| parse_addr(&f("sources"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let exclude = spec
            .exclude
            .iter()
            .map(|s| parse_cidr(&f("exclude"), s))
            .collect::<Result<Vec<_>, _>>()?;
        let allow = spec
            .allow
            .as_ref()
            .map(|l| {
                l.iter()
                    .map(|s| parse_cidr(&f("allow"), s))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let ports = spec
            .ports
            .as_ref()
            .map(|l| {
                l.iter()
                    .map(|s| {
                        s.parse::<PortMatch>().map_err(|e| match e {
                            PortParseError::UnknownProtocol(p) => ModelError::UnknownProtocol {
                                field: f("ports"),
                                value: p,
                            },
                            PortParseError::InvalidPort(v, reason) => ModelError::InvalidPort {
                                field: f("ports"),
                                value: v,
                                reason,
                            },
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        EgressPolicy::new(spec.name.clone(), vip, sources, exclude, allow, ports)
    }

    pub fn to_spec(&self) -> EgressPolicySpec {
        EgressPolicySpec {
            name: self.name.clone(),
            vip: self.vip.to_string(),
            sources: self.sources.iter().map(IpAddr::to_string).collect(),
            exclude: self.exclude.iter().map(Cidr::to_string).collect(),
            allow: self
                .allow
                .as_ref()
                .map(|l| l.iter().map(Cidr::to_string).collect()),
            ports: self
                .ports
                .as_ref()
                .map(|l| l.iter().map(PortMatch::to_string).collect()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn vip(&self) -> IpAddr {
        self.vip
    }
    pub fn family(&self) -> Family {
        Family::of(self.vip)
    }
    /// Pod addresses, sorted and unique.
    pub fn sources(&self) -> &[IpAddr] {
        &self.sources
    }
    /// Destinations never translated, canonical.
    pub fn exclude(&self) -> &[Cidr] {
        &self.exclude
    }
    /// When set, only these destinations are translated.
    pub fn allow(&self) -> Option<&[Cidr]> {
        self.allow.as_deref()
    }
    /// When set, only these destination ports are translated.
    pub fn ports(&self) -> Option<&[PortMatch]> {
        self.ports.as_deref()
    }

    /// The same policy with other sources (validated again).
    pub fn with_sources(&self, sources: Vec<IpAddr>) -> Result<Self, ModelError> {
        EgressPolicy::new(
            self.name.clone(),
            self.vip,
            sources,
            self.exclude.clone(),
            self.allow.clone(),
            self.ports.clone(),
        )
    }

    /// Whether two policies translate a given source the same way (everything but the name
    /// and the source list is equal).
    pub fn same_translation(&self, other: &EgressPolicy) -> bool {
        self.vip == other.vip
            && self.exclude == other.exclude
            && self.allow == other.allow
            && self.ports == other.ports
    }
}

/// What kind of kernel object differs between a desired and an observed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DriftKind {
    /// A VIP address missing or extra.
    Address,
    /// A policy's rules (missing, extra, or translating differently).
    Rule,
    /// A policy's rules intact but its source elements differ.
    SetElement,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Address => "address",
            DriftKind::Rule => "rule",
            DriftKind::SetElement => "set_element",
        }
    }
}

/// Everything this node must hold. Always valid: built only through [`DesiredState::new`]
/// (or deserialisation, which calls it). Lists are kept sorted, so two states holding the same
/// things compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "DesiredStateSpec", into = "DesiredStateSpec")]
pub struct DesiredState {
    vips: Vec<VipClaim>,
    egress: Vec<EgressPolicy>,
}

impl DesiredState {
    /// Validates a whole state: unique VIPs, unique policy names, and no source in two
    /// policies (a typed [`ModelError::SourceConflict`] naming both).
    pub fn new(mut vips: Vec<VipClaim>, mut egress: Vec<EgressPolicy>) -> Result<Self, ModelError> {
        vips.sort();
        vips.dedup();
        let mut seen_vip: BTreeMap<IpAddr, &str> = BTreeMap::new();
        for v in &vips {
            check_usable("vips.address", v.address)?;
            check_interface("vips.interface", &v.interface)?;
            if let Some(first) = seen_vip.insert(v.address, &v.interface) {
                return Err(ModelError::DuplicateVip {
                    address: v.address.to_string(),
                    first: first.to_string(),
                    second: v.interface.clone(),
                });
            }
        }
        egress.sort_by(|a, b| a.name.cmp(&b.name));
        for pair in egress.windows(2) {
            if pair[0].name == pair[1].name {
                return Err(ModelError::DuplicatePolicy {
                    name: pair[0].name.clone(),
                });
            }
        }
        // By index into the (sorted) policies: the first owner is the policy earlier by name.
        let total = egress.iter().map(|p| p.sources.len()).sum();
        let mut owner: HashMap<IpAddr, usize> = HashMap::with_capacity(total);
        for (i, p) in egress.iter().enumerate() {
            for s in &p.sources {
                if let Some(first) = owner.insert(*s, i) {
                    return Err(ModelError::SourceConflict {
                        source_ip: s.to_string(),
                        first: egress[first].name.clone(),
                        second: p.name.clone(),
                    });
                }
            }
        }
        Ok(DesiredState { vips, egress })
    }

    pub fn empty() -> Self {
        DesiredState::default()
    }

    pub fn vips(&self) -> &[VipClaim] {
        &self.vips
    }

    /// Policies sorted by name.
    pub fn egress(&self) -> &[EgressPolicy] {
        &self.egress
    }

    pub fn policy(&self, name: &str) -> Option<&EgressPolicy> {
        self.egress
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.egress[i])
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.egress.is_empty()
    }

    /// Total number of translated pod addresses.
    pub fn source_count(&self) -> usize {
        self.egress.iter().map(|p| p.sources.len()).sum()
    }

    /// Sources whose translation differs between `self` (before) and `next`: added, removed,
    /// or moved to a policy that translates differently. Their connection-tracking entries
    /// must be flushed so that existing flows do not keep a stale translation.
    ///
    /// A policy equal in both states keeps its sources' translation (no source is in two
    /// policies of one state), so only the sources of policies that differ are looked at:
    /// the cost follows the change, not the size of the state.
    pub fn changed_sources(&self, next: &DesiredState) -> BTreeSet<IpAddr> {
        let mut before: HashMap<IpAddr, &EgressPolicy> = HashMap::new();
        let mut after: HashMap<IpAddr, &EgressPolicy> = HashMap::new();
        let (mut a, mut b) = (self.egress.iter().peekable(), next.egress.iter().peekable());
        // Both are sorted by name.
        loop {
            let (p, q) = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(p), Some(q)) => match p.name.cmp(&q.name) {
                    std::cmp::Ordering::Equal => (a.next(), b.next()),
                    std::cmp::Ordering::Less => (a.next(), None),
                    std::cmp::Ordering::Greater => (None, b.next()),
                },
                (Some(_), None) => (a.next(), None),
                (None, Some(_)) => (None, b.next()),
            };
            if let (Some(p), Some(q)) = (p, q)
                && p == q
            {
                continue;
            }
            if let Some(p) = p {
                before.extend(p.sources.iter().map(|s| (*s, p)));
            }
            if let Some(q) = q {
                after.extend(q.sources.iter().map(|s| (*s, q)));
            }
        }
        let mut out = BTreeSet::new();
        for (s, p) in &before {
            match after.get(s) {
                Some(q) if p.same_translation(q) => {}
                _ => {
                    out.insert(*s);
                }
            }
        }
        out.extend(after.keys().filter(|s| !before.contains_key(s)));
        out
    }

    /// The part of `self` whose VIPs and policies pass the filters. A part of a valid state
    /// is valid; should it not be, holding nothing is always safe.
    pub fn subset(
        &self,
        keep_vip: impl Fn(&VipClaim) -> bool,
        keep_policy: impl Fn(&EgressPolicy) -> bool,
    ) -> DesiredState {
        let vips = self.vips.iter().filter(|v| keep_vip(v)).cloned().collect();
        let egress = self
            .egress
            .iter()
            .filter(|p| keep_policy(p))
            .cloned()
            .collect();
        DesiredState::new(vips, egress).unwrap_or_default()
    }

    /// What of `self` (the state the kernel holds) `next` keeps: the VIPs `next` also claims
    /// on the same interface, and the policies `next` also has by name and VIP, as they are in
    /// `self`. Moving from `self` to it only removes: what a node does when `next` cannot be
    /// applied, so that a lost VIP still leaves.
    pub fn retained_in(&self, next: &DesiredState) -> DesiredState {
        self.subset(
            |v| next.vips.contains(v),
            |p| {
                self.vips
                    .iter()
                    .any(|v| v.address == p.vip && next.vips.contains(v))
                    && next.policy(&p.name).is_some_and(|n| n.vip == p.vip)
            },
        )
    }

    /// The kinds of difference between this (desired) state and `observed` (empty when
    /// they are equal).
    pub fn drift(&self, observed: &DesiredState) -> BTreeSet<DriftKind> {
        let mut out = BTreeSet::new();
        if self.vips != observed.vips {
            out.insert(DriftKind::Address);
        }
        let mine: BTreeMap<&str, &EgressPolicy> =
            self.egress.iter().map(|p| (p.name(), p)).collect();
        let theirs: BTreeMap<&str, &EgressPolicy> =
            observed.egress.iter().map(|p| (p.name(), p)).collect();
        for name in mine.keys().chain(theirs.keys()) {
            match (mine.get(name), theirs.get(name)) {
                (Some(a), Some(b)) if a == b => {}
                (Some(a), Some(b)) if a.same_translation(b) => {
                    out.insert(DriftKind::SetElement);
                }
                _ => {
                    out.insert(DriftKind::Rule);
                }
            }
        }
        out
    }

    pub fn to_spec(&self) -> DesiredStateSpec {
        DesiredStateSpec::from(self.clone())
    }
}

impl TryFrom<DesiredStateSpec> for DesiredState {
    type Error = ModelError;

    fn try_from(spec: DesiredStateSpec) -> Result<Self, Self::Error> {
        let vips = spec
            .vips
            .iter()
            .map(|v| {
                let address = parse_addr("vips.address", &v.address)?;
                VipClaim::new(address, v.interface.clone())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let egress = spec
            .egress
            .iter()
            .map(EgressPolicy::from_spec)
            .collect::<Result<Vec<_>, _>>()?;
        DesiredState::new(vips, egress)
    }
}

impl From<DesiredState> for DesiredStateSpec {
    fn from(s: DesiredState) -> Self {
        DesiredStateSpec {
            vips: s
                .vips
                .iter()
                .map(|v| VipClaimSpec {
                    address: v.address.to_string(),
                    interface: v.interface.clone(),
                })
                .collect(),
            egress: s.egress.iter().map(EgressPolicy::to_spec).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retained_in_only_removes() {
        let st = |y: &str| -> super::DesiredState { serde_norway::from_str(y).unwrap() };
        let now = st(
            "vips: [{address: 192.0.2.1, interface: eth0}, {address: 192.0.2.2, interface: eth0}]\negress:\n  - {name: a/a, vip: 192.0.2.1, sources: [10.244.1.1], exclude: []}\n  - {name: b/b, vip: 192.0.2.2, sources: [10.244.1.2], exclude: []}\n",
        );
        // Next: 192.0.2.2 gone, 192.0.2.3 new, a/a changed its pods.
        let next = st(
            "vips: [{address: 192.0.2.1, interface: eth0}, {address: 192.0.2.3, interface: eth0}]\negress:\n  - {name: a/a, vip: 192.0.2.1, sources: [10.244.1.9], exclude: []}\n  - {name: c/c, vip: 192.0.2.3, sources: [10.244.1.3], exclude: []}\n",
        );
        let kept = now.retained_in(&next);
        let vips: Vec<String> = kept.vips().iter().map(|v| v.address.to_string()).collect();
        assert_eq!(vips, ["192.0.2.1"]);
        assert_eq!(kept.egress().len(), 1);
        assert_eq!(
            kept.egress()[0].sources()[0].to_string(),
            "10.244.1.1",
            "as it was"
        );
    }

    use super::*;

    fn spec_policy(name: &str, vip: &str, sources: &[&str]) -> EgressPolicySpec {
        EgressPolicySpec {
            name: name.into(),
            vip: vip.into(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            exclude: vec!["10.244.0.0/16".into()],
            allow: None,
            ports: None,
        }
    }

    fn state(egress: Vec<EgressPolicySpec>) -> Result<DesiredState, ModelError> {
        DesiredState::try_from(DesiredStateSpec {
            vips: vec![],
            egress,
        })
    }

    #[test]
    fn drift_is_classified_by_kind() {
        let base = state(vec![
            spec_policy("a/one", "198.51.100.10", &["10.244.1.5", "10.244.1.6"]),
            spec_policy("b/two", "198.51.100.11", &["10.244.2.5"]),
        ])
        .unwrap();
        assert!(base.drift(&base).is_empty());
        let element = state(vec![
            spec_policy("a/one", "198.51.100.10", &["10.244.1.5"]),
            spec_policy("b/two", "198.51.100.11", &["10.244.2.5"]),
        ])
        .unwrap();
        assert_eq!(
            base.drift(&element).into_iter().collect::<Vec<_>>(),
            [DriftKind::SetElement]
        );
        let rule = state(vec![spec_policy(
            "a/one",
            "198.51.100.10",
            &["10.244.1.5", "10.244.1.6"],
        )])
        .unwrap();
        assert_eq!(
            base.drift(&rule).into_iter().collect::<Vec<_>>(),
            [DriftKind::Rule]
        );
        let mut with_vip = base.clone();
        with_vip.vips = vec![VipClaim::new("198.51.100.10".parse().unwrap(), "eth0").unwrap()];
        assert_eq!(
            with_vip.drift(&base).into_iter().collect::<Vec<_>>(),
            [DriftKind::Address]
        );
    }

    #[test]
    fn valid_state_is_canonical() {
        let mut p = spec_policy(
            "default/web",
            "198.51.100.10",
            &["10.244.1.6", "10.244.1.5", "10.244.1.6"],
        );
        p.exclude = vec![
            "10.96.0.0/12".into(),
            "10.244.0.0/16".into(),
            "10.244.3.0/24".into(),
        ];
        p.ports = Some(vec!["udp:53".into(), "TCP:443".into()]);
        let s = state(vec![p]).expect("valid");
        let p = &s.egress()[0];
        assert_eq!(p.sources().len(), 2);
        assert_eq!(p.exclude().len(), 2);
        let spec = p.to_spec();
        assert_eq!(spec.ports, Some(vec!["tcp:443".into(), "udp:53".into()]));
        assert_eq!(
            spec.exclude,
            vec!["10.96.0.0/12".to_string(), "10.244.0.0/16".into()]
        );
    }

    #[test]
    fn conflict_names_both_policies() {
        let err = state(vec![
            spec_policy("a/one", "198.51.100.10", &["10.244.1.5"]),
            spec_policy("b/two", "198.51.100.11", &["10.244.1.5"]),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            ModelError::SourceConflict {
                source_ip: "10.244.1.5".into(),
                first: "a/one".into(),
                second: "b/two".into()
            }
        );
        assert!(err.to_string().contains("a/one") && err.to_string().contains("b/two"));
    }

    #[test]
    fn typed_errors_for_bad_input() {
        let mut p = spec_policy("x", "198.51.100.10", &["10.244.1.5"]);
        p.exclude = vec!["300.1.1.1/8".into()];
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::InvalidCidr { .. })
        ));

        let mut p = spec_policy("x", "198.51.100.10", &["10.244.1.5"]);
        p.ports = Some(vec!["tcp:0".into()]);
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::InvalidPort { .. })
        ));

        let mut p = spec_policy("x", "198.51.100.10", &["10.244.1.5"]);
        p.ports = Some(vec!["tcp:70000".into()]);
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::InvalidPort { .. })
        ));

        let mut p = spec_policy("x", "198.51.100.10", &["10.244.1.5"]);
        p.ports = Some(vec!["icmp:7".into()]);
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::UnknownProtocol { .. })
        ));

        let p = spec_policy("x", "198.51.100.10", &["fd00::5"]);
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::MixedFamily { .. })
        ));

        let mut p = spec_policy("x", "2001:db8::10", &["fd00::5"]);
        p.exclude = vec!["10.244.0.0/16".into()];
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::MixedFamily { .. })
        ));

        let mut p = spec_policy("x", "198.51.100.10", &["10.244.1.5"]);
        p.allow = Some(vec![]);
        assert!(matches!(state(vec![p]), Err(ModelError::EmptyList { .. })));

        let p = spec_policy("x", "198.51.100.10", &[]);
        assert!(matches!(state(vec![p]), Err(ModelError::EmptyList { .. })));

        let p = spec_policy("x", "not-an-ip", &["10.244.1.5"]);
        assert!(matches!(
            state(vec![p]),
            Err(ModelError::InvalidAddress { .. })
        ));

        let dup = state(vec![
            spec_policy("x", "198.51.100.10", &["10.244.1.5"]),
            spec_policy("x", "198.51.100.11", &["10.244.1.6"]),
        ]);
        assert!(matches!(dup, Err(ModelError::DuplicatePolicy { .. })));
    }

    #[test]
    fn duplicate_vip_on_two_interfaces() {
        let spec = DesiredStateSpec {
            vips: vec![
                VipClaimSpec {
                    address: "198.51.100.10".into(),
                    interface: "eth0".into(),
                },
                VipClaimSpec {
                    address: "198.51.100.10".into(),
                    interface: "eth1".into(),
                },
            ],
            egress: vec![],
        };
        assert!(matches!(
            DesiredState::try_from(spec),
            Err(ModelError::DuplicateVip { .. })
        ));
    }

    #[test]
    fn changed_sources_tracks_moves_and_translation_changes() {
        let a = state(vec![
            spec_policy("a", "198.51.100.10", &["10.244.1.5", "10.244.1.6"]),
            spec_policy("b", "198.51.100.11", &["10.244.1.7"]),
        ])
        .unwrap();
        let b = state(vec![
            spec_policy("a", "198.51.100.10", &["10.244.1.5"]),
            spec_policy("b", "198.51.100.12", &["10.244.1.7", "10.244.1.8"]),
        ])
        .unwrap();
        let changed: Vec<String> = a
            .changed_sources(&b)
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(changed, vec!["10.244.1.6", "10.244.1.7", "10.244.1.8"]);
        assert!(a.changed_sources(&a).is_empty());
    }

    #[test]
    fn json_round_trip() {
        let s = state(vec![spec_policy(
            "default/web",
            "198.51.100.10",
            &["10.244.1.5"],
        )])
        .unwrap();
        let j = serde_json::to_string(&s).unwrap();
        let back: DesiredState = serde_json::from_str(&j).unwrap();
        assert_eq!(s, back);
        assert!(
            serde_json::from_str::<DesiredState>(
                r#"{"egress":[{"name":"x","vip":"1.2.3.4","sources":["10.0.0.1"],"bogus":1}]}"#
            )
            .is_err()
        );
    }
}
