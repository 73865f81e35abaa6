use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A transport protocol an egress policy can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Case-insensitive: `TCP`, `tcp` and `Tcp` are the same protocol.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// A destination port match, written `protocol:port` (`tcp:443`); a bare port means TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: u16,
}

/// Why a string is not a port match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortParseError {
    UnknownProtocol(String),
    InvalidPort(String, String),
}

impl FromStr for PortMatch {
    type Err = PortParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (proto_s, port_s) = match s.split_once(':') {
            Some((p, n)) => (Some(p.trim()), n.trim()),
            None => (None, s),
        };
        let protocol = match proto_s {
            None => Protocol::Tcp,
            Some(p) => {
                Protocol::parse(p).ok_or_else(|| PortParseError::UnknownProtocol(p.to_string()))?
            }
        };
        if port_s.is_empty() || !port_s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PortParseError::InvalidPort(
                port_s.to_string(),
                "not a number".into(),
            ));
        }
        let n: u32 = port_s.parse().map_err(|_| {
            PortParseError::InvalidPort(port_s.to_string(), "out of range 1-65535".into())
        })?;
        if n == 0 || n > 65535 {
            return Err(PortParseError::InvalidPort(
                port_s.to_string(),
                "out of range 1-65535".into(),
            ));
        }
        Ok(PortMatch {
            protocol,
            port: n as u16,
        })
    }
}

impl fmt::Display for PortMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.protocol.as_str(), self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let p: PortMatch = "tcp:443".parse().unwrap();
        assert_eq!((p.protocol, p.port), (Protocol::Tcp, 443));
        let p: PortMatch = "UDP:53".parse().unwrap();
        assert_eq!((p.protocol, p.port), (Protocol::Udp, 53));
        let p: PortMatch = "8080".parse().unwrap();
        assert_eq!((p.protocol, p.port), (Protocol::Tcp, 8080));
        assert_eq!(p.to_string(), "tcp:8080");
    }

    #[test]
    fn rejects_bad_ports() {
        assert!(matches!(
            "tcp:0".parse::<PortMatch>(),
            Err(PortParseError::InvalidPort(..))
        ));
        assert!(matches!(
            "tcp:70000".parse::<PortMatch>(),
            Err(PortParseError::InvalidPort(..))
        ));
        assert!(matches!(
            "tcp:99999999999999999999".parse::<PortMatch>(),
            Err(PortParseError::InvalidPort(..))
        ));
        assert!(matches!(
            "icmp:1".parse::<PortMatch>(),
            Err(PortParseError::UnknownProtocol(..))
        ));
        assert!(matches!(
            "tcp:-1".parse::<PortMatch>(),
            Err(PortParseError::InvalidPort(..))
        ));
        assert!(matches!(
            "tcp:".parse::<PortMatch>(),
            Err(PortParseError::InvalidPort(..))
        ));
    }
}
