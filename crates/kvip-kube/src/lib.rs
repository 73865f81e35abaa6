//! kvip-kube: kvip's side of the Kubernetes API. Today: Lease-based election with
//! resourceVersion-guarded writes, driven by the pure [`kvip_core::lease::Elector`], and the
//! watches, kept as what `plan()` reads of each object, that feed [`kvip_core::plan`].

pub mod backoff;
pub mod cluster;
pub mod discovery;
pub mod election;
pub mod elections;
pub mod publish;
pub mod rbac;

pub use cluster::ClusterCache;
pub use election::{Election, ElectionError, LeaseLock};
