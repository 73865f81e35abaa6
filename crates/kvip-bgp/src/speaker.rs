//! The speaker: one session task per peer, all announcing the same set of host routes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bfd::{self, BfdSettings, BfdState, Receivers};
use crate::session::{self, Local, Peer, Routes, Status};

struct PeerTask {
    peer: Peer,
    status: watch::Receiver<Status>,
    bfd: Option<watch::Receiver<BfdState>>,
}

/// A peer's session as the speaker shows it.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub peer: Peer,
    pub status: Status,
    /// The BFD session's state, for a peer with BFD.
    pub bfd: Option<BfdState>,
}

pub struct Speaker {
    routes: watch::Sender<Routes>,
    peers: Vec<PeerTask>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Speaker {
    /// Starts a session task per peer on the current tokio runtime. Nothing is announced
    /// until [`Speaker::announce`].
    pub fn start(local: Local, peers: Vec<Peer>) -> Speaker {
        let local = Arc::new(local);
        let (routes, _) = watch::channel(Routes::default());
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let receivers = Receivers::default();
        let peers = peers
            .into_iter()
            .map(|p| {
                let (tx, rx) = watch::channel(Status::default());
                let bfd = p.bfd.map(|(transmit, receive, multiplier)| {
                    let (btx, brx) = watch::channel(BfdState::Down);
                    let settings = BfdSettings {
                        peer: p.address,
                        source: p.source,
                        interface: p.interface.clone(),
                        transmit,
                        receive,
                        multiplier,
                    };
                    let (receivers, stop) = (receivers.clone(), stop.child_token());
                    tasks.spawn(async move {
                        if let Err(e) = bfd::run(settings.clone(), receivers, btx, stop).await {
                            tracing::error!(peer = %settings.peer, error = %e, "BFD cannot run: the session relies on its hold time");
                        }
                    });
                    brx
                });
                tasks.spawn(session::run(
                    local.clone(),
                    p.clone(),
                    routes.subscribe(),
                    bfd.clone(),
                    tx,
                    stop.child_token(),
                ));
                PeerTask {
                    peer: p,
                    status: rx,
                    bfd,
                }
            })
            .collect();
        tasks.close();
        Speaker {
            routes,
            peers,
            stop,
            tasks,
        }
    }

    /// The host routes every session announces from now on (level-triggered: the whole set).
    pub fn announce(&self, routes: BTreeSet<IpAddr>) {
        self.routes.send_if_modified(|r| {
            if **r == routes {
                return false;
            }
            *r = Arc::new(routes);
            true
        });
    }

    /// Makes every Established session compare what it told its peer with the routes to
    /// announce again, and send the difference (a repair after drift was found).
    pub fn resend(&self) {
        self.routes.send_modify(|_| {});
    }

    /// Each peer, its session's status and its BFD state.
    pub fn peers(&self) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|t| PeerView {
                peer: t.peer.clone(),
                status: t.status.borrow().clone(),
                bfd: t.bfd.as_ref().map(|b| *b.borrow()),
            })
            .collect()
    }

    /// Withdraws every route and closes every session, within `within`; false when some
    /// session did not finish in time (it is then abandoned: its connection closes).
    pub async fn shutdown(&self, within: Duration) -> bool {
        self.stop.cancel();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
