//! BGP mode (`bgp_enable`): kvip's own speaker announces, as host routes, the VIPs this
//! node has in its kernel. The reconcile loop publishes that set (withdrawals before the
//! addresses go, announcements once they are in); this module hands it to the speaker, keeps
//! the per-peer metrics, and checks each session's Adj-RIB-Out against it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kvip_bgp::{Local, Peer, Speaker, State};
use kvip_core::bgp::{BgpConfig, MpNextHop};
use kvip_dataplane::addr::AddrManager;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{BgpPeerReport, Metrics, PeerLabel};

/// How often the sessions' state is read into the metrics and checked.
const LOOK: Duration = Duration::from_millis(500);

/// The node's own addresses (not kvip's VIPs), by interface.
type Addresses = BTreeMap<String, Vec<IpAddr>>;

/// The addresses of `interface`.
fn of<'a>(addrs: &'a Addresses, interface: &str) -> Result<&'a [IpAddr]> {
    addrs
        .get(interface)
        .map(Vec::as_slice)
        .with_context(|| format!("no interface named {interface}"))
}

fn global_v6(a: &[IpAddr]) -> Option<Ipv6Addr> {
    a.iter().find_map(|a| match a {
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_loopback() => Some(*v6),
        _ => None,
    })
}

fn first_v4(a: &[IpAddr]) -> Option<Ipv4Addr> {
    a.iter().find_map(|a| match a {
        IpAddr::V4(v4) if !v4.is_loopback() => Some(*v4),
        _ => None,
    })
}

/// The next hops of the other family (IPv4 routes on IPv6 sessions, IPv6 routes on IPv4
/// sessions) that `mp` asks for.
fn next_hops(
    addrs: &Addresses,
    cfg: &BgpConfig,
    mp: &MpNextHop,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
    let found: Option<&[IpAddr]> = match mp {
        MpNextHop::Fixed { v4, v6 } => return Ok((*v4, *v6)),
        MpNextHop::SourceInterface => match &cfg.source_if {
            Some(i) => Some(of(addrs, i)?),
            None => None,
        },
        // The interface holding bgp_sourceip.
        MpNextHop::SourceIp => cfg
            .source_ip
            .and_then(|ip| addrs.values().find(|a| a.contains(&ip)).map(Vec::as_slice)),
    };
    Ok(found.map_or((None, None), |a| (first_v4(a), global_v6(a))))
}

/// Starts the speaker for `cfg`; its routes follow the returned sender.
pub(crate) async fn start(
    cfg: &BgpConfig,
    m: &Arc<Metrics>,
    tasks: &TaskTracker,
    root: &CancellationToken,
) -> Result<(Arc<Speaker>, watch::Sender<BTreeSet<IpAddr>>)> {
    let am = AddrManager::new().context("opening a netlink socket")?;
    let kvip: BTreeSet<u8> = kvip_dataplane::protocols::NAMED_RANGE.collect();
    let addrs = am
        .own_addresses(&kvip)
        .await
        .context("reading the node's addresses")?;
    drop(am);
    let router_id = match (cfg.router_id, &cfg.router_interface) {
        (Some(id), _) => id,
        (None, Some(i)) => first_v4(of(&addrs, i)?).with_context(|| {
            format!("bgp_routerinterface={i}: the interface has no IPv4 address for a router ID")
        })?,
        (None, None) => bail!("bgp_routerid is not set"),
    };
    let (v4, v6) = next_hops(&addrs, cfg, &cfg.mp_next_hop)?;
    let local = Local {
        asn: cfg.local_as,
        router_id,
        hold_time: cfg.hold_time,
        keepalive: cfg.keepalive,
        next_hop_v4: v4,
        next_hop_v6: v6,
    };
    let mut peers = Vec::new();
    for p in &cfg.peers {
        let (pv4, pv6) = match &p.mp_next_hop {
            Some(mp) => next_hops(&addrs, cfg, mp)?,
            None => (None, None),
        };
        peers.push(Peer {
            address: p.address,
            port: p.port,
            remote_as: p.remote_as,
            password: p.password.clone(),
            multihop: p.multihop,
            // bgp_sourceip is of one family: peers of the other dial from their own.
            source: cfg
                .source_ip
                .filter(|ip| ip.is_ipv4() == p.address.is_ipv4()),
            interface: cfg.source_if.clone(),
            next_hop_v4: pv4,
            next_hop_v6: pv6,
            bfd: p
                .bfd
                .map(|b| (b.transmit_interval, b.receive_interval, b.multiplier)),
        });
    }
    tracing::info!(
        asn = cfg.local_as, %router_id, peers = ?cfg.peers.iter().map(|p| p.address).collect::<Vec<_>>(),
        next_hop_v4 = ?v4, next_hop_v6 = ?v6, "BGP: announcing the VIPs this node holds"
    );
    let speaker = Arc::new(Speaker::start(local, peers));
    let (routes_tx, routes) = watch::channel(BTreeSet::new());
    tasks.spawn(follow(
        speaker.clone(),
        routes,
        m.clone(),
        root.child_token(),
    ));
    Ok((speaker, routes_tx))
}

/// Per peer: what was last seen of its session.
#[derive(Default)]
struct Seen {
    updates: u64,
    established: u64,
    bfd_downs: u64,
    /// The routes to announce and the Adj-RIB-Out differed at the last look (while
    /// Established, with the routes unchanged since).
    differed: bool,
}

/// Hands every change of `routes` to the speaker; every [`LOOK`], reads the sessions into
/// the metrics and compares each Established session's Adj-RIB-Out with `routes`.
async fn follow(
    speaker: Arc<Speaker>,
    mut routes: watch::Receiver<BTreeSet<IpAddr>>,
    m: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut seen: BTreeMap<IpAddr, Seen> = BTreeMap::new();
    let mut tick = tokio::time::interval(LOOK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = routes.changed() => {
                if r.is_err() {
                    return;
                }
                speaker.announce(routes.borrow_and_update().clone());
                // A change restarts every comparison.
                for s in seen.values_mut() {
                    s.differed = false;
                }
            }
            _ = tick.tick() => {
                let want = routes.borrow().clone();
                let views = speaker.peers();
                m.set_bgp_peers(views.iter().map(|v| BgpPeerReport {
                    peer: v.peer.address.to_string(),
                    remote_as: v.peer.remote_as,
                    state: v.status.state.as_str().into(),
                    last_error: v.status.last_error.as_ref().map(|e| kvip_kube::Causes(e).to_string()),
                    routes_announced: v.status.adj_rib_out.len(),
                    routes_unannounced: v.status.unannounced.iter().map(ToString::to_string).collect(),
                    bfd: v.bfd.map(|b| b.as_str().into()),
                }).collect());
                for v in views {
                    let (peer, st) = (v.peer, v.status);
                    let label = PeerLabel { peer: peer.address.to_string() };
                    let s = seen.entry(peer.address).or_default();
                    let up = st.state == State::Established;
                    m.bgp_session_up.get_or_create(&label).set(i64::from(up));
                    if let Some(b) = v.bfd {
                        m.bfd_session_up.get_or_create(&label).set(i64::from(b == kvip_bgp::bfd::BfdState::Up));
                    }
                    m.bgp_routes_announced.get_or_create(&label).set(st.adj_rib_out.len() as i64);
                    m.bgp_routes_unannounced.get_or_create(&label).set(st.unannounced.len() as i64);
                    m.bgp_updates_sent.get_or_create(&label).inc_by(st.updates_sent.saturating_sub(s.updates));
                    m.bgp_sessions_established.get_or_create(&label).inc_by(st.established.saturating_sub(s.established));
                    m.bfd_session_downs.get_or_create(&label).inc_by(st.bfd_downs.saturating_sub(s.bfd_downs));
                    s.updates = st.updates_sent;
                    s.established = st.established;
                    s.bfd_downs = st.bfd_downs;
                    // Everything to announce is either in the Adj-RIB-Out or reported as not
                    // carried; nothing else is in it. A difference may be a write under way:
                    // only one that lasts two looks is drift.
                    let told: BTreeSet<IpAddr> = st.adj_rib_out.union(&st.unannounced).copied().collect();
                    let differs = up && told != want;
                    if differs && s.differed {
                        m.bgp_adj_rib_out_drift.inc();
                        tracing::error!(peer = %peer.address, announced = ?st.adj_rib_out, want = ?want, "the session's Adj-RIB-Out differs from the routes to announce: sending the difference");
                        speaker.resend();
                    }
                    s.differed = differs && !s.differed;
                }
            }
        }
    }
}
