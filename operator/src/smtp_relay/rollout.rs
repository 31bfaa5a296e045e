//! Where the relay's Deployment stands (pure), read the way `kubectl rollout
//! status` reads it: the Deployment controller must have observed the current
//! generation, every replica must run the current template, old replicas must
//! be gone and the updated ones available; a `Progressing` condition with
//! reason `ProgressDeadlineExceeded` means the rollout is stuck.

use k8s_openapi::api::apps::v1::Deployment;
use petrel_crds::smtp_relay::REASON_PROGRESS_DEADLINE_EXCEEDED;

/// What the Deployment says about the rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// Every replica runs the current template and is available.
    Complete,
    /// Rolling out or scaling, with what it waits for.
    InProgress(String),
    /// The Deployment controller gave up waiting (`ProgressDeadlineExceeded`).
    Stalled(String),
}

/// How many relay pods are up, and how many must be for the relay to count as available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Availability {
    /// Pods passing their readiness probe.
    pub ready: i32,
    /// Pods ready for at least `minReadySeconds`.
    pub available: i32,
    /// Replicas the Deployment wants.
    pub desired: i32,
    /// Available pods needed: all but the one the PodDisruptionBudget lets go
    /// (`maxUnavailable: 1`), and at least one.
    pub minimum: i32,
}

impl Availability {
    /// Whether the relay counts as available.
    pub fn is_available(&self) -> bool {
        self.desired > 0 && self.ready > 0 && self.available >= self.minimum
    }
}

fn desired(deployment: &Deployment) -> i32 {
    // The stored Deployment always has spec.replicas (defaulted to 1, or set by the HPA).
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
}

/// Pod counts of the Deployment.
pub fn availability(deployment: &Deployment) -> Availability {
    let status = deployment.status.clone().unwrap_or_default();
    let desired = desired(deployment);
    Availability {
        ready: status.ready_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        desired,
        minimum: (desired - 1).max(1),
    }
}

/// The rollout state of the Deployment.
pub fn rollout(deployment: &Deployment) -> Rollout {
    let status = deployment.status.clone().unwrap_or_default();
    let generation = deployment.metadata.generation.unwrap_or(0);
    if status.observed_generation.unwrap_or(0) < generation {
        return Rollout::InProgress(format!(
            "waiting for the Deployment controller to observe generation {generation}"
        ));
    }
    let stalled = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some(REASON_PROGRESS_DEADLINE_EXCEEDED)
    });
    if let Some(c) = stalled {
        return Rollout::Stalled(format!(
            "the Deployment did not progress within its deadline: {}",
            c.message.as_deref().unwrap_or("no message")
        ));
    }
    let desired = desired(deployment);
    let replicas = status.replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < desired {
        return Rollout::InProgress(format!(
            "{updated} of {desired} relay pods run the current template"
        ));
    }
    if replicas > updated {
        return Rollout::InProgress(format!(
            "{} old relay pods are terminating",
            replicas - updated
        ));
    }
    if available < updated {
        return Rollout::InProgress(format!(
            "{available} of {updated} updated relay pods are available"
        ));
    }
    Rollout::Complete
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Deployment as the API server returns it: `spec.replicas` and
    /// `metadata.generation` set, status fields absent when zero.
    fn deployment(generation: i64, replicas: i32, status: serde_json::Value) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "petrel-main", "namespace": "mail", "generation": generation},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "x"}},
                     "template": {"spec": {"containers": []}}},
            "status": status,
        }))
        .expect("deployment")
    }

    fn progressing(reason: &str, status: &str, message: &str) -> serde_json::Value {
        serde_json::json!({"type": "Progressing", "status": status, "reason": reason, "message": message,
            "lastUpdateTime": "2026-12-01T21:00:00Z", "lastTransitionTime": "2026-12-01T21:00:00Z"})
    }

    fn available(status: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({"type": "Available", "status": status, "reason": reason,
            "message": "Deployment does not have minimum availability.",
            "lastUpdateTime": "2026-12-01T21:00:00Z", "lastTransitionTime": "2026-12-01T21:00:00Z"})
    }

    #[test]
    fn rollout_states_from_real_status_shapes() {
        // Pods stuck in ContainerCreating (a Secret volume that does not exist).
        let stuck = deployment(
            1,
            2,
            serde_json::json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                "unavailableReplicas": 2, "conditions": [
                    available("False", "MinimumReplicasUnavailable"),
                    progressing("ReplicaSetUpdated", "True", "ReplicaSet \"petrel-main-6d5f\" is progressing.")]}),
        );
        assert_eq!(
            rollout(&stuck),
            Rollout::InProgress("0 of 2 updated relay pods are available".into())
        );
        assert!(!availability(&stuck).is_available());

        // Ten minutes later the Deployment controller gives up.
        let stalled = deployment(
            1,
            2,
            serde_json::json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
                "unavailableReplicas": 2, "conditions": [
                    available("False", "MinimumReplicasUnavailable"),
                    progressing("ProgressDeadlineExceeded", "False", "ReplicaSet \"petrel-main-6d5f\" has timed out progressing.")]}),
        );
        match rollout(&stalled) {
            Rollout::Stalled(message) => assert!(message.contains("has timed out progressing")),
            other => panic!("{other:?}"),
        }

        // A new spec the Deployment controller has not seen yet.
        let unobserved = deployment(
            3,
            2,
            serde_json::json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": 2, "availableReplicas": 2}),
        );
        assert!(
            matches!(rollout(&unobserved), Rollout::InProgress(m) if m.contains("generation 3"))
        );

        // Mid rolling update: one new pod, two old ones still serving.
        let rolling = deployment(
            2,
            2,
            serde_json::json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 1,
                "readyReplicas": 2, "availableReplicas": 2, "unavailableReplicas": 1, "conditions": [
                    available("True", "MinimumReplicasAvailable"),
                    progressing("ReplicaSetUpdated", "True", "ReplicaSet \"petrel-main-7f\" is progressing.")]}),
        );
        assert_eq!(
            rollout(&rolling),
            Rollout::InProgress("1 of 2 relay pods run the current template".into())
        );
        assert!(availability(&rolling).is_available());

        // All updated, an old pod still terminating.
        let draining = deployment(
            2,
            2,
            serde_json::json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 2,
                "readyReplicas": 3, "availableReplicas": 3}),
        );
        assert_eq!(
            rollout(&draining),
            Rollout::InProgress("1 old relay pods are terminating".into())
        );

        // Done.
        let done = deployment(
            2,
            2,
            serde_json::json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2,
                "readyReplicas": 2, "availableReplicas": 2, "conditions": [
                    available("True", "MinimumReplicasAvailable"),
                    progressing("NewReplicaSetAvailable", "True", "ReplicaSet \"petrel-main-7f\" has successfully progressed.")]}),
        );
        assert_eq!(rollout(&done), Rollout::Complete);
        assert!(availability(&done).is_available());
    }

    #[test]
    fn available_needs_ready_pods_and_the_minimum() {
        // One of three ready: below the minimum of two.
        let low = deployment(
            1,
            3,
            serde_json::json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3,
                "readyReplicas": 1, "availableReplicas": 1}),
        );
        let a = availability(&low);
        assert_eq!((a.ready, a.minimum), (1, 2));
        assert!(!a.is_available());
        // A single replica needs its one pod.
        let single = deployment(
            1,
            1,
            serde_json::json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                "readyReplicas": 1, "availableReplicas": 1}),
        );
        assert!(availability(&single).is_available());
        // Scaled to zero: nothing serves.
        let zero = deployment(1, 0, serde_json::json!({"observedGeneration": 1}));
        assert!(!availability(&zero).is_available());
        assert_eq!(rollout(&zero), Rollout::Complete);
    }
}
