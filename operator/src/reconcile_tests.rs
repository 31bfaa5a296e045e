//! The three reconcilers against the in-memory API server ([`crate::fake_api`]),
//! with a fake clock and a table DNS: create, rotation step by step, spec
//! changes, invalid specs, API conflicts and deletion.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use petrel_crds::config::RelayConfig;
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use petrel_crds::status::{
    DkimKeyPhase, DnsRecordPurpose, DnsRecordState, DnsRecordType, condition_is_true,
    find_condition,
};
use serde_json::json;

use crate::clock::{Clock, FakeClock};
use crate::context::{Context, Settings};
use crate::dns::StaticTxt;
use crate::dns_record::TxtAnswer;
use crate::fake_api::{FakeApi, path};
use crate::metrics::Metrics;
use crate::reputation::FakeReputation;
use crate::stores::Writers;
use crate::{dkim_key, sending_domain, smtp_relay};
use kube::core::DeserializeGuard;

const NS: &str = "mail";
/// The admin API of the SmtpRelay `main` in `mail`, as the operator addresses it.
const RELAY_URL: &str = "http://petrel-main.mail.svc:9090";
const DAY: Duration = Duration::from_secs(86400);

struct World {
    api: Arc<FakeApi>,
    ctx: Arc<Context>,
    clock: Arc<FakeClock>,
    dns: Arc<StaticTxt>,
    /// The relay's reputation guard as the operator reads it.
    reputation: Arc<FakeReputation>,
    /// The caches' write side: tests play the watches, filling the stores
    /// from the fake API's objects before each reconcile.
    writers: std::sync::Mutex<Writers>,
}

impl World {
    fn new() -> Self {
        Self::with_settings(Settings::default())
    }

    fn with_settings(settings: Settings) -> Self {
        let (client, api) = FakeApi::start();
        let clock = Arc::new(FakeClock::new(
            Timestamp::from_second(1_790_000_000).expect("timestamp"),
        ));
        let dns = Arc::new(StaticTxt::default());
        // The relay answers with no domains until a test says otherwise.
        let reputation = Arc::new(FakeReputation::default());
        reputation.set(RELAY_URL, Vec::new());
        let ctx = Arc::new(
            Context::new(
                client,
                Arc::new(Metrics::new().expect("metrics")),
                clock.clone(),
                settings,
                dns.clone(),
            )
            .with_reputation(reputation.clone()),
        );
        let writers = std::sync::Mutex::new(ctx.take_writers().expect("writers"));
        Self {
            api,
            ctx,
            clock,
            dns,
            reputation,
            writers,
        }
    }

    /// Objects of kind `K` the fake API holds, as a watch would list them.
    fn listed<K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned>(
        &self,
        filter: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<K> {
        let prefix = format!("{}/", K::url_path(&(), Some(NS)));
        self.api
            .paths()
            .into_iter()
            .filter(|p| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
            .filter_map(|p| self.api.get(&p))
            .filter(|o| filter(o))
            .map(|o| serde_json::from_value(o).expect("stored object"))
            .collect()
    }

    /// Brings the stores up to date with the fake API, as the watches would.
    fn sync(&self) {
        let mut w = self.writers.lock().expect("writers");
        Writers::replace(
            &mut w.relays,
            self.listed::<DeserializeGuard<SmtpRelay>>(|_| true),
        );
        Writers::replace(
            &mut w.domains,
            self.listed::<DeserializeGuard<SendingDomain>>(|_| true),
        );
        Writers::replace(
            &mut w.keys,
            self.listed::<DeserializeGuard<DkimKey>>(|_| true),
        );
        // Only the operator's own Secrets are cached (the managed-by label).
        Writers::replace(
            &mut w.owned_secrets,
            self.listed::<Secret>(|o| {
                o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "petrel-operator"
            }),
        );
    }

    fn add_relay(&self, spec: serde_json::Value) {
        self.api.insert(
            &path::<SmtpRelay>(NS, "main"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "SmtpRelay",
                   "metadata": {"name": "main", "namespace": NS}, "spec": spec}),
        );
    }

    fn add_domain(&self, name: &str, spec: serde_json::Value) {
        self.api.insert(
            &path::<SendingDomain>(NS, name),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "SendingDomain",
                   "metadata": {"name": name, "namespace": NS}, "spec": spec}),
        );
    }

    fn relay(&self) -> SmtpRelay {
        self.api.typed(&path::<SmtpRelay>(NS, "main"))
    }

    fn domain(&self, name: &str) -> SendingDomain {
        self.api.typed(&path::<SendingDomain>(NS, name))
    }

    fn key(&self, name: &str) -> DkimKey {
        self.api.typed(&path::<DkimKey>(NS, name))
    }

    async fn reconcile_relay(&self) -> Action {
        self.sync();
        smtp_relay::reconcile::reconcile(Arc::new(self.relay()), self.ctx.clone())
            .await
            .expect("relay reconciles")
    }

    async fn reconcile_domain(&self, name: &str) -> Action {
        self.sync();
        sending_domain::reconcile::reconcile(Arc::new(self.domain(name)), self.ctx.clone())
            .await
            .expect("domain reconciles")
    }

    async fn reconcile_key(&self, name: &str) -> Action {
        self.sync();
        dkim_key::reconcile::reconcile(Arc::new(self.key(name)), self.ctx.clone())
            .await
            .expect("key reconciles")
    }

    /// Everything once, in the order watches would trigger it.
    async fn settle(&self, domain: &str) {
        self.reconcile_domain(domain).await;
        self.reconcile_key(domain).await;
        self.reconcile_domain(domain).await;
        self.reconcile_relay().await;
    }

    fn rendered_config(&self) -> RelayConfig {
        let cm: ConfigMap = self.api.typed(&path::<ConfigMap>(NS, "petrel-main-config"));
        let yaml = cm
            .data
            .and_then(|d| d.get("relay.yaml").cloned())
            .expect("relay.yaml");
        RelayConfig::from_yaml(&yaml).expect("the relay accepts the rendered config")
    }

    fn key_files(&self) -> Vec<String> {
        let secret: Secret = self.api.typed(&path::<Secret>(NS, "petrel-main-dkim"));
        secret.data.unwrap_or_default().into_keys().collect()
    }

    /// Publishes every record the domain's status asks for.
    fn publish_dns(&self, domain: &str) {
        for record in self.domain(domain).status.unwrap_or_default().dns_records {
            let answer = TxtAnswer::Records(vec![record.value]);
            match record.type_ {
                DnsRecordType::MX => self.dns.set_mx(&record.name, answer),
                _ => self.dns.set(&record.name, answer),
            }
        }
    }

    fn dkim_records(&self, domain: &str) -> Vec<String> {
        self.domain(domain)
            .status
            .unwrap_or_default()
            .dns_records
            .into_iter()
            .filter(|r| r.purpose == DnsRecordPurpose::Dkim)
            .map(|r| r.name)
            .collect()
    }
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("test finished in time");
}

fn relay_spec() -> serde_json::Value {
    json!({"redis": {"urlSecretRef": {"name": "redis", "key": "url"}},
           "trustedNetworks": ["10.0.0.0/8"], "egressIps": ["203.0.113.7"]})
}

#[tokio::test]
async fn full_rotation_through_the_api() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"},
                   "dkim": {"algorithm": "ed25519"}}),
        );

        // The domain creates its DkimKey; the first key waits for DNS.
        w.settle("example").await;
        let key = w.key("example");
        assert_eq!(key.spec.rotation.every, "90d");
        let first = key
            .status
            .clone()
            .and_then(|s| s.next)
            .expect("pending first key");
        assert_eq!(first.phase, DkimKeyPhase::Pending);
        assert!(w.api.get(&path::<Secret>(NS, &first.secret_name)).is_some());
        let sd = w.domain("example");
        let status = sd.status.clone().expect("status");
        assert!(!condition_is_true(&status.conditions, "Ready"));
        assert_eq!(
            find_condition(&status.conditions, "DkimActive").map(|c| c.reason.as_str()),
            Some("WaitingForDkimRecord")
        );
        assert!(
            status
                .dns_records
                .iter()
                .all(|r| r.state == DnsRecordState::Missing)
        );
        assert_eq!(w.dkim_records("example").len(), 1);
        assert!(
            w.rendered_config().domains.is_empty(),
            "no unpublished key signs"
        );

        // DNS serves everything: the key activates, the domain is Ready and bound.
        w.publish_dns("example");
        w.settle("example").await;
        let sd = w.domain("example");
        let status = sd.status.clone().expect("status");
        assert!(
            condition_is_true(&status.conditions, "Ready"),
            "{:?}",
            status.conditions
        );
        assert_eq!(
            status.active_selector.as_deref(),
            Some(first.selector.as_str())
        );
        let config = w.rendered_config();
        assert_eq!(config.domains.len(), 1);
        assert_eq!(config.domains[0].dkim.selector, first.selector);
        assert_eq!(
            w.key_files(),
            [format!("example.com.{}.pem", first.selector)]
        );
        assert_eq!(
            w.relay().status.expect("relay status").bound_domains,
            ["example.com"]
        );

        // 83 days later the next key is generated; the first keeps signing.
        w.clock.advance(83 * DAY);
        w.settle("example").await;
        let second = w
            .key("example")
            .status
            .and_then(|s| s.next)
            .expect("next key");
        assert_ne!(second.selector, first.selector);
        assert_eq!(w.rendered_config().domains[0].dkim.selector, first.selector);
        assert_eq!(
            w.key_files().len(),
            2,
            "next key's file is mounted ahead of the switch"
        );
        assert_eq!(w.dkim_records("example").len(), 2);

        // DNS serves it: Published, but the switch waits for day 90.
        w.publish_dns("example");
        w.settle("example").await;
        let key = w.key("example");
        assert_eq!(
            key.status
                .as_ref()
                .and_then(|s| s.next.as_ref())
                .map(|n| n.phase),
            Some(DkimKeyPhase::Published)
        );
        assert_eq!(w.rendered_config().domains[0].dkim.selector, first.selector);

        w.clock.advance(7 * DAY);
        w.settle("example").await;
        let status = w.key("example").status.expect("status");
        assert_eq!(
            status.active.as_ref().map(|k| k.selector.clone()),
            Some(second.selector.clone())
        );
        assert_eq!(status.retiring.len(), 1);
        assert_eq!(
            w.rendered_config().domains[0].dkim.selector,
            second.selector
        );
        assert_eq!(
            w.key_files().len(),
            2,
            "the retiring key's file stays mounted"
        );
        assert_eq!(
            w.dkim_records("example").len(),
            2,
            "retiring key stays published"
        );
        assert!(condition_is_true(
            &w.domain("example").status.expect("s").conditions,
            "Ready"
        ));

        // retireAfter (7d) later the old key, its record and its Secret are gone.
        w.clock.advance(7 * DAY);
        w.settle("example").await;
        assert!(w.key("example").status.expect("status").retiring.is_empty());
        assert!(w.api.get(&path::<Secret>(NS, &first.secret_name)).is_none());
        assert_eq!(w.dkim_records("example").len(), 1);
        assert_eq!(
            w.key_files(),
            [format!("example.com.{}.pem", second.selector)]
        );

        let reasons: Vec<String> = w
            .api
            .events()
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect();
        for reason in ["KeyGenerated", "KeyPublished", "KeyActivated", "KeyRemoved"] {
            assert!(
                reasons.iter().any(|r| r == reason),
                "no {reason} event in {reasons:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn rotate_annotation_rotates_once() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"}}),
        );
        w.settle("example").await;
        w.publish_dns("example");
        w.settle("example").await;
        let first = w.domain("example").status.and_then(|s| s.active_selector).expect("active");
        let key_path = path::<DkimKey>(NS, "example");
        w.api.merge(&key_path, json!({"metadata": {"annotations": {"petrel.dev/rotate": "now"}}}));
        w.clock.advance(Duration::from_secs(120));
        w.reconcile_key("example").await;
        let key = w.key("example");
        assert!(!key.metadata.annotations.unwrap_or_default().contains_key("petrel.dev/rotate"));
        assert!(key.status.as_ref().and_then(|s| s.rotation_requested_at.as_ref()).is_some());
        assert!(key.status.as_ref().and_then(|s| s.next.as_ref()).is_some());
        w.reconcile_domain("example").await;
        w.publish_dns("example");
        w.settle("example").await;
        // DNS serves the new key at once, but pods may not have its file yet:
        // the config keeps the old key while the new file is being mounted.
        let second = w.key("example").status.and_then(|s| s.next).expect("next").selector;
        assert_eq!(w.rendered_config().domains[0].dkim.selector, first);
        assert!(w.key_files().contains(&format!("example.com.{second}.pem")));
        w.clock.advance(Duration::from_secs(
            dkim_key::rotation::MOUNT_GRACE.as_secs() as u64,
        ));
        let before = w.api.requests().len();
        w.settle("example").await;
        let active = w.domain("example").status.and_then(|s| s.active_selector).expect("active");
        assert_eq!(active, second, "switched once DNS served the key and its file was mounted");
        assert_eq!(w.rendered_config().domains[0].dkim.selector, second);
        // The Secret with the key is written before the ConfigMap that names it.
        let writes: Vec<String> = w.api.requests()[before..]
            .iter()
            .filter(|r| r.starts_with("PATCH") && (r.contains("petrel-main-dkim") || r.contains("petrel-main-config")))
            .cloned()
            .collect();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(writes[0].contains("petrel-main-dkim"), "{writes:?}");
        assert!(w.key("example").status.expect("s").rotation_requested_at.is_none());
    })
    .await;
}

#[tokio::test]
async fn relay_children_spec_changes_and_deletion() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        let action = w.reconcile_relay().await;
        assert_eq!(action, Action::requeue(Settings::default().resync));
        let deploy_path = path::<Deployment>(NS, "petrel-main");
        for child in [
            deploy_path.clone(),
            path::<Service>(NS, "petrel-main"),
            path::<PodDisruptionBudget>(NS, "petrel-main"),
            path::<ConfigMap>(NS, "petrel-main-config"),
            path::<Secret>(NS, "petrel-main-dkim"),
        ] {
            let obj = w.api.get(&child).unwrap_or_else(|| panic!("{child} applied"));
            assert_eq!(obj["metadata"]["ownerReferences"][0]["kind"], "SmtpRelay");
            assert_eq!(obj["metadata"]["ownerReferences"][0]["controller"], true);
        }
        assert!(w.api.requests().iter().any(|r| r.starts_with("PATCH") && r.contains("deployments")));
        let status = w.relay().status.expect("status");
        assert!(!condition_is_true(&status.conditions, "Available"));
        assert_eq!(status.endpoints, ["petrel-main.mail.svc:25"]);

        // The kubelet reports two ready pods.
        w.api.merge(
            &deploy_path,
            json!({"status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2,
                              "updatedReplicas": 2, "availableReplicas": 2}}),
        );
        w.reconcile_relay().await;
        let status = w.relay().status.expect("status");
        assert!(condition_is_true(&status.conditions, "Available"));
        assert!(!condition_is_true(&status.conditions, "Progressing"));
        assert_eq!(status.ready_replicas, 2);

        let hash = |w: &World| {
            let d: Deployment = w.api.typed(&deploy_path);
            d.spec
                .and_then(|s| s.template.metadata)
                .and_then(|m| m.annotations)
                .and_then(|a| a.get("petrel.dev/restart-hash").cloned())
                .expect("restart hash")
        };
        let before = hash(&w);
        // A config-only change re-renders the ConfigMap but keeps the pods.
        let relay_path = path::<SmtpRelay>(NS, "main");
        w.api.merge(&relay_path, json!({"spec": {"limits": {"maxRecipients": 7}}}));
        w.reconcile_relay().await;
        assert_eq!(hash(&w), before);
        assert_eq!(w.rendered_config().limits.max_recipients, 7);
        // An image change rolls the pods; autoscaling adds the HPA.
        w.api.merge(
            &relay_path,
            json!({"spec": {"image": "relay:2", "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}}),
        );
        w.reconcile_relay().await;
        assert_ne!(hash(&w), before);
        assert!(w.api.get(&path::<HorizontalPodAutoscaler>(NS, "petrel-main")).is_some());
        // Monitoring on: a ServiceMonitor owned by the relay.
        w.api.merge(&relay_path, json!({"spec": {"monitoring": {"serviceMonitor": true}}}));
        w.reconcile_relay().await;
        let sm = w
            .api
            .get("/apis/monitoring.coreos.com/v1/namespaces/mail/servicemonitors/petrel-main")
            .expect("service monitor applied");
        assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");

        // Deleting the relay garbage-collects every child through owner references.
        w.api.delete(&relay_path);
        let left: Vec<String> = w.api.paths().into_iter().filter(|p| p.contains("petrel-main")).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    })
    .await;
}

/// A Secret as the API server returns it (data base64-encoded).
fn secret_json(name: &str, type_: &str, data: &[(&str, &str)]) -> serde_json::Value {
    use base64::Engine as _;
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_string(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "type": type_,
           "metadata": {"name": name, "namespace": NS}, "data": data})
}

/// Deployment status shapes as kube-controller-manager writes them.
fn deployment_status(shape: &str) -> serde_json::Value {
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastUpdateTime": "2026-12-01T21:00:00Z", "lastTransitionTime": "2026-12-01T21:00:00Z"})
    };
    let unavailable = cond(
        "Available",
        "False",
        "MinimumReplicasUnavailable",
        "Deployment does not have minimum availability.",
    );
    match shape {
        // Pods stuck in ContainerCreating: a Secret volume cannot be mounted.
        "stuck" => json!({"status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
            "unavailableReplicas": 2, "conditions": [unavailable,
            cond("Progressing", "True", "ReplicaSetUpdated", "ReplicaSet \"petrel-main-6d5f\" is progressing.")]}}),
        // progressDeadlineSeconds (600) later.
        "deadline" => {
            json!({"status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
            "unavailableReplicas": 2, "conditions": [unavailable,
            cond("Progressing", "False", "ProgressDeadlineExceeded", "ReplicaSet \"petrel-main-6d5f\" has timed out progressing.")]}})
        }
        // Both pods up.
        "complete" => {
            json!({"status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2,
            "readyReplicas": 2, "availableReplicas": 2, "conditions": [
            cond("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability."),
            cond("Progressing", "True", "NewReplicaSetAvailable", "ReplicaSet \"petrel-main-6d5f\" has successfully progressed.")]}})
        }
        other => panic!("no shape {other}"),
    }
}

const TEST_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n";

#[tokio::test]
async fn degraded_names_broken_secrets_and_conditions_follow_the_rollout() {
    bounded(async {
        let w = World::new();
        let mut spec = relay_spec();
        spec["tlsSecretName"] = json!("petrel-main-tls");
        spec["listeners"] = json!([{"name": "submission", "port": 587, "tls": "starttls"}]);
        w.add_relay(spec);
        w.api.insert(
            &path::<Secret>(NS, "redis"),
            secret_json("redis", "Opaque", &[("url", "redis://redis:6379")]),
        );
        let deploy_path = path::<Deployment>(NS, "petrel-main");
        let conditions = |w: &World| w.relay().status.expect("status").conditions;
        let get = |w: &World, t: &str| {
            find_condition(&conditions(w), t)
                .cloned()
                .unwrap_or_else(|| panic!("no {t} condition"))
        };

        // The TLS Secret does not exist; the Deployment was just created.
        w.reconcile_relay().await;
        let degraded = get(&w, "Degraded");
        assert!(degraded.is_true(), "{degraded:?}");
        assert_eq!(degraded.reason, "SecretMissing");
        assert!(
            degraded.message.contains(
                "Secret mail/petrel-main-tls does not exist (named by spec.tlsSecretName)"
            ),
            "{}",
            degraded.message
        );
        assert!(get(&w, "Progressing").is_true());
        let available = get(&w, "Available");
        assert!(!available.is_true());
        assert_eq!(available.reason, "NoReadyReplicas");
        assert!(
            w.api.get(&deploy_path).is_some(),
            "children are applied anyway"
        );

        // The pods cannot mount it: the rollout is in progress, nothing is available.
        w.api.merge(&deploy_path, deployment_status("stuck"));
        w.reconcile_relay().await;
        let progressing = get(&w, "Progressing");
        assert!(progressing.is_true());
        assert_eq!(progressing.reason, "RollingOut");
        assert_eq!(
            progressing.message,
            "0 of 2 updated relay pods are available"
        );
        assert!(!get(&w, "Available").is_true());

        // Someone creates it, malformed: the certificate is not PEM and the key is absent.
        w.api.insert(
            &path::<Secret>(NS, "petrel-main-tls"),
            secret_json(
                "petrel-main-tls",
                "kubernetes.io/tls",
                &[("tls.crt", "not a certificate")],
            ),
        );
        w.api.merge(&deploy_path, deployment_status("deadline"));
        w.reconcile_relay().await;
        let degraded = get(&w, "Degraded");
        assert!(degraded.is_true());
        assert_eq!(degraded.reason, "SecretInvalid");
        for part in [
            "Secret mail/petrel-main-tls key tls.crt is not PEM",
            "Secret mail/petrel-main-tls key tls.key is missing",
            "has timed out progressing",
        ] {
            assert!(
                degraded.message.contains(part),
                "{part}: {}",
                degraded.message
            );
        }
        let progressing = get(&w, "Progressing");
        assert!(!progressing.is_true());
        assert_eq!(progressing.reason, "ProgressDeadlineExceeded");
        let degraded_since = degraded.last_transition_time.clone();

        // Fixed, and the pods come up.
        w.clock.advance(Duration::from_secs(60));
        w.api.insert(
            &path::<Secret>(NS, "petrel-main-tls"),
            secret_json(
                "petrel-main-tls",
                "kubernetes.io/tls",
                &[("tls.crt", TEST_PEM), ("tls.key", TEST_PEM)],
            ),
        );
        w.api.merge(&deploy_path, deployment_status("complete"));
        w.reconcile_relay().await;
        let degraded = get(&w, "Degraded");
        assert!(!degraded.is_true());
        assert_eq!(degraded.reason, "AsExpected");
        assert_ne!(
            degraded.last_transition_time, degraded_since,
            "flipped: new transition time"
        );
        let progressing = get(&w, "Progressing");
        assert!(!progressing.is_true());
        assert_eq!(progressing.reason, "RolloutComplete");
        let available = get(&w, "Available");
        assert!(available.is_true());
        assert_eq!(available.message, "2 of 2 relay pods available");

        // Nothing changed but the time: no status write, transition times kept.
        w.clock.advance(Duration::from_secs(60));
        let before = w.api.requests().len();
        w.reconcile_relay().await;
        let status_writes = w.api.requests()[before..]
            .iter()
            .filter(|r| r.contains("smtprelays/main/status"))
            .count();
        assert_eq!(status_writes, 0, "{:?}", &w.api.requests()[before..]);
        assert_eq!(
            get(&w, "Available").last_transition_time,
            available.last_transition_time
        );
    })
    .await;
}

#[tokio::test]
async fn smarthost_users_and_redis_secrets_are_checked_too() {
    bounded(async {
        let w = World::new();
        let mut spec = relay_spec();
        spec["authUsersSecretName"] = json!("users");
        spec["delivery"] = json!({"transport": "smarthost",
            "smarthost": {"host": "smtp.example.net", "credentialsSecretRef": {"name": "smarthost"}}});
        w.add_relay(spec);
        w.api.insert(&path::<Secret>(NS, "redis"), secret_json("redis", "Opaque", &[("uri", "x")]));
        w.api.insert(&path::<Secret>(NS, "smarthost"), secret_json("smarthost", "Opaque", &[("username", "app")]));
        w.reconcile_relay().await;
        let status = w.relay().status.expect("status");
        let degraded = find_condition(&status.conditions, "Degraded").expect("Degraded");
        assert_eq!(degraded.reason, "SecretMissing");
        for part in [
            "Secret mail/redis key url is missing (named by spec.redis.urlSecretRef)",
            "Secret mail/users does not exist (named by spec.authUsersSecretName)",
            "Secret mail/smarthost key password is missing (named by spec.delivery.smarthost.credentialsSecretRef)",
        ] {
            assert!(degraded.message.contains(part), "{part}: {}", degraded.message);
        }
        // The username still reaches the rendered config.
        assert_eq!(
            w.rendered_config().delivery.smarthost.and_then(|s| s.username).as_deref(),
            Some("app")
        );
    })
    .await;
}

/// Whether a request lists a collection (no object name after the plural).
fn is_list(request: &str) -> bool {
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    request.starts_with("GET ")
        && ["/smtprelays", "/sendingdomains", "/dkimkeys", "/secrets"]
            .iter()
            .any(|plural| path.ends_with(plural))
}

#[tokio::test]
async fn reconcilers_read_related_objects_from_the_stores() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"}}),
        );
        w.settle("example").await;
        w.publish_dns("example");
        w.settle("example").await;
        assert_eq!(w.rendered_config().domains.len(), 1, "bound through the stores");
        let requests = w.api.requests();
        let lists: Vec<&String> = requests.iter().filter(|r| is_list(r)).collect();
        assert!(lists.is_empty(), "listed from the API: {lists:?}");
        // Only the user's Secret (the Redis URL) is read from the API; DkimKeys,
        // SendingDomains and the key Secrets come from the caches. The feedback
        // Secret is read once, before it is created: a cache that has not seen
        // it yet must not make the operator generate a second key.
        let gets: Vec<&String> = requests
            .iter()
            .filter(|r| r.starts_with("GET "))
            .filter(|r| !r.ends_with("/secrets/redis"))
            .collect();
        assert_eq!(
            gets,
            ["GET /api/v1/namespaces/mail/secrets/petrel-main-feedback"],
            "{gets:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn secret_events_map_to_the_relays_that_use_them() {
    use crate::controllers::{relays_for_owned_secret, relays_for_user_secret};
    use kube::core::PartialObjectMeta;
    bounded(async {
        let w = World::new();
        let mut spec = relay_spec();
        spec["tlsSecretName"] = json!("tls");
        w.add_relay(spec);
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"}}),
        );
        w.sync();
        let stores = &w.ctx.stores;
        let names = |refs: Vec<kube::runtime::reflector::ObjectRef<DeserializeGuard<SmtpRelay>>>| {
            refs.into_iter().map(|r| r.name).collect::<Vec<_>>()
        };
        let meta = |name: &str| -> PartialObjectMeta<Secret> {
            serde_json::from_value(json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": {"name": name, "namespace": NS}}))
            .expect("metadata")
        };
        assert_eq!(names(relays_for_user_secret(stores, &meta("tls"))), ["main"]);
        assert_eq!(names(relays_for_user_secret(stores, &meta("redis"))), ["main"]);
        assert!(relays_for_user_secret(stores, &meta("helm-release")).is_empty());
        let key_secret: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "example-petrel-1", "namespace": NS,
                         "labels": {"petrel.dev/dkim-key": "example"}}}))
        .expect("secret");
        assert_eq!(names(relays_for_owned_secret(stores, &key_secret)), ["main"]);
        let aggregated: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "petrel-main-dkim", "namespace": NS, "ownerReferences": [
                {"apiVersion": "petrel.dev/v1alpha1", "kind": "SmtpRelay", "name": "main",
                 "uid": "u", "controller": true}]}}))
        .expect("secret");
        assert_eq!(names(relays_for_owned_secret(stores, &aggregated)), ["main"]);
    })
    .await;
}

#[tokio::test]
async fn controllers_run_on_shared_watches_and_secrets_are_listed_as_metadata() {
    bounded(async {
        let (client, api) = FakeApi::start();
        let clock = Arc::new(FakeClock::new(
            Timestamp::from_second(1_790_000_000).expect("timestamp"),
        ));
        let ctx = Arc::new(
            Context::new(
                client,
                Arc::new(Metrics::new().expect("metrics")),
                clock,
                Settings::default(),
                Arc::new(StaticTxt::default()),
            )
            .with_reputation(Arc::new(FakeReputation::default())),
        );
        let mut spec = relay_spec();
        spec["tlsSecretName"] = json!("petrel-main-tls");
        api.insert(
            &path::<SmtpRelay>(NS, "main"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "SmtpRelay",
                   "metadata": {"name": "main", "namespace": NS}, "spec": spec}),
        );
        api.insert(
            &path::<Secret>(NS, "redis"),
            secret_json("redis", "Opaque", &[("url", "redis://redis:6379")]),
        );
        // A large Secret nobody references: never fetched with its data.
        api.insert(
            &path::<Secret>(NS, "sh.helm.release.v1.app.v1"),
            secret_json(
                "sh.helm.release.v1.app.v1",
                "helm.sh/release.v1",
                &[("release", &"x".repeat(100_000))],
            ),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let shutdown = move || {
            let mut rx = stop_rx.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|s| *s).await;
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>
        };
        let run = tokio::spawn(crate::controllers::run(
            ctx.clone(),
            Some(NS.into()),
            shutdown,
        ));

        // The relay is reconciled from the initial lists: children applied and
        // Degraded naming the missing TLS Secret.
        let relay_path = path::<SmtpRelay>(NS, "main");
        api.wait_for(|api| {
            api.get(&relay_path).is_some_and(|r| {
                r["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Degraded" && c["reason"] == "SecretMissing")
                })
            })
        })
        .await;
        assert!(api.get(&path::<Deployment>(NS, "petrel-main")).is_some());
        let relay: SmtpRelay = api.typed(&relay_path);
        let degraded = find_condition(&relay.status.expect("status").conditions, "Degraded")
            .cloned()
            .expect("Degraded");
        assert!(
            degraded
                .message
                .contains("Secret mail/petrel-main-tls does not exist")
        );

        let requests = api.requests();
        let secret_lists: Vec<&String> = requests
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/namespaces/mail/secrets "))
            .collect();
        // Two Secret lists: the operator's own (full objects, by label) and
        // everything else as metadata only.
        assert!(
            secret_lists.iter().any(|r| !r.contains("metadata-only")
                && r.contains("labels app.kubernetes.io/managed-by=petrel-operator")),
            "{secret_lists:?}"
        );
        assert!(
            secret_lists.iter().any(|r| r.contains("metadata-only")
                && r.contains("labels app.kubernetes.io/managed-by!=petrel-operator")),
            "{secret_lists:?}"
        );
        assert!(
            secret_lists.iter().all(|r| r.contains("labels ")),
            "no Secret list without a selector: {secret_lists:?}"
        );
        assert!(
            !requests.iter().any(|r| r.contains("sh.helm.release")),
            "the unreferenced Secret was never read"
        );
        for plural in ["smtprelays", "sendingdomains", "dkimkeys"] {
            let lists = requests
                .iter()
                .filter(|r| {
                    r.starts_with("GET ")
                        && r.split_whitespace()
                            .nth(1)
                            .is_some_and(|p| p.ends_with(plural))
                })
                .count();
            assert_eq!(
                lists, 1,
                "{plural} listed once for all controllers: {requests:?}"
            );
        }

        stop_tx.send(true).expect("stop");
        run.await.expect("controllers stop");
    })
    .await;
}

#[tokio::test]
async fn invalid_specs_become_conditions() {
    bounded(async {
        let w = World::new();
        let mut spec = relay_spec();
        spec["trustedNetworks"] = json!(["10.0.0.0/99"]);
        w.add_relay(spec);
        assert_eq!(w.reconcile_relay().await, Action::await_change());
        let status = w.relay().status.expect("status");
        let degraded = find_condition(&status.conditions, "Degraded").expect("Degraded");
        assert!(degraded.is_true());
        assert_eq!(degraded.reason, "InvalidTrustedNetwork");
        assert!(w.api.get(&path::<Deployment>(NS, "petrel-main")).is_none());

        // A domain naming a relay that does not exist.
        w.add_domain(
            "orphan",
            json!({"domain": "orphan.example", "relayRef": {"name": "nope"}}),
        );
        w.reconcile_domain("orphan").await;
        let ready = find_condition(
            &w.domain("orphan").status.expect("status").conditions,
            "Ready",
        )
        .cloned()
        .expect("Ready");
        assert_eq!(ready.reason, "RelayNotFound");
        assert!(ready.message.contains("nope"));

        // The same domain claimed twice: the later claim is refused.
        w.add_domain(
            "first",
            json!({"domain": "dup.example", "relayRef": {"name": "main"}}),
        );
        w.add_domain(
            "second",
            json!({"domain": "dup.example", "relayRef": {"name": "main"}}),
        );
        w.api.merge(
            &path::<SendingDomain>(NS, "second"),
            json!({"metadata": {"creationTimestamp": "2026-02-01T00:00:00Z"}}),
        );
        // Not await_change: the conflict ends without this object changing.
        assert_ne!(w.reconcile_domain("second").await, Action::await_change());
        let ready = find_condition(
            &w.domain("second").status.expect("status").conditions,
            "Ready",
        )
        .cloned()
        .expect("Ready");
        assert_eq!(ready.reason, "DomainConflict");
        w.api.delete(&path::<SendingDomain>(NS, "first"));
        w.reconcile_domain("second").await;
        assert!(
            w.api.get(&path::<DkimKey>(NS, "second")).is_some(),
            "the remaining claim proceeds once the older one is gone"
        );
    })
    .await;
}

#[tokio::test]
async fn api_conflict_is_a_transient_error() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.api.fail_next("PATCH", "deployments", 409);
        w.sync();
        let err = smtp_relay::reconcile::reconcile(Arc::new(w.relay()), w.ctx.clone())
            .await
            .expect_err("conflict surfaces");
        assert_eq!(err.category(), "ApiError");
        assert!(w.ctx.metrics.render().contains("result=\"ApiError\""));
        // The retry succeeds.
        w.reconcile_relay().await;
        assert!(w.api.get(&path::<Deployment>(NS, "petrel-main")).is_some());
    })
    .await;
}

#[tokio::test]
async fn verify_dns_false_activates_without_lookups() {
    bounded(async {
        let w = World::new();
        w.api.insert(
            &path::<DkimKey>(NS, "manual"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "DkimKey",
                   "metadata": {"name": "manual", "namespace": NS},
                   "spec": {"domain": "example.org", "algorithm": "rsa2048", "verifyDns": false}}),
        );
        w.reconcile_key("manual").await;
        let status = w.key("manual").status.expect("status");
        let active = status.active.expect("active at once");
        assert!(active.dns_value.starts_with("v=DKIM1; k=rsa; p="));
        assert!(condition_is_true(&status.conditions, "Ready"));
        assert_eq!(
            w.clock.now(),
            Timestamp::from_second(1_790_000_000).expect("ts")
        );
    })
    .await;
}

#[tokio::test]
async fn transient_failures_back_off_exponentially() {
    bounded(async {
        let w = World::new();
        let delays: Vec<u64> = (0..9).map(|_| w.ctx.backoff("relay/a").as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(w.ctx.backoff("relay/b").as_secs(), 5, "per object");
        w.ctx.succeeded("relay/a");
        assert_eq!(w.ctx.backoff("relay/a").as_secs(), 5, "reset after success");
    })
    .await;
}

#[tokio::test]
async fn only_one_replica_leads() {
    use crate::leader::LeaseLock;
    use k8s_openapi::api::coordination::v1::Lease;
    bounded(async {
        let w = World::new();
        let lock = |identity: &str| LeaseLock {
            api: kube::Api::<Lease>::namespaced(w.ctx.client.clone(), "petrel-system"),
            name: "petrel-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
        };
        let (a, b) = (lock("a"), lock("b"));
        let t0 = w.clock.now();
        assert!(a.try_acquire_or_renew(t0).await.expect("a acquires"));
        assert!(!b.try_acquire_or_renew(t0).await.expect("b follows"));
        let t1 = t0
            .saturating_add(k8s_openapi::jiff::SignedDuration::from_secs(10))
            .expect("ts");
        assert!(a.try_acquire_or_renew(t1).await.expect("a renews"));
        assert!(!b.try_acquire_or_renew(t1).await.expect("b still follows"));
        // a stops renewing: after the lease duration b takes over, and a then follows.
        let t2 = t1
            .saturating_add(k8s_openapi::jiff::SignedDuration::from_secs(16))
            .expect("ts");
        assert!(b.try_acquire_or_renew(t2).await.expect("b takes over"));
        assert!(!a.try_acquire_or_renew(t2).await.expect("a follows"));
        let lease: Lease = w
            .api
            .typed("/apis/coordination.k8s.io/v1/namespaces/petrel-system/leases/petrel-operator");
        let spec = lease.spec.expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
    })
    .await;
}

#[tokio::test]
async fn leader_rides_out_a_failed_renewal_and_hands_over_on_release() {
    use crate::leader::{Leadership, LeaseLock};
    use k8s_openapi::api::coordination::v1::Lease;
    bounded(async {
        let w = World::new();
        let lock = |identity: &str| LeaseLock {
            api: kube::Api::<Lease>::namespaced(w.ctx.client.clone(), "petrel-system"),
            name: "petrel-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
        };
        let (a, b) = (lock("a"), lock("b"));
        let at = |secs: i64| {
            w.clock
                .now()
                .saturating_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
                .expect("ts")
        };
        let (mut sa, mut sb) = (Leadership::default(), Leadership::default());
        assert!(a.step(&mut sa, at(0)).await, "a acquires");
        assert!(!b.step(&mut sb, at(0)).await, "b follows");

        // One renewal fails (the API server answers 500): a keeps leading.
        w.api.fail_next("PUT", "leases/petrel-operator", 500);
        assert!(
            a.step(&mut sa, at(5)).await,
            "still leading after one failed renewal"
        );
        assert!(
            w.api
                .requests()
                .iter()
                .any(|r| r.starts_with("PUT") && r.contains("leases")),
            "the renewal was attempted"
        );
        assert!(a.step(&mut sa, at(9)).await, "the next renewal succeeds");
        assert!(
            !b.step(&mut sb, at(9)).await,
            "b still follows a live lease"
        );

        // Failures past the renew deadline (10 s of 15 s): a steps down before the
        // Lease expires for b.
        w.api.fail_next("GET", "leases/petrel-operator", 500);
        assert!(a.step(&mut sa, at(14)).await);
        w.api.fail_next("GET", "leases/petrel-operator", 500);
        assert!(
            !a.step(&mut sa, at(19)).await,
            "stepped down at the renew deadline"
        );
        assert!(
            !b.step(&mut sb, at(19)).await,
            "the Lease has not expired yet"
        );
        assert!(
            a.step(&mut sa, at(20)).await,
            "a, still the holder, renews again"
        );

        // Shutdown: a releases the Lease and b leads at once, long before expiry.
        assert!(a.release(at(21)).await.expect("release"));
        let lease: Lease = w
            .api
            .typed("/apis/coordination.k8s.io/v1/namespaces/petrel-system/leases/petrel-operator");
        assert_eq!(
            lease.spec.as_ref().and_then(|s| s.holder_identity.clone()),
            None
        );
        assert!(
            b.step(&mut sb, at(22)).await,
            "b acquires the released Lease at once"
        );
        // A replica that does not hold the Lease releases nothing.
        assert!(!a.release(at(23)).await.expect("release"));
        let lease: Lease = w
            .api
            .typed("/apis/coordination.k8s.io/v1/namespaces/petrel-system/leases/petrel-operator");
        assert_eq!(
            lease.spec.and_then(|s| s.holder_identity).as_deref(),
            Some("b")
        );
    })
    .await;
}

#[tokio::test]
async fn the_renewal_loop_releases_the_lease_when_stopped() {
    use crate::leader::LeaseLock;
    use k8s_openapi::api::coordination::v1::Lease;
    bounded(async {
        let w = World::new();
        let lock = LeaseLock {
            api: kube::Api::<Lease>::namespaced(w.ctx.client.clone(), "petrel-system"),
            name: "petrel-operator".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
        };
        let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(false);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(lock.run(leader_tx, Duration::from_secs(3600), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        leader_rx.wait_for(|l| *l).await.expect("leads");
        stop_tx.send(true).expect("stop");
        task.await.expect("loop ends");
        assert!(!*leader_rx.borrow(), "reports not leading after release");
        let lease: Lease = w
            .api
            .typed("/apis/coordination.k8s.io/v1/namespaces/petrel-system/leases/petrel-operator");
        assert_eq!(lease.spec.and_then(|s| s.holder_identity), None);
    })
    .await;
}

#[tokio::test]
async fn malformed_object_is_skipped_not_fatal() {
    use kube::core::DeserializeGuard;
    bounded(async {
        let w = World::new();
        let bad: DeserializeGuard<SmtpRelay> = serde_json::from_value(json!({
            "apiVersion": "petrel.dev/v1alpha1", "kind": "SmtpRelay",
            "metadata": {"name": "broken", "namespace": NS},
            "spec": {"listeners": "not a list"}
        }))
        .expect("the guard always deserializes");
        assert!(bad.0.is_err());
        w.sync();
        let action = crate::controllers::guarded(
            Arc::new(bad),
            w.ctx.clone(),
            "SmtpRelay",
            smtp_relay::reconcile::reconcile,
        )
        .await
        .expect("skipped, not an error");
        assert_eq!(action, Action::await_change());
        assert!(
            w.ctx
                .metrics
                .render()
                .contains("result=\"MalformedObject\"")
        );
        assert!(w.api.requests().is_empty(), "nothing was written");
    })
    .await;
}

#[tokio::test]
async fn orphaned_key_secrets_are_removed() {
    bounded(async {
        let w = World::new();
        w.api.insert(
            &path::<DkimKey>(NS, "k"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "DkimKey",
                   "metadata": {"name": "k", "namespace": NS, "uid": "key-uid"},
                   "spec": {"domain": "example.org", "algorithm": "ed25519", "verifyDns": false}}),
        );
        let owned = |name: &str| json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS, "labels": {"petrel.dev/dkim-key": "k",
                                                              "app.kubernetes.io/managed-by": "petrel-operator"},
                         "ownerReferences": [{"apiVersion": "petrel.dev/v1alpha1", "kind": "DkimKey",
                                              "name": "k", "uid": "key-uid", "controller": true}]}});
        w.api.insert(&path::<Secret>(NS, "k-orphan"), owned("k-orphan"));
        // Labelled alike but not owned by this key: left alone.
        w.api.insert(
            &path::<Secret>(NS, "unrelated"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "unrelated", "namespace": NS, "labels": {"petrel.dev/dkim-key": "k",
                                                                  "app.kubernetes.io/managed-by": "petrel-operator"}}}),
        );
        w.reconcile_key("k").await;
        let active = w.key("k").status.and_then(|s| s.active).expect("active");
        assert!(w.api.get(&path::<Secret>(NS, &active.secret_name)).is_some());
        assert!(w.api.get(&path::<Secret>(NS, "k-orphan")).is_none());
        assert!(w.api.get(&path::<Secret>(NS, "unrelated")).is_some());
    })
    .await;
}

#[tokio::test]
async fn rsa_dkim_record_is_listed_split_and_verifies_when_served() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "rsa",
            json!({"domain": "rsa.example", "relayRef": {"name": "main"}}),
        );
        w.settle("rsa").await;
        let key = w
            .key("rsa")
            .status
            .and_then(|s| s.next)
            .expect("pending key");
        let listed = w
            .domain("rsa")
            .status
            .expect("status")
            .dns_records
            .into_iter()
            .find(|r| r.purpose == DnsRecordPurpose::Dkim)
            .expect("dkim record");
        assert!(
            listed.value.starts_with("\"v=DKIM1; k=rsa; p="),
            "{}",
            listed.value
        );
        assert!(listed.value.contains("\" \""), "split into several strings");
        // DNS serves the strings; resolvers hand back their concatenation.
        w.dns.set(
            &listed.name,
            TxtAnswer::Records(vec![key.dns_value.clone()]),
        );
        w.settle("rsa").await;
        let status = w.domain("rsa").status.expect("status");
        assert_eq!(
            status.active_selector.as_deref(),
            Some(key.selector.as_str())
        );
        assert!(condition_is_true(&status.conditions, "DkimActive"));
    })
    .await;
}

#[tokio::test]
async fn relay_that_missed_the_new_key_keeps_the_old_one_until_mounted() {
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"}}),
        );
        w.settle("example").await;
        w.publish_dns("example");
        w.settle("example").await;
        let first = w.domain("example").status.and_then(|s| s.active_selector).expect("active");
        // The key rotates while the relay does not reconcile (API errors, operator down).
        w.api.merge(
            &path::<DkimKey>(NS, "example"),
            json!({"metadata": {"annotations": {"petrel.dev/rotate": "now"}}}),
        );
        w.reconcile_key("example").await;
        w.reconcile_domain("example").await;
        w.publish_dns("example");
        let grace = Duration::from_secs(dkim_key::rotation::MOUNT_GRACE.as_secs() as u64);
        w.clock.advance(grace);
        w.reconcile_key("example").await;
        let second = w.key("example").status.and_then(|s| s.active).expect("active").selector;
        assert_ne!(second, first);

        // Now the relay catches up: the new file enters the Secret, but the
        // config keeps the old (still published) key until pods have the file.
        let action = w.reconcile_relay().await;
        assert_eq!(w.rendered_config().domains[0].dkim.selector, first);
        let files = w.key_files();
        assert!(files.contains(&format!("example.com.{first}.pem")));
        assert!(files.contains(&format!("example.com.{second}.pem")));
        assert_eq!(action, Action::requeue(grace));

        w.clock.advance(grace);
        w.reconcile_relay().await;
        assert_eq!(w.rendered_config().domains[0].dkim.selector, second);
    })
    .await;
}

const SCALED_OBJECT: &str = "/apis/keda.sh/v1alpha1/namespaces/mail/scaledobjects/petrel-main";
const DNS_ENDPOINT: &str = "/apis/externaldns.k8s.io/v1alpha1/namespaces/mail/dnsendpoints/example";

#[tokio::test]
async fn keda_engine_swaps_the_hpa_for_a_scaled_object_and_back() {
    bounded(async {
        let w = World::with_settings(Settings {
            keda: true,
            ..Settings::default()
        });
        let mut spec = relay_spec();
        spec["autoscaling"] = json!({"minReplicas": 2, "maxReplicas": 9, "engine": "keda",
            "targetDuePerPod": 40, "prometheus": {"serverAddress": "http://prom.monitoring.svc:9090"}});
        w.add_relay(spec);
        w.reconcile_relay().await;
        let hpa_path = path::<HorizontalPodAutoscaler>(NS, "petrel-main");
        assert!(w.api.get(&hpa_path).is_none(), "KEDA, not an HPA");
        let so = w.api.get(SCALED_OBJECT).expect("ScaledObject applied");
        assert_eq!(so["metadata"]["ownerReferences"][0]["kind"], "SmtpRelay");
        assert_eq!(so["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(so["spec"]["maxReplicaCount"], 9);
        assert_eq!(so["spec"]["triggers"][0]["metadata"]["threshold"], "40");
        // KEDA owns the replica count: the Deployment leaves it unset.
        let deployment: Deployment = w.api.typed(&path::<Deployment>(NS, "petrel-main"));
        assert_eq!(deployment.spec.expect("spec").replicas, None);

        // Back to the CPU HPA: the ScaledObject is pruned.
        w.api.merge(
            &path::<SmtpRelay>(NS, "main"),
            json!({"spec": {"autoscaling": {"engine": "hpa"}}}),
        );
        w.reconcile_relay().await;
        assert!(w.api.get(SCALED_OBJECT).is_none(), "pruned");
        assert!(w.api.get(&hpa_path).is_some(), "HPA back");
    })
    .await;
}

#[tokio::test]
async fn keda_without_operator_support_warns_and_touches_nothing() {
    bounded(async {
        let w = World::new();
        let mut spec = relay_spec();
        spec["autoscaling"] = json!({"maxReplicas": 4, "engine": "keda",
            "prometheus": {"serverAddress": "http://prom:9090"}});
        w.add_relay(spec);
        w.reconcile_relay().await;
        assert!(!w.api.requests().iter().any(|r| r.contains("keda.sh")));
        assert!(w.api.events().iter().any(|e| e["reason"] == "KedaDisabled"));
        // A missing KEDA CRD (404) is an Event too, not a failing reconcile.
        let w = World::with_settings(Settings {
            keda: true,
            ..Settings::default()
        });
        let mut spec = relay_spec();
        spec["autoscaling"] = json!({"maxReplicas": 4, "engine": "keda",
            "prometheus": {"serverAddress": "http://prom:9090"}});
        w.add_relay(spec);
        w.api.fail_next("PATCH", "scaledobjects", 404);
        w.reconcile_relay().await;
        assert!(
            w.api
                .events()
                .iter()
                .any(|e| e["reason"] == "KedaUnavailable")
        );
    })
    .await;
}

#[tokio::test]
async fn dns_publish_keeps_a_dns_endpoint_equal_to_the_status_records() {
    bounded(async {
        let w = World::with_settings(Settings {
            external_dns: true,
            ..Settings::default()
        });
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"},
                   "dnsPublish": {"externalDns": true}}),
        );
        w.settle("example").await;
        w.reconcile_domain("example").await;
        let records = w.domain("example").status.expect("status").dns_records;
        assert!(records.iter().any(|r| r.purpose == DnsRecordPurpose::Dkim));
        let endpoint = w.api.get(DNS_ENDPOINT).expect("DNSEndpoint applied");
        assert_eq!(
            endpoint["metadata"]["ownerReferences"][0]["kind"],
            "SendingDomain"
        );
        let endpoints = endpoint["spec"]["endpoints"].as_array().expect("endpoints");
        // Every record, with its value exactly as the status lists it.
        for record in &records {
            let found = endpoints.iter().any(|e| {
                e["dnsName"] == record.name.as_str()
                    && e["recordType"] == "TXT"
                    && e["targets"]
                        .as_array()
                        .is_some_and(|t| t.iter().any(|v| v == record.value.as_str()))
            });
            assert!(
                found,
                "{} {} missing from {endpoints:?}",
                record.name, record.value
            );
        }
        let targets: usize = endpoints
            .iter()
            .map(|e| e["targets"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(targets, records.len(), "nothing extra");
        // A long RSA key stays one target of several quoted strings.
        assert!(endpoints.iter().any(|e| {
            e["targets"][0]
                .as_str()
                .is_some_and(|t| t.starts_with("\"v=DKIM1") && t.contains("\" \""))
        }));

        // Verification keeps reporting what DNS serves: nothing is served yet.
        assert!(records.iter().all(|r| r.state != DnsRecordState::Verified));

        // Turned off: the DNSEndpoint is deleted.
        w.api.merge(
            &path::<SendingDomain>(NS, "example"),
            json!({"spec": {"dnsPublish": {"externalDns": false}}}),
        );
        w.reconcile_domain("example").await;
        assert!(w.api.get(DNS_ENDPOINT).is_none(), "pruned");
    })
    .await;
}

fn feedback_relay_spec() -> serde_json::Value {
    let mut spec = relay_spec();
    spec["feedback"] = json!({"hostname": "feedback.petrel.example.net"});
    spec
}

const FEEDBACK_SECRET: &str = "petrel-main-feedback";

fn feedback_domain_spec() -> serde_json::Value {
    json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"},
           "returnPathDomain": "bounces.example.com",
           "unsubscribe": {"enabled": true, "baseUrl": "https://u.example.com/petrel"},
           "feedbackId": "{tag:campaign}:{domain}:petrel",
           "reputation": {"maxBounceRate": "2%", "window": "6h"}})
}

fn secret_data(w: &World, name: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let secret: Secret = w.api.typed(&path::<Secret>(NS, name));
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

#[tokio::test]
async fn feedback_listener_service_secret_and_return_path_mx() {
    bounded(async {
        let w = World::new();
        w.add_relay(feedback_relay_spec());
        w.add_domain("example", feedback_domain_spec());
        w.settle("example").await;

        // The MX of the return-path domain points at the relay's feedback host,
        // beside the SPF record there.
        let records = w.domain("example").status.expect("status").dns_records;
        let mx = records
            .iter()
            .find(|r| r.type_ == DnsRecordType::MX)
            .expect("MX record");
        assert_eq!(mx.name, "bounces.example.com");
        assert_eq!(mx.value, "10 feedback.petrel.example.net");
        assert_eq!(mx.purpose, DnsRecordPurpose::ReturnPath);
        assert_eq!(mx.state, DnsRecordState::Missing);
        assert!(records.iter().any(|r| r.name == "bounces.example.com"
            && r.type_ == DnsRecordType::TXT
            && r.value.starts_with("v=spf1")));
        w.publish_dns("example");
        w.settle("example").await;
        let sd = w.domain("example");
        let status = sd.status.expect("status");
        assert!(
            status
                .dns_records
                .iter()
                .all(|r| r.state == DnsRecordState::Verified),
            "{:?}",
            status.dns_records
        );
        assert!(condition_is_true(&status.conditions, "DnsVerified"));

        // The generated Secret: both values, owned by the relay, cached as the operator's own.
        let first = secret_data(&w, FEEDBACK_SECRET);
        assert_eq!(
            first.keys().cloned().collect::<Vec<_>>(),
            ["admin-token", "feedback.key"]
        );
        assert!(first.values().all(|v| v.len() >= 32));
        let secret: Secret = w.api.typed(&path::<Secret>(NS, FEEDBACK_SECRET));
        assert_eq!(
            secret.metadata.owner_references.expect("owner")[0].kind,
            "SmtpRelay"
        );
        assert_eq!(
            secret.metadata.labels.unwrap_or_default()["app.kubernetes.io/managed-by"],
            "petrel-operator"
        );

        // Rendered: the feedback listener, the key and token files, the domain's settings.
        let config = w.rendered_config();
        let listener = config
            .listeners
            .iter()
            .find(|l| l.name == "feedback")
            .expect("feedback listener");
        assert_eq!(listener.role, petrel_crds::config::ListenerRole::Feedback);
        assert_eq!(listener.address.port(), 11025);
        assert_eq!(listener.auth, petrel_crds::config::AuthMode::None);
        assert_eq!(
            config.feedback.key_file.as_deref(),
            Some(std::path::Path::new("/etc/petrel/feedback/feedback.key"))
        );
        assert_eq!(
            config.http.admin_token_file.as_deref(),
            Some(std::path::Path::new("/etc/petrel/feedback/admin-token"))
        );
        let d = &config.domains[0];
        assert_eq!(d.return_path_domain.as_deref(), Some("bounces.example.com"));
        let unsubscribe = d.unsubscribe.as_ref().expect("unsubscribe");
        assert!(unsubscribe.enabled);
        assert_eq!(unsubscribe.base_url, "https://u.example.com/petrel");
        assert_eq!(
            d.feedback_id.as_deref(),
            Some("{tag:campaign}:{domain}:petrel")
        );
        assert_eq!(d.reputation.max_bounce_rate.percent(), 2.0);
        assert_eq!(d.reputation.window.as_secs(), 6 * 3600);
        assert_eq!(d.reputation.max_complaint_rate.percent(), 0.1);

        // The pods mount the Secret and expose the feedback port; its own Service serves it.
        let deployment: Deployment = w.api.typed(&path::<Deployment>(NS, "petrel-main"));
        let pod = deployment.spec.and_then(|s| s.template.spec).expect("pod");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "feedback")
            .expect("feedback volume");
        assert_eq!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some(FEEDBACK_SECRET)
        );
        let c = &pod.containers[0];
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "feedback"
                    && m.mount_path == "/etc/petrel/feedback"
                    && m.read_only == Some(true))
        );
        assert!(
            c.ports
                .iter()
                .flatten()
                .any(|p| p.name.as_deref() == Some("feedback") && p.container_port == 11025)
        );
        let svc: Service = w.api.typed(&path::<Service>(NS, "petrel-main-feedback"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        let port = &spec.ports.expect("ports")[0];
        assert_eq!(port.port, 25);
        assert_eq!(
            port.target_port,
            Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                    "feedback".into()
                )
            )
        );
        // The apps' Service keeps port 25 for the smtp listener.
        let main: Service = w.api.typed(&path::<Service>(NS, "petrel-main"));
        assert!(
            main.spec
                .expect("spec")
                .ports
                .expect("ports")
                .iter()
                .all(|p| p.name.as_deref() != Some("feedback"))
        );

        // Never rewritten: more reconciles keep both values; a lost key is
        // added back without touching the other.
        w.reconcile_relay().await;
        w.reconcile_relay().await;
        assert_eq!(secret_data(&w, FEEDBACK_SECRET), first);
        w.api.merge(
            &path::<Secret>(NS, FEEDBACK_SECRET),
            json!({"data": {"admin-token": null}}),
        );
        w.reconcile_relay().await;
        let healed = secret_data(&w, FEEDBACK_SECRET);
        assert_eq!(healed["feedback.key"], first["feedback.key"]);
        assert_ne!(healed["admin-token"], first["admin-token"]);
        let creates = w
            .api
            .requests()
            .iter()
            .filter(|r| r.starts_with("POST") && r.ends_with("/secrets"))
            .count();
        assert_eq!(creates, 1, "created once");

        // Without spec.feedback: its Service goes, and the MX has no target,
        // with a condition saying what to set.
        w.api.merge(
            &path::<SmtpRelay>(NS, "main"),
            json!({"spec": {"feedback": null}}),
        );
        w.reconcile_relay().await;
        assert!(
            w.api
                .get(&path::<Service>(NS, "petrel-main-feedback"))
                .is_none()
        );
        assert!(
            w.rendered_config()
                .listeners
                .iter()
                .all(|l| l.name != "feedback")
        );
        w.reconcile_domain("example").await;
        let status = w.domain("example").status.expect("status");
        let mx = status
            .dns_records
            .iter()
            .find(|r| r.type_ == DnsRecordType::MX)
            .expect("still listed");
        assert_eq!(mx.value, "");
        let dns = find_condition(&status.conditions, "DnsVerified").expect("DnsVerified");
        assert!(!dns.is_true());
        assert!(
            dns.message
                .contains("set spec.feedback.hostname on SmtpRelay main"),
            "{}",
            dns.message
        );
    })
    .await;
}

fn reputation_of(
    state: crate::reputation::ReputationState,
    reason: Option<crate::reputation::ReputationReason>,
    message: Option<&str>,
) -> Vec<crate::reputation::DomainReputation> {
    vec![crate::reputation::DomainReputation {
        domain: "example.com".into(),
        state,
        reason,
        message: message.map(String::from),
        bounce_rate: 0.072,
        complaint_rate: 0.0,
        volume: 1234,
        since: None,
    }]
}

fn event_reasons(w: &World) -> Vec<String> {
    w.api
        .events()
        .iter()
        .filter_map(|e| e["reason"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn reputation_conditions_follow_the_relay_and_the_resume_annotation_resumes() {
    use crate::reputation::{ReputationReason, ReputationState};
    bounded(async {
        let w = World::new();
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"}, "dkim": {"algorithm": "ed25519"}}),
        );
        w.settle("example").await;
        w.publish_dns("example");
        w.settle("example").await;
        let message = "bounce rate 7.2% over 24h exceeds 5%";
        w.reputation.set(
            RELAY_URL,
            reputation_of(
                ReputationState::Paused,
                Some(ReputationReason::BounceRateExceeded),
                Some(message),
            ),
        );
        let action = w.reconcile_domain("example").await;
        assert_eq!(action, Action::requeue(Duration::from_secs(60)), "watched closely while paused");
        let status = w.domain("example").status.expect("status");
        let paused = find_condition(&status.conditions, "Paused").expect("Paused");
        assert!(paused.is_true());
        assert_eq!(paused.reason, "BounceRateExceeded");
        assert_eq!(paused.message, message);
        assert!(condition_is_true(&status.conditions, "ReputationWarning"));
        assert!(condition_is_true(&status.conditions, "ReputationSynced"));
        let pause_event = w
            .api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "BounceRateExceeded")
            .expect("an Event for the pause");
        assert_eq!(pause_event["type"], "Warning");
        // The operator presented the admin token of the relay's generated Secret.
        let token = String::from_utf8(secret_data(&w, FEEDBACK_SECRET)["admin-token"].clone()).unwrap();
        assert_eq!(w.reputation.tokens().last().cloned().flatten(), Some(token));

        // Resume by annotation: the relay is asked once, the annotation goes,
        // the condition clears, and Events say so.
        w.api.merge(
            &path::<SendingDomain>(NS, "example"),
            json!({"metadata": {"annotations": {"petrel.dev/resume": "now"}}}),
        );
        let action = w.reconcile_domain("example").await;
        assert_eq!(
            w.reputation.calls().iter().filter(|c| c.starts_with("RESUME")).cloned().collect::<Vec<_>>(),
            [format!("RESUME {RELAY_URL} example.com")]
        );
        let sd = w.domain("example");
        assert!(!sd.metadata.annotations.unwrap_or_default().contains_key("petrel.dev/resume"));
        let status = sd.status.expect("status");
        assert!(!condition_is_true(&status.conditions, "Paused"));
        assert!(!condition_is_true(&status.conditions, "ReputationWarning"));
        assert_ne!(action, Action::requeue(Duration::from_secs(60)), "back to the slow pace");
        let reasons = event_reasons(&w);
        for reason in ["ResumeRequested", "Resumed"] {
            assert!(reasons.iter().any(|r| r == reason), "no {reason} in {reasons:?}");
        }
        w.reconcile_domain("example").await;
        assert_eq!(
            w.reputation.calls().iter().filter(|c| c.starts_with("RESUME")).count(),
            1,
            "resumed once"
        );

        // Paused again, then the relay is unreachable: the pause stays as it
        // was, one Event and a condition say why, and nothing flaps.
        w.reputation.set(
            RELAY_URL,
            reputation_of(
                ReputationState::Paused,
                Some(ReputationReason::BounceRateExceeded),
                Some(message),
            ),
        );
        w.reconcile_domain("example").await;
        let before = find_condition(&w.domain("example").status.expect("s").conditions, "Paused")
            .cloned()
            .expect("Paused");
        assert!(before.is_true());
        w.reputation.unreachable(RELAY_URL);
        let events_before = w.api.events().len();
        for _ in 0..3 {
            w.clock.advance(Duration::from_secs(60));
            let action = w.reconcile_domain("example").await;
            assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        }
        let status = w.domain("example").status.expect("status");
        assert_eq!(find_condition(&status.conditions, "Paused"), Some(&before));
        let synced = find_condition(&status.conditions, "ReputationSynced").expect("synced");
        assert!(!synced.is_true());
        assert_eq!(synced.reason, "RelayUnreachable");
        assert!(synced.message.contains(RELAY_URL), "{}", synced.message);
        let new: Vec<String> = w.api.events()[events_before..]
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect();
        assert_eq!(new, ["RelayUnreachable"]);

        // A resume while unreachable keeps the annotation for the next try.
        w.api.merge(
            &path::<SendingDomain>(NS, "example"),
            json!({"metadata": {"annotations": {"petrel.dev/resume": "now"}}}),
        );
        w.reconcile_domain("example").await;
        assert!(w.domain("example").metadata.annotations.unwrap_or_default().contains_key("petrel.dev/resume"));
        assert!(event_reasons(&w).iter().any(|r| r == "ResumeFailed"));
    })
    .await;
}

#[tokio::test]
async fn dns_endpoint_carries_the_return_path_mx() {
    bounded(async {
        let w = World::with_settings(Settings {
            external_dns: true,
            ..Settings::default()
        });
        w.add_relay(feedback_relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"},
                   "returnPathDomain": "bounces.example.com",
                   "dnsPublish": {"externalDns": true}}),
        );
        w.settle("example").await;
        w.reconcile_domain("example").await;
        let endpoint = w.api.get(DNS_ENDPOINT).expect("DNSEndpoint applied");
        let endpoints = endpoint["spec"]["endpoints"].as_array().expect("endpoints");
        let at_return_path: Vec<(&str, &str)> = endpoints
            .iter()
            .filter(|e| e["dnsName"] == "bounces.example.com")
            .map(|e| {
                (
                    e["recordType"].as_str().unwrap_or_default(),
                    e["targets"][0].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            at_return_path,
            [
                ("TXT", "v=spf1 ip4:203.0.113.7 ~all"),
                ("MX", "10 feedback.petrel.example.net")
            ]
        );
        // Without the relay's feedback host the MX has no target: not published.
        w.api.merge(
            &path::<SmtpRelay>(NS, "main"),
            json!({"spec": {"feedback": null}}),
        );
        w.reconcile_domain("example").await;
        let endpoint = w.api.get(DNS_ENDPOINT).expect("DNSEndpoint applied");
        let types: Vec<&str> = endpoint["spec"]["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .filter_map(|e| e["recordType"].as_str())
            .collect();
        assert!(types.iter().all(|t| *t == "TXT"), "{types:?}");
    })
    .await;
}

#[tokio::test]
async fn dns_endpoint_is_kept_as_it_was_when_a_reconcile_fails() {
    bounded(async {
        let w = World::with_settings(Settings {
            external_dns: true,
            ..Settings::default()
        });
        w.add_relay(relay_spec());
        w.add_domain(
            "example",
            json!({"domain": "example.com", "relayRef": {"name": "main"},
                   "dnsPublish": {"externalDns": true}}),
        );
        w.settle("example").await;
        w.reconcile_domain("example").await;
        let before = w.api.get(DNS_ENDPOINT).expect("DNSEndpoint applied");
        let touched = |w: &World| {
            w.api
                .requests()
                .iter()
                .filter(|r| r.contains("dnsendpoints"))
                .count()
        };

        // The DkimKey apply fails: the reconcile errs before the DNSEndpoint.
        let requests = touched(&w);
        w.api.fail_next("PATCH", "dkimkeys", 500);
        w.sync();
        let failed =
            sending_domain::reconcile::reconcile(Arc::new(w.domain("example")), w.ctx.clone())
                .await;
        assert!(failed.is_err());
        assert_eq!(touched(&w), requests, "no DNSEndpoint request on failure");
        assert_eq!(w.api.get(DNS_ENDPOINT), Some(before.clone()));

        // The relay is gone (the spec is blocked): nothing is pruned.
        w.api.delete(&path::<SmtpRelay>(NS, "main"));
        w.reconcile_domain("example").await;
        assert_eq!(touched(&w), requests, "a blocked spec leaves it alone");
        assert_eq!(w.api.get(DNS_ENDPOINT), Some(before));
    })
    .await;
}
