//! Events on Services, published on change only, so a steady state emits nothing; a repeat
//! within [`SERIES_TTL`] becomes a series on the first Event (count and last time), as
//! Kubernetes' own recorders do. Every publication is bounded in time.
//!
//! kube's `Recorder` keeps every Event it published (the whole object, for its TTL) in a
//! table that never shrinks: at a thousand Services that was the agent's largest use of
//! memory. This one keeps, per series, its name, count and time, and at most
//! [`MAX_SERIES`] of them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kvip_core::Plan;
use kvip_core::plan::{ServiceKey, ServiceWarning};
use tokio::time::Instant;

use super::client::API_CALL_TIMEOUT;
use super::permissions::Missing;

/// A repeat within this time joins the first Event's series (Kubernetes' recorders: 6 min).
const SERIES_TTL: Duration = Duration::from_secs(360);
/// Series remembered at most (the oldest are forgotten first).
const MAX_SERIES: usize = 512;
/// The API refuses an Event note longer than this (notes quote annotation values).
const MAX_NOTE: usize = 1024;

/// `s` cut to at most `max` bytes, on a character boundary, marked when cut.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str("...");
    s
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum EventType {
    Normal,
    Warning,
}

/// What makes two Events one series.
type SeriesKey = (ServiceKey, EventType, String, String);

struct Series {
    name: String,
    count: i32,
    last: Instant,
}

/// Publishes Events about Services as `kvip` on this node.
struct Publisher {
    client: kube::Client,
    node: String,
    series: BTreeMap<SeriesKey, Series>,
}

impl Publisher {
    async fn publish(
        &mut self,
        key: &ServiceKey,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let now = Instant::now();
        self.series
            .retain(|_, s| now.duration_since(s.last) < SERIES_TTL);
        let note = truncate(note, MAX_NOTE);
        let skey: SeriesKey = (key.clone(), type_, reason.to_string(), action.to_string());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
        let stamp = Timestamp::now();
        if let Some(s) = self.series.get_mut(&skey) {
            s.count += 1;
            s.last = now;
            let patch = serde_json::json!({
                "note": note,
                "series": EventSeries { count: s.count, last_observed_time: MicroTime(stamp) },
            });
            let patched = api
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            if patched.is_err() {
                // The Event is gone (or refused): the next repeat starts a new one.
                self.series.remove(&skey);
            }
            return patched.map(|_| ());
        }
        let name = format!("{}.{:x}", key.name, stamp.as_nanosecond());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(key.namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(stamp)),
            type_: Some(match type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            reason: Some(reason.to_string()),
            action: Some(action.to_string()),
            note: Some(note),
            regarding: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                name: Some(key.name.clone()),
                namespace: Some(key.namespace.clone()),
                ..ObjectReference::default()
            }),
            reporting_controller: Some("kvip".into()),
            reporting_instance: Some(self.node.clone()),
            ..Event::default()
        };
        api.create(&PostParams::default(), &event).await?;
        if self.series.len() >= MAX_SERIES
            && let Some(oldest) = self
                .series
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
        {
            self.series.remove(&oldest);
        }
        self.series.insert(
            skey,
            Series {
                name,
                count: 1,
                last: now,
            },
        );
        Ok(())
    }
}

pub(crate) struct ServiceEvents {
    publisher: Publisher,
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
            publisher: Publisher {
                client,
                node: node.to_string(),
                series: BTreeMap::new(),
            },
            node: node.to_string(),
            last: BTreeMap::new(),
            last_invalid: None,
            last_missing: BTreeMap::new(),
        }
    }

    /// `action` is part of what makes a series: distinct problems (one per annotation) stay
    /// distinct Events, repeats of one become a series.
    async fn emit(
        &mut self,
        key: &ServiceKey,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let publish = self.publisher.publish(key, type_, reason, action, note);
        match tokio::time::timeout(API_CALL_TIMEOUT, publish).await {
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
            // Nothing new about this Service (the common case): nothing to build.
            let unchanged = self.last.get(key).is_some_and(|(held, n, w)| {
                *held == sp.held
                    && *n == if sp.held { pods } else { 0 }
                    && w.len() == sp.warnings.len()
                    && w.iter().zip(&sp.warnings).all(|(a, b)| *a == b.to_string())
            });
            if unchanged {
                continue;
            }
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
                    ServiceWarning::VipRefused(a) => (
                        "VipRefused",
                        "HoldVIP".to_string(),
                        format!("{a} is the control-plane VIP: no Service may hold it or share it"),
                    ),
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

#[cfg(test)]
mod tests {
    #[test]
    fn notes_are_cut_to_what_the_api_takes() {
        assert_eq!(super::truncate("short".into(), 1024), "short");
        let long = "é".repeat(1000);
        let cut = super::truncate(long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
    }
}
