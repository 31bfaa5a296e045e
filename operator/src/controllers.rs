//! Wiring of the three controllers with kube's runtime: what each watches,
//! how a malformed object is contained, and how errors requeue.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use serde::de::DeserializeOwned;

use crate::context::Context;
use crate::error::Error;
use crate::sending_domain::reconcile::dkim_key_name;
use crate::{dkim_key, sending_domain, smtp_relay};

/// Label selecting the objects the operator manages.
const MANAGED: &str = "app.kubernetes.io/managed-by=petrel-operator";

fn api<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn object_key<K: Resource>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        std::any::type_name::<K>(),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// Transient errors requeue with exponential backoff; invalid specs wait for a change.
fn error_policy<K: Resource>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    match error {
        Error::Validate(_) => Action::await_change(),
        _ => Action::requeue(ctx.backoff(&object_key(obj.as_ref()))),
    }
}

/// Unwraps a guarded object: a malformed one is logged and skipped, so it
/// cannot stall the controller.
pub(crate) async fn guarded<K, F, Fut>(
    obj: Arc<DeserializeGuard<K>>,
    ctx: Arc<Context>,
    kind: &'static str,
    reconcile: F,
) -> Result<Action, Error>
where
    K: Clone + Resource,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    match &obj.0 {
        Ok(k) => {
            let key = object_key(obj.as_ref());
            let result = reconcile(Arc::new(k.clone()), ctx.clone()).await;
            if result.is_ok() {
                ctx.succeeded(&key);
            }
            result
        }
        Err(invalid) => {
            tracing::warn!(
                kind,
                name = invalid.metadata.name.as_deref().unwrap_or_default(),
                error = %invalid.error,
                "skipping malformed object"
            );
            ctx.metrics.count(kind, "MalformedObject");
            Ok(Action::await_change())
        }
    }
}

fn guard_ref<K: Resource<DynamicType = ()> + DeserializeOwned>(
    name: &str,
    ns: Option<String>,
) -> ObjectRef<DeserializeGuard<K>> {
    let r = ObjectRef::new(name);
    match ns {
        Some(ns) => r.within(&ns),
        None => r,
    }
}

async fn log_results<S, T, E>(stream: S, kind: &'static str)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Display,
{
    stream
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::warn!(kind, error = %err, "reconcile failed");
            }
        })
        .await;
}

/// Runs the three controllers until `shutdown` completes.
pub async fn run<S>(ctx: Arc<Context>, namespace: Option<String>, shutdown: S)
where
    S: Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
{
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let wc = watcher::Config::default().any_semantic();
    let managed = watcher::Config::default().labels(MANAGED).any_semantic();

    let keys = Controller::new(api::<DeserializeGuard<DkimKey>>(&client, ns), wc.clone())
        .owns(api::<Secret>(&client, ns), managed.clone())
        .graceful_shutdown_on(shutdown())
        .run(
            |obj, ctx| guarded(obj, ctx, "DkimKey", dkim_key::reconcile::reconcile),
            error_policy,
            ctx.clone(),
        );

    let domains_ctrl = Controller::new(
        api::<DeserializeGuard<SendingDomain>>(&client, ns),
        wc.clone(),
    );
    let domain_store = domains_ctrl.store();
    let domains = domains_ctrl
        // Owned keys and keys named by spec.dkim.keyRef alike: rotation moves the records.
        .watches(api::<DeserializeGuard<DkimKey>>(&client, ns), wc.clone(), {
            let store = domain_store.clone();
            move |key| {
                let (name, key_ns) = (key.name_any(), key.namespace());
                store
                    .state()
                    .into_iter()
                    .filter_map(|g| g.0.as_ref().ok().cloned())
                    .filter(|sd| dkim_key_name(sd) == name && sd.namespace() == key_ns)
                    .map(|sd| guard_ref::<SendingDomain>(&sd.name_any(), sd.namespace()))
                    .collect::<Vec<_>>()
            }
        })
        .watches(
            api::<DeserializeGuard<SmtpRelay>>(&client, ns),
            wc.clone(),
            {
                let store = domain_store.clone();
                move |relay| {
                    let (name, relay_ns) = (relay.name_any(), relay.namespace());
                    store
                        .state()
                        .into_iter()
                        .filter_map(|g| g.0.as_ref().ok().cloned())
                        .filter(|sd| sd.spec.relay_ref.name == name && sd.namespace() == relay_ns)
                        .map(|sd| guard_ref::<SendingDomain>(&sd.name_any(), sd.namespace()))
                        .collect::<Vec<_>>()
                }
            },
        )
        .graceful_shutdown_on(shutdown())
        .run(
            |obj, ctx| {
                guarded(
                    obj,
                    ctx,
                    "SendingDomain",
                    sending_domain::reconcile::reconcile,
                )
            },
            error_policy,
            ctx.clone(),
        );

    let relays_ctrl = Controller::new(api::<DeserializeGuard<SmtpRelay>>(&client, ns), wc.clone());
    let relay_store = relays_ctrl.store();
    let relays = relays_ctrl
        .owns(api::<ConfigMap>(&client, ns), managed.clone())
        .owns(api::<Secret>(&client, ns), managed.clone())
        .owns(api::<Deployment>(&client, ns), managed.clone())
        .owns(api::<Service>(&client, ns), managed.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), managed.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), managed.clone())
        .watches(
            api::<DeserializeGuard<SendingDomain>>(&client, ns),
            wc.clone(),
            |sd| {
                sd.0.as_ref()
                    .ok()
                    .map(|sd| guard_ref::<SmtpRelay>(&sd.spec.relay_ref.name, sd.namespace()))
            },
        )
        .watches(api::<DeserializeGuard<DkimKey>>(&client, ns), wc.clone(), {
            let store = domain_store.clone();
            move |key| {
                let (name, key_ns) = (key.name_any(), key.namespace());
                store
                    .state()
                    .into_iter()
                    .filter_map(|g| g.0.as_ref().ok().cloned())
                    .filter(|sd| dkim_key_name(sd) == name && sd.namespace() == key_ns)
                    .map(|sd| guard_ref::<SmtpRelay>(&sd.spec.relay_ref.name, sd.namespace()))
                    .collect::<Vec<_>>()
            }
        })
        .watches(api::<Secret>(&client, ns), wc.clone(), {
            let store = relay_store.clone();
            move |secret: Secret| {
                let (name, secret_ns) = (secret.name_any(), secret.namespace());
                store
                    .state()
                    .into_iter()
                    .filter_map(|g| g.0.as_ref().ok().cloned())
                    .filter(|r| r.namespace() == secret_ns && references_secret(r, &name))
                    .map(|r| guard_ref::<SmtpRelay>(&r.name_any(), r.namespace()))
                    .collect::<Vec<_>>()
            }
        })
        .graceful_shutdown_on(shutdown())
        .run(
            |obj, ctx| guarded(obj, ctx, "SmtpRelay", smtp_relay::reconcile::reconcile),
            error_policy,
            ctx.clone(),
        );

    tokio::join!(
        log_results(keys, "DkimKey"),
        log_results(domains, "SendingDomain"),
        log_results(relays, "SmtpRelay"),
    );
}

/// Whether a relay's pods or config depend on the Secret `name`.
pub fn references_secret(relay: &SmtpRelay, name: &str) -> bool {
    let spec = &relay.spec;
    spec.redis.url_secret_ref.name == name
        || spec.tls_secret_name.as_deref() == Some(name)
        || spec.auth_users_secret_name.as_deref() == Some(name)
        || spec
            .delivery
            .smarthost
            .as_ref()
            .and_then(|s| s.credentials_secret_ref.as_ref())
            .is_some_and(|c| c.name == name)
        || spec
            .events
            .iter()
            .flat_map(|e| &e.webhooks)
            .any(|w| w.secret_ref.name == name)
}
