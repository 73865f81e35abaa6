//! The speaker: one session task per peer, all announcing the same set of host routes.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::session::{self, Local, Peer, Routes, Status};

pub struct Speaker {
    routes: watch::Sender<Routes>,
    peers: Vec<(Peer, watch::Receiver<Status>)>,
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
        let peers = peers
            .into_iter()
            .map(|p| {
                let (tx, rx) = watch::channel(Status::default());
                tasks.spawn(session::run(
                    local.clone(),
                    p.clone(),
                    routes.subscribe(),
                    tx,
                    stop.child_token(),
                ));
                (p, rx)
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

    /// Each peer and its session's status.
    pub fn peers(&self) -> Vec<(Peer, Status)> {
        self.peers
            .iter()
            .map(|(p, s)| (p.clone(), s.borrow().clone()))
            .collect()
    }

    /// Each peer's status channel, to wait on.
    pub fn watch(&self) -> Vec<watch::Receiver<Status>> {
        self.peers.iter().map(|(_, s)| s.clone()).collect()
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
