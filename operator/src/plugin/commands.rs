//! The API calls behind `kubectl petrel`: read the three kinds, annotate a
//! key, find a relay pod for `queue`.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use petrel_crds::dkim_key::{DkimKey, ROTATE_ANNOTATION};
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;

use super::format::{self, Row};
use crate::smtp_relay::build::selector_labels;

/// What a plugin command fails with.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    /// The named object does not exist.
    #[error("{kind} {name} not found in namespace {namespace}")]
    NotFound {
        /// Kind looked for.
        kind: &'static str,
        /// Name given.
        name: String,
        /// Namespace searched.
        namespace: String,
    },
    /// The relay has no pod that could run the command.
    #[error("SmtpRelay {0} has no running, ready pod to run the queue command in")]
    NoReadyPod(String),
}

/// Relays, domains and keys of `ns` with their conditions, in one table.
pub async fn status(client: &Client, ns: &str) -> Result<String, PluginError> {
    let lp = ListParams::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut relays = Api::<SmtpRelay>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items;
    relays.sort_by_key(|r| r.name_any());
    rows.extend(relays.iter().map(format::relay_row));
    let mut domains = Api::<SendingDomain>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items;
    domains.sort_by_key(|d| d.name_any());
    rows.extend(domains.iter().map(format::domain_row));
    let mut keys = Api::<DkimKey>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items;
    keys.sort_by_key(|k| k.name_any());
    rows.extend(keys.iter().map(format::key_row));
    if rows.is_empty() {
        return Ok(format!(
            "no SmtpRelays, SendingDomains or DkimKeys in namespace {ns}\n"
        ));
    }
    Ok(format::table(&rows))
}

/// The SendingDomain named `domain`, or whose `spec.domain` is `domain`.
pub async fn find_domain(
    client: &Client,
    ns: &str,
    domain: &str,
) -> Result<SendingDomain, PluginError> {
    let api = Api::<SendingDomain>::namespaced(client.clone(), ns);
    if let Some(sd) = api.get_opt(domain).await? {
        return Ok(sd);
    }
    api.list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|sd| {
            sd.spec
                .domain
                .eq_ignore_ascii_case(domain.trim_end_matches('.'))
        })
        .ok_or_else(|| PluginError::NotFound {
            kind: "SendingDomain",
            name: domain.into(),
            namespace: ns.into(),
        })
}

/// The domain's records to publish as zone-file lines with their states.
pub async fn dns(client: &Client, ns: &str, domain: &str, ttl: u32) -> Result<String, PluginError> {
    let sd = find_domain(client, ns, domain).await?;
    let records = sd.status.unwrap_or_default().dns_records;
    if records.is_empty() {
        return Ok(format!(
            "; SendingDomain {} lists no records yet (the operator has not reconciled it)\n",
            sd.metadata.name.unwrap_or_default()
        ));
    }
    Ok(format::zone_lines(&records, ttl))
}

/// Asks the operator to rotate the DkimKey `key` now (`petrel.dev/rotate=now`).
pub async fn rotate(client: &Client, ns: &str, key: &str) -> Result<(), PluginError> {
    let api = Api::<DkimKey>::namespaced(client.clone(), ns);
    if api.get_opt(key).await?.is_none() {
        return Err(PluginError::NotFound {
            kind: "DkimKey",
            name: key.into(),
            namespace: ns.into(),
        });
    }
    let patch = serde_json::json!({"metadata": {"annotations": {ROTATE_ANNOTATION: "now"}}});
    api.patch(key, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// A running, ready pod of `relay` (pure): the first by name, so repeated
/// commands land on the same pod.
pub fn pick_pod(relay: &SmtpRelay, pods: &[Pod]) -> Option<String> {
    let selector = selector_labels(relay);
    let mut ready: Vec<String> = pods
        .iter()
        .filter(|p| {
            let labels = p.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            let status = p.status.as_ref();
            status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(ResourceExt::name_any)
        .collect();
    ready.sort();
    ready.into_iter().next()
}

/// The pod of `relay` to run `petrel-relay queue` in.
pub async fn queue_pod(client: &Client, ns: &str, relay: &str) -> Result<String, PluginError> {
    let Some(relay_obj) = Api::<SmtpRelay>::namespaced(client.clone(), ns)
        .get_opt(relay)
        .await?
    else {
        return Err(PluginError::NotFound {
            kind: "SmtpRelay",
            name: relay.into(),
            namespace: ns.into(),
        });
    };
    let selector: Vec<String> = selector_labels(&relay_obj)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector.join(",")))
        .await?
        .items;
    pick_pod(&relay_obj, &pods).ok_or_else(|| PluginError::NoReadyPod(relay.into()))
}

/// `kubectl exec` arguments running `petrel-relay queue ARGS` in the relay
/// container of `pod` (pure). The relay image has no shell, so the binary is
/// run directly, with the config file the operator mounts (the queue
/// command finds the backend, and the relay's admin API, through it).
pub fn queue_exec_args(ns: &str, pod: &str, args: &[String]) -> Vec<String> {
    let config = format!(
        "{}/{}",
        crate::smtp_relay::build::CONFIG_DIR,
        crate::smtp_relay::build::CONFIG_KEY
    );
    let mut out: Vec<String> = [
        "exec",
        "-n",
        ns,
        pod,
        "-c",
        "relay",
        "--",
        "petrel-relay",
        "queue",
        "--config",
        &config,
    ]
    .into_iter()
    .map(String::from)
    .collect();
    out.extend(args.iter().cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::{FakeApi, path};
    use serde_json::json;

    const NS: &str = "mail";
    const T: &str = "2026-01-01T00:00:00Z";

    fn seed(api: &FakeApi) {
        api.insert(
            &path::<SmtpRelay>(NS, "main"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "SmtpRelay", "metadata": {"name": "main"},
                   "spec": {"redis": {"urlSecretRef": {"name": "r", "key": "url"}}},
                   "status": {"readyReplicas": 1, "replicas": 2, "conditions": [
                       {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "lastTransitionTime": T}]}}),
        );
        api.insert(
            &path::<SendingDomain>(NS, "example"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "SendingDomain", "metadata": {"name": "example"},
                   "spec": {"domain": "example.com", "relayRef": {"name": "main"}},
                   "status": {"dnsRecords": [
                       {"name": "_dmarc.example.com", "type": "TXT", "value": "v=DMARC1; p=none", "purpose": "dmarc", "state": "missing"}]}}),
        );
        api.insert(
            &path::<DkimKey>(NS, "example"),
            json!({"apiVersion": "petrel.dev/v1alpha1", "kind": "DkimKey", "metadata": {"name": "example"},
                   "spec": {"domain": "example.com"}}),
        );
    }

    fn pod(name: &str, instance: &str, phase: &str, ready: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "petrel-relay", "app.kubernetes.io/instance": instance}},
               "status": {"phase": phase, "conditions": [{"type": "Ready", "status": ready}]}})
    }

    async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
        tokio::time::timeout(std::time::Duration::from_secs(20), test)
            .await
            .expect("test finished in time");
    }

    #[tokio::test]
    async fn status_lists_every_kind_in_one_table() {
        bounded(async {
            let (client, api) = FakeApi::start();
            seed(&api);
            let out = status(&client, NS).await.expect("status");
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 4, "{out}");
            assert!(lines[0].starts_with("KIND"));
            assert!(
                lines[1].starts_with("SmtpRelay")
                    && lines[1].contains("Available=True(MinimumReplicasAvailable)")
                    && lines[1].contains("1/2 pods ready"),
                "{out}"
            );
            assert!(
                lines[2].starts_with("SendingDomain") && lines[2].contains("0/1 records verified"),
                "{out}"
            );
            assert!(
                lines[3].starts_with("DkimKey") && lines[3].contains("Unknown"),
                "{out}"
            );
            let empty = status(&client, "other").await.expect("status");
            assert!(empty.starts_with("no SmtpRelays"), "{empty}");
        })
        .await;
    }

    #[tokio::test]
    async fn dns_finds_the_domain_by_name_or_domain() {
        bounded(async {
            let (client, api) = FakeApi::start();
            seed(&api);
            let want = "_dmarc.example.com. 3600 IN TXT \"v=DMARC1; p=none\" ; dmarc missing\n";
            assert_eq!(
                dns(&client, NS, "example", 3600).await.expect("by name"),
                want
            );
            assert_eq!(
                dns(&client, NS, "example.com", 3600)
                    .await
                    .expect("by domain"),
                want
            );
            let err = dns(&client, NS, "nope.org", 3600)
                .await
                .expect_err("unknown");
            assert_eq!(
                err.to_string(),
                "SendingDomain nope.org not found in namespace mail"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn rotate_sets_the_annotation_and_rejects_unknown_keys() {
        bounded(async {
            let (client, api) = FakeApi::start();
            seed(&api);
            rotate(&client, NS, "example").await.expect("rotate");
            let key = api.get(&path::<DkimKey>(NS, "example")).expect("key");
            assert_eq!(key["metadata"]["annotations"]["petrel.dev/rotate"], "now");
            assert!(matches!(
                rotate(&client, NS, "missing").await,
                Err(PluginError::NotFound {
                    kind: "DkimKey",
                    ..
                })
            ));
        })
        .await;
    }

    #[tokio::test]
    async fn queue_runs_in_a_ready_pod_of_the_relay() {
        bounded(async {
            let (client, api) = FakeApi::start();
            seed(&api);
            let pods = path::<Pod>(NS, "");
            let pods = pods.trim_end_matches('/');
            api.insert(
                &format!("{pods}/petrel-main-c"),
                pod("petrel-main-c", "main", "Running", "True"),
            );
            api.insert(
                &format!("{pods}/petrel-main-a"),
                pod("petrel-main-a", "main", "Running", "False"),
            );
            api.insert(
                &format!("{pods}/petrel-main-b"),
                pod("petrel-main-b", "main", "Pending", "False"),
            );
            api.insert(
                &format!("{pods}/petrel-other-a"),
                pod("petrel-other-a", "other", "Running", "True"),
            );
            assert_eq!(
                queue_pod(&client, NS, "main").await.expect("pod"),
                "petrel-main-c"
            );
            assert!(matches!(
                queue_pod(&client, NS, "absent").await,
                Err(PluginError::NotFound { .. })
            ));
            api.delete(&format!("{pods}/petrel-main-c"));
            assert!(matches!(
                queue_pod(&client, NS, "main").await,
                Err(PluginError::NoReadyPod(_))
            ));
            assert_eq!(
                queue_exec_args(NS, "petrel-main-c", &["list".into(), "--json".into()]),
                [
                    "exec",
                    "-n",
                    "mail",
                    "petrel-main-c",
                    "-c",
                    "relay",
                    "--",
                    "petrel-relay",
                    "queue",
                    "--config",
                    "/etc/petrel/config/relay.yaml",
                    "list",
                    "--json"
                ]
            );
        })
        .await;
    }
}
