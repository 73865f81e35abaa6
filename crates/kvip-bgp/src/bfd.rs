//! BFD (RFC 5880) in asynchronous mode over single-hop UDP (RFC 5881), for the BGP
//! sessions that ask for it: the router declares a silent node down after `multiplier`
//! intervals (kube-vip's default: 300 ms × 3) instead of after the BGP hold time, and kvip
//! ends a BGP session whose BFD session goes down.
//!
//! One receiver per address family listens on port 3784 and hands each packet to the session
//! of its source address; each session sends from its own port (49152–65535) with TTL 255.
//! Without authentication, a packet is taken only if it arrived with TTL (hop limit) 255
//! (RFC 5881 section 5): one sent from off the link cannot have it, whatever it claims.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// RFC 5881: control packets go to this port.
pub const CONTROL_PORT: u16 = 3784;
/// RFC 5880 6.8.3: the slowest rate allowed while the session is not Up.
const SLOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BfdState {
    /// Published for the peer's administrative down (and at kvip's own stop): no failure.
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl BfdState {
    fn from_bits(b: u8) -> BfdState {
        match b & 3 {
            0 => BfdState::AdminDown,
            1 => BfdState::Down,
            2 => BfdState::Init,
            _ => BfdState::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BfdState::AdminDown => "admin_down",
            BfdState::Down => "down",
            BfdState::Init => "init",
            BfdState::Up => "up",
        }
    }
}

/// Diagnostic codes (RFC 5880 4.1) kvip sends.
mod diag {
    pub const NONE: u8 = 0;
    pub const DETECTION_TIME_EXPIRED: u8 = 1;
    pub const NEIGHBOR_SIGNALED_DOWN: u8 = 3;
    pub const ADMIN_DOWN: u8 = 7;
}

/// A BFD control packet (without authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub diag: u8,
    pub state: BfdState,
    pub poll: bool,
    pub fin: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl Packet {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        b[1] = ((self.state as u8) << 6)
            | if self.poll { 0x20 } else { 0 }
            | if self.fin { 0x10 } else { 0 };
        b[2] = self.detect_mult;
        b[3] = 24;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&micros(self.desired_min_tx).to_be_bytes());
        b[16..20].copy_from_slice(&micros(self.required_min_rx).to_be_bytes());
        // Required Min Echo RX Interval: 0, kvip does not take echo packets.
        b
    }

    /// RFC 5880 6.8.6's checks of a received packet; `None` for one to discard.
    pub fn decode(b: &[u8]) -> Option<Packet> {
        if b.len() < 24 || b[0] >> 5 != 1 {
            return None;
        }
        let len = usize::from(b[3]);
        // Authentication (A bit) is not used by kvip: such packets are discarded.
        if len < 24 || len > b.len() || b[1] & 0x04 != 0 {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let p = Packet {
            diag: b[0] & 0x1f,
            state: BfdState::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            fin: b[1] & 0x10 != 0,
            detect_mult: b[2],
            my_disc: word(4),
            your_disc: word(8),
            desired_min_tx: Duration::from_micros(u64::from(word(12))),
            required_min_rx: Duration::from_micros(u64::from(word(16))),
        };
        // Multipoint (M) set, a zero multiplier or discriminator, or a zero "your
        // discriminator" outside Down/AdminDown: discarded.
        if b[1] & 0x01 != 0 || p.detect_mult == 0 || p.my_disc == 0 {
            return None;
        }
        if p.your_disc == 0 && !matches!(p.state, BfdState::Down | BfdState::AdminDown) {
            return None;
        }
        Some(p)
    }
}

/// One BFD session's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BfdSettings {
    pub peer: IpAddr,
    pub source: Option<IpAddr>,
    pub interface: Option<String>,
    pub transmit: Duration,
    pub receive: Duration,
    pub multiplier: u8,
}

#[derive(Debug, thiserror::Error)]
pub enum BfdError {
    #[error("opening the BFD socket ({what}): {source}")]
    Socket {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the BFD receiver on port 3784 could not start: {0}")]
    Receiver(Arc<std::io::Error>),
}

/// Whether a family's receiver started.
type ReceiverStart = Result<(), Arc<std::io::Error>>;

/// The per-family receivers on port 3784, handing packets to sessions by source address.
#[derive(Clone, Default)]
pub struct Receivers {
    routes: Arc<Mutex<HashMap<IpAddr, mpsc::Sender<Packet>>>>,
    /// Per family: whether its receiver runs (`Some(Ok)`), or why it could not start (every
    /// session of that family gets the error).
    started: Arc<Mutex<[Option<ReceiverStart>; 2]>>,
}

fn socket_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BfdError {
    move |source| BfdError::Socket { what, source }
}

impl Receivers {
    /// Registers `peer`'s session and makes sure its family's receiver runs.
    fn register(
        &self,
        peer: IpAddr,
        tx: mpsc::Sender<Packet>,
        stop: &CancellationToken,
    ) -> Result<(), BfdError> {
        let fam = usize::from(peer.is_ipv6());
        {
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            let r = started[fam].get_or_insert_with(|| {
                let sock = receiver(peer.is_ipv6()).map_err(Arc::new)?;
                tokio::spawn(receive(sock, self.routes.clone(), stop.clone()));
                Ok(())
            });
            if let Err(e) = r {
                return Err(BfdError::Receiver(e.clone()));
            }
        }
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, tx);
        Ok(())
    }
}

/// The receiving socket of one family on port 3784 (not shared with another daemon).
fn receiver(v6: bool) -> std::io::Result<UdpSocket> {
    let bind: SocketAddr = if v6 {
        (Ipv6Addr::UNSPECIFIED, CONTROL_PORT).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, CONTROL_PORT).into()
    };
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Each packet's TTL (hop limit) comes with it, for the check in `receive`.
    if v6 {
        s.set_only_v6(true)?;
        setsockopt(&s, sockopt::Ipv6RecvHopLimit, &true).map_err(std::io::Error::from)?;
    } else {
        setsockopt(&s, sockopt::Ipv4RecvTtl, &true).map_err(std::io::Error::from)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&bind.into())?;
    UdpSocket::from_std(s.into())
}

/// One datagram: its length, its source, and the TTL (hop limit) it arrived with (`None`
/// when the kernel gave none, or cut its control data short).
fn recv_with_ttl(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<SocketAddr>, Option<u8>)> {
    // Room for more than the one message asked for.
    let mut cmsg = nix::cmsg_space!(libc::c_int, libc::c_int, [u8; 64]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let mut ttl = None;
    if !msg.flags.contains(MsgFlags::MSG_CTRUNC)
        && let Ok(cmsgs) = msg.cmsgs()
    {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) => {
                    ttl = u8::try_from(t).ok();
                }
                _ => {}
            }
        }
    }
    let from = msg.address.and_then(|a: SockaddrStorage| {
        a.as_sockaddr_in()
            .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(*a)))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|a| SocketAddr::from(std::net::SocketAddrV6::from(*a)))
            })
    });
    Ok((msg.bytes, from, ttl))
}

/// How often packets discarded for their TTL are logged (each is counted).
const OFF_LINK_LOG_EVERY: Duration = Duration::from_secs(60);

async fn receive(
    sock: UdpSocket,
    routes: Arc<Mutex<HashMap<IpAddr, mpsc::Sender<Packet>>>>,
    stop: CancellationToken,
) {
    let mut buf = [0u8; 128];
    let mut off_link: u64 = 0;
    let mut logged: Option<Instant> = None;
    loop {
        let (n, from, ttl) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.async_io(Interest::READABLE, || recv_with_ttl(&sock, &mut buf)) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "BFD receiver");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(from) = from else {
            continue;
        };
        // RFC 5881 section 5: without authentication, only TTL 255 (sent on this link).
        if ttl != Some(255) {
            off_link += 1;
            if logged.is_none_or(|t| t.elapsed() >= OFF_LINK_LOG_EVERY) {
                logged = Some(Instant::now());
                match ttl {
                    Some(ttl) => {
                        tracing::warn!(%from, ttl, discarded = off_link, "BFD: packets not sent with TTL 255 (from off the link, or forged) are discarded; count since the last such line")
                    }
                    None => {
                        tracing::warn!(%from, discarded = off_link, "BFD: packets that came without their TTL are discarded; count since the last such line")
                    }
                }
                off_link = 0;
            }
            continue;
        }
        let Some(p) = Packet::decode(&buf[..n]) else {
            continue;
        };
        let ip = match from.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            a => a,
        };
        let tx = routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned();
        if let Some(tx) = tx {
            // A session that is behind loses packets, as the network could.
            let _ = tx.try_send(p);
        }
    }
}

/// The session's sending socket: a port of 49152–65535, TTL 255 (RFC 5881 section 4).
fn sender(s: &BfdSettings, disc: u32) -> Result<UdpSocket, BfdError> {
    let peer = SocketAddr::new(s.peer, CONTROL_PORT);
    let sock = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))
        .map_err(socket_err("sender"))?;
    match peer {
        SocketAddr::V4(_) => sock.set_ttl_v4(255),
        SocketAddr::V6(_) => sock.set_unicast_hops_v6(255),
    }
    .map_err(socket_err("setting TTL 255"))?;
    if let Some(i) = &s.interface {
        sock.bind_device(Some(i.as_bytes()))
            .map_err(socket_err("binding to the interface"))?;
    }
    let ip = s.source.unwrap_or(if peer.is_ipv6() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    // A free port of the range, starting from one derived from the discriminator.
    let mut bound = Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
    for i in 0..16384u32 {
        let port = 49152 + ((disc.wrapping_add(i)) % 16384) as u16;
        bound = sock.bind(&SocketAddr::new(ip, port).into());
        match &bound {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            _ => break,
        }
    }
    bound.map_err(socket_err("binding a source port"))?;
    sock.connect(&peer.into())
        .map_err(socket_err("connecting"))?;
    sock.set_nonblocking(true).map_err(socket_err("sender"))?;
    UdpSocket::from_std(sock.into()).map_err(socket_err("sender"))
}

/// A discriminator unique in this process and unlikely to repeat across restarts.
fn discriminator(peer: IpAddr) -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(1);
    let p = match peer {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => a.octets().chunks(4).fold(0u32, |h, c| {
            h ^ u32::from_be_bytes([c[0], c[1], c[2], c[3]])
        }),
    };
    let d = t ^ p.rotate_left(7) ^ std::process::id();
    if d == 0 { 1 } else { d }
}

/// `d` shortened by a random 0–25 % (RFC 5880 6.8.7's jitter; 10–25 % with a detection
/// multiplier of 1).
fn jittered(d: Duration, multiplier: u8, seed: &mut u32) -> Duration {
    // xorshift: enough to spread the transmissions.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 17;
    *seed ^= *seed << 5;
    let span = if multiplier == 1 { 16 } else { 26 };
    let pct = 75 + (*seed % span);
    d * pct / 100
}

/// Sends `p`; a failure is logged (the next packet is the retry: BFD is lossy by design).
async fn send(sock: &UdpSocket, p: &Packet, peer: IpAddr) {
    if let Err(e) = sock.send(&p.encode()).await {
        tracing::debug!(%peer, error = %e, "BFD send");
    }
}

/// Runs one BFD session until `stop`, publishing its state; at stop, tells the peer
/// AdminDown.
pub async fn run(
    s: BfdSettings,
    receivers: Receivers,
    state: watch::Sender<BfdState>,
    stop: CancellationToken,
) -> Result<(), BfdError> {
    let my_disc = discriminator(s.peer);
    let (tx, mut rx) = mpsc::channel(16);
    receivers.register(s.peer, tx, &stop)?;
    let sock = sender(&s, my_disc)?;
    let mut seed = my_disc | 1;
    let mut local = BfdState::Down;
    let mut local_diag = diag::NONE;
    let mut remote_disc = 0u32;
    let mut remote_min_rx = Duration::from_micros(1);
    // While not Up, kvip advertises (and sends at) 1 s; once Up, its configured rate,
    // announced by a Poll Sequence.
    let mut desired_tx = SLOW;
    let mut polling = false;
    let mut detect_at: Option<Instant> = None;
    let mut next_tx = Instant::now();
    let packet = |local: BfdState,
                  diag: u8,
                  desired_tx: Duration,
                  remote_disc: u32,
                  poll: bool,
                  fin: bool| Packet {
        diag,
        state: local,
        poll,
        fin,
        detect_mult: s.multiplier,
        my_disc,
        your_disc: remote_disc,
        desired_min_tx: desired_tx,
        required_min_rx: s.receive,
    };
    loop {
        let detect = crate::session::sleep_until_opt(detect_at);
        tokio::select! {
            // A packet already received counts before the detection time is judged.
            biased;
            _ = stop.cancelled() => {
                let p = packet(BfdState::AdminDown, diag::ADMIN_DOWN, desired_tx, remote_disc, false, false);
                send(&sock, &p, s.peer).await;
                state.send_replace(BfdState::AdminDown);
                return Ok(());
            }
            _ = tokio::time::sleep_until(next_tx) => {
                // RFC 5880 6.8.7: a peer that asks for no packets (Required Min RX 0) gets
                // none but answers.
                if !remote_min_rx.is_zero() {
                    let p = packet(local, local_diag, desired_tx, remote_disc, polling, false);
                    send(&sock, &p, s.peer).await;
                }
                let interval = desired_tx.max(remote_min_rx);
                next_tx = Instant::now() + jittered(interval, s.multiplier, &mut seed);
            }
            _ = detect => {
                // RFC 5880 6.8.4: no packet within the detection time.
                if matches!(local, BfdState::Init | BfdState::Up) {
                    tracing::warn!(peer = %s.peer, "BFD: no packet within the detection time: down");
                    local = BfdState::Down;
                    local_diag = diag::DETECTION_TIME_EXPIRED;
                    remote_disc = 0;
                    desired_tx = SLOW;
                    polling = false;
                    state.send_replace(local);
                }
                detect_at = None;
            }
            Some(p) = rx.recv() => {
                if p.your_disc != 0 && p.your_disc != my_disc {
                    continue;
                }
                // An Up session takes only packets that name it: one without our
                // discriminator (a spoofed Down, a peer that restarted) is left to the
                // detection time.
                if p.your_disc == 0 && local == BfdState::Up {
                    continue;
                }
                let interval_before = desired_tx.max(remote_min_rx);
                remote_disc = p.my_disc;
                remote_min_rx = p.required_min_rx;
                let (remote_desired_tx, remote_mult) = (p.desired_min_tx, p.detect_mult);
                if p.fin {
                    polling = false;
                }
                let before = local;
                let mut admin_down = false;
                if p.state == BfdState::AdminDown {
                    if local != BfdState::Down {
                        local = BfdState::Down;
                        local_diag = diag::NEIGHBOR_SIGNALED_DOWN;
                        admin_down = true;
                    }
                } else {
                    match (local, p.state) {
                        (BfdState::Down, BfdState::Down) => local = BfdState::Init,
                        (BfdState::Down, BfdState::Init) => local = BfdState::Up,
                        (BfdState::Init, BfdState::Init | BfdState::Up) => local = BfdState::Up,
                        (BfdState::Up, BfdState::Down) => {
                            local = BfdState::Down;
                            local_diag = diag::NEIGHBOR_SIGNALED_DOWN;
                        }
                        _ => {}
                    }
                }
                if local != before {
                    if local == BfdState::Up {
                        local_diag = diag::NONE;
                        desired_tx = s.transmit;
                        polling = true;
                        tracing::info!(peer = %s.peer, "BFD session up");
                    } else if local == BfdState::Down {
                        desired_tx = SLOW;
                        polling = false;
                        tracing::warn!(peer = %s.peer, admin_down, "BFD session down (the peer said so)");
                    }
                    // RFC 5882 3.2: the peer's administrative down is no path failure; it is
                    // published as AdminDown, which BGP does not act on.
                    state.send_replace(if admin_down { BfdState::AdminDown } else { local });
                }
                // The detection time (RFC 5880 6.8.4), restarted by every packet.
                detect_at = (p.state != BfdState::AdminDown).then(|| {
                    Instant::now() + s.receive.max(remote_desired_tx) * u32::from(remote_mult)
                });
                // A Poll is answered at once with Final; a state change is sent at once.
                if p.poll || local != before {
                    let r = packet(local, local_diag, desired_tx, remote_disc, polling && !p.poll, p.poll);
                    send(&sock, &r, s.peer).await;
                }
                // A faster rate (kvip's own once Up, or the peer's lower Required Min RX)
                // applies from now, not after a packet still scheduled at the old one: the
                // peer times kvip by the rate kvip just advertised, and a Final it never gets
                // (lost) must not leave kvip a second between packets (RFC 5880 6.8.3 holds
                // back only a slower rate until the Poll Sequence ends).
                let interval = desired_tx.max(remote_min_rx);
                if interval < interval_before {
                    let sooner = Instant::now() + jittered(interval, s.multiplier, &mut seed);
                    next_tx = next_tx.min(sooner);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_packet_round_trip_and_discards() {
        let p = Packet {
            diag: 0,
            state: BfdState::Up,
            poll: true,
            fin: false,
            detect_mult: 3,
            my_disc: 7,
            your_disc: 9,
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
        };
        let b = p.encode();
        assert_eq!(b[0], 0x20);
        assert_eq!(b[1], 0xe0);
        assert_eq!(Packet::decode(&b), Some(p));
        // Version 0, a zero multiplier, a zero "your discriminator" while Up: discarded.
        let mut v = b;
        v[0] = 0;
        assert_eq!(Packet::decode(&v), None);
        let mut m = b;
        m[2] = 0;
        assert_eq!(Packet::decode(&m), None);
        let mut y = b;
        y[8..12].copy_from_slice(&[0; 4]);
        assert_eq!(Packet::decode(&y), None);
        assert_eq!(Packet::decode(&b[..20]), None);
    }

    #[test]
    fn jitter_stays_within_75_to_100_percent() {
        let mut seed = 12345;
        for _ in 0..1000 {
            let j = jittered(Duration::from_millis(300), 3, &mut seed);
            assert!(j >= Duration::from_millis(225) && j <= Duration::from_millis(300));
            let j = jittered(Duration::from_millis(300), 1, &mut seed);
            assert!(j >= Duration::from_millis(225) && j <= Duration::from_millis(270));
        }
    }
}
