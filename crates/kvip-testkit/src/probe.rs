//! Real-packet probes: a listener in one namespace that tells each client the source address
//! it saw, and clients that connect from another namespace and read that answer.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::{Netns, NetnsError};

/// TCP and UDP listeners answering every client with the source address they saw.
pub struct Reporter {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Reporter {
    /// Listens on each address (TCP and UDP on the same port) inside `ns`.
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Result<Reporter, NetnsError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in addrs {
            let addr = *addr;
            let (tcp, udp) = ns
                .enter(move || {
                    let tcp = TcpListener::bind(addr)?;
                    tcp.set_nonblocking(true)?;
                    let udp = UdpSocket::bind(addr)?;
                    udp.set_read_timeout(Some(Duration::from_millis(20)))?;
                    Ok::<_, std::io::Error>((tcp, udp))
                })?
                .map_err(|source| NetnsError::Enter {
                    name: format!("{} (bind {addr})", ns.name()),
                    source,
                })?;
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.write_all(format!("{}\n", peer.ip()).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{}\n", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
        }
        Ok(Reporter { stop, threads })
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn parse_answer(s: &str) -> std::io::Result<IpAddr> {
    s.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("reporter answered {s:?}"),
        )
    })
}

/// Opens a TCP connection from `ns` to `dst` and returns the source address the reporter saw.
pub fn tcp_seen_source(ns: &Netns, dst: SocketAddr) -> Result<IpAddr, NetnsError> {
    let stream = ns
        .enter(move || TcpStream::connect_timeout(&dst, Duration::from_secs(3)))?
        .map_err(|source| NetnsError::Enter {
            name: format!("{} (connect {dst})", ns.name()),
            source,
        })?;
    let read = (|| {
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut s = String::new();
        stream.read_to_string(&mut s)?;
        parse_answer(&s)
    })();
    read.map_err(|source| NetnsError::Enter {
        name: format!("{} (read from {dst})", ns.name()),
        source,
    })
}

/// Sends a UDP datagram from `ns` to `dst` and returns the source address the reporter saw.
pub fn udp_seen_source(ns: &Netns, dst: SocketAddr) -> Result<IpAddr, NetnsError> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| unreachable_addr())?
    } else {
        "[::]:0".parse().map_err(|_| unreachable_addr())?
    };
    let sock = ns
        .enter(move || UdpSocket::bind(bind))?
        .map_err(|source| NetnsError::Enter {
            name: format!("{} (udp bind)", ns.name()),
            source,
        })?;
    let res = (|| {
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        sock.send_to(b"?", dst)?;
        let mut buf = [0u8; 64];
        let n = loop {
            // A signal (SIGCHLD from a tool finishing) may interrupt the blocking receive.
            match sock.recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?.0,
            }
        };
        parse_answer(&String::from_utf8_lossy(&buf[..n]))
    })();
    res.map_err(|source| NetnsError::Enter {
        name: format!("{} (udp to {dst})", ns.name()),
        source,
    })
}

fn unreachable_addr() -> NetnsError {
    NetnsError::Enter {
        name: "wildcard address".into(),
        source: std::io::Error::other("cannot parse wildcard address"),
    }
}
