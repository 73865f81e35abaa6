//! One endpoint of the test API server: a listener served by hand, so that stopping it
//! closes its port and cuts every connection made through it (what a killed kube-apiserver
//! does to its clients), while the other endpoints, on the same store, go on.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::watch;

/// A listener handed to the server thread: its endpoint number, the signal that stops it, and
/// its TLS configuration (none: plain HTTP).
pub(crate) struct Incoming {
    pub listener: std::net::TcpListener,
    pub id: usize,
    pub stop: watch::Receiver<bool>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Serves `app` on `listener` (over TLS with `tls`) until `stop` turns true; then the listener
/// is closed and every connection it accepted is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: watch::Receiver<bool>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut stopped = stop.clone();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                // Out of descriptors, say: try again shortly rather than spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped_signal(&mut stopped) => return,
        };
        let svc = TowerToHyperService::new(app.clone());
        let mut conn_stop = stop.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let conn = async {
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    // A failed handshake (a client that does not trust the certificate)
                    // just closes the connection, as kube-apiserver does.
                    Some(t) => {
                        if let Ok(s) = t.accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = conn => {}
                // Dropping the connection closes its socket, open watches included.
                _ = stopped_signal(&mut conn_stop) => {}
            }
        });
    }
}

/// Until `stop` turns true (or its sender is gone: the server is going away).
async fn stopped_signal(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
