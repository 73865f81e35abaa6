//! One peer's session (RFC 4271's state machine, as an announce-only speaker that always
//! dials out): Connect → OpenSent → OpenConfirm → Established, and back to Idle with a
//! backoff on any error. While Established, the routes to announce are followed: each change
//! becomes withdrawals and announcements of the difference against what the peer was told
//! (the Adj-RIB-Out), which is published only after the write succeeded.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bfd::BfdState;
use crate::socket::{Dial, DialError, dial};
use crate::wire::{
    self, AFI_IPV4, AFI_IPV6, Capability, Message, Notification, Open, Routing, SAFI_UNICAST,
    WireError, code,
};

/// What the speaker is, for every peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Proposed hold time, seconds (0: none).
    pub hold_time: u16,
    /// Keepalive interval, seconds (capped at a third of the negotiated hold time).
    pub keepalive: u16,
    /// Next hop of IPv4 routes on an IPv6 session.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// Next hop of IPv6 routes on an IPv4 session (the node's global IPv6 address).
    pub next_hop_v6: Option<Ipv6Addr>,
}

/// One peer. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Peer {
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub password: Option<String>,
    pub multihop: bool,
    pub source: Option<IpAddr>,
    pub interface: Option<String>,
    /// This peer's next hops of the other family than the session's (instead of
    /// [`Local`]'s).
    pub next_hop_v4: Option<Ipv4Addr>,
    pub next_hop_v6: Option<Ipv6Addr>,
    /// BFD for this session: (transmit interval, receive interval, multiplier).
    pub bfd: Option<(Duration, Duration, u8)>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("remote_as", &self.remote_as)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("multihop", &self.multihop)
            .field("source", &self.source)
            .field("interface", &self.interface)
            .field("next_hop_v4", &self.next_hop_v4)
            .field("next_hop_v6", &self.next_hop_v6)
            .field("bfd", &self.bfd)
            .finish()
    }
}

impl Peer {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Connect => "connect",
            State::OpenSent => "open_sent",
            State::OpenConfirm => "open_confirm",
            State::Established => "established",
        }
    }
}

/// Why a session ended or could not start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Dial(Arc<DialError>),
    #[error("the connection failed: {0}")]
    Io(Arc<std::io::Error>),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer sent a malformed message: {0}")]
    Malformed(WireError),
    #[error("the peer sent NOTIFICATION {0}")]
    PeerNotification(Notification),
    #[error("the peer's AS is {got}, configured {want}")]
    WrongAs { got: u32, want: u32 },
    #[error("the peer proposed hold time {0} s (0 or at least 3 allowed)")]
    HoldTime(u16),
    #[error("the peer's BGP identifier {0} is invalid")]
    Identifier(Ipv4Addr),
    #[error("no message from the peer within the hold time ({0:?})")]
    HoldTimerExpired(Duration),
    #[error("a write to the peer did not finish within {0:?}")]
    WriteTimeout(Duration),
    #[error("the peer sent {0} in state {1:?}")]
    Unexpected(&'static str, State),
    #[error("the BFD session went down")]
    BfdDown,
}

/// What a session shows of itself.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// The routes the peer has been told of and not told to withdraw, as written.
    pub adj_rib_out: BTreeSet<IpAddr>,
    /// Routes to announce that this session cannot carry (no next hop of their family, or
    /// the family not negotiated).
    pub unannounced: BTreeSet<IpAddr>,
    pub updates_sent: u64,
    pub established: u64,
    /// Why the last session ended or the last attempt failed (cleared once a session is
    /// established again).
    pub last_error: Option<SessionError>,
    /// Sessions ended because their BFD session went down.
    pub bfd_downs: u64,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            state: State::Idle,
            adj_rib_out: BTreeSet::new(),
            unannounced: BTreeSet::new(),
            updates_sent: 0,
            established: 0,
            last_error: None,
            bfd_downs: 0,
        }
    }
}

/// The routes every session announces.
pub type Routes = Arc<BTreeSet<IpAddr>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the peer may take to answer our OPEN (RFC 4271 suggests 4 minutes; a peer that
/// accepts the connection and says nothing is as good as down).
const OPEN_WAIT: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long one write may take before the session is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `peer`'s session until `stop`; then withdraws what it announced and closes with a
/// Cease NOTIFICATION (administrative shutdown).
pub async fn run(
    local: Arc<Local>,
    peer: Peer,
    mut routes: watch::Receiver<Routes>,
    mut bfd: Option<watch::Receiver<BfdState>>,
    status: watch::Sender<Status>,
    stop: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        status.send_modify(|s| s.state = State::Connect);
        // The session watches `stop` itself: once Established, stopping withdraws first.
        let ended = session(&local, &peer, &mut routes, bfd.as_mut(), &status, &stop).await;
        let was_established = status.borrow().state == State::Established;
        status.send_modify(|s| {
            s.state = State::Idle;
            s.adj_rib_out.clear();
            s.unannounced.clear();
            if let Err(e) = &ended {
                s.bfd_downs += u64::from(matches!(e, SessionError::BfdDown));
                s.last_error = Some(e.clone());
            }
        });
        match ended {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(peer = %peer.address, error = %e, "BGP session down");
            }
        }
        if was_established {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Reads messages from the peer, one at a time, into `tx` (a cancel-safe source for the
/// session's select).
async fn reader(mut r: OwnedReadHalf, tx: mpsc::Sender<Result<Message, SessionError>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(wire::MAX_LEN);
    let mut chunk = vec![0u8; 8192];
    loop {
        loop {
            match wire::decode_received(&buf) {
                Ok(Some((m, used))) => {
                    buf.drain(..used);
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(SessionError::Malformed(e))).await;
                    return;
                }
            }
        }
        match r.read(&mut chunk).await {
            Ok(0) => {
                let _ = tx.send(Err(SessionError::Closed)).await;
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                let _ = tx.send(Err(SessionError::Io(Arc::new(e)))).await;
                return;
            }
        }
    }
}

struct Conn {
    w: OwnedWriteHalf,
    rx: mpsc::Receiver<Result<Message, SessionError>>,
    local_addr: SocketAddr,
}

impl Conn {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), SessionError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.w.write_all(bytes)).await {
            Ok(r) => r.map_err(|e| SessionError::Io(Arc::new(e))),
            Err(_) => Err(SessionError::WriteTimeout(WRITE_TIMEOUT)),
        }
    }

    /// Sends a NOTIFICATION (best effort: the session is ending anyway).
    async fn notify(&mut self, code: u8, subcode: u8) {
        let n = Notification {
            code,
            subcode,
            data: Vec::new(),
        };
        let _ = self.send(&wire::encode_notification(&n)).await;
        let _ = tokio::time::timeout(WRITE_TIMEOUT, self.w.shutdown()).await;
    }

    /// The next message, within `deadline`.
    async fn next(&mut self, deadline: Instant, hold: Duration) -> Result<Message, SessionError> {
        match tokio::time::timeout_at(deadline, self.rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => Err(SessionError::Closed),
            Err(_) => Err(SessionError::HoldTimerExpired(hold)),
        }
    }
}

fn open_of(local: &Local) -> Open {
    Open {
        asn: local.asn,
        hold_time: local.hold_time,
        id: local.router_id,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::FourOctetAs(local.asn),
        ],
    }
}

/// A session that reached Established.
struct Opened {
    c: Conn,
    routing: Routing,
    hold: Duration,
    keepalive: Option<Duration>,
    _reader: AbortOnDrop,
}

/// One session, from dialling to its end (`Ok` only when stopped). Stopped before it is
/// Established, it just closes: nothing was announced.
async fn session(
    local: &Local,
    peer: &Peer,
    routes: &mut watch::Receiver<Routes>,
    bfd: Option<&mut watch::Receiver<BfdState>>,
    status: &watch::Sender<Status>,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let opened = tokio::select! {
        r = open(local, peer, status) => r?,
        _ = stop.cancelled() => return Ok(()),
    };
    established(opened, peer, routes, bfd, status, stop).await
}

/// Dials `peer` and exchanges OPEN and KEEPALIVE.
async fn open(
    local: &Local,
    peer: &Peer,
    status: &watch::Sender<Status>,
) -> Result<Opened, SessionError> {
    let ebgp = peer.remote_as != local.asn;
    let d = Dial {
        peer: peer.socket_addr(),
        source: peer.source,
        interface: peer.interface.clone(),
        password: peer.password.clone(),
        // A directly connected eBGP peer is one hop away (RFC 4271's default); multihop
        // peers may be anywhere.
        ttl: match (ebgp, peer.multihop) {
            (true, false) => Some(1),
            (_, true) => Some(255),
            (false, false) => None,
        },
    };
    let stream = dial(&d, CONNECT_TIMEOUT)
        .await
        .map_err(|e| SessionError::Dial(Arc::new(e)))?;
    let local_addr = stream
        .local_addr()
        .map_err(|e| SessionError::Io(Arc::new(e)))?;
    let (r, w) = stream.into_split();
    let (tx, rx) = mpsc::channel(64);
    let reader = tokio::spawn(reader(r, tx));
    // The reader ends with the connection; make sure it does when this session does.
    let _reader = AbortOnDrop(reader);
    let mut c = Conn { w, rx, local_addr };
    c.send(&wire::encode_open(&open_of(local))).await?;
    status.send_modify(|s| s.state = State::OpenSent);
    let theirs = match c.next(Instant::now() + OPEN_WAIT, OPEN_WAIT).await {
        Ok(Message::Open(o)) => o,
        Ok(Message::Notification(n)) => return Err(SessionError::PeerNotification(n)),
        Ok(_) => {
            c.notify(code::FSM, 1).await;
            return Err(SessionError::Unexpected(
                "a message before OPEN",
                State::OpenSent,
            ));
        }
        Err(e) => return Err(fail(&mut c, e).await),
    };
    if theirs.asn != peer.remote_as {
        c.notify(code::OPEN, 2).await;
        return Err(SessionError::WrongAs {
            got: theirs.asn,
            want: peer.remote_as,
        });
    }
    if theirs.hold_time == 1 || theirs.hold_time == 2 {
        c.notify(code::OPEN, 6).await;
        return Err(SessionError::HoldTime(theirs.hold_time));
    }
    if theirs.id.is_unspecified() || (!ebgp && theirs.id == local.router_id) {
        c.notify(code::OPEN, 3).await;
        return Err(SessionError::Identifier(theirs.id));
    }
    let hold = Duration::from_secs(u64::from(local.hold_time.min(theirs.hold_time)));
    let keepalive = (!hold.is_zero()).then(|| {
        Duration::from_secs(u64::from(local.keepalive.max(1)))
            .min(hold / 3)
            .max(Duration::from_secs(1))
    });
    // With no hold time, a silent peer is never given up by timer (RFC 4271: both sides
    // agreed to it); the TCP connection's own failure still ends the session.
    let deadline_after = |now: Instant| {
        if hold.is_zero() {
            now + Duration::from_secs(86400 * 365)
        } else {
            now + hold
        }
    };
    c.send(&wire::encode_keepalive()).await?;
    status.send_modify(|s| s.state = State::OpenConfirm);
    match c.next(deadline_after(Instant::now()), hold).await {
        Ok(Message::Keepalive) => {}
        Ok(Message::Notification(n)) => return Err(SessionError::PeerNotification(n)),
        Ok(_) => {
            c.notify(code::FSM, 2).await;
            return Err(SessionError::Unexpected(
                "a message before KEEPALIVE",
                State::OpenConfirm,
            ));
        }
        Err(e) => return Err(fail(&mut c, e).await),
    }
    let four_octet = theirs.four_octet_as().is_some();
    let routing = Routing {
        local_as: local.asn,
        ibgp: !ebgp,
        four_octet,
        next_hop_v4: match c.local_addr.ip() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => peer.next_hop_v4.or(local.next_hop_v4),
        }
        .filter(|_| theirs.offers(AFI_IPV4, SAFI_UNICAST)),
        next_hop_v6: match c.local_addr.ip() {
            IpAddr::V6(a) if !is_link_local(a) => Some(a),
            _ => peer.next_hop_v6.or(local.next_hop_v6),
        }
        .filter(|_| theirs.offers(AFI_IPV6, SAFI_UNICAST)),
    };
    status.send_modify(|s| {
        s.state = State::Established;
        s.established += 1;
        s.last_error = None;
    });
    tracing::info!(peer = %peer.address, hold = ?hold, four_octet, "BGP session established");
    Ok(Opened {
        c,
        routing,
        hold,
        keepalive,
        _reader,
    })
}

/// The Established state: follows `routes` until the session fails or `stop`.
async fn established(
    opened: Opened,
    peer: &Peer,
    routes: &mut watch::Receiver<Routes>,
    mut bfd: Option<&mut watch::Receiver<BfdState>>,
    status: &watch::Sender<Status>,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    // BFD ends the session only once it has been Up during it (a peer whose BFD is not
    // configured leaves it Down: the hold time still counts).
    let mut bfd_was_up = bfd.as_ref().is_some_and(|b| *b.borrow() == BfdState::Up);
    let Opened {
        mut c,
        routing,
        hold,
        keepalive,
        _reader,
    } = opened;
    let deadline_after = |now: Instant| {
        if hold.is_zero() {
            now + Duration::from_secs(86400 * 365)
        } else {
            now + hold
        }
    };
    let mut told: BTreeSet<IpAddr> = BTreeSet::new();
    let mut hold_deadline = deadline_after(Instant::now());
    let mut next_keepalive = keepalive.map(|k| Instant::now() + k);
    // The current routes are sent at once, then every change.
    routes.mark_changed();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // Withdraw explicitly, then close: the peer drops the routes at once either
                // way, and a peer that kept them after a lost NOTIFICATION would not.
                let all: Vec<IpAddr> = told.iter().copied().collect();
                let (msgs, _) = wire::encode_updates(&routing, &[], &all);
                for m in &msgs {
                    if c.send(m).await.is_err() {
                        // Part of a message may be on the wire: a NOTIFICATION after it
                        // would be read as its rest. Closing is all that is left.
                        return Ok(());
                    }
                }
                c.notify(code::CEASE, code::CEASE_ADMIN_SHUTDOWN).await;
                return Ok(());
            }
            // Our keepalives before the peer's messages: a peer streaming UPDATEs must not
            // hold them off until its hold timer runs out.
            _ = sleep_until_opt(next_keepalive) => {
                c.send(&wire::encode_keepalive()).await?;
                next_keepalive = keepalive.map(|k| Instant::now() + k);
            }
            m = c.rx.recv() => {
                match m {
                    Some(Ok(Message::Keepalive)) | Some(Ok(Message::Update(_))) => {
                        hold_deadline = deadline_after(Instant::now());
                    }
                    Some(Ok(Message::Notification(n))) => {
                        return Err(SessionError::PeerNotification(n));
                    }
                    Some(Ok(Message::Open(_))) => {
                        c.notify(code::FSM, 3).await;
                        return Err(SessionError::Unexpected("OPEN", State::Established));
                    }
                    Some(Err(e)) => return Err(fail(&mut c, e).await),
                    None => return Err(SessionError::Closed),
                }
            }
            changed = bfd_changed(bfd.as_deref_mut()) => {
                if changed {
                    let now = bfd.as_ref().map(|b| *b.borrow());
                    if now == Some(BfdState::Up) {
                        bfd_was_up = true;
                    } else if bfd_was_up && now != Some(BfdState::AdminDown) {
                        // RFC 9384: Cease, BFD Down.
                        c.notify(code::CEASE, 10).await;
                        return Err(SessionError::BfdDown);
                    }
                } else {
                    bfd = None;
                }
            }
            _ = tokio::time::sleep_until(hold_deadline) => {
                c.notify(code::HOLD_TIMER_EXPIRED, 0).await;
                return Err(SessionError::HoldTimerExpired(hold));
            }

            changed = routes.changed() => {
                if changed.is_err() {
                    // The speaker is gone without a stop: nothing more to follow.
                    c.notify(code::CEASE, code::CEASE_ADMIN_SHUTDOWN).await;
                    return Ok(());
                }
                let want = routes.borrow_and_update().clone();
                let withdraw: Vec<IpAddr> = told.difference(&want).copied().collect();
                let announce: Vec<IpAddr> = want.difference(&told).copied().collect();
                let (msgs, skipped) = wire::encode_updates(&routing, &announce, &withdraw);
                for m in &msgs {
                    c.send(m).await?;
                }
                let skipped: BTreeSet<IpAddr> = skipped.into_iter().collect();
                for a in &withdraw {
                    told.remove(a);
                }
                told.extend(announce.iter().filter(|a| !skipped.contains(a)));
                let n = msgs.len() as u64;
                let unannounced: BTreeSet<IpAddr> =
                    want.iter().filter(|a| !told.contains(a)).copied().collect();
                if !unannounced.is_empty() && !skipped.is_empty() {
                    tracing::warn!(peer = %peer.address, routes = ?skipped, "no next hop of these routes' family on this session (or the family was not negotiated): not announced");
                }
                status.send_modify(|s| {
                    s.adj_rib_out = told.clone();
                    s.unannounced = unannounced;
                    s.updates_sent += n;
                });
                if n > 0 {
                    // An UPDATE counts as a keepalive.
                    next_keepalive = keepalive.map(|k| Instant::now() + k);
                }
            }
        }
    }
}

fn is_link_local(a: Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

/// Until the BFD state changes (`true`), or its sender is gone (`false`); never without BFD.
async fn bfd_changed(b: Option<&mut watch::Receiver<BfdState>>) -> bool {
    match b {
        Some(b) => b.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Answers a read error with the NOTIFICATION it calls for, and returns it.
async fn fail(c: &mut Conn, e: SessionError) -> SessionError {
    match &e {
        SessionError::Malformed(w) => {
            let (code, sub) = w.notification();
            c.notify(code, sub).await;
        }
        SessionError::HoldTimerExpired(_) => c.notify(code::HOLD_TIMER_EXPIRED, 0).await,
        _ => {}
    }
    e
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
