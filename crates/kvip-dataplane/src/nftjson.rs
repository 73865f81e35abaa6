//! The part of libnftables' JSON schema kvip writes, as typed values that serialise straight
//! to text (no intermediate JSON tree: rendering tens of thousands of elements stays cheap).

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

use crate::error::DataplaneError;

/// A batch of commands: one `nft -j -f -` run, one kernel transaction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Batch {
    #[serde(rename = "nftables")]
    pub cmds: Vec<Cmd>,
}

impl Batch {
    /// The batch as `nft -j -f` reads it. An error here is never an empty batch: the caller
    /// must not take a failed rendering for "nothing to do".
    pub fn to_json(&self) -> Result<String, DataplaneError> {
        serde_json::to_string(self).map_err(DataplaneError::Render)
    }

    pub fn to_value(&self) -> Result<serde_json::Value, DataplaneError> {
        serde_json::to_value(self).map_err(DataplaneError::Render)
    }

    pub fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cmd {
    Add(Obj),
    /// Adds, failing if the object exists already.
    Create(Obj),
    Delete(Obj),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Obj {
    Table {
        family: &'static str,
        name: String,
    },
    Chain {
        family: &'static str,
        table: String,
        name: String,
        #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
        chain_type: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hook: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        prio: Option<i32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        policy: Option<&'static str>,
    },
    Set {
        family: &'static str,
        table: String,
        name: String,
        #[serde(rename = "type")]
        set_type: SetType,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        flags: Vec<&'static str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        elem: Vec<Elem>,
    },
    Map {
        family: &'static str,
        table: String,
        name: String,
        #[serde(rename = "type")]
        set_type: SetType,
        map: &'static str,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        elem: Vec<Elem>,
    },
    Rule {
        family: &'static str,
        table: String,
        chain: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
        expr: Vec<Stmt>,
    },
    Element {
        family: &'static str,
        table: String,
        name: String,
        elem: Vec<Elem>,
    },
}

/// A set's key type: one type or a concatenation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetType {
    One(&'static str),
    Concat(Vec<&'static str>),
}

impl Serialize for SetType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SetType::One(t) => s.serialize_str(t),
            SetType::Concat(v) => v.serialize(s),
        }
    }
}

/// A set or map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elem {
    /// A single address (or a host network).
    Addr(String),
    /// A network.
    Prefix { addr: String, len: u8 },
    /// protocol . port
    ProtoPort(&'static str, u16),
    /// key : goto chain (verdict maps)
    Goto { key: String, chain: String },
}

struct One<'a, T: Serialize>(&'static str, &'a T);

impl<T: Serialize> Serialize for One<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, self.1)?;
        m.end()
    }
}

#[derive(Serialize)]
struct PrefixBody<'a> {
    addr: &'a str,
    len: u8,
}

#[derive(Serialize)]
struct Target<'a> {
    target: &'a str,
}

impl Serialize for Elem {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Elem::Addr(a) => s.serialize_str(a),
            Elem::Prefix { addr, len } => {
                One("prefix", &PrefixBody { addr, len: *len }).serialize(s)
            }
            Elem::ProtoPort(p, n) => {
                #[derive(Serialize)]
                #[serde(untagged)]
                enum PP<'a> {
                    P(&'a str),
                    N(u16),
                }
                One("concat", &[PP::P(p), PP::N(*n)]).serialize(s)
            }
            Elem::Goto { key, chain } => {
                let mut seq = s.serialize_seq(Some(2))?;
                seq.serialize_element(key)?;
                seq.serialize_element(&One("goto", &Target { target: chain }))?;
                seq.end()
            }
        }
    }
}

/// The left-hand sides kvip matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lhs {
    /// `ip saddr`, `ip6 daddr`, ...
    Payload {
        protocol: &'static str,
        field: &'static str,
    },
    /// `meta l4proto . th dport`
    L4ProtoDport,
}

#[derive(Serialize)]
struct PayloadBody<'a> {
    protocol: &'a str,
    field: &'a str,
}

#[derive(Serialize)]
struct MetaBody {
    key: &'static str,
}

impl Serialize for Lhs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Lhs::Payload { protocol, field } => {
                One("payload", &PayloadBody { protocol, field }).serialize(s)
            }
            Lhs::L4ProtoDport => {
                #[derive(Serialize)]
                #[serde(untagged)]
                enum Part<'a> {
                    Meta(One<'a, MetaBody>),
                    Payload(One<'a, PayloadBody<'a>>),
                }
                let parts = [
                    Part::Meta(One("meta", &MetaBody { key: "l4proto" })),
                    Part::Payload(One(
                        "payload",
                        &PayloadBody {
                            protocol: "th",
                            field: "dport",
                        },
                    )),
                ];
                One("concat", &parts).serialize(s)
            }
        }
    }
}

/// The statements kvip writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `<lhs> ==|!= @set`
    MatchSet {
        op: &'static str,
        left: Lhs,
        set: String,
    },
    Return,
    /// `snat ip|ip6 to <addr>`
    Snat {
        family: &'static str,
        addr: String,
    },
    /// `<lhs> vmap @map`
    Vmap {
        key: Lhs,
        map: String,
    },
}

impl Serialize for Stmt {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct MatchBody<'a> {
            op: &'a str,
            left: &'a Lhs,
            right: String,
        }
        #[derive(Serialize)]
        struct SnatBody<'a> {
            family: &'a str,
            addr: &'a str,
        }
        #[derive(Serialize)]
        struct VmapBody<'a> {
            key: &'a Lhs,
            data: String,
        }
        match self {
            Stmt::MatchSet { op, left, set } => One(
                "match",
                &MatchBody {
                    op,
                    left,
                    right: format!("@{set}"),
                },
            )
            .serialize(s),
            Stmt::Return => One("return", &()).serialize(s),
            Stmt::Snat { family, addr } => One("snat", &SnatBody { family, addr }).serialize(s),
            Stmt::Vmap { key, map } => One(
                "vmap",
                &VmapBody {
                    key,
                    data: format!("@{map}"),
                },
            )
            .serialize(s),
        }
    }
}
