use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// What went wrong talking to the kernel. Messages are one line and say what to do where
/// that is known. Errors from the kernel keep their source (netlink error, `io::Error`), so
/// callers decide on the error number ([`DataplaneError::errno`]), never on the text.
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
    #[error("{tool} {args} did not finish within {after:?} and was killed")]
    ToolTimeout {
        tool: String,
        args: String,
        after: std::time::Duration,
    },
    #[error("cannot run {tool}: {source}")]
    Io {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    /// A netlink request the kernel refused or that could not be read.
    #[error("netlink: {op}: {source}")]
    Netlink {
        /// What was being done, e.g. "adding 192.0.2.10 to interface 2".
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket: {source}")]
    NetlinkSocket {
        #[source]
        source: std::io::Error,
    },
    /// The packet (AF_PACKET) socket that sends announcements.
    #[error("packet socket: {op} on interface {ifindex}: {source}")]
    PacketSocket {
        op: &'static str,
        ifindex: u32,
        #[source]
        source: std::io::Error,
    },
    /// A file of kvip's under the runtime directory (locks, address-protocol registry).
    #[error("{op} {path}: {source}", path = path.display())]
    RunFile {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another kvip process of this instance holds {path} (pid {holder}) for more than {secs} s: \
         is it stuck?",
        path = path.display(),
        holder = holder.map_or_else(|| "unknown".to_string(), |p| p.to_string()),
        secs = waited.as_secs()
    )]
    LockTimeout {
        path: PathBuf,
        holder: Option<u32>,
        waited: Duration,
    },
    #[error("interface {0:?} does not exist")]
    InterfaceNotFound(String),
    #[error(
        "IPv6 is disabled on interface {interface:?} (net.ipv6.conf.{interface}.disable_ipv6): \
         cannot hold IPv6 VIP {address}"
    )]
    Ipv6Disabled {
        interface: String,
        address: std::net::IpAddr,
    },
    #[error("cannot read kvip's kernel state back: {0}")]
    ReadBack(String),
    /// A batch could not be rendered: nothing was written.
    #[error("rendering the nftables batch failed: {0}")]
    Render(serde_json::Error),
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

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        DataplaneError::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The error number (`EEXIST`, `EPERM`, ...) the kernel answered, when it gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DataplaneError::Netlink {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => msg.code.map(|c| -c.get()),
            DataplaneError::Io { source, .. }
            | DataplaneError::NetlinkSocket { source }
            | DataplaneError::PacketSocket { source, .. }
            | DataplaneError::RunFile { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the kernel refused for lack of privilege (root or CAP_NET_ADMIN): `EPERM` or
    /// `EACCES` from netlink or a system call, or a rule tool (nft, iptables), which reports
    /// no error number, saying so on stderr.
    pub fn is_permission_denied(&self) -> bool {
        if let Some(e) = self.errno() {
            return e == libc::EPERM || e == libc::EACCES;
        }
        match self {
            DataplaneError::ToolFailed { stderr, .. } => {
                stderr.contains("Operation not permitted")
                    || stderr.contains("Permission denied (you must be root)")
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;

    use rtnetlink::packet_core::ErrorMessage;

    use super::*;

    fn nl_error(code: i32) -> DataplaneError {
        let mut msg = ErrorMessage::default();
        msg.code = NonZeroI32::new(-code);
        DataplaneError::netlink("adding an address", rtnetlink::Error::NetlinkError(msg))
    }

    #[test]
    fn errno_and_permission() {
        assert_eq!(nl_error(libc::EEXIST).errno(), Some(libc::EEXIST));
        assert!(!nl_error(libc::EEXIST).is_permission_denied());
        assert!(nl_error(libc::EPERM).is_permission_denied());
        assert!(nl_error(libc::EACCES).is_permission_denied());
        let io = DataplaneError::PacketSocket {
            op: "opening",
            ifindex: 2,
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(io.is_permission_denied());
        let nft = DataplaneError::ToolFailed {
            tool: "nft".into(),
            args: "list tables".into(),
            stderr: "Operation not permitted (you must be root)".into(),
        };
        assert!(nft.is_permission_denied());
        assert!(!DataplaneError::InterfaceNotFound("x".into()).is_permission_denied());
    }
}
