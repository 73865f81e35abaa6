//! The test API server's endpoints, one per network namespace, on one store — the shape of
//! several kube-apiservers on one etcd: each one stops (connections refused and cut),
//! starts again, freezes, or refuses an identity on its own, while the others go on.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use kvip_testkit::apiserver::{ApiServer, Endpoint};
use kvip_testkit::{Netns, require_kernel};

/// What a call through `e` (from inside `ns`, as `token`) got: the ConfigMap's data value,
/// or the error as text; `None` when no answer came within 500 ms.
fn read(ns: &Netns, e: &Endpoint, token: Option<&str>) -> Option<Result<String, String>> {
    let kubeconfig = ApiServer::kubeconfig_with_token(&e.url, token);
    ns.block_on(move || async move {
        let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(cfg).expect("client");
        let api: Api<ConfigMap> = Api::namespaced(client, "default");
        match tokio::time::timeout(Duration::from_millis(500), api.get("shared")).await {
            Err(_) => None,
            Ok(Ok(cm)) => Some(Ok(cm
                .data
                .and_then(|d| d.get("v").cloned())
                .unwrap_or_default())),
            Ok(Err(e)) => Some(Err(e.to_string())),
        }
    })
    .expect("netns")
}

/// `GET /readyz` through `e` from inside `ns`: the body, or the connection's error.
fn readyz(ns: &Netns, e: &Endpoint) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = e.url.trim_start_matches("http://").to_string();
    ns.enter(move || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .expect("netns")
    .map_err(|e| e.to_string())
}

#[test]
fn endpoints_share_one_store_and_fail_one_by_one() {
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    let (na, nb) = (
        Netns::new("epa").expect("netns"),
        Netns::new("epb").expect("netns"),
    );
    let a = server.endpoint_in(&na).expect("endpoint a");
    let b = server.endpoint_in(&nb).expect("endpoint b");
    assert_ne!(a.id, b.id);
    // Written through the test's own loopback, read through both.
    let (rt, client) = server.runtime_and_client();
    rt.block_on(async {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "shared", "namespace": "default"}, "data": {"v": "one"}
        }))
        .expect("configmap");
        Api::<ConfigMap>::namespaced(client, "default")
            .create(&PostParams::default(), &cm)
            .await
            .expect("create");
    });
    let one = Some(Ok("one".to_string()));
    assert_eq!(read(&na, &a, None), one);
    assert_eq!(read(&nb, &b, None), one);
    assert!(readyz(&na, &a).expect("readyz").ends_with("ok"));

    // Stopped: refused on a, b goes on; started again at the same address.
    server.stop_endpoint(&a);
    let refused = readyz(&na, &a).expect_err("a stopped endpoint refuses connections");
    assert!(refused.contains("refused"), "{refused}");
    assert!(matches!(read(&na, &a, None), Some(Err(_))));
    assert_eq!(read(&nb, &b, None), one);
    server.restart_endpoint(&na, &a).expect("restart");
    assert_eq!(read(&na, &a, None), one);

    // Frozen alone: no answer on a, b answers; thawed, a answers again.
    server.freeze_endpoint(&a);
    assert_eq!(read(&na, &a, None), None);
    assert_eq!(read(&nb, &b, None), one);
    server.thaw_endpoint(&a);
    assert_eq!(read(&na, &a, None), one);

    // An identity refused on a alone: 403 there, served on b, and others served on a.
    server.refuse_identity(&a, "kubernetes-admin", true);
    match read(&na, &a, Some("kubernetes-admin")) {
        Some(Err(e)) => assert!(e.contains("403") || e.contains("forbidden"), "{e}"),
        other => panic!("not refused: {other:?}"),
    }
    assert_eq!(read(&nb, &b, Some("kubernetes-admin")), one);
    assert_eq!(read(&na, &a, Some("kubernetes-super-admin")), one);
    server.refuse_identity(&a, "kubernetes-admin", false);
    assert_eq!(read(&na, &a, Some("kubernetes-admin")), one);
}

/// A stopped endpoint cuts the watches open through it: the client sees its stream end.
#[test]
fn stopping_an_endpoint_cuts_its_open_watches() {
    require_kernel!();
    use futures_util::StreamExt;
    let server = ApiServer::start().expect("api server");
    let ns = Netns::new("epw").expect("netns");
    let e = server.endpoint_in(&ns).expect("endpoint");
    let (tx, rx) = std::sync::mpsc::channel();
    let url = e.url.clone();
    let ended = std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            ns.block_on(move || async move {
                let client = kube::Client::try_from(kube::Config::new(url.parse().expect("url")))
                    .expect("client");
                let api: Api<ConfigMap> = Api::namespaced(client, "default");
                let mut stream = api
                    .watch(&Default::default(), "0")
                    .await
                    .expect("watch")
                    .boxed();
                tx.send(()).expect("started");
                // Nothing is written: the stream can only end because the endpoint stopped.
                let drained = async {
                    while let Some(item) = stream.next().await {
                        if item.is_err() {
                            break;
                        }
                    }
                };
                tokio::time::timeout(Duration::from_secs(10), drained)
                    .await
                    .is_ok()
            })
            .expect("netns")
        });
        rx.recv_timeout(Duration::from_secs(5)).expect("watch open");
        server.stop_endpoint(&e);
        h.join().expect("watch thread")
    });
    assert!(ended, "the watch went on after its endpoint stopped");
}

/// A TLS endpoint presents its serving certificate: verified for a name it carries, refused
/// for one it does not, and for a CA that did not sign it; restarted with another
/// certificate, it presents that one.
#[test]
fn tls_endpoint_presents_its_certificate() {
    use kvip_testkit::tls::Authority;
    require_kernel!();
    let server = ApiServer::start().expect("api server");
    let ns = Netns::new("ept").expect("netns");
    let ca = Authority::new().expect("CA");
    let cert = ca.serving(&["kubernetes"]).expect("certificate");
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let e = server.tls_endpoint_in_at(&ns, at, &cert).expect("endpoint");
    assert!(e.url.starts_with("https://127.0.0.1:"), "{}", e.url);
    let addr: std::net::SocketAddr = e.url["https://".len()..].parse().expect("address");
    let get = |ca: &Authority, name: &'static str| {
        ns.enter(|| ca.get(addr, name, "/readyz"))
            .expect("netns")
            .map_err(|e| e.to_string())
    };
    let answer = get(&ca, "kubernetes").expect("verified for kubernetes");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
    let wrong = get(&ca, "localhost").expect_err("not valid for localhost");
    assert!(wrong.contains("not valid for name"), "{wrong}");
    let other = Authority::new().expect("CA");
    assert!(get(&other, "kubernetes").is_err(), "another CA's client");
    // Restarted with a certificate for another name.
    let cert = ca.serving(&["localhost"]).expect("certificate");
    server
        .restart_endpoint_with(&ns, &e, &cert)
        .expect("restart");
    assert!(get(&ca, "localhost").is_ok_and(|a| a.ends_with("ok")));
    assert!(get(&ca, "kubernetes").is_err());
}
