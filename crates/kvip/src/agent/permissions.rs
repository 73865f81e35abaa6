//! Permissions checked, not discovered by failure. At start, periodically, and at once when
//! a call is refused (403), the agent asks the API (SelfSubjectAccessReview) for every
//! permission its configuration needs. Each missing one is logged with its fix (at first
//! sight, then every [`LOG_INTERVAL`] while it lasts), counted in
//! `kvip_permission_missing`, turns `/readyz` not ready, and is raised as a Warning Event on
//! the Services it affects.
//!
//! What stops the agent and what degrades it: without reading Services, EndpointSlices and
//! its Node the agent can do nothing, so a start that lacks them fails at once with the fix.
//! Every other missing permission degrades the agent (no Lease: no VIP for the Services
//! concerned; no status patch: VIPs held but not shown; no Events: log lines only; no CIDR
//! discovery: egress refused unless the CIDRs are configured) and is retried.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use kvip_kube::rbac::{Rule, Scope, rules_for};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::client::{CallError, bounded};
use crate::metrics::{Metrics, NotReady, PermissionLabel};

/// How often a permission that stays missing is logged again.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(300);
/// How often permissions are checked while one is missing (a 403 also checks at once).
const RECHECK_MISSING: Duration = Duration::from_secs(10);
/// The least time between two checks.
const MIN_RECHECK: Duration = Duration::from_secs(2);
/// How often they are checked while all are granted.
const RECHECK_OK: Duration = Duration::from_secs(300);

/// What the agent's configuration needs.
#[derive(Debug, Clone)]
pub(crate) struct Needs {
    pub discovery: bool,
    pub per_service_leases: bool,
    /// With election; without it, no Lease permission is needed.
    pub leases: bool,
    pub own_namespace: String,
}

impl Needs {
    /// What `cfg` needs.
    pub(crate) fn for_config(cfg: &kvip_core::config::AgentConfig) -> Self {
        Needs {
            discovery: cfg.egress_pod_cidr.is_none() || cfg.egress_service_cidr.is_none(),
            per_service_leases: cfg.svc_election,
            leases: cfg.leader_election,
            own_namespace: super::own_namespace(),
        }
    }

    fn rules(&self) -> Vec<Rule> {
        rules_for(self.discovery, self.per_service_leases)
            .into_iter()
            .filter(|r| self.leases || r.resource != "leases")
            .collect()
    }

    /// The namespaces a rule must hold in (`None`: cluster-wide). Per-Service Leases are
    /// needed in the namespace of every selected Service.
    fn namespaces(&self, r: &Rule, service_namespaces: &BTreeSet<String>) -> Vec<Option<String>> {
        match r.scope {
            Scope::Cluster if r.resource == "leases" => {
                service_namespaces.iter().cloned().map(Some).collect()
            }
            Scope::Cluster => vec![None],
            Scope::OwnNamespace => vec![Some(self.own_namespace.clone())],
            Scope::KubeSystem => vec![Some("kube-system".into())],
        }
    }

    /// The command that grants what this configuration needs.
    pub(crate) fn fix(&self) -> String {
        format!(
            "kvip manifest rbac --namespace {}{} | kubectl apply -f -",
            self.own_namespace,
            if self.per_service_leases {
                " --svc-election"
            } else {
                ""
            }
        )
    }
}

/// One permission the agent needs and does not have.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Missing {
    pub rule: Rule,
    pub namespace: Option<String>,
    pub fix: String,
}

impl Missing {
    fn resource(&self) -> String {
        if self.rule.group.is_empty() {
            self.rule.resource.to_string()
        } else {
            format!("{}.{}", self.rule.resource, self.rule.group)
        }
    }

    /// Whether it matters to a Service in `namespace` (Events cannot be raised without the
    /// permission to raise them).
    pub(crate) fn affects(&self, namespace: &str) -> bool {
        self.rule.resource != "events" && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }
}

impl Missing {
    /// "verb resource in namespace".
    pub(crate) fn what(&self) -> String {
        format!(
            "{} {} in {}",
            self.rule.verb,
            self.resource(),
            self.namespace
                .as_deref()
                .map_or("all namespaces".to_string(), |n| format!("namespace {n}")),
        )
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "missing permission: {}; fix: {}", self.what(), self.fix)
    }
}

/// Asks the API about each needed permission. `Err` when the API could not be asked.
pub(crate) async fn check(
    client: &kube::Client,
    needs: &Needs,
    service_namespaces: &BTreeSet<String>,
) -> Result<Vec<Missing>, CallError> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut missing = Vec::new();
    for rule in needs.rules() {
        for namespace in needs.namespaces(&rule, service_namespaces) {
            let (resource, subresource) = match rule.resource.split_once('/') {
                Some((r, s)) => (r.to_string(), Some(s.to_string())),
                None => (rule.resource.to_string(), None),
            };
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some(rule.group.to_string()),
                        resource: Some(resource),
                        subresource,
                        verb: Some(rule.verb.to_string()),
                        namespace: namespace.clone(),
                        ..ResourceAttributes::default()
                    }),
                    ..SelfSubjectAccessReviewSpec::default()
                },
                ..SelfSubjectAccessReview::default()
            };
            let done = bounded(reviews.create(&PostParams::default(), &review)).await?;
            if !done.status.as_ref().is_some_and(|s| s.allowed) {
                missing.push(Missing {
                    rule,
                    namespace,
                    fix: needs.fix(),
                });
            }
        }
    }
    missing.sort();
    missing.dedup();
    Ok(missing)
}

/// Those of `missing` without which the agent cannot start.
pub(crate) fn fatal(missing: &[Missing]) -> Vec<&Missing> {
    missing
        .iter()
        .filter(|m| {
            matches!(m.rule.resource, "services" | "endpointslices" | "nodes")
                && matches!(m.rule.verb, "list" | "watch")
        })
        .collect()
}

/// Checks until `root` is cancelled; publishes the missing permissions on `out`. `first` is
/// the answer of a check just made (at start), used instead of asking again.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn watch_permissions(
    client: kube::Client,
    needs: Needs,
    mut first: Option<Vec<Missing>>,
    mut service_namespaces: watch::Receiver<BTreeSet<String>>,
    forbidden: Arc<Notify>,
    out: watch::Sender<Vec<Missing>>,
    metrics: Arc<Metrics>,
    root: CancellationToken,
) {
    let mut logged: BTreeMap<Missing, tokio::time::Instant> = BTreeMap::new();
    let mut check_failed_logged = false;
    loop {
        let started = tokio::time::Instant::now();
        let namespaces = service_namespaces.borrow_and_update().clone();
        let answer = match first.take() {
            Some(missing) => Ok(missing),
            None => check(&client, &needs, &namespaces).await,
        };
        let next = match answer {
            Ok(missing) => {
                check_failed_logged = false;
                let now = tokio::time::Instant::now();
                for m in &missing {
                    let due = logged.get(m).is_none_or(|t| now >= *t + LOG_INTERVAL);
                    if due {
                        tracing::error!("{m}");
                        logged.insert(m.clone(), now);
                    }
                }
                for m in logged.keys().filter(|m| !missing.contains(m)) {
                    tracing::info!(
                        verb = m.rule.verb,
                        resource = m.resource(),
                        namespace = m.namespace.as_deref().unwrap_or("*"),
                        "permission granted now"
                    );
                }
                logged.retain(|m, _| missing.contains(m));
                metrics.permission_missing.clear();
                for m in &missing {
                    metrics
                        .permission_missing
                        .get_or_create(&PermissionLabel {
                            verb: m.rule.verb.into(),
                            resource: m.resource(),
                            namespace: m.namespace.clone().unwrap_or_default(),
                        })
                        .set(1);
                }
                metrics.not_ready(
                    NotReady::Permissions,
                    (!missing.is_empty()).then(|| {
                        missing
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("\n")
                    }),
                );
                let interval = if missing.is_empty() {
                    RECHECK_OK
                } else {
                    RECHECK_MISSING
                };
                out.send_if_modified(|v| std::mem::replace(v, missing.clone()) != missing);
                interval
            }
            Err(e) => {
                // Not knowing is not the same as missing: keep the last answer.
                if !check_failed_logged {
                    tracing::warn!(error = %e, "checking permissions (SelfSubjectAccessReview); retrying");
                    check_failed_logged = true;
                }
                metrics.permission_check_errors.inc();
                RECHECK_MISSING
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = forbidden.notified() => {}
            r = service_namespaces.changed() => {
                if r.is_err() { return; }
            }
            _ = root.cancelled() => return,
        }
        // Refusals can come every retry period: check at most every MIN_RECHECK.
        tokio::select! {
            _ = tokio::time::sleep_until(started + MIN_RECHECK) => {}
            _ = root.cancelled() => return,
        }
    }
}
