//! The TCP connection of a session: source address or interface, TTL, and the TCP MD5
//! signature (RFC 2385) set before the SYN is sent.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

/// Where and how to dial a peer. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Dial {
    pub peer: SocketAddr,
    pub source: Option<IpAddr>,
    pub interface: Option<String>,
    pub password: Option<String>,
    /// IP TTL (IPv6 hop limit) of the session's packets; `None`: the system's.
    pub ttl: Option<u32>,
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dial")
            .field("peer", &self.peer)
            .field("source", &self.source)
            .field("interface", &self.interface)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Which step of opening the connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Socket,
    Md5,
    Ttl,
    Interface,
    Bind,
    Connect,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Socket => "creating the socket",
            Step::Md5 => "setting the TCP MD5 key",
            Step::Ttl => "setting the TTL",
            Step::Interface => "binding to the source interface",
            Step::Bind => "binding to the source address",
            Step::Connect => "connecting",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{step}: {source}")]
    Io {
        step: Step,
        #[source]
        source: io::Error,
    },
    #[error("connecting: no answer within {0:?}")]
    Timeout(Duration),
}

/// The kernel's `struct tcp_md5sig` (linux/tcp.h): the peer's address, flags, prefix
/// length, key length, interface index, and the key (at most 80 bytes).
#[repr(C)]
struct TcpMd5Sig {
    addr: [u64; 16],
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; 80],
}

/// The `sockaddr_in`/`sockaddr_in6` of `peer`, in a `sockaddr_storage`'s 128 bytes.
fn sockaddr_bytes(peer: SocketAddr) -> [u8; 128] {
    let mut b = [0u8; 128];
    match peer {
        SocketAddr::V4(a) => {
            b[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            b[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            b[2..4].copy_from_slice(&a.port().to_be_bytes());
            b[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            b[8..24].copy_from_slice(&a.ip().octets());
            b[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
    b
}

/// Sets the TCP MD5 key for segments to and from `peer` on `s`.
fn set_md5(s: &Socket, peer: SocketAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > 80 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP MD5 keys are at most 80 bytes",
        ));
    }
    let raw = sockaddr_bytes(peer);
    let mut addr = [0u64; 16];
    for (word, chunk) in addr.iter_mut().zip(raw.chunks_exact(8)) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        *word = u64::from_ne_bytes(w);
    }
    let mut sig = TcpMd5Sig {
        addr,
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; 80],
    };
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` is a live, initialised `struct tcp_md5sig` of the length passed, and the
    // descriptor is owned by `s` for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&sig as *const TcpMd5Sig).cast::<libc::c_void>(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens the session's TCP connection within `timeout`.
pub async fn dial(d: &Dial, timeout: Duration) -> Result<TcpStream, DialError> {
    let at = |step| move |source| DialError::Io { step, source };
    let s = Socket::new(
        Domain::for_address(d.peer),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .map_err(at(Step::Socket))?;
    s.set_nonblocking(true).map_err(at(Step::Socket))?;
    s.set_tcp_nodelay(true).map_err(at(Step::Socket))?;
    // A peer that vanished without a word is found even with a hold time of 0 (no BGP
    // keepalives): TCP's own, after about 20 s of silence.
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(3))
            .with_retries(3),
    )
    .map_err(at(Step::Socket))?;
    if let Some(k) = &d.password {
        set_md5(&s, d.peer, k.as_bytes()).map_err(at(Step::Md5))?;
    }
    if let Some(ttl) = d.ttl {
        match d.peer {
            SocketAddr::V4(_) => s.set_ttl_v4(ttl),
            SocketAddr::V6(_) => s.set_unicast_hops_v6(ttl),
        }
        .map_err(at(Step::Ttl))?;
    }
    if let Some(i) = &d.interface {
        s.bind_device(Some(i.as_bytes()))
            .map_err(at(Step::Interface))?;
    }
    if let Some(src) = d.source {
        s.bind(&SocketAddr::new(src, 0).into())
            .map_err(at(Step::Bind))?;
    }
    let socket = tokio::net::TcpSocket::from_std_stream(s.into());
    match tokio::time::timeout(timeout, socket.connect(d.peer)).await {
        Ok(r) => r.map_err(at(Step::Connect)),
        Err(_) => Err(DialError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_struct_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<TcpMd5Sig>(), 216);
        let b = sockaddr_bytes("192.0.2.1:179".parse().expect("addr"));
        assert_eq!(&b[2..8], &[0, 179, 192, 0, 2, 1]);
    }
}
