//! kvip-core: the model kvip reasons about, with validation.
//!
//! Nothing here performs I/O. Every value that reaches the dataplane has passed through the
//! validating constructors in this crate, so backends can rely on its invariants: one address
//! family per egress policy, canonical CIDR lists, no pod egressing through two VIPs.

pub mod annotations;
pub mod bgp;
pub mod cidr;
pub mod config;
pub mod control_plane;
pub mod error;
pub mod fence;
pub mod lease;
pub mod model;
pub mod plan;
pub mod port;

pub use cidr::Cidr;
pub use error::ModelError;
pub use model::{
    DesiredState, DesiredStateSpec, DriftKind, EgressPolicy, EgressPolicySpec, Family, VipClaim,
};
pub use plan::{Leadership, NodeConfig, Plan, Snapshot, plan};
pub use port::{PortMatch, Protocol};
