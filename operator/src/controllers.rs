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
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use serde::de::DeserializeOwned;

use crate::context::Context;
use crate::error::Error;
use crate::names::{
    FIELD_MANAGER, KEY_LABEL, MANAGED_BY, MANAGED_SELECTOR as MANAGED, dkim_key_name,
};
use crate::stores::{Stores, Writers};
use crate::{dkim_key, sending_domain, smtp_relay};

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

/// The API of a kind known only at runtime (another project's CRD).
pub(crate) fn dynamic_api(
    client: &kube::Client,
    namespace: Option<&str>,
    resource: &kube::api::ApiResource,
) -> Api<kube::api::DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
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
            // Related objects come from the caches: act only on a complete view.
            ctx.stores.ready().await;
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

/// The SmtpRelays in `ns` that `matches`, as references.
fn relays_where(
    stores: &Stores,
    ns: Option<String>,
    matches: impl Fn(&SmtpRelay) -> bool,
) -> Vec<ObjectRef<DeserializeGuard<SmtpRelay>>> {
    let Some(ns) = ns else { return Vec::new() };
    stores
        .relays_in(&ns)
        .into_iter()
        .filter(|r| matches(r))
        .map(|r| guard_ref::<SmtpRelay>(&r.name_any(), Some(ns.clone())))
        .collect()
}

/// The SendingDomains in `ns` that sign with the DkimKey `key`.
fn domains_signing_with(stores: &Stores, ns: Option<String>, key: &str) -> Vec<SendingDomain> {
    let Some(ns) = ns else { return Vec::new() };
    stores
        .domains(&ns)
        .into_iter()
        .filter(|sd| dkim_key_name(sd) == key)
        .collect()
}

/// Drives a shared reflector: the watch fills the store and feeds its subscribers.
async fn reflect<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    kind: &'static str,
) where
    K: Clone,
{
    stream
        .for_each(|event| async move {
            if let Err(err) = event {
                tracing::warn!(kind, error = %err, "watch failed; retrying with backoff");
            }
        })
        .await;
}

/// Runs the three controllers until `shutdown` completes.
///
/// Each petrel.dev kind and the operator's own Secrets are watched once, into
/// the shared stores in [`Context::stores`] that the reconcilers read; every
/// controller subscribes to the stores it needs. The user's Secrets are
/// watched as metadata only (`metadata_watcher`) and not cached at all: a
/// cluster's Secrets (Helm releases, service-account tokens, certificates) can
/// hold hundreds of megabytes the operator never needs, while a Secret event
/// only has to say which relay to reconcile, by name.
pub async fn run<S>(ctx: Arc<Context>, namespace: Option<String>, shutdown: S)
where
    S: Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
{
    let Some(writers) = ctx.take_writers() else {
        tracing::error!("the controllers already run for this context");
        return;
    };
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let wc = watcher::Config::default().any_semantic();
    let managed = watcher::Config::default().labels(MANAGED).any_semantic();
    // Everything the operator did not create (a label selector with `!=` also
    // matches Secrets without the label).
    let unmanaged = watcher::Config::default()
        .labels(&format!("{MANAGED_BY}!={FIELD_MANAGER}"))
        .any_semantic();
    let stores = ctx.stores.clone();

    let Writers {
        relays: relay_writer,
        domains: domain_writer,
        keys: key_writer,
        owned_secrets: secret_writer,
    } = writers;
    // Subscribe before the watches start, so no subscriber misses an event.
    macro_rules! sub {
        ($w:expr) => {
            match $w.subscribe() {
                Some(handle) => handle,
                None => {
                    tracing::error!("store writers are not shared");
                    return;
                }
            }
        };
    }
    let (relays_for_relays, relays_for_domains) = (sub!(relay_writer), sub!(relay_writer));
    let (domains_for_domains, domains_for_relays) = (sub!(domain_writer), sub!(domain_writer));
    let (keys_for_keys, keys_for_domains, keys_for_relays) =
        (sub!(key_writer), sub!(key_writer), sub!(key_writer));
    let (secrets_for_keys, secrets_for_relays) = (sub!(secret_writer), sub!(secret_writer));

    let reflectors = async {
        tokio::join!(
            reflect(
                watcher(api::<DeserializeGuard<SmtpRelay>>(&client, ns), wc.clone())
                    .default_backoff()
                    .reflect_shared(relay_writer),
                "SmtpRelay"
            ),
            reflect(
                watcher(
                    api::<DeserializeGuard<SendingDomain>>(&client, ns),
                    wc.clone()
                )
                .default_backoff()
                .reflect_shared(domain_writer),
                "SendingDomain"
            ),
            reflect(
                watcher(api::<DeserializeGuard<DkimKey>>(&client, ns), wc.clone())
                    .default_backoff()
                    .reflect_shared(key_writer),
                "DkimKey"
            ),
            reflect(
                watcher(api::<Secret>(&client, ns), managed.clone())
                    .default_backoff()
                    .reflect_shared(secret_writer),
                "Secret"
            ),
        );
    };

    let keys = Controller::for_shared_stream(keys_for_keys, stores.keys.clone())
        .owns_shared_stream(secrets_for_keys)
        .graceful_shutdown_on(shutdown())
        .run(
            |obj, ctx| guarded(obj, ctx, "DkimKey", dkim_key::reconcile::reconcile),
            error_policy,
            ctx.clone(),
        );

    let domains_ctrl = Controller::for_shared_stream(domains_for_domains, stores.domains.clone());
    let domains_ctrl = if ctx.settings.external_dns {
        let ep = sending_domain::dns_endpoint::resource();
        domains_ctrl.owns_with(dynamic_api(&client, ns, &ep), ep, managed.clone())
    } else {
        domains_ctrl
    };
    let domains = domains_ctrl
        // Owned keys and keys named by spec.dkim.keyRef alike: rotation moves the records.
        .watches_shared_stream(keys_for_domains, {
            let stores = stores.clone();
            move |key| {
                domains_signing_with(&stores, key.namespace(), &key.name_any())
                    .into_iter()
                    .map(|sd| guard_ref::<SendingDomain>(&sd.name_any(), sd.namespace()))
                    .collect::<Vec<_>>()
            }
        })
        .watches_shared_stream(relays_for_domains, {
            let stores = stores.clone();
            move |relay| {
                let (name, relay_ns) = (relay.name_any(), relay.namespace());
                relay_ns
                    .map(|ns| stores.domains(&ns))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|sd| sd.spec.relay_ref.name == name)
                    .map(|sd| guard_ref::<SendingDomain>(&sd.name_any(), sd.namespace()))
                    .collect::<Vec<_>>()
            }
        })
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

    let relays_ctrl = Controller::for_shared_stream(relays_for_relays, stores.relays.clone());
    let relays_ctrl = if ctx.settings.keda {
        let so = smtp_relay::keda::resource();
        relays_ctrl.owns_with(dynamic_api(&client, ns, &so), so, managed.clone())
    } else {
        relays_ctrl
    };
    let relays = relays_ctrl
        .owns(api::<ConfigMap>(&client, ns), managed.clone())
        .owns(api::<Deployment>(&client, ns), managed.clone())
        .owns(api::<Service>(&client, ns), managed.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), managed.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), managed.clone())
        .watches_shared_stream(domains_for_relays, |sd| {
            sd.0.as_ref()
                .ok()
                .map(|sd| guard_ref::<SmtpRelay>(&sd.spec.relay_ref.name, sd.namespace()))
        })
        .watches_shared_stream(keys_for_relays, {
            let stores = stores.clone();
            move |key| {
                domains_signing_with(&stores, key.namespace(), &key.name_any())
                    .into_iter()
                    .map(|sd| guard_ref::<SmtpRelay>(&sd.spec.relay_ref.name, sd.namespace()))
                    .collect::<Vec<_>>()
            }
        })
        // The operator's Secrets: a relay's aggregated key Secret (owned), and
        // the DkimKeys' key Secrets its domains sign with.
        .watches_shared_stream(secrets_for_relays, {
            let stores = stores.clone();
            move |secret: Arc<Secret>| relays_for_owned_secret(&stores, &secret)
        })
        // The user's Secrets, metadata only: mapped to the relays naming them.
        .watches_stream(
            // An Api of PartialObjectMeta asks the API server for metadata only.
            watcher(api::<PartialObjectMeta<Secret>>(&client, ns), unmanaged)
                .default_backoff()
                .touched_objects(),
            {
                let stores = stores.clone();
                move |secret: PartialObjectMeta<Secret>| relays_for_user_secret(&stores, &secret)
            },
        )
        .graceful_shutdown_on(shutdown())
        .run(
            |obj, ctx| guarded(obj, ctx, "SmtpRelay", smtp_relay::reconcile::reconcile),
            error_policy,
            ctx.clone(),
        );

    let controllers = async {
        tokio::join!(
            log_results(keys, "DkimKey"),
            log_results(domains, "SendingDomain"),
            log_results(relays, "SmtpRelay"),
        );
    };
    // The watches never end by themselves: stop them once the controllers have.
    tokio::select! {
        _ = controllers => {}
        _ = reflectors => {}
    }
}

/// The relays to reconcile when an operator-created Secret changes: the
/// relay owning it (its aggregated key Secret), or the relays whose domains
/// sign with the DkimKey it belongs to.
pub(crate) fn relays_for_owned_secret(
    stores: &Stores,
    secret: &Secret,
) -> Vec<ObjectRef<DeserializeGuard<SmtpRelay>>> {
    let owner = secret
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "SmtpRelay")
        .map(|o| guard_ref::<SmtpRelay>(&o.name, secret.namespace()));
    let via_key = secret.labels().get(KEY_LABEL).map(|key| {
        domains_signing_with(stores, secret.namespace(), key)
            .into_iter()
            .map(|sd| guard_ref::<SmtpRelay>(&sd.spec.relay_ref.name, sd.namespace()))
            .collect::<Vec<_>>()
    });
    owner
        .into_iter()
        .chain(via_key.into_iter().flatten())
        .collect()
}

/// The relays to reconcile when a user's Secret changes (seen as metadata
/// only): those naming it in their spec.
pub(crate) fn relays_for_user_secret(
    stores: &Stores,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<DeserializeGuard<SmtpRelay>>> {
    let name = secret.name_any();
    relays_where(stores, secret.namespace(), |r| references_secret(r, &name))
}

/// Whether a relay's pods or config depend on the Secret `name`.
pub fn references_secret(relay: &SmtpRelay, name: &str) -> bool {
    smtp_relay::secrets::references(relay, name)
}
