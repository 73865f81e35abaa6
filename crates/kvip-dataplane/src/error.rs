use thiserror::Error;

/// What went wrong talking to the kernel. Messages are one line and say what to do where
/// that is known.
#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("{tool} not found: {hint}")]
    ToolMissing { tool: String, hint: &'static str },
    #[error("{tool} {args} failed: {stderr}")]
    ToolFailed {
        tool: String,
        args: String,
        stderr: String,
    },
    #[error("cannot run {tool}: {source}")]
    Io {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("interface {0:?} does not exist")]
    InterfaceNotFound(String),
    #[error("cannot read kvip's kernel state back: {0}")]
    ReadBack(String),
    #[error("{0}")]
    KernelUnsupported(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "egress policies {first:?} and {second:?} map to the same {kind} name {name}: rename one of them"
    )]
    NameCollision {
        kind: &'static str,
        name: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Model(#[from] kvip_core::ModelError),
}

impl DataplaneError {
    pub(crate) fn readback(msg: impl Into<String>) -> Self {
        DataplaneError::ReadBack(msg.into())
    }
}
