//! Link-layer capture on one interface of a namespace (AF_PACKET), with parsers for
//! gratuitous ARP and unsolicited neighbour advertisements.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use crate::netns::{Netns, NetnsError};

/// A frame and when it was received.
pub type TimedFrame = (Instant, Vec<u8>);

/// Frames received on one interface while the capture runs.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<TimedFrame>>>,
    /// Why receiving stopped early, if it did.
    error: Arc<Mutex<Option<std::io::Error>>>,
    thread: Option<JoinHandle<()>>,
}

fn open_packet_socket(ifname: &str) -> std::io::Result<Socket> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // Close-on-exec: tools the test runs meanwhile must not inherit the capture.
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW.cloexec(),
        Some(Protocol::from(i32::from(proto))),
    )?;
    let ifindex = rustix::net::netdevice::name_to_index(&socket, ifname)?;
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: SockAddrStorage is a sockaddr_storage, larger than and aligned for sockaddr_ll,
    // and zeroed memory is a valid sockaddr_ll.
    let sll = unsafe { storage.view_as::<libc::sockaddr_ll>() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = i32::try_from(ifindex).map_err(std::io::Error::other)?;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the storage holds an initialised sockaddr_ll of `len` bytes.
    socket.bind(&unsafe { SockAddr::new(storage, len) })?;
    // Wake up regularly to see whether the capture was stopped.
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    Ok(socket)
}

impl Capture {
    /// Starts capturing every frame received on `ifname` inside `ns`.
    pub fn start(ns: &Netns, ifname: &str) -> Result<Capture, NetnsError> {
        let name = ifname.to_string();
        let fd = ns
            .enter(move || open_packet_socket(&name))?
            .map_err(|source| NetnsError::Enter {
                name: format!("{} (capture on {ifname})", ns.name()),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let (s, f, err) = (stop.clone(), frames.clone(), error.clone());
        let ifname = ifname.to_string();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                match (&fd).read(&mut buf) {
                    Ok(n) => {
                        if let Ok(mut v) = f.lock() {
                            v.push((Instant::now(), buf[..n].to_vec()));
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        eprintln!("capture on {ifname}: receiving failed: {e}");
                        if let Ok(mut slot) = err.lock() {
                            *slot = Some(e);
                        }
                        break;
                    }
                }
            }
        });
        Ok(Capture {
            stop,
            frames,
            error,
            thread: Some(thread),
        })
    }

    /// Stops the capture and returns the frames seen. Panics if receiving failed (the
    /// frames would be incomplete) or the capture thread panicked.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        if let Some(e) = self.error.lock().ok().and_then(|mut e| e.take()) {
            panic!("the capture stopped early: {e}");
        }
        self.snapshot()
    }

    /// The frames seen so far (capture goes on).
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.frames
            .lock()
            .map(|v| v.iter().map(|(_, f)| f.clone()).collect())
            .unwrap_or_default()
    }

    /// How many frames have been seen so far.
    pub fn count(&self) -> usize {
        self.frames.lock().map(|v| v.len()).unwrap_or_default()
    }

    /// The frames from the `from`-th on, with when each was received, and the index to
    /// continue from.
    pub fn timed_since(&self, from: usize) -> (Vec<TimedFrame>, usize) {
        self.frames
            .lock()
            .map(|v| (v.get(from..).unwrap_or_default().to_vec(), v.len()))
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A gratuitous ARP or unsolicited neighbour advertisement parsed from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub dest_mac: [u8; 6],
}

/// Parses a gratuitous ARP (sender IP == target IP, broadcast) from an Ethernet frame.
pub fn parse_garp(frame: &[u8]) -> Option<Announcement> {
    if frame.len() < 42 || frame[12..14] != [0x08, 0x06] {
        return None;
    }
    let arp = &frame[14..];
    // Ethernet/IPv4, hlen 6, plen 4.
    if arp[0..2] != [0, 1] || arp[2..4] != [0x08, 0x00] || arp[4] != 6 || arp[5] != 4 {
        return None;
    }
    let sha: [u8; 6] = arp[8..14].try_into().ok()?;
    let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let tpa = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    if spa != tpa {
        return None;
    }
    Some(Announcement {
        address: IpAddr::V4(spa),
        mac: sha,
        dest_mac: frame[0..6].try_into().ok()?,
    })
}

/// Parses an unsolicited neighbour advertisement (ICMPv6 136, override set, solicited clear,
/// hop limit 255, with a target link-layer address option) and checks its checksum.
pub fn parse_unsolicited_na(frame: &[u8]) -> Option<Announcement> {
    if frame.len() < 14 + 40 + 24 || frame[12..14] != [0x86, 0xdd] {
        return None;
    }
    let ip = &frame[14..];
    if ip[6] != 58 || ip[7] != 255 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let icmp = ip.get(40..40 + plen)?;
    if icmp[0] != 136 || icmp[1] != 0 {
        return None;
    }
    let flags = icmp[4];
    if flags & 0x20 == 0 || flags & 0x40 != 0 {
        return None;
    }
    let src: [u8; 16] = ip[8..24].try_into().ok()?;
    let dst: [u8; 16] = ip[24..40].try_into().ok()?;
    if icmpv6_checksum(&src, &dst, icmp) != 0 {
        return None;
    }
    let target: [u8; 16] = icmp[8..24].try_into().ok()?;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == 2 && len == 8 {
            return Some(Announcement {
                address: IpAddr::V6(Ipv6Addr::from(target)),
                mac: opts[2..8].try_into().ok()?,
                dest_mac: frame[0..6].try_into().ok()?,
            });
        }
        opts = &opts[len..];
    }
    None
}

/// The ICMPv6 checksum over the pseudo-header; 0 when `icmp` carries a correct checksum.
pub fn icmpv6_checksum(src: &[u8; 16], dst: &[u8; 16], icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
    };
    add(src);
    add(dst);
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
