//! An in-process Kubernetes API server for tests: the real kube client talks to it over HTTP
//! on loopback. It keeps objects as JSON with a cluster-wide resourceVersion, answers get,
//! list, create, replace (409 when the resourceVersion moved) and delete with Kubernetes'
//! Status errors, records every call, and injects faults (403 per resource, 500 for a while,
//! stalls).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Where an object lives: API group/version ("v1" for the core group), resource, namespace
/// ("" for cluster-scoped), name.
type Key = (String, String, String, String);

/// One recorded call: method, resource (`leases`, `services/status`, ...), namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub verb: String,
    pub group_version: String,
    pub resource: String,
    pub namespace: String,
}

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, Value>,
    resource_version: u64,
    calls: Vec<Call>,
    /// Resources (e.g. "pods") answered with 403.
    denied: Vec<String>,
    fail_until: Option<Instant>,
    stall: Duration,
}

/// A running test API server; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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

fn kind_of(obj: &Value) -> String {
    obj["kind"].as_str().unwrap_or("Object").to_string()
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let Some(t) = parse_path(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route {}", uri.path()),
        );
    };
    let verb = match (&method, t.name.is_some()) {
        (&Method::GET, true) => "get",
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
        let Ok(mut g) = inner.lock() else {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "poisoned".into(),
            );
        };
        g.calls.push(Call {
            verb: verb.into(),
            group_version: t.group_version.clone(),
            resource: resource.clone(),
            namespace: t.namespace.clone(),
        });
        g.stall
    };
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    let Ok(mut g) = inner.lock() else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "poisoned".into(),
        );
    };
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
                .filter(|((gv, r, ns, _), _)| {
                    *gv == t.group_version
                        && *r == t.resource
                        && (t.namespace.is_empty() || *ns == t.namespace)
                })
                .map(|(_, o)| o.clone())
                .collect();
            let kind = items.first().map(kind_of).unwrap_or_default();
            let body = json!({
                "kind": format!("{kind}List"), "apiVersion": t.group_version,
                "metadata": {"resourceVersion": g.resource_version.to_string()}, "items": items
            });
            (StatusCode::OK, axum::Json(body)).into_response()
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
            g.objects.insert(k, obj.clone());
            let code = if verb == "create" {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, axum::Json(obj)).into_response()
        }
        "delete" => {
            let name = t.name.clone().unwrap_or_default();
            match g.objects.remove(&key(&name)) {
                Some(o) => {
                    g.resource_version += 1;
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
        let inner = Arc::new(Mutex::new(Inner::default()));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = inner.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
                    return;
                };
                let app = Router::new().fallback(handle).with_state(state);
                // Stop at once (open client connections are cut when the runtime goes).
                tokio::select! {
                    _ = axum::serve(listener, app) => {}
                    _ = rx => {}
                }
            });
        });
        Ok(ApiServer {
            addr,
            inner,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
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
