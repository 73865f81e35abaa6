//! BGP-4 messages on the wire (RFC 4271), with what an announce-only speaker needs:
//! capabilities (RFC 5492) for multiprotocol (RFC 4760) and 4-octet AS numbers (RFC 6793),
//! UPDATEs for IPv4 and IPv6 unicast host routes, NOTIFICATIONs and KEEPALIVEs.
//!
//! Decoding checks every length against its container, so a malformed or hostile message is
//! an error carrying the NOTIFICATION code to answer with, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const HEADER_LEN: usize = 19;
/// RFC 4271's largest message.
pub const MAX_LEN: usize = 4096;
/// RFC 6793: the 2-octet AS field of a speaker whose AS does not fit in it.
pub const AS_TRANS: u16 = 23456;

pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;

const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const ATTR_AS4_PATH: u8 = 17;

const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED: u8 = 0x10;

const AS_SEQUENCE: u8 = 2;

/// NOTIFICATION error codes (RFC 4271 section 4.5) kvip sends or names.
pub mod code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    /// Cease subcode (RFC 4486): administrative shutdown.
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    /// Cease subcode: out of resources / other configuration change.
    pub const CEASE_CONFIG_CHANGE: u8 = 6;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The speaker's AS (the 4-octet capability's value when present).
    pub asn: u32,
    pub hold_time: u16,
    pub id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol { afi: u16, safi: u8 },
    RouteRefresh,
    FourOctetAs(u32),
    Other { code: u8, value: Vec<u8> },
}

impl Open {
    pub fn four_octet_as(&self) -> Option<u32> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::FourOctetAs(a) => Some(*a),
            _ => None,
        })
    }

    /// Whether the speaker offers `afi`/`safi` (without any multiprotocol capability, IPv4
    /// unicast alone, RFC 4760 section 8).
    pub fn offers(&self, afi: u16, safi: u8) -> bool {
        let mp: Vec<(u16, u8)> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol { afi, safi } => Some((*afi, *safi)),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            return afi == AFI_IPV4 && safi == SAFI_UNICAST;
        }
        mp.contains(&(afi, safi))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.code, self.subcode) {
            (1, _) => "message header error",
            (2, 2) => "OPEN: bad peer AS",
            (2, 3) => "OPEN: bad BGP identifier",
            (2, 6) => "OPEN: unacceptable hold time",
            (2, 7) => "OPEN: unsupported capability",
            (2, _) => "OPEN message error",
            (3, _) => "UPDATE message error",
            (4, _) => "hold timer expired",
            (5, _) => "finite state machine error",
            (6, 2) => "cease: administrative shutdown",
            (6, 3) => "cease: peer de-configured",
            (6, 4) => "cease: administrative reset",
            (6, 5) => "cease: connection rejected",
            (6, 7) => "cease: connection collision resolution",
            (6, _) => "cease",
            _ => "unknown error",
        };
        write!(f, "{what} ({}/{})", self.code, self.subcode)
    }
}

/// A prefix: an address and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// The host route of `a` (/32 or /128).
    pub fn host(a: IpAddr) -> Prefix {
        let len = if a.is_ipv4() { 32 } else { 128 };
        Prefix { addr: a, len }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A path attribute as received: kept raw but for the ones kvip reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

/// MP_REACH_NLRI's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpReach {
    pub next_hops: Vec<IpAddr>,
    pub prefixes: Vec<Prefix>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Prefix>,
    pub attributes: Vec<Attribute>,
    pub nlri: Vec<Prefix>,
}

impl Update {
    /// The prefixes announced through MP_REACH_NLRI, with its next hops.
    pub fn mp_reach(&self) -> Result<Option<MpReach>, WireError> {
        let Some(a) = self.attributes.iter().find(|a| a.code == ATTR_MP_REACH) else {
            return Ok(None);
        };
        let v = &a.value;
        let bad = || WireError::Attribute(ATTR_MP_REACH);
        if v.len() < 5 {
            return Err(bad());
        }
        let afi = u16::from_be_bytes([v[0], v[1]]);
        let nh_len = usize::from(v[3]);
        let nh = v.get(4..4 + nh_len).ok_or_else(bad)?;
        let rest = v.get(5 + nh_len..).ok_or_else(bad)?;
        let hops = match (afi, nh_len) {
            (AFI_IPV6, 16) | (AFI_IPV6, 32) => nh
                .chunks(16)
                .map(|c| {
                    let mut b = [0u8; 16];
                    b.copy_from_slice(c);
                    IpAddr::V6(Ipv6Addr::from(b))
                })
                .collect(),
            (AFI_IPV4, 4) => vec![IpAddr::V4(Ipv4Addr::new(nh[0], nh[1], nh[2], nh[3]))],
            _ => return Err(bad()),
        };
        Ok(Some(MpReach {
            next_hops: hops,
            prefixes: decode_prefixes(rest, afi).ok_or_else(bad)?,
        }))
    }

    /// IPv6 unicast prefixes withdrawn through MP_UNREACH_NLRI.
    pub fn mp_unreach(&self) -> Result<Vec<Prefix>, WireError> {
        let Some(a) = self.attributes.iter().find(|a| a.code == ATTR_MP_UNREACH) else {
            return Ok(Vec::new());
        };
        let v = &a.value;
        if v.len() < 3 {
            return Err(WireError::Attribute(ATTR_MP_UNREACH));
        }
        let afi = u16::from_be_bytes([v[0], v[1]]);
        decode_prefixes(&v[3..], afi).ok_or(WireError::Attribute(ATTR_MP_UNREACH))
    }

    /// The classic NEXT_HOP attribute.
    pub fn next_hop(&self) -> Option<Ipv4Addr> {
        let a = self.attributes.iter().find(|a| a.code == ATTR_NEXT_HOP)?;
        let b: [u8; 4] = a.value.as_slice().try_into().ok()?;
        Some(Ipv4Addr::from(b))
    }
}

/// Why a received message is refused, with the NOTIFICATION to answer it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the message header's marker is not all ones")]
    Marker,
    #[error("bad message length {0}")]
    Length(u16),
    #[error("unknown message type {0}")]
    Type(u8),
    #[error("unsupported BGP version {0}")]
    Version(u8),
    #[error("malformed OPEN")]
    Open,
    #[error("unsupported optional parameter {0} in OPEN")]
    OptionalParameter(u8),
    #[error("malformed UPDATE")]
    Update,
    #[error("malformed path attribute {0}")]
    Attribute(u8),
    #[error("malformed NOTIFICATION")]
    Notification,
}

impl WireError {
    /// The NOTIFICATION (code, subcode) that answers this error.
    pub fn notification(&self) -> (u8, u8) {
        match self {
            WireError::Marker => (code::HEADER, 1),
            WireError::Length(_) => (code::HEADER, 2),
            WireError::Type(_) => (code::HEADER, 3),
            WireError::Version(_) => (code::OPEN, 1),
            WireError::Open => (code::OPEN, 0),
            WireError::OptionalParameter(_) => (code::OPEN, 4),
            WireError::Update => (code::UPDATE, 1),
            WireError::Attribute(_) => (code::UPDATE, 1),
            WireError::Notification => (code::HEADER, 2),
        }
    }
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&[0xff; 16]);
    // Callers keep bodies under MAX_LEN.
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

pub fn encode_keepalive() -> Vec<u8> {
    frame(KEEPALIVE, &[])
}

pub fn encode_notification(n: &Notification) -> Vec<u8> {
    let mut body = vec![n.code, n.subcode];
    let room = MAX_LEN - HEADER_LEN - 2;
    body.extend_from_slice(&n.data[..n.data.len().min(room)]);
    frame(NOTIFICATION, &body)
}

pub fn encode_open(o: &Open) -> Vec<u8> {
    let my_as = u16::try_from(o.asn).unwrap_or(AS_TRANS);
    let mut caps = Vec::new();
    for c in &o.capabilities {
        match c {
            Capability::Multiprotocol { afi, safi } => {
                caps.extend_from_slice(&[1, 4]);
                caps.extend_from_slice(&afi.to_be_bytes());
                caps.extend_from_slice(&[0, *safi]);
            }
            Capability::RouteRefresh => caps.extend_from_slice(&[2, 0]),
            Capability::FourOctetAs(a) => {
                caps.extend_from_slice(&[65, 4]);
                caps.extend_from_slice(&a.to_be_bytes());
            }
            Capability::Other { code, value } => {
                caps.push(*code);
                caps.push(value.len().min(255) as u8);
                caps.extend_from_slice(&value[..value.len().min(255)]);
            }
        }
    }
    let mut body = vec![4];
    body.extend_from_slice(&my_as.to_be_bytes());
    body.extend_from_slice(&o.hold_time.to_be_bytes());
    body.extend_from_slice(&o.id.octets());
    // One capabilities parameter (kvip's few capabilities always fit in 255 bytes).
    let caps = &caps[..caps.len().min(253)];
    body.push(caps.len() as u8 + 2);
    body.push(2);
    body.push(caps.len() as u8);
    body.extend_from_slice(caps);
    frame(OPEN, &body)
}

/// As [`decode`], for what a peer sends an announce-only speaker: the body of an UPDATE is
/// not read (kvip takes no routes), so a route it could not parse never ends the session
/// (and withdraws every VIP); the message is returned empty.
pub fn decode_received(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    decode_with(buf, false)
}

/// Decodes one message from the front of `buf`: `None` while it is incomplete, else the
/// message and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    decode_with(buf, true)
}

fn decode_with(buf: &[u8], updates: bool) -> Result<Option<(Message, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16] != [0xff; 16] {
        return Err(WireError::Marker);
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]);
    let kind = buf[18];
    let min = match kind {
        OPEN => 29,
        UPDATE => 23,
        NOTIFICATION => 21,
        KEEPALIVE => 19,
        t => return Err(WireError::Type(t)),
    };
    if usize::from(len) < min || usize::from(len) > MAX_LEN || (kind == KEEPALIVE && len != 19) {
        return Err(WireError::Length(len));
    }
    let len = usize::from(len);
    if buf.len() < len {
        return Ok(None);
    }
    let body = &buf[HEADER_LEN..len];
    let m = match kind {
        OPEN => Message::Open(decode_open(body)?),
        UPDATE if updates => Message::Update(decode_update(body)?),
        UPDATE => Message::Update(Update::default()),
        NOTIFICATION => Message::Notification(Notification {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        }),
        _ => Message::Keepalive,
    };
    Ok(Some((m, len)))
}

fn decode_open(b: &[u8]) -> Result<Open, WireError> {
    if b[0] != 4 {
        return Err(WireError::Version(b[0]));
    }
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    let id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    let mut opt_len = usize::from(b[9]);
    let mut rest = &b[10..];
    // RFC 9072's extended optional parameters: length 255, then type 255 and a 2-octet length.
    let extended = opt_len == 255 && rest.first() == Some(&255);
    if extended {
        if rest.len() < 3 {
            return Err(WireError::Open);
        }
        opt_len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        rest = &rest[3..];
    }
    if rest.len() != opt_len {
        return Err(WireError::Open);
    }
    let mut capabilities = Vec::new();
    while !rest.is_empty() {
        let head = if extended { 3 } else { 2 };
        if rest.len() < head {
            return Err(WireError::Open);
        }
        let kind = rest[0];
        let plen = if extended {
            usize::from(u16::from_be_bytes([rest[1], rest[2]]))
        } else {
            usize::from(rest[1])
        };
        let value = rest.get(head..head + plen).ok_or(WireError::Open)?;
        if kind != 2 {
            return Err(WireError::OptionalParameter(kind));
        }
        let mut c = value;
        while !c.is_empty() {
            if c.len() < 2 {
                return Err(WireError::Open);
            }
            let (code, clen) = (c[0], usize::from(c[1]));
            let v = c.get(2..2 + clen).ok_or(WireError::Open)?;
            capabilities.push(match (code, clen) {
                (1, 4) => Capability::Multiprotocol {
                    afi: u16::from_be_bytes([v[0], v[1]]),
                    safi: v[3],
                },
                (2, 0) => Capability::RouteRefresh,
                (65, 4) => Capability::FourOctetAs(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                _ => Capability::Other {
                    code,
                    value: v.to_vec(),
                },
            });
            c = &c[2 + clen..];
        }
        rest = &rest[head + plen..];
    }
    let mut open = Open {
        asn: u32::from(my_as),
        hold_time,
        id,
        capabilities,
    };
    if let Some(a) = open.four_octet_as() {
        open.asn = a;
    }
    Ok(open)
}

fn decode_prefixes(mut b: &[u8], afi: u16) -> Option<Vec<Prefix>> {
    let max = match afi {
        AFI_IPV4 => 32,
        AFI_IPV6 => 128,
        _ => return None,
    };
    let mut out = Vec::new();
    while let Some(&len) = b.first() {
        if len > max {
            return None;
        }
        let n = usize::from(len).div_ceil(8);
        let bytes = b.get(1..1 + n)?;
        let addr = if afi == AFI_IPV4 {
            let mut o = [0u8; 4];
            o[..n].copy_from_slice(bytes);
            IpAddr::V4(Ipv4Addr::from(o))
        } else {
            let mut o = [0u8; 16];
            o[..n].copy_from_slice(bytes);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        out.push(Prefix { addr, len });
        b = &b[1 + n..];
    }
    Some(out)
}

fn decode_update(b: &[u8]) -> Result<Update, WireError> {
    let wlen = usize::from(u16::from_be_bytes([b[0], b[1]]));
    let withdrawn = b.get(2..2 + wlen).ok_or(WireError::Update)?;
    let rest = &b[2 + wlen..];
    if rest.len() < 2 {
        return Err(WireError::Update);
    }
    let alen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let mut attrs = rest.get(2..2 + alen).ok_or(WireError::Update)?;
    let nlri = &rest[2 + alen..];
    let mut attributes = Vec::new();
    while !attrs.is_empty() {
        if attrs.len() < 3 {
            return Err(WireError::Update);
        }
        let (flags, code) = (attrs[0], attrs[1]);
        let (len, head) = if flags & FLAG_EXTENDED != 0 {
            let l = attrs.get(2..4).ok_or(WireError::Attribute(code))?;
            (usize::from(u16::from_be_bytes([l[0], l[1]])), 4)
        } else {
            (usize::from(attrs[2]), 3)
        };
        let value = attrs
            .get(head..head + len)
            .ok_or(WireError::Attribute(code))?;
        attributes.push(Attribute {
            flags,
            code,
            value: value.to_vec(),
        });
        attrs = &attrs[head + len..];
    }
    Ok(Update {
        withdrawn: decode_prefixes(withdrawn, AFI_IPV4).ok_or(WireError::Update)?,
        attributes,
        nlri: decode_prefixes(nlri, AFI_IPV4).ok_or(WireError::Update)?,
    })
}

/// What the UPDATEs kvip sends to one peer carry besides the prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub local_as: u32,
    /// The peer is in the local AS: no AS in the path, LOCAL_PREF 100.
    pub ibgp: bool,
    /// Both sides have the 4-octet AS capability.
    pub four_octet: bool,
    /// Next hop of IPv4 routes (the session's local address when it is IPv4).
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop of IPv6 routes (the node's global IPv6 address).
    pub next_hop_v6: Option<Ipv6Addr>,
}

fn push_attr(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.extend_from_slice(&[flags | FLAG_EXTENDED, code]);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[flags, code, value.len() as u8]);
    }
    out.extend_from_slice(value);
}

fn push_prefix(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(v4) => {
            out.push(32);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(128);
            out.extend_from_slice(&v6.octets());
        }
    }
}

/// The attributes every announcement carries: ORIGIN IGP, the AS path, LOCAL_PREF for
/// iBGP.
fn common_attrs(r: &Routing) -> Vec<u8> {
    let mut a = Vec::new();
    push_attr(&mut a, FLAG_TRANSITIVE, ATTR_ORIGIN, &[0]);
    if r.ibgp {
        push_attr(&mut a, FLAG_TRANSITIVE, ATTR_AS_PATH, &[]);
        push_attr(
            &mut a,
            FLAG_TRANSITIVE,
            ATTR_LOCAL_PREF,
            &100u32.to_be_bytes(),
        );
    } else if r.four_octet {
        let mut p = vec![AS_SEQUENCE, 1];
        p.extend_from_slice(&r.local_as.to_be_bytes());
        push_attr(&mut a, FLAG_TRANSITIVE, ATTR_AS_PATH, &p);
    } else {
        let two = u16::try_from(r.local_as).unwrap_or(AS_TRANS);
        let mut p = vec![AS_SEQUENCE, 1];
        p.extend_from_slice(&two.to_be_bytes());
        push_attr(&mut a, FLAG_TRANSITIVE, ATTR_AS_PATH, &p);
        if two == AS_TRANS {
            // RFC 6793: the real path for 4-octet speakers beyond this 2-octet peer.
            let mut p4 = vec![AS_SEQUENCE, 1];
            p4.extend_from_slice(&r.local_as.to_be_bytes());
            push_attr(&mut a, FLAG_OPTIONAL | FLAG_TRANSITIVE, ATTR_AS4_PATH, &p4);
        }
    }
    a
}

/// Room for prefixes in one UPDATE after the header, both length fields and `attrs`.
fn room(attrs: usize) -> usize {
    MAX_LEN - HEADER_LEN - 4 - attrs
}

/// The UPDATEs that withdraw `withdraw` and announce `announce` (host routes), each within
/// the 4096-byte limit. IPv4 goes in the classic fields, IPv6 in MP_(UN)REACH_NLRI. Routes
/// of a family without a next hop are returned apart, unannounced.
pub fn encode_updates(
    r: &Routing,
    announce: &[IpAddr],
    withdraw: &[IpAddr],
) -> (Vec<Vec<u8>>, Vec<IpAddr>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    let (w4, w6): (Vec<IpAddr>, Vec<IpAddr>) = withdraw.iter().partition(|a| a.is_ipv4());
    let (a4, a6): (Vec<IpAddr>, Vec<IpAddr>) = announce.iter().partition(|a| a.is_ipv4());
    // IPv4 withdrawals: 5 bytes each in the withdrawn routes field.
    for chunk in w4.chunks(room(0) / 5) {
        let mut w = Vec::new();
        for a in chunk {
            push_prefix(&mut w, *a);
        }
        let mut body = (w.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&w);
        body.extend_from_slice(&[0, 0]);
        out.push(frame(UPDATE, &body));
    }
    // IPv6 withdrawals: MP_UNREACH_NLRI (extended length), 17 bytes each.
    for chunk in w6.chunks((room(4 + 3) - 3) / 17) {
        let mut v = AFI_IPV6.to_be_bytes().to_vec();
        v.push(SAFI_UNICAST);
        for a in chunk {
            push_prefix(&mut v, *a);
        }
        let mut attrs = Vec::new();
        push_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MP_UNREACH, &v);
        let mut body = vec![0, 0];
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        out.push(frame(UPDATE, &body));
    }
    let common = common_attrs(r);
    match r.next_hop_v4 {
        Some(nh) => {
            let mut attrs = common.clone();
            push_attr(&mut attrs, FLAG_TRANSITIVE, ATTR_NEXT_HOP, &nh.octets());
            for chunk in a4.chunks(room(attrs.len()) / 5) {
                let mut body = vec![0, 0];
                body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
                body.extend_from_slice(&attrs);
                for a in chunk {
                    push_prefix(&mut body, *a);
                }
                out.push(frame(UPDATE, &body));
            }
        }
        None => skipped.extend(a4),
    }
    match r.next_hop_v6 {
        Some(nh) => {
            // MP_REACH_NLRI: AFI, SAFI, next hop length and next hop, a reserved octet.
            let head = 2 + 1 + 1 + 16 + 1;
            for chunk in a6.chunks((room(common.len() + 4) - head) / 17) {
                let mut v = AFI_IPV6.to_be_bytes().to_vec();
                v.push(SAFI_UNICAST);
                v.push(16);
                v.extend_from_slice(&nh.octets());
                v.push(0);
                for a in chunk {
                    push_prefix(&mut v, *a);
                }
                let mut attrs = common.clone();
                push_attr(&mut attrs, FLAG_OPTIONAL, ATTR_MP_REACH, &v);
                let mut body = vec![0, 0];
                body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
                body.extend_from_slice(&attrs);
                out.push(frame(UPDATE, &body));
            }
        }
        None => skipped.extend(a6),
    }
    (out, skipped)
}

#[cfg(test)]
mod tests;
