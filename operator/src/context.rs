//! What every reconcile gets: `Context { client, recorder, metrics, clock, settings }`,
//! plus the DNS lookup used for verification.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};

use crate::clock::Clock;
use crate::dns::TxtLookup;
use crate::metrics::Metrics;
use crate::reputation::{HttpReputation, ReputationSource};
use crate::stores::{Stores, Writers};

pub use crate::apply::{FIELD_MANAGER, apply, apply_status};

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Relay image when an SmtpRelay does not set one.
    pub relay_image: String,
    /// Re-check interval while a DNS record is not verified.
    pub dns_recheck_fast: Duration,
    /// Re-check interval once every record is verified.
    pub dns_recheck_slow: Duration,
    /// Safety-net requeue after a successful reconcile.
    pub resync: Duration,
    /// KEDA support (`--keda`): render, own and watch ScaledObjects. Off, the
    /// operator never touches keda.sh objects (it may lack the RBAC and the CRD).
    pub keda: bool,
    /// external-dns support (`--external-dns`): render, own and watch DNSEndpoints.
    pub external_dns: bool,
    /// Re-check interval of a domain's reputation while it is ok.
    pub reputation_recheck: Duration,
    /// Re-check interval while a domain is warning or paused, or its relay unreachable.
    pub reputation_recheck_fast: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            relay_image: format!("ghcr.io/petrel-dev/petrel:{}", env!("CARGO_PKG_VERSION")),
            dns_recheck_fast: Duration::from_secs(60),
            dns_recheck_slow: Duration::from_secs(30 * 60),
            resync: Duration::from_secs(10 * 60),
            keda: false,
            external_dns: false,
            reputation_recheck: Duration::from_secs(5 * 60),
            reputation_recheck_fast: Duration::from_secs(60),
        }
    }
}

impl Settings {
    /// What the SmtpRelay builders need.
    pub fn build(&self) -> BuildSettings {
        BuildSettings {
            relay_image: self.relay_image.clone(),
        }
    }
}

/// Operator-wide settings the SmtpRelay builders need.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Relay image when the SmtpRelay does not set one.
    pub relay_image: String,
}

/// Shared state of the controllers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on the reconciled objects.
    pub recorder: Recorder,
    /// Operator metrics.
    pub metrics: Arc<Metrics>,
    /// Source of time (a fake one in tests).
    pub clock: Arc<dyn Clock>,
    /// Settings from flags.
    pub settings: Settings,
    /// DNS TXT lookups for record verification.
    pub dns: Arc<dyn TxtLookup>,
    /// The relays' reputation guards (admin API).
    pub reputation: Arc<dyn ReputationSource>,
    /// Caches of related objects, read instead of listing from the API.
    pub stores: Stores,
    /// The caches' write side, until the controllers take it to run the watches.
    writers: Mutex<Option<Writers>>,
    /// Consecutive failed reconciles per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context with the given parts; the recorder reports as `petrel-operator`.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        settings: Settings,
        dns: Arc<dyn TxtLookup>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let (stores, writers) = Stores::new();
        Self {
            client,
            recorder,
            metrics,
            clock,
            settings,
            dns,
            reputation: Arc::new(HttpReputation::new(Duration::from_secs(5))),
            stores,
            writers: Mutex::new(Some(writers)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// The same context reading reputation from `source` (tests use a fake).
    pub fn with_reputation(mut self, source: Arc<dyn ReputationSource>) -> Self {
        self.reputation = source;
        self
    }

    /// The caches' write side, once: whoever takes it feeds the caches (the
    /// controllers' watches, or a test).
    pub fn take_writers(&self) -> Option<Writers> {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Delay before retrying `key` after one more failure: 5s doubling up to 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 5u64.saturating_mul(1 << (*n - 1).min(6));
        Duration::from_secs(secs.min(300))
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Publishes an Event on `obj`; failures are logged, never fatal (Events are best effort).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), %reason, error = %err, "publishing event failed");
        }
    }
}
