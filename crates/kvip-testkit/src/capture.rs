//! Link-layer capture on one interface of a namespace (AF_PACKET), with parsers for
//! gratuitous ARP and unsolicited neighbour advertisements.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::netns::{Netns, NetnsError};

/// A frame and when it was received.
pub type TimedFrame = (Instant, Vec<u8>);

/// Frames received on one interface while the capture runs.
pub struct Capture {
    stop: Arc<AtomicBool>,
    frames: Arc<Mutex<Vec<TimedFrame>>>,
    thread: Option<JoinHandle<()>>,
}

fn open_packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "interface name"))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a properly initialised sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
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
        let (s, f) = (stop.clone(), frames.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: buf is valid for buf.len() bytes.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0
                    && let Ok(mut v) = f.lock()
                {
                    v.push((Instant::now(), buf[..n as usize].to_vec()));
                }
            }
        });
        Ok(Capture {
            stop,
            frames,
            thread: Some(thread),
        })
    }

    /// Stops the capture and returns the frames seen.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
