//! Events on Services, published on change only (and aggregated into series by the
//! recorder), so a steady state emits nothing. Every publication is bounded in time.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kvip_core::Plan;
use kvip_core::plan::{ServiceKey, ServiceWarning};

use super::client::API_CALL_TIMEOUT;
use super::permissions::Missing;

pub(crate) struct ServiceEvents {
    recorder: Recorder,
    node: String,
    /// Per Service: held, translated pods, warnings, as last reported.
    last: BTreeMap<ServiceKey, (bool, usize, Vec<String>)>,
    /// The invalid-state error last reported (reported again only when it changes).
    last_invalid: Option<String>,
    /// Per Service: the missing permissions last reported on it.
    last_missing: BTreeMap<ServiceKey, BTreeSet<String>>,
}

impl ServiceEvents {
    pub(crate) fn new(client: kube::Client, node: &str) -> Self {
        ServiceEvents {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "kvip".into(),
                    instance: Some(node.to_string()),
                },
            ),
            node: node.to_string(),
            last: BTreeMap::new(),
            last_invalid: None,
            last_missing: BTreeMap::new(),
        }
    }

    /// `action` is part of what the recorder aggregates by: distinct problems (one per
    /// annotation) stay distinct Events, repeats of one become a series.
    async fn emit(
        &self,
        key: &ServiceKey,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            ..ObjectReference::default()
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        match tokio::time::timeout(API_CALL_TIMEOUT, self.recorder.publish(&ev, &reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(service = %key, reason, error = %e, "publishing an event"),
            Err(_) => tracing::warn!(service = %key, reason, "publishing an event timed out"),
        }
    }

    /// Events for what changed since the last report.
    pub(crate) async fn report(&mut self, p: &Plan) {
        let node = self.node.clone();
        for (key, sp) in &p.services {
            let pods: usize = sp.egress_pods.values().map(Vec::len).sum();
            let warnings: Vec<String> = sp.warnings.iter().map(ToString::to_string).collect();
            let (was_held, was_pods, was_warnings) =
                self.last.get(key).cloned().unwrap_or_default();
            if sp.held && !was_held {
                let vips: Vec<String> = sp.vips.iter().map(ToString::to_string).collect();
                self.emit(
                    key,
                    EventType::Normal,
                    "VIPAcquired",
                    "Hold",
                    format!("node {node} holds {}", vips.join(", ")),
                )
                .await;
            }
            if !sp.held && was_held {
                self.emit(
                    key,
                    EventType::Normal,
                    "VIPReleased",
                    "Release",
                    format!("node {node} released the VIPs"),
                )
                .await;
            }
            if sp.held && pods > 0 && pods != was_pods {
                self.emit(
                    key,
                    EventType::Normal,
                    "EgressApplied",
                    "Egress",
                    format!("{pods} pod(s) on node {node} egress through the VIP"),
                )
                .await;
            }
            for w in sp
                .warnings
                .iter()
                .filter(|w| !was_warnings.contains(&w.to_string()))
            {
                let (reason, action, note) = match w {
                    ServiceWarning::InvalidAnnotation(a) => {
                        ("InvalidAnnotation", a.annotation.clone(), a.to_string())
                    }
                    ServiceWarning::EgressRefused(r) => {
                        ("EgressRefused", "Egress".to_string(), r.clone())
                    }
                };
                tracing::warn!(service = %key, reason, "{note}");
                self.emit(key, EventType::Warning, reason, &action, note)
                    .await;
            }
            self.last.insert(
                key.clone(),
                (sp.held, if sp.held { pods } else { 0 }, warnings),
            );
        }
        // Services gone from the plan (deleted, deselected): forget them.
        self.last.retain(|k, _| p.services.contains_key(k));
        self.last_missing.retain(|k, _| p.services.contains_key(k));
    }

    /// A Warning on every selected Service when the desired state is invalid (the kernel
    /// keeps the last good state), once per distinct error.
    pub(crate) async fn report_invalid(&mut self, p: &Plan, error: Option<&str>) {
        if self.last_invalid.as_deref() == error {
            return;
        }
        self.last_invalid = error.map(str::to_string);
        let Some(error) = error else { return };
        for key in p.services.keys() {
            self.emit(
                key,
                EventType::Warning,
                "InvalidDesiredState",
                "Sync",
                format!(
                    "node {}: the desired state is invalid ({error}); the node keeps its last good state",
                    self.node
                ),
            )
            .await;
        }
    }

    /// A Warning on each selected Service a missing permission affects, once per permission.
    pub(crate) async fn report_missing(&mut self, p: &Plan, missing: &[Missing]) {
        for key in p.services.keys() {
            let now: BTreeSet<String> = missing
                .iter()
                .filter(|m| m.affects(&key.namespace))
                .map(ToString::to_string)
                .collect();
            let before = self.last_missing.get(key).cloned().unwrap_or_default();
            for m in missing
                .iter()
                .filter(|m| m.affects(&key.namespace) && !before.contains(&m.to_string()))
            {
                self.emit(
                    key,
                    EventType::Warning,
                    "PermissionMissing",
                    "Authorize",
                    format!("node {}: {m}", self.node),
                )
                .await;
            }
            self.last_missing.insert(key.clone(), now);
        }
    }
}
