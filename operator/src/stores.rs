//! The reflector caches the reconcilers read related objects from, instead of
//! listing from the API on every run. Each kind is watched and cached once and
//! shared by every controller that needs it ([`crate::controllers`] feeds the
//! [`Writers`]; tests feed them from the fake API).
//!
//! Secrets: only the ones the operator created (labelled
//! `app.kubernetes.io/managed-by=petrel-operator`: DKIM key Secrets and the
//! relays' aggregated key Secrets) are cached, with their data. The user's
//! Secrets (TLS, users, Redis URL, smarthost credentials) are watched as
//! metadata only and never cached; a reconcile reads the few its relay names.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use serde::de::DeserializeOwned;

/// Events a shared store buffers for a slow subscriber before the watch waits.
const BUFFER: usize = 1024;

/// Read side of the caches.
#[derive(Clone)]
pub struct Stores {
    /// Every SmtpRelay (malformed ones as errors).
    pub relays: Store<DeserializeGuard<SmtpRelay>>,
    /// Every SendingDomain.
    pub domains: Store<DeserializeGuard<SendingDomain>>,
    /// Every DkimKey.
    pub keys: Store<DeserializeGuard<DkimKey>>,
    /// Secrets the operator created, with their data.
    pub owned_secrets: Store<Secret>,
}

/// Write side of the caches: one reflector each.
pub struct Writers {
    /// Fed by the SmtpRelay watch.
    pub relays: Writer<DeserializeGuard<SmtpRelay>>,
    /// Fed by the SendingDomain watch.
    pub domains: Writer<DeserializeGuard<SendingDomain>>,
    /// Fed by the DkimKey watch.
    pub keys: Writer<DeserializeGuard<DkimKey>>,
    /// Fed by the watch of managed Secrets.
    pub owned_secrets: Writer<Secret>,
}

fn valid<K: Clone>(guard: &DeserializeGuard<K>) -> Option<K> {
    guard.0.as_ref().ok().cloned()
}

fn object_ref<K: kube::Resource<DynamicType = ()>>(ns: &str, name: &str) -> ObjectRef<K> {
    ObjectRef::new(name).within(ns)
}

impl Stores {
    /// Empty caches and the writers that fill them (shared: several
    /// controllers subscribe to each).
    pub fn new() -> (Stores, Writers) {
        let writers = Writers {
            relays: Writer::new_shared(BUFFER, ()),
            domains: Writer::new_shared(BUFFER, ()),
            keys: Writer::new_shared(BUFFER, ()),
            owned_secrets: Writer::new_shared(BUFFER, ()),
        };
        let stores = Stores {
            relays: writers.relays.as_reader(),
            domains: writers.domains.as_reader(),
            keys: writers.keys.as_reader(),
            owned_secrets: writers.owned_secrets.as_reader(),
        };
        (stores, writers)
    }

    /// Waits until every cache holds its initial list, so no reconcile acts on
    /// a partial view (a relay rendered before the domains are known would
    /// drop them from its config).
    pub async fn ready(&self) {
        let _ = self.relays.wait_until_ready().await;
        let _ = self.domains.wait_until_ready().await;
        let _ = self.keys.wait_until_ready().await;
        let _ = self.owned_secrets.wait_until_ready().await;
    }

    /// The SmtpRelay `ns/name`, if cached and well-formed.
    pub fn relay(&self, ns: &str, name: &str) -> Option<SmtpRelay> {
        self.relays
            .get(&object_ref(ns, name))
            .and_then(|g| valid(&g))
    }

    /// Every well-formed SendingDomain in `ns`.
    pub fn domains(&self, ns: &str) -> Vec<SendingDomain> {
        in_namespace(&self.domains, ns)
    }

    /// Every well-formed SmtpRelay in `ns`.
    pub fn relays_in(&self, ns: &str) -> Vec<SmtpRelay> {
        in_namespace(&self.relays, ns)
    }

    /// The DkimKey `ns/name`, if cached and well-formed.
    pub fn key(&self, ns: &str, name: &str) -> Option<DkimKey> {
        self.keys.get(&object_ref(ns, name)).and_then(|g| valid(&g))
    }

    /// The operator-created Secret `ns/name`.
    pub fn owned_secret(&self, ns: &str, name: &str) -> Option<Arc<Secret>> {
        self.owned_secrets.get(&object_ref(ns, name))
    }

    /// Operator-created Secrets in `ns` carrying `label=value`.
    pub fn owned_secrets_labelled(&self, ns: &str, label: &str, value: &str) -> Vec<Arc<Secret>> {
        self.owned_secrets
            .state()
            .into_iter()
            .filter(|s| s.namespace().as_deref() == Some(ns))
            .filter(|s| s.labels().get(label).map(String::as_str) == Some(value))
            .collect()
    }
}

fn in_namespace<K>(store: &Store<DeserializeGuard<K>>, ns: &str) -> Vec<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned,
{
    let mut all: Vec<K> = store
        .state()
        .iter()
        .filter_map(|g| valid(g))
        .filter(|k| k.namespace().as_deref() == Some(ns))
        .collect();
    // Store order is a hash map's: sort so every run sees the same order.
    all.sort_by_key(|k| k.name_any());
    all
}

impl Writers {
    /// Replaces a cache's contents with `objects` and marks it ready, as a
    /// watch's initial list does (tests, and nothing else, call this).
    pub fn replace<K>(writer: &mut Writer<K>, objects: impl IntoIterator<Item = K>)
    where
        K: kube::runtime::reflector::Lookup + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        writer.apply_watcher_event(&watcher::Event::Init);
        for obj in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(obj));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
    }
}
