//! Two questions to nf_tables over netlink, each one request answered at once, in the
//! calling thread's network namespace (no `nft` process):
//!
//! - the ruleset generation: a counter the kernel bumps once for every committed nftables
//!   transaction, whoever commits it (`nft`, iptables-nft, a CNI, kvip), so kvip can tell
//!   "nothing in nftables changed since I last knew its state" without listing its table;
//! - whether a table exists, so kvip can tell without `nft` whether its table is in the
//!   kernel (and may be translating) before it would fall back to iptables.

use std::io;
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::error::DataplaneError;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_GEN_ID: u16 = 1;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const SEQ: u32 = 0x6b76_6970;

fn err(source: io::Error) -> DataplaneError {
    DataplaneError::Io {
        tool: "nfnetlink".into(),
        source,
    }
}

fn malformed(what: &str) -> DataplaneError {
    err(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
}

/// Sends one nf_tables request (`msg`, for `family`, with `attrs` already encoded) and
/// returns the kernel's answer. Blocks for it (the kernel answers at once; a receive timeout
/// bounds it regardless).
fn ask(msg: u16, family: u8, attrs: &[u8]) -> Result<Vec<u8>, DataplaneError> {
    let sock = Socket::new(NETLINK_NETFILTER).map_err(err)?;
    socket2::SockRef::from(&sock)
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(err)?;
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&SEQ.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    req.extend_from_slice(&[family, 0, 0, 0]);
    req.extend_from_slice(attrs);
    sock.send_to(&req, &SocketAddr::new(0, 0), 0).map_err(err)?;
    let (reply, _) = sock.recv_from_full().map_err(err)?;
    Ok(reply)
}

/// The current generation.
pub fn generation() -> Result<u32, DataplaneError> {
    parse_generation(&ask(NFT_MSG_GETGEN, 0, &[])?)
}

/// Whether the table `inet <name>` exists. A kernel without nf_tables has none.
pub fn inet_table_exists(name: &str) -> Result<bool, DataplaneError> {
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    let mut attr = Vec::new();
    attr.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    attr.extend_from_slice(&value);
    attr.resize(attr.len().div_ceil(4) * 4, 0);
    let reply = match ask(NFT_MSG_GETTABLE, NFPROTO_INET, &attr) {
        Ok(r) => r,
        Err(DataplaneError::Io { source, .. })
            if source.raw_os_error() == Some(libc::EPROTONOSUPPORT) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    match message(&reply) {
        Ok((k, _)) if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE => Ok(true),
        Ok((k, _)) => Err(malformed(&format!("unexpected netlink reply type {k:#x}"))),
        Err(DataplaneError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOENT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The first message of an answer: its type and the whole message; the kernel's error as an
/// `Io` error with its errno.
fn message(b: &[u8]) -> Result<(u16, &[u8]), DataplaneError> {
    let len = u32_at(b, 0).ok_or_else(|| malformed("short netlink reply"))? as usize;
    let kind = u16_at(b, 4).ok_or_else(|| malformed("short netlink reply"))?;
    let msg = b
        .get(..len)
        .ok_or_else(|| malformed("truncated netlink reply"))?;
    if kind == NLMSG_ERROR {
        let code = u32_at(msg, NLMSG_HDRLEN).ok_or_else(|| malformed("short netlink error"))?;
        return Err(match (code as i32).wrapping_neg() {
            // An acknowledgement, not an answer.
            0 => malformed("an acknowledgement instead of an answer"),
            errno => err(io::Error::from_raw_os_error(errno)),
        });
    }
    Ok((kind, msg))
}

/// The generation from the kernel's answer (`NFT_MSG_NEWGEN`), or its error.
fn parse_generation(b: &[u8]) -> Result<u32, DataplaneError> {
    let (kind, msg) = message(b)?;
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
        return Err(malformed("unexpected netlink reply type"));
    }
    let mut at = NLMSG_HDRLEN + NFGENMSG_LEN;
    while at + 4 <= msg.len() {
        let alen = u16_at(msg, at).ok_or_else(|| malformed("short attribute"))? as usize;
        let atype = u16_at(msg, at + 2).ok_or_else(|| malformed("short attribute"))? & 0x3fff;
        if alen < 4 {
            return Err(malformed("attribute length below its header"));
        }
        if atype == NFTA_GEN_ID {
            let v = msg
                .get(at + 4..at + 8)
                .ok_or_else(|| malformed("short generation attribute"))?;
            // Netfilter attributes are big-endian.
            return Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        }
        at += (alen + 3) & !3;
    }
    Err(malformed("no generation in the reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&[0; 10]);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn reads_the_generation_and_the_kernels_errors() {
        let mut payload = vec![0, 0, 0, 0];
        // NFTA_GEN_PROC_PID first, then NFTA_GEN_ID.
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&2u16.to_ne_bytes());
        payload.extend_from_slice(&7u32.to_be_bytes());
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&NFTA_GEN_ID.to_ne_bytes());
        payload.extend_from_slice(&4242u32.to_be_bytes());
        let ok = reply((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN, &payload);
        assert_eq!(parse_generation(&ok).expect("generation"), 4242);

        let e = reply(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        match parse_generation(&e) {
            Err(DataplaneError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EPERM))
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_generation(&ok[..10]).is_err());
        assert!(
            parse_generation(&reply(
                (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN,
                &[0; 4]
            ))
            .is_err()
        );
    }
}
