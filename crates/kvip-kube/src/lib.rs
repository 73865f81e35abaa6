//! kvip-kube: kvip's side of the Kubernetes API. Today: Lease-based election with
//! resourceVersion-guarded writes, driven by the pure [`kvip_core::lease::Elector`].

pub mod election;

pub use election::{Election, ElectionError, LeaseLock};
