//! `spec.autoscaling.engine: keda`: a KEDA ScaledObject (keda.sh/v1alpha1)
//! scaling the relay Deployment on the queue's due units, read from
//! Prometheus, in place of the CPU HorizontalPodAutoscaler.
//!
//! Typed as a `DynamicObject`: KEDA's Go types are not worth a crate for one
//! object, and the shape is checked against KEDA's own CRD schema in
//! `tests/tests/operator_children.rs`.

use kube::api::ApiResource;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use petrel_crds::smtp_relay::{AutoscalingEngine, AutoscalingSpec, SmtpRelay};
use serde_json::{Value, json};

use super::build;
use crate::apply::apply_optional;
use crate::context::Context;
use crate::error::Result;

/// The relay metric the default query reads (see relay/src/metrics.rs).
pub const DUE_METRIC: &str = "petrel_queue_units";

/// KEDA's ScaledObject resource.
pub fn resource() -> ApiResource {
    ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: "ScaledObject".into(),
        plural: "scaledobjects".into(),
    }
}

/// The autoscaling spec when it asks for KEDA.
fn keda_spec(relay: &SmtpRelay) -> Option<&AutoscalingSpec> {
    relay
        .spec
        .autoscaling
        .as_ref()
        .filter(|a| a.engine == AutoscalingEngine::Keda)
}

/// PromQL for the relay's due units. Every pod reports the whole shared
/// (Redis) queue, so `max` rather than `sum`; the labels are the ones a
/// prometheus-operator ServiceMonitor adds to the relay Service's targets.
pub fn default_query(relay: &SmtpRelay) -> String {
    format!(
        "max({DUE_METRIC}{{state=\"due\",namespace=\"{}\",service=\"{}\"}})",
        relay.namespace().unwrap_or_default(),
        build::base_name(relay)
    )
}

/// The ScaledObject for `relay`, or `None` unless `engine: keda` (pure).
///
/// KEDA's Prometheus scaler with the default `AverageValue` metric type runs
/// `ceil(due / targetDuePerPod)` pods, clamped to the bounds. Scale-down
/// removes pods through the Deployment, and each pod drains on SIGTERM (new
/// connections get 421, deliveries in flight finish), so scaling in loses no
/// mail.
pub fn scaled_object(relay: &SmtpRelay) -> Option<Value> {
    let scaling = keda_spec(relay)?;
    let prometheus = scaling.prometheus.as_ref()?;
    let query = prometheus
        .query
        .clone()
        .unwrap_or_else(|| default_query(relay));
    let name = build::base_name(relay);
    Some(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": name,
            "namespace": relay.namespace(),
            "labels": build::labels(relay),
            "ownerReferences": relay.controller_owner_ref(&()).map(|r| vec![r]),
        },
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": scaling.min_replicas,
            "maxReplicaCount": scaling.max_replicas,
            "triggers": [{
                "type": "prometheus",
                "name": "due-units",
                "metricType": "AverageValue",
                "metadata": {
                    "serverAddress": prometheus.server_address,
                    "query": query,
                    // KEDA trigger metadata values are strings.
                    "threshold": scaling.target_due_per_pod.to_string(),
                },
            }],
        },
    }))
}

/// Applies the ScaledObject, or removes it when the relay no longer asks for
/// KEDA. Without the operator's KEDA support (`--keda`, chart value
/// `keda.enabled`: the RBAC and the watch) nothing is touched; asking for
/// `engine: keda` then is a Warning Event, and the pods keep their count.
pub async fn reconcile(relay: &SmtpRelay, ctx: &Context, ns: &str) -> Result<()> {
    let wanted = scaled_object(relay);
    if !ctx.settings.keda {
        if wanted.is_some() {
            ctx.event(
                relay,
                EventType::Warning,
                "KedaDisabled",
                "Autoscale",
                "spec.autoscaling.engine is keda but the operator runs without KEDA support; install KEDA and set the chart value keda.enabled=true (operator flag --keda)".into(),
            )
            .await;
        }
        return Ok(());
    }
    let known = apply_optional(
        &ctx.client,
        ns,
        &resource(),
        &build::base_name(relay),
        wanted.as_ref(),
    )
    .await?;
    if !known {
        ctx.event(
            relay,
            EventType::Warning,
            "KedaUnavailable",
            "Autoscale",
            "spec.autoscaling.engine is keda but the ScaledObject CRD (keda.sh) is not installed"
                .into(),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp_relay::build::fixtures::relay;

    const KEDA: &str = "{redis: {urlSecretRef: {name: r, key: url}}, autoscaling: {minReplicas: 2, \
        maxReplicas: 12, engine: keda, targetDuePerPod: 250, \
        prometheus: {serverAddress: 'http://prometheus-operated.monitoring.svc:9090'}}}";

    #[test]
    fn keda_engine_renders_a_scaled_object_on_due_units() {
        let so = scaled_object(&relay(KEDA)).expect("keda asked for");
        let spec = &so["spec"];
        assert_eq!(
            spec["scaleTargetRef"]["name"],
            build::base_name(&relay(KEDA))
        );
        assert_eq!(spec["scaleTargetRef"]["kind"], "Deployment");
        assert_eq!(
            (
                spec["minReplicaCount"].as_i64(),
                spec["maxReplicaCount"].as_i64()
            ),
            (Some(2), Some(12))
        );
        let trigger = &spec["triggers"][0];
        assert_eq!(trigger["type"], "prometheus");
        assert_eq!(trigger["metadata"]["threshold"], "250");
        assert_eq!(
            trigger["metadata"]["serverAddress"],
            "http://prometheus-operated.monitoring.svc:9090"
        );
        assert_eq!(
            trigger["metadata"]["query"],
            format!(
                "max(petrel_queue_units{{state=\"due\",namespace=\"mail\",service=\"{}\"}})",
                build::base_name(&relay(KEDA))
            )
        );
        assert_eq!(so["metadata"]["ownerReferences"][0]["controller"], true);
    }

    #[test]
    fn custom_query_wins_and_hpa_engine_renders_none() {
        let custom = KEDA.replace(
            "prometheus: {",
            "prometheus: {query: 'sum(petrel_queue_units{state=\"due\"})', ",
        );
        let so = scaled_object(&relay(&custom)).expect("keda");
        assert_eq!(
            so["spec"]["triggers"][0]["metadata"]["query"],
            "sum(petrel_queue_units{state=\"due\"})"
        );
        let hpa = KEDA.replace("engine: keda", "engine: hpa");
        assert!(scaled_object(&relay(&hpa)).is_none());
        assert!(build::hpa(&relay(&hpa)).is_some());
        assert!(build::hpa(&relay(KEDA)).is_none(), "keda replaces the HPA");
    }

    #[test]
    fn default_query_names_a_metric_the_relay_exports() {
        let metrics = include_str!("../../../relay/src/metrics.rs");
        assert!(metrics.contains(&format!("\"{DUE_METRIC}\"")));
        assert!(default_query(&relay(KEDA)).contains("state=\"due\""));
    }
}
