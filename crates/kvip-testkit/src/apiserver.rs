//! An in-process Kubernetes API server for tests: the real kube client talks to it over HTTP
//! on loopback. It keeps objects as JSON with a cluster-wide resourceVersion, answers get,
//! list and watch (from a resourceVersion, with label and field selectors, bookmarks, and an
//! ERROR 410 event for a version older than the retained history), create, replace (409 when
//! the resourceVersion moved) and delete with Kubernetes' Status errors, records every call,
//! and injects faults (403 per resource, 500 for a while, stalls, dropped watches, expired
//! history). One store can be served through several endpoints, one per network namespace
//! (the shape of several kube-apiservers on one etcd), each of which can be stopped and
//! started again, frozen, or made to refuse an identity on its own; `/readyz`, `/livez` and
//! `/healthz` answer `ok` on every endpoint that runs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::endpoint::Incoming;
use tokio::sync::{broadcast, watch};

/// Where an object lives: API group/version ("v1" for the core group), resource, namespace
/// ("" for cluster-scoped), name.
type Key = (String, String, String, String);

/// One recorded call: method, resource (`leases`, `services/status`, ...), namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    /// The listener the call came through: 0 is loopback of the test process, then one per
    /// [`ApiServer::listen_in`] in call order.
    pub listener: usize,
    pub verb: String,
    pub group_version: String,
    pub resource: String,
    pub namespace: String,
}

/// A change, as watches report it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, Value>,
    resource_version: u64,
    /// Every change, oldest first; versions up to `compacted` are no longer served.
    log: Vec<Change>,
    compacted: u64,
    calls: Vec<Call>,
    /// Resources (e.g. "pods") answered with 403.
    denied: Vec<String>,
    fail_until: Option<Instant>,
    stall: Duration,
    /// With `Some`, RBAC is enforced: only these permissions are granted (everything else is
    /// 403, as with a real authorizer); SelfSubjectAccessReviews are answered from them.
    grants: Option<Vec<Grant>>,
    /// Calls that never get an answer, as (verb, resource with subresource).
    hung: Vec<(String, String)>,
    /// Resources answered with 500 until lifted.
    failing: Vec<String>,
    /// Per endpoint, the identities (bearer tokens) answered with 403 there.
    refused: BTreeMap<usize, BTreeSet<String>>,
}

/// One granted permission, as an RBAC rule bound to the caller grants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// API group ("" for the core group).
    pub group: String,
    /// Resource, with its subresource (`services/status`).
    pub resource: String,
    pub verb: String,
    /// `None`: every namespace (a ClusterRole through a ClusterRoleBinding).
    pub namespace: Option<String>,
}

fn granted(grants: &[Grant], group: &str, resource: &str, verb: &str, namespace: &str) -> bool {
    grants.iter().any(|g| {
        g.group == group
            && g.resource == resource
            && g.verb == verb
            && g.namespace.as_deref().is_none_or(|n| n == namespace)
    })
}

struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch.
    watch_epoch: watch::Sender<u64>,
    /// While true, no request is answered (a frozen API server); answers resume when false.
    frozen: watch::Sender<bool>,
    /// The endpoints frozen on their own.
    frozen_endpoints: watch::Sender<BTreeSet<usize>>,
}

impl Shared {
    fn record(&self, g: &mut Inner, kind: &'static str, key: Key, object: Value) {
        let c = Change {
            rv: g.resource_version,
            kind,
            key,
            object,
        };
        g.log.push(c.clone());
        let _ = self.changes.send(c);
    }
}

/// A running test API server; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listen: tokio::sync::mpsc::UnboundedSender<Incoming>,
    /// Per running endpoint, the switch that stops it.
    stops: Mutex<BTreeMap<usize, watch::Sender<bool>>>,
    /// The TLS configuration of each endpoint served over TLS (kept for a restart).
    tls: Mutex<BTreeMap<usize, crate::tls::ServingCert>>,
    next_id: std::sync::atomic::AtomicUsize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One endpoint of the server inside a network namespace: its number (as in [`Call`]) and
/// URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: usize,
    pub url: String,
    addr: SocketAddr,
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, axum::Json(body)).into_response()
}

/// Parsed request path.
struct Target {
    group_version: String,
    namespace: String,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (ns.to_string(), rest),
        _ => (String::new(), rest),
    };
    let (resource, name, sub) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, s] => (r.to_string(), Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    Some(Target {
        group_version: gv,
        namespace,
        resource,
        name,
        subresource: sub,
    })
}

/// A label selector term: key, value (none: exists), equal (`=`) or not (`!=`).
type LabelTerm = (String, Option<String>, bool);

/// Query parameters the server understands.
#[derive(Default, Clone)]
struct Query {
    watch: bool,
    resource_version: Option<u64>,
    labels: Vec<LabelTerm>,
    fields: Vec<(String, String)>,
    timeout: Option<Duration>,
    bookmarks: bool,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: Option<&str>) -> Query {
    let mut out = Query::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "watch" => out.watch = v == "true" || v == "1",
            "resourceVersion" => out.resource_version = v.parse().ok(),
            "timeoutSeconds" => out.timeout = v.parse().ok().map(Duration::from_secs),
            "allowWatchBookmarks" => out.bookmarks = v == "true",
            "labelSelector" => {
                for term in v.split(',').filter(|t| !t.is_empty()) {
                    let term = term.trim();
                    if let Some((a, b)) = term.split_once("!=") {
                        out.labels.push((a.into(), Some(b.into()), false));
                    } else if let Some((a, b)) = term.split_once('=') {
                        out.labels
                            .push((a.into(), Some(b.trim_start_matches('=').into()), true));
                    } else {
                        out.labels.push((term.into(), None, true));
                    }
                }
            }
            "fieldSelector" => {
                for term in v.split(',').filter(|t| !t.is_empty()) {
                    if let Some((a, b)) = term.split_once('=') {
                        out.fields
                            .push((a.into(), b.trim_start_matches('=').into()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn selected(q: &Query, obj: &Value) -> bool {
    let labels = &obj["metadata"]["labels"];
    let labels_ok = q.labels.iter().all(|(k, v, eq)| match v {
        None => !labels[k.as_str()].is_null(),
        Some(v) => (labels[k.as_str()].as_str() == Some(v.as_str())) == *eq,
    });
    let fields_ok = q.fields.iter().all(|(k, v)| match k.as_str() {
        "metadata.name" => obj["metadata"]["name"].as_str() == Some(v.as_str()),
        "metadata.namespace" => obj["metadata"]["namespace"].as_str() == Some(v.as_str()),
        _ => false,
    });
    labels_ok && fields_ok
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        Value::Null => {}
        other => *target = other.clone(),
    }
}

/// What one open watch still has to send.
struct WatchState {
    queue: std::collections::VecDeque<Bytes>,
    live: broadcast::Receiver<Change>,
    epoch: watch::Receiver<u64>,
    deadline: tokio::time::Instant,
    filter: Box<dyn Fn(&Change) -> bool + Send>,
    bookmark: Option<(String, String)>,
    last_rv: u64,
    done: bool,
}

async fn next_chunk(
    mut st: WatchState,
) -> Option<(Result<Bytes, std::convert::Infallible>, WatchState)> {
    loop {
        if let Some(b) = st.queue.pop_front() {
            return Some((Ok(b), st));
        }
        if st.done {
            return None;
        }
        let tick = tokio::time::sleep(Duration::from_millis(500));
        tokio::select! {
            c = st.live.recv() => match c {
                Ok(c) => {
                    if c.rv > st.last_rv && (st.filter)(&c) {
                        st.last_rv = c.rv;
                        st.queue.push_back(watch_line(c.kind, &c.object));
                    } else {
                        st.last_rv = st.last_rv.max(c.rv);
                    }
                }
                // Lagging behind or server gone: end; the client watches again.
                Err(_) => st.done = true,
            },
            _ = st.epoch.changed() => st.done = true,
            _ = tokio::time::sleep_until(st.deadline) => st.done = true,
            _ = tick => {
                if let Some((kind, gv)) = &st.bookmark {
                    let obj = json!({"kind": kind, "apiVersion": gv,
                        "metadata": {"resourceVersion": st.last_rv.to_string()}});
                    st.queue.push_back(watch_line("BOOKMARK", &obj));
                }
            }
        }
    }
}

fn kind_for(resource: &str) -> String {
    match resource {
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "nodes" => "Node",
        "leases" => "Lease",
        "pods" => "Pod",
        "configmaps" => "ConfigMap",
        "events" => "Event",
        other => other,
    }
    .to_string()
}

/// A watch: the retained changes after the requested version, then live ones, until its
/// timeout, a dropped watch or the server's end. A version older than the retained history
/// gets an ERROR event with a 410 Status, as from a real API server.
fn watch_response(shared: &Arc<Shared>, t: &Target, q: Query) -> Response {
    let live = shared.changes.subscribe();
    let epoch = shared.watch_epoch.subscribe();
    let (backlog, expired, current) = {
        let Ok(g) = shared.inner.lock() else {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned".into(),
            );
        };
        let from = q.resource_version.unwrap_or(g.resource_version);
        let backlog: Vec<Change> = g.log.iter().filter(|c| c.rv > from).cloned().collect();
        (backlog, from < g.compacted, from)
    };
    if expired {
        let gone = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410
        });
        return (
            StatusCode::OK,
            axum::body::Body::from(watch_line("ERROR", &gone)),
        )
            .into_response();
    }
    let (gv, resource, ns) = (
        t.group_version.clone(),
        t.resource.clone(),
        t.namespace.clone(),
    );
    let q2 = q.clone();
    let filter = move |c: &Change| -> bool {
        c.key.0 == gv
            && c.key.1 == resource
            && (ns.is_empty() || c.key.2 == ns)
            && selected(&q2, &c.object)
    };
    let mut last_rv = current;
    let mut queue = std::collections::VecDeque::new();
    for c in backlog {
        last_rv = last_rv.max(c.rv);
        if filter(&c) {
            queue.push_back(watch_line(c.kind, &c.object));
        }
    }
    let st = WatchState {
        queue,
        live,
        epoch,
        deadline: tokio::time::Instant::now() + q.timeout.unwrap_or(Duration::from_secs(290)),
        filter: Box::new(filter),
        bookmark: q
            .bookmarks
            .then(|| (kind_for(&t.resource), t.group_version.clone())),
        last_rv,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, next_chunk).boxed();
    (StatusCode::OK, axum::body::Body::from_stream(stream)).into_response()
}

/// Which listener a request came through.
#[derive(Clone, Copy)]
struct ListenerId(usize);

async fn handle(
    State(shared): State<Arc<Shared>>,
    axum::Extension(ListenerId(listener)): axum::Extension<ListenerId>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    // An endpoint frozen on its own answers nothing until it thaws.
    let mut frozen_here = shared.frozen_endpoints.subscribe();
    let _ = frozen_here.wait_for(|f| !f.contains(&listener)).await;
    if matches!(uri.path(), "/readyz" | "/livez" | "/healthz") {
        let mut frozen = shared.frozen.subscribe();
        let _ = frozen.wait_for(|f| !*f).await;
        return (StatusCode::OK, "ok").into_response();
    }
    let identity = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(t) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {}", uri.path()),
        );
    };
    // A frozen server answers nothing, refusals and failures included, until it thaws (an
    // error means the server is going away: answer then).
    let mut frozen = shared.frozen.subscribe();
    let _ = frozen.wait_for(|f| !*f).await;
    let q = parse_query(uri.query());
    let verb = match (&method, t.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if q.watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "other",
    };
    let resource = match &t.subresource {
        Some(s) => format!("{}/{s}", t.resource),
        None => t.resource.clone(),
    };
    let stall = {
        let Ok(mut g) = shared.inner.lock() else {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned".into(),
            );
        };
        g.calls.push(Call {
            listener,
            verb: verb.into(),
            group_version: t.group_version.clone(),
            resource: resource.clone(),
            namespace: t.namespace.clone(),
        });
        if let Some(who) = identity.as_ref().filter(|who| {
            g.refused
                .get(&listener)
                .is_some_and(|r| r.contains(who.as_str()))
        }) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{resource} is forbidden: User \"{who}\" cannot {verb} resource {resource:?} in the namespace {:?}",
                    t.namespace
                ),
            );
        }
        if g.failing.contains(&t.resource) || g.failing.contains(&resource) {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("injected failure for {resource}"),
            );
        }
        let group = t
            .group_version
            .rsplit_once('/')
            .map_or("", |(g, _)| g)
            .to_string();
        let review = verb == "create" && t.resource == "selfsubjectaccessreviews";
        if let Some(grants) = g.grants.as_ref().filter(|_| listener != 0)
            && !review
            && !granted(grants, &group, &resource, verb, &t.namespace)
        {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{resource} is forbidden: User \"system:serviceaccount:test:kvip\" cannot {verb} resource {resource:?} in API group {group:?} {}",
                    if t.namespace.is_empty() {
                        "at the cluster scope".to_string()
                    } else {
                        format!("in the namespace {:?}", t.namespace)
                    }
                ),
            );
        }
        if g.fail_until.is_some_and(|u| Instant::now() < u) {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "injected failure".into(),
            );
        }
        if g.denied.contains(&t.resource) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{} is forbidden: cannot {verb} resource {resource:?} in namespace {:?}",
                    t.resource, t.namespace
                ),
            );
        }
        let hung = g.hung.iter().any(|(v, r)| v == verb && *r == resource);
        (g.stall, hung)
    };
    let (stall, hung) = stall;
    if hung {
        return std::future::pending().await;
    }
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }

    if verb == "watch" {
        return watch_response(&shared, &t, q);
    }
    let Ok(mut g) = shared.inner.lock() else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "poisoned".into(),
        );
    };
    // SelfSubjectAccessReview: answered from the denial list, never stored.
    if verb == "create" && t.resource == "selfsubjectaccessreviews" {
        let mut review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let attrs = &review["spec"]["resourceAttributes"];
        let resource = attrs["resource"].as_str().unwrap_or_default().to_string();
        let allowed = match g.grants.as_ref().filter(|_| listener != 0) {
            Some(grants) => {
                let str_of = |k: &str| attrs[k].as_str().unwrap_or_default().to_string();
                let full = match str_of("subresource") {
                    sub if sub.is_empty() => resource.clone(),
                    sub => format!("{resource}/{sub}"),
                };
                let ns = str_of("namespace");
                // A cluster-wide question is granted only by a cluster-wide grant.
                grants.iter().any(|gr| {
                    gr.group == str_of("group")
                        && gr.resource == full
                        && gr.verb == str_of("verb")
                        && match (&gr.namespace, ns.as_str()) {
                            (None, _) => true,
                            (Some(_), "") => false,
                            (Some(n), ns) => n == ns,
                        }
                })
            }
            None => !g.denied.contains(&resource),
        };
        review["status"] = serde_json::json!({
            "allowed": allowed,
            "reason": if allowed { "allowed by the test server" } else { "denied by the test server" },
        });
        return (StatusCode::CREATED, axum::Json(review)).into_response();
    }
    let key = |name: &str| -> Key {
        (
            t.group_version.clone(),
            t.resource.clone(),
            t.namespace.clone(),
            name.to_string(),
        )
    };
    match verb {
        "get" => {
            let name = t.name.clone().unwrap_or_default();
            match g.objects.get(&key(&name)) {
                Some(o) => (StatusCode::OK, axum::Json(o.clone())).into_response(),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", t.resource),
                ),
            }
        }
        "list" => {
            let items: Vec<Value> = g
                .objects
                .iter()
                .filter(|((gv, r, ns, _), o)| {
                    *gv == t.group_version
                        && *r == t.resource
                        && (t.namespace.is_empty() || *ns == t.namespace)
                        && selected(&q, o)
                })
                .map(|(_, o)| o.clone())
                .collect();
            let body = json!({
                "kind": format!("{}List", kind_for(&t.resource)), "apiVersion": t.group_version,
                "metadata": {"resourceVersion": g.resource_version.to_string()}, "items": items
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        "patch" => {
            // JSON merge patch (RFC 7386), what `kubectl patch --type merge` and kube's
            // `Patch::Merge` send. On the status subresource only status changes; on the
            // object, everything but status.
            let name = t.name.clone().unwrap_or_default();
            let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "body is not JSON".into(),
                );
            };
            let k = key(&name);
            let Some(cur) = g.objects.get(&k).cloned() else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", t.resource),
                );
            };
            let mut obj = cur;
            if t.subresource.as_deref() == Some("status") {
                merge_patch(&mut obj["status"], &patch["status"]);
            } else {
                let mut p = patch.clone();
                if let Some(m) = p.as_object_mut() {
                    m.remove("status");
                }
                merge_patch(&mut obj, &p);
            }
            g.resource_version += 1;
            obj["metadata"]["resourceVersion"] = json!(g.resource_version.to_string());
            g.objects.insert(k.clone(), obj.clone());
            shared.record(&mut g, "MODIFIED", k, obj.clone());
            (StatusCode::OK, axum::Json(obj)).into_response()
        }
        "create" | "update" => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "body is not JSON".into(),
                );
            };
            let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name is required".into(),
                );
            };
            let k = key(&name);
            let existing = g.objects.get(&k).cloned();
            if verb == "create" && existing.is_some() {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    format!("{} {name:?} already exists", t.resource),
                );
            }
            if verb == "update" {
                let Some(cur) = &existing else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{} {name:?} not found", t.resource),
                    );
                };
                let want = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !want.is_empty()
                    && want != cur["metadata"]["resourceVersion"].as_str().unwrap_or("")
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                            t.resource
                        ),
                    );
                }
                // The status subresource changes only status; the object itself keeps it.
                if let Some(sub) = &t.subresource
                    && sub == "status"
                {
                    let mut merged = cur.clone();
                    merged["status"] = obj["status"].clone();
                    merged["metadata"]["resourceVersion"] =
                        obj["metadata"]["resourceVersion"].clone();
                    obj = merged;
                } else if let Some(st) = cur.get("status") {
                    obj["status"] = st.clone();
                }
            }
            g.resource_version += 1;
            let rv = g.resource_version.to_string();
            if let Some(meta) = obj["metadata"].as_object_mut() {
                meta.insert("resourceVersion".into(), json!(rv));
                if !t.namespace.is_empty() {
                    meta.insert("namespace".into(), json!(t.namespace));
                }
                let uid = existing
                    .as_ref()
                    .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("uid-{rv}"));
                meta.insert("uid".into(), json!(uid));
            }
            g.objects.insert(k.clone(), obj.clone());
            let kind = if existing.is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            shared.record(&mut g, kind, k, obj.clone());
            let code = if verb == "create" {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, axum::Json(obj)).into_response()
        }
        "delete" => {
            let name = t.name.clone().unwrap_or_default();
            let k = key(&name);
            match g.objects.remove(&k) {
                Some(mut o) => {
                    g.resource_version += 1;
                    o["metadata"]["resourceVersion"] = json!(g.resource_version.to_string());
                    shared.record(&mut g, "DELETED", k, o.clone());
                    (StatusCode::OK, axum::Json(o)).into_response()
                }
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{} {name:?} not found", t.resource),
                ),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not served here"),
        ),
    }
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 (a free port) on its own thread.
    pub fn start() -> std::io::Result<ApiServer> {
        let (changes, _) = broadcast::channel(4096);
        let (watch_epoch, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(false);
        let (frozen_endpoints, _) = watch::channel(BTreeSet::new());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changes,
            watch_epoch,
            frozen,
            frozen_endpoints,
        });
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (listen_tx, mut listen_rx) = tokio::sync::mpsc::unbounded_channel::<Incoming>();
        let (loopback_stop, stop_rx) = watch::channel(false);
        let _ = listen_tx.send(Incoming {
            listener: std_listener,
            id: 0,
            stop: stop_rx,
            tls: None,
        });
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let app = Router::new().fallback(handle).with_state(state);
                let serve_all = async {
                    // Every listener handed over (loopback, and those opened inside network
                    // namespaces) is served by the same app and store.
                    while let Some(i) = listen_rx.recv().await {
                        if let Ok(listener) = tokio::net::TcpListener::from_std(i.listener) {
                            let app = app.clone().layer(axum::Extension(ListenerId(i.id)));
                            tokio::spawn(crate::endpoint::serve(listener, app, i.stop, i.tls));
                        }
                    }
                };
                // Stop at once (open client connections are cut when the runtime goes).
                tokio::select! {
                    _ = serve_all => {}
                    _ = rx => {}
                }
            });
        });
        Ok(ApiServer {
            addr,
            shared,
            listen: listen_tx,
            stops: Mutex::new(BTreeMap::from([(0, loopback_stop)])),
            tls: Mutex::new(BTreeMap::new()),
            next_id: std::sync::atomic::AtomicUsize::new(1),
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Also listens on 127.0.0.1 inside `ns` (each network namespace has its own loopback),
    /// so processes there reach the server; returns that URL. Calls through it are recorded
    /// with the listener's number (1 for the first such listener, 2 for the next, ...).
    pub fn listen_in(&self, ns: &crate::Netns) -> std::io::Result<String> {
        self.endpoint_in(ns).map(|e| e.url)
    }

    /// As [`ApiServer::listen_in`], returning the endpoint, to stop, start, freeze or make
    /// refuse an identity on its own.
    pub fn endpoint_in(&self, ns: &crate::Netns) -> std::io::Result<Endpoint> {
        self.endpoint_in_at(ns, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// An endpoint bound to `addr` inside `ns` (`0.0.0.0:0`: every address of the namespace,
    /// a VIP included, on a free port). Its URL names 127.0.0.1 and the port.
    pub fn endpoint_in_at(&self, ns: &crate::Netns, addr: SocketAddr) -> std::io::Result<Endpoint> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addr = self.serve_in(ns, id, addr)?;
        Ok(Endpoint {
            id,
            url: format!("http://127.0.0.1:{}", addr.port()),
            addr,
        })
    }

    /// As [`ApiServer::endpoint_in_at`], served over TLS with `cert` (see
    /// [`crate::tls::Authority::serving`]); its URL is `https://127.0.0.1:<port>`.
    pub fn tls_endpoint_in_at(
        &self,
        ns: &crate::Netns,
        addr: SocketAddr,
        cert: &crate::tls::ServingCert,
    ) -> std::io::Result<Endpoint> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, cert.clone());
        let addr = self.serve_in(ns, id, addr)?;
        Ok(Endpoint {
            id,
            url: format!("https://127.0.0.1:{}", addr.port()),
            addr,
        })
    }

    /// Binds `addr` inside `ns` and serves it as endpoint `id`.
    fn serve_in(
        &self,
        ns: &crate::Netns,
        id: usize,
        addr: SocketAddr,
    ) -> std::io::Result<SocketAddr> {
        let l = ns
            .enter(move || -> std::io::Result<std::net::TcpListener> {
                // A stopped endpoint's listener is closed by the server thread: a restart
                // at its address waits (up to 5 s) for the port to be free.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let l = loop {
                    match std::net::TcpListener::bind(addr) {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::AddrInUse
                                && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        r => break r?,
                    }
                };
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let bound = l.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let tls = self
            .tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|c| c.config.clone());
        self.listen
            .send(Incoming {
                listener: l,
                id,
                stop: stop_rx,
                tls,
            })
            .map_err(|_| std::io::Error::other("the test API server has stopped"))?;
        if let Some(old) = self
            .stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, stop)
        {
            old.send_replace(true);
        }
        Ok(bound)
    }

    /// Stops `e` as a killed kube-apiserver stops: its port is closed (connections are
    /// refused) and every connection made through it is cut, open watches included. The
    /// store and the other endpoints go on.
    pub fn stop_endpoint(&self, e: &Endpoint) {
        let stop = self
            .stops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&e.id);
        if let Some(s) = stop {
            s.send_replace(true);
            // Returns once it is done: the listener and every connection hold a receiver of
            // this switch, and drop it when they are closed.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while s.receiver_count() > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Starts a stopped `e` again at the same address (inside `ns`, where it was).
    pub fn restart_endpoint(&self, ns: &crate::Netns, e: &Endpoint) -> std::io::Result<()> {
        self.serve_in(ns, e.id, e.addr).map(|_| ())
    }

    /// Stops `e` (if it runs) and starts it again at the same address with another serving
    /// certificate (an API server restarted with new certificates).
    pub fn restart_endpoint_with(
        &self,
        ns: &crate::Netns,
        e: &Endpoint,
        cert: &crate::tls::ServingCert,
    ) -> std::io::Result<()> {
        self.stop_endpoint(e);
        self.tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(e.id, cert.clone());
        self.serve_in(ns, e.id, e.addr).map(|_| ())
    }

    /// Freezes `e` alone: its requests get no answer until [`ApiServer::thaw_endpoint`].
    pub fn freeze_endpoint(&self, e: &Endpoint) {
        self.shared.frozen_endpoints.send_modify(|f| {
            f.insert(e.id);
        });
    }

    pub fn thaw_endpoint(&self, e: &Endpoint) {
        self.shared.frozen_endpoints.send_modify(|f| {
            f.remove(&e.id);
        });
    }

    /// Answers `identity` (the bearer token of its kubeconfig, see
    /// [`ApiServer::kubeconfig_with_token`]) with 403 on `e` (`refuse` false: lifts it), as an
    /// API server does for an identity without any granted permission.
    pub fn refuse_identity(&self, e: &Endpoint, identity: &str, refuse: bool) {
        self.with(|g| {
            let set = g.refused.entry(e.id).or_default();
            if refuse {
                set.insert(identity.to_string());
            } else {
                set.remove(identity);
            }
        });
    }

    /// `http://127.0.0.1:<port>`
    /// A kube client for this server (loopback of the test's own namespace). Call it
    /// inside a tokio runtime: the client's request buffer runs as a task there.
    pub fn client(&self) -> kube::Client {
        let url = self.url().parse().expect("the test server's URL is valid");
        kube::Client::try_from(kube::Config::new(url)).expect("a kube client")
    }

    /// A single-threaded runtime for blocking test code, and a client for this server on it.
    pub fn runtime_and_client(&self) -> (tokio::runtime::Runtime, kube::Client) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let client = {
            let _in = rt.enter();
            self.client()
        };
        (rt, client)
    }

    /// A kubeconfig (YAML text) pointing at `url`, without credentials (the test server
    /// takes any client).
    pub fn kubeconfig(url: &str) -> String {
        Self::kubeconfig_with_token(url, None)
    }

    /// A kubeconfig for `url` whose user presents `token` (the identity the server sees).
    pub fn kubeconfig_with_token(url: &str, token: Option<&str>) -> String {
        Self::kubeconfig_for(url, token, None)
    }

    /// A kubeconfig for `url` whose user presents `token`, trusting the CA in the file `ca`
    /// (kubeadm's `certificate-authority`) when given.
    pub fn kubeconfig_for(url: &str, token: Option<&str>, ca: Option<&std::path::Path>) -> String {
        let user = match token {
            Some(t) => format!("{{token: \"{t}\"}}"),
            None => "{}".into(),
        };
        let ca = match ca {
            Some(p) => format!(", certificate-authority: \"{}\"", p.display()),
            None => String::new(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"{url}\"{ca}}}}}]\nusers: [{{name: t, user: {user}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t}}}}]\ncurrent-context: t\n"
        )
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.shared.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Answers every request with 500 for `d`.
    pub fn fail_for(&self, d: Duration) {
        self.with(|g| g.fail_until = Some(Instant::now() + d));
    }

    /// Delays every answer by `d` (zero to stop).
    pub fn stall(&self, d: Duration) {
        self.with(|g| g.stall = d);
    }

    /// Answers requests for `resource` (e.g. "pods") with 403, like a missing RBAC rule.
    pub fn deny(&self, resource: &str) {
        self.with(|g| g.denied.push(resource.to_string()));
    }

    /// Enforces RBAC from now on for the identities of the namespaces' listeners (those of
    /// [`ApiServer::listen_in`]): only `grants` are allowed (see [`Grant`]). Calls through the
    /// test process's own loopback listener stay an administrator's.
    pub fn enforce(&self, grants: Vec<Grant>) {
        self.with(|g| g.grants = Some(grants));
    }

    /// Calls of `verb` on `resource` (with subresource, e.g. `services/status`) never get an
    /// answer from now on.
    pub fn hang(&self, verb: &str, resource: &str) {
        self.with(|g| g.hung.push((verb.into(), resource.into())));
    }

    /// Answers every call on `resource` with 500 until [`ApiServer::heal`].
    pub fn fail_resource(&self, resource: &str) {
        self.with(|g| g.failing.push(resource.into()));
    }

    /// Lifts [`ApiServer::fail_resource`] and [`ApiServer::hang`] (calls already hanging stay so).
    pub fn heal(&self) {
        self.with(|g| {
            g.failing.clear();
            g.hung.clear();
        });
    }

    /// Freezes the server: requests get no answer until [`ApiServer::thaw`], as with a
    /// stopped kube-apiserver process whose sockets stay open. Watch streams already open
    /// deliver nothing either (nothing changes while frozen: the test makes no writes then).
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Ends every open watch (clients must watch again).
    pub fn drop_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the change history, as if it had been compacted after changes elsewhere: the
    /// resourceVersion moves on, a watch from any earlier version gets 410 Gone, and every open
    /// watch ends, so clients must list again.
    pub fn expire_history(&self) {
        self.with(|g| {
            g.resource_version += 1;
            g.compacted = g.resource_version;
            g.log.clear();
        });
        self.drop_watches();
    }

    /// Every object of a resource in a namespace.
    pub fn objects(&self, group_version: &str, resource: &str, namespace: &str) -> Vec<Value> {
        self.with(|g| {
            g.objects
                .iter()
                .filter(|((gv, r, ns, _), _)| {
                    gv == group_version && r == resource && ns == namespace
                })
                .map(|(_, o)| o.clone())
                .collect()
        })
    }

    /// Every call made so far.
    pub fn calls(&self) -> Vec<Call> {
        self.with(|g| g.calls.clone())
    }

    /// An object as stored (`group_version` "v1" for the core group).
    pub fn object(
        &self,
        group_version: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.with(|g| {
            g.objects
                .get(&(
                    group_version.into(),
                    resource.into(),
                    namespace.into(),
                    name.into(),
                ))
                .cloned()
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
