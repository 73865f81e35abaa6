use thiserror::Error;

/// Why a desired state, or a part of it, was rejected. Every variant names the field and the
/// offending value so that the message can be shown to an operator as it is.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModelError {
    #[error("{field}: {value:?} is not an IP address")]
    InvalidAddress { field: String, value: String },
    #[error("{field}: {value:?} is not a valid CIDR: {reason}")]
    InvalidCidr {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{field}: {value:?} is not a valid port: {reason}")]
    InvalidPort {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{field}: unknown protocol {value:?} (expected tcp, udp or sctp)")]
    UnknownProtocol { field: String, value: String },
    #[error("{field}: {value} is {found} but the policy's VIP {vip} is {expected}")]
    MixedFamily {
        field: String,
        value: String,
        vip: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error(
        "source {source_ip} is in egress policies {first:?} and {second:?}: a pod can egress through only one VIP"
    )]
    SourceConflict {
        source_ip: String,
        first: String,
        second: String,
    },
    #[error("egress policy {name:?} is defined twice")]
    DuplicatePolicy { name: String },
    #[error("VIP {address} is claimed twice (interfaces {first:?} and {second:?})")]
    DuplicateVip {
        address: String,
        first: String,
        second: String,
    },
    #[error("{field}: {value:?} is not a valid name: {reason}")]
    InvalidName {
        field: String,
        value: String,
        reason: &'static str,
    },
    #[error("{field}: an empty list would match nothing; omit the field instead")]
    EmptyList { field: String },
    #[error("{field}: {value} cannot be used ({reason})")]
    UnusableAddress {
        field: String,
        value: String,
        reason: &'static str,
    },
}
