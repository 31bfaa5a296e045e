//! SmtpRelay reconcile: gather the bound SendingDomains and their active keys,
//! render the RelayConfig, apply every child object with server-side apply,
//! and report Available, Progressing and Degraded.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ApiResource};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use petrel_crds::smtp_relay::{
    CONDITION_AVAILABLE, CONDITION_DEGRADED, CONDITION_PROGRESSING, REASON_AS_EXPECTED,
    REASON_MINIMUM_REPLICAS_AVAILABLE, REASON_MINIMUM_REPLICAS_UNAVAILABLE,
    REASON_NO_READY_REPLICAS, REASON_PROGRESS_DEADLINE_EXCEEDED, REASON_ROLLING_OUT,
    REASON_ROLLOUT_COMPLETE, SmtpRelay, SmtpRelayStatus,
};
use petrel_crds::status::{
    Condition, ConditionStatus, DkimKeyEntry, conditions_equivalent, merge_conditions,
};

use super::build::{self, BoundDomain};
use super::rollout::{self, Rollout};
use super::{feedback, keda, mounted, secrets};
use crate::apply::{apply, apply_optional, apply_status, delete};
use crate::claims::conflicting_owner;
use crate::context::Context;
use crate::error::{Error, InvalidSpec, Result};
use crate::names::{PRIVATE_KEY, dkim_key_name, feedback_secret_name, feedback_service_name};
use crate::stores::Stores;

/// What the relay signs for, and the key files its pods need.
#[derive(Debug, Default)]
pub struct Bindings {
    /// Domains with an active key, sorted by domain.
    pub domains: Vec<BoundDomain>,
    /// Private keys by file name: active, next and retiring keys of each domain.
    pub keys: BTreeMap<String, String>,
    /// Retiring keys (with their file in `keys`) by domain: they may sign while
    /// the active key's file is being mounted (see [`mounted`]).
    pub retiring: BTreeMap<String, Vec<DkimKeyEntry>>,
}

/// Reconciles one SmtpRelay.
pub async fn reconcile(relay: Arc<SmtpRelay>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("SmtpRelay");
    let result = reconcile_inner(&relay, &ctx).await;
    ctx.metrics.count(
        "SmtpRelay",
        result.as_ref().map_or_else(|e| e.category(), |_| "ok"),
    );
    result
}

async fn reconcile_inner(relay: &SmtpRelay, ctx: &Context) -> Result<Action> {
    let ns = relay.namespace().ok_or(Error::Malformed("namespace"))?;
    let name = relay.name_any();
    let client = ctx.client.clone();
    let relays: Api<SmtpRelay> = Api::namespaced(client.clone(), &ns);
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let generation = relay.metadata.generation;
    let stored = relay.status.clone().unwrap_or_default();
    let now = ctx.clock.now_time();

    let mut bindings = bindings(relay, &ctx.stores, &ns);
    // When each key file entered the aggregated Secret decides which key signs.
    let stored_keys = ctx
        .stores
        .owned_secret(&ns, &build::dkim_secret_name(relay));
    let since = mounted::files_since(stored_keys.as_deref(), bindings.keys.keys(), now.0);
    let mut recheck = None;
    for bound in &mut bindings.domains {
        let domain = bound.spec.domain.clone();
        let retiring = bindings
            .retiring
            .get(&domain)
            .map_or(&[][..], Vec::as_slice);
        let file = |k: &DkimKeyEntry| build::key_file_name(&domain, &k.selector);
        let (key, at) = mounted::signing_key(&bound.active_key, retiring, &since, &file, now.0);
        bound.active_key = key;
        recheck = recheck.into_iter().chain(at).min();
    }
    // The user's Secrets are read when needed, never cached: the operator may
    // not hold every Secret of the cluster in memory (see controllers.rs).
    let refs = secrets::referenced_secrets(relay);
    let mut found = BTreeMap::new();
    for r in &refs {
        if !found.contains_key(&r.name) {
            found.insert(r.name.clone(), secrets_api.get_opt(&r.name).await?);
        }
    }
    let secret_problem = secrets::degraded(&ns, &secrets::check(&refs, &found));
    let config =
        match build::relay_config(relay, &bindings.domains, smarthost_username(relay, &found)) {
            Ok(config) => config,
            Err(invalid) => {
                let status = SmtpRelayStatus {
                    conditions: merge_conditions(
                        &stored.conditions,
                        vec![degraded(Some(&invalid), generation, now)],
                    ),
                    observed_generation: generation,
                    ..stored.clone()
                };
                write_status(&relays, &name, &stored, &status).await?;
                ctx.event(
                    relay,
                    EventType::Warning,
                    invalid.reason,
                    "Render",
                    invalid.message,
                )
                .await;
                return Ok(Action::await_change());
            }
        };

    let settings = ctx.settings.build();
    let config_map = build::config_map(relay, &config).map_err(Error::Build)?;
    // Keys first: if this write fails, the config must not already name a key
    // the Secret lacks (the relay answers 451 for a missing key file).
    let mut key_secret = build::dkim_secret(relay, &bindings.keys);
    key_secret.metadata.annotations = Some(BTreeMap::from([(
        mounted::FILES_SINCE.to_string(),
        mounted::since_annotation(&since),
    )]));
    apply(&secrets_api, &build::dkim_secret_name(relay), &key_secret).await?;
    // Before the Deployment, whose pods cannot start without it.
    ensure_feedback_secret(relay, ctx, &secrets_api, &ns).await?;
    apply(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns),
        &build::config_map_name(relay),
        &config_map,
    )
    .await?;
    let deployment = apply(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        &build::base_name(relay),
        &build::deployment(relay, &settings),
    )
    .await?;
    apply(
        &Api::<Service>::namespaced(client.clone(), &ns),
        &build::base_name(relay),
        &build::service(relay),
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    match feedback::service(relay) {
        Some(svc) => {
            apply(&services, &feedback_service_name(relay), &svc).await?;
        }
        None => delete(&services, &feedback_service_name(relay)).await?,
    }
    apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns),
        &build::base_name(relay),
        &build::pdb(relay),
    )
    .await?;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns);
    match build::hpa(relay) {
        Some(hpa) => {
            apply(&hpas, &build::base_name(relay), &hpa).await?;
        }
        None => delete(&hpas, &build::base_name(relay)).await?,
    }

    keda::reconcile(relay, ctx, &ns).await?;
    apply_service_monitor(relay, ctx, &ns).await?;

    let mut bound: Vec<String> = bindings
        .domains
        .iter()
        .map(|d| d.spec.domain.clone())
        .collect();
    bound.sort();
    let status = relay_status(
        relay,
        &deployment,
        bound,
        &stored,
        now.clone(),
        secret_problem,
    );
    write_status(&relays, &name, &stored, &status).await?;
    let after = recheck.map_or(ctx.settings.resync, |at| {
        let secs = at.duration_since(now.0).as_secs().max(1);
        ctx.settings
            .resync
            .min(std::time::Duration::from_secs(secs.unsigned_abs()))
    });
    Ok(Action::requeue(after))
}

/// Creates the relay's feedback Secret (token key and admin token) when it
/// does not exist, and adds a key it lacks; never rewrites a value it holds.
/// The cache may lag behind a create of a moment ago, so absence is checked
/// against the API, and the create is a create (409 when it exists), not an
/// apply that could replace the key.
async fn ensure_feedback_secret(
    relay: &SmtpRelay,
    ctx: &Context,
    api: &Api<Secret>,
    ns: &str,
) -> Result<()> {
    let name = feedback_secret_name(relay);
    let cached = ctx.stores.owned_secret(ns, &name);
    if feedback::missing_values(cached.as_deref()).is_empty() {
        return Ok(());
    }
    let stored = api.get_opt(&name).await?;
    let missing = feedback::missing_values(stored.as_ref());
    if missing.is_empty() {
        return Ok(());
    }
    let created = stored.is_none();
    match stored {
        None => {
            let secret = feedback::secret(relay, missing);
            match api.create(&kube::api::PostParams::default(), &secret).await {
                Ok(_) => {}
                // Created meanwhile (another operator replica, a retried request): keep it.
                Err(kube::Error::Api(status)) if status.code == 409 => return Ok(()),
                Err(err) => return Err(err.into()),
            }
        }
        Some(_) => {
            // A merge patch adds the missing keys and leaves the others as they are.
            let data: BTreeMap<String, k8s_openapi::ByteString> = missing
                .into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
                .collect();
            api.patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({ "data": data })),
            )
            .await?;
        }
    }
    ctx.event(
        relay,
        EventType::Normal,
        "FeedbackSecretCreated",
        "Render",
        if created {
            format!(
                "created Secret {ns}/{name} with the feedback token key and the admin API token"
            )
        } else {
            format!("added the missing keys to Secret {ns}/{name}")
        },
    )
    .await;
    Ok(())
}

/// The SendingDomains bound to `relay` (not losing a domain conflict) that have
/// an active key, and the private keys the pods need.
pub fn bindings(relay: &SmtpRelay, stores: &Stores, ns: &str) -> Bindings {
    let all = stores.domains(ns);
    let private_key = |name: &str| private_key(stores, ns, name);
    let mut out = Bindings::default();
    for sd in all
        .iter()
        .filter(|sd| sd.spec.relay_ref.name == relay.name_any())
        .filter(|sd| conflicting_owner(sd, &all).is_none())
    {
        let Some(key) = stores.key(ns, &dkim_key_name(sd)) else {
            continue;
        };
        if !key.spec.domain.eq_ignore_ascii_case(&sd.spec.domain) {
            continue;
        }
        let status = key.status.unwrap_or_default();
        // The next key's file is in place before the config switches to it, and a
        // retiring key's file stays until it is removed, so however the kubelet
        // orders the ConfigMap and Secret updates, the config never names a missing
        // file (with rotation::MOUNT_GRACE covering the kubelet's sync delay).
        // A first key is mounted while it waits for DNS, before the domain is bound.
        let mut retiring = Vec::new();
        for other in status.next.iter().chain(status.retiring.iter()) {
            if let Some(pem) = private_key(&other.secret_name) {
                out.keys
                    .insert(build::key_file_name(&sd.spec.domain, &other.selector), pem);
                if status.retiring.iter().any(|r| r.selector == other.selector) {
                    retiring.push(other.clone());
                }
            }
        }
        let Some(active) = status.active.clone() else {
            continue;
        };
        let Some(active_pem) = private_key(&active.secret_name) else {
            // The key's Secret is gone: better not to sign than to reference a missing file.
            tracing::warn!(domain = %sd.spec.domain, secret = %active.secret_name, "active DKIM key Secret missing");
            continue;
        };
        out.keys.insert(
            build::key_file_name(&sd.spec.domain, &active.selector),
            active_pem,
        );
        out.retiring.insert(sd.spec.domain.clone(), retiring);
        out.domains.push(BoundDomain {
            spec: sd.spec.clone(),
            active_key: active,
        });
    }
    out.domains
        .sort_by(|a, b| a.spec.domain.cmp(&b.spec.domain));
    out
}

/// Applies (or removes) the ServiceMonitor. Without the prometheus-operator
/// CRD installed this is a warning Event, not an error: the relay runs anyway.
async fn apply_service_monitor(relay: &SmtpRelay, ctx: &Context, ns: &str) -> Result<()> {
    let resource = ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "ServiceMonitor".into(),
        plural: "servicemonitors".into(),
    };
    let desired = build::service_monitor(relay);
    let applied = apply_optional(
        &ctx.client,
        ns,
        &resource,
        &build::base_name(relay),
        desired.as_ref(),
    )
    .await?;
    if !applied {
        ctx.event(
            relay,
            EventType::Warning,
            "ServiceMonitorUnavailable",
            "Monitor",
            "spec.monitoring.serviceMonitor is set but the ServiceMonitor CRD (prometheus-operator) is not installed".into(),
        )
        .await;
    }
    Ok(())
}

/// The PEM in a DkimKey's key Secret (operator-created, so cached).
fn private_key(stores: &Stores, ns: &str, name: &str) -> Option<String> {
    stores
        .owned_secret(ns, name)?
        .data
        .as_ref()?
        .get(PRIVATE_KEY)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn smarthost_username(
    relay: &SmtpRelay,
    found: &BTreeMap<String, Option<Secret>>,
) -> Option<String> {
    let creds = relay
        .spec
        .delivery
        .smarthost
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())?;
    found
        .get(&creds.name)?
        .as_ref()?
        .data
        .as_ref()?
        .get("username")
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .map(|u| u.trim().to_string())
}

fn degraded(invalid: Option<&InvalidSpec>, generation: Option<i64>, now: Time) -> Condition {
    match invalid {
        Some(invalid) => Condition::new(
            CONDITION_DEGRADED,
            ConditionStatus::True,
            invalid.reason,
            invalid.message.clone(),
            generation,
            now,
        ),
        None => Condition::new(
            CONDITION_DEGRADED,
            ConditionStatus::False,
            REASON_AS_EXPECTED,
            "",
            generation,
            now,
        ),
    }
}

/// Status from the applied Deployment and what is wrong with the referenced
/// Secrets (pure): Available only with enough ready pods, Progressing while
/// the Deployment rolls out, Degraded naming each broken Secret or a stalled
/// rollout.
pub fn relay_status(
    relay: &SmtpRelay,
    deployment: &Deployment,
    bound_domains: Vec<String>,
    stored: &SmtpRelayStatus,
    now: Time,
    secret_problem: Option<(&'static str, String)>,
) -> SmtpRelayStatus {
    let generation = relay.metadata.generation;
    let ds = deployment.status.clone().unwrap_or_default();
    let pods = rollout::availability(deployment);
    let available = if pods.is_available() {
        Condition::new(
            CONDITION_AVAILABLE,
            ConditionStatus::True,
            REASON_MINIMUM_REPLICAS_AVAILABLE,
            format!(
                "{} of {} relay pods available",
                pods.available, pods.desired
            ),
            generation,
            now.clone(),
        )
    } else if pods.ready == 0 {
        Condition::new(
            CONDITION_AVAILABLE,
            ConditionStatus::False,
            REASON_NO_READY_REPLICAS,
            format!(
                "0 of {} relay pods ready; see `kubectl describe deployment {}` for scheduling, image and Secret mount problems",
                pods.desired,
                build::base_name(relay)
            ),
            generation,
            now.clone(),
        )
    } else {
        Condition::new(
            CONDITION_AVAILABLE,
            ConditionStatus::False,
            REASON_MINIMUM_REPLICAS_UNAVAILABLE,
            format!(
                "{} of {} relay pods available, {} needed",
                pods.available, pods.desired, pods.minimum
            ),
            generation,
            now.clone(),
        )
    };
    let state = rollout::rollout(deployment);
    let progressing = match &state {
        Rollout::Complete => Condition::new(
            CONDITION_PROGRESSING,
            ConditionStatus::False,
            REASON_ROLLOUT_COMPLETE,
            "",
            generation,
            now.clone(),
        ),
        Rollout::InProgress(message) => Condition::new(
            CONDITION_PROGRESSING,
            ConditionStatus::True,
            REASON_ROLLING_OUT,
            message.clone(),
            generation,
            now.clone(),
        ),
        Rollout::Stalled(message) => Condition::new(
            CONDITION_PROGRESSING,
            ConditionStatus::False,
            REASON_PROGRESS_DEADLINE_EXCEEDED,
            message.clone(),
            generation,
            now.clone(),
        ),
    };
    let stalled = match state {
        Rollout::Stalled(message) => Some(message),
        _ => None,
    };
    // A broken Secret usually is why a rollout stalls: name it first.
    let problem = match (secret_problem, stalled) {
        (Some((reason, message)), Some(stalled)) => {
            Some(InvalidSpec::new(reason, format!("{message}; {stalled}")))
        }
        (Some((reason, message)), None) => Some(InvalidSpec::new(reason, message)),
        (None, Some(stalled)) => Some(InvalidSpec::new(REASON_PROGRESS_DEADLINE_EXCEEDED, stalled)),
        (None, None) => None,
    };
    SmtpRelayStatus {
        conditions: merge_conditions(
            &stored.conditions,
            vec![
                available,
                progressing,
                degraded(problem.as_ref(), generation, now),
            ],
        ),
        ready_replicas: ds.ready_replicas.unwrap_or(0),
        replicas: ds.replicas.unwrap_or(0),
        endpoints: build::endpoints(relay),
        bound_domains,
        observed_generation: generation,
    }
}

async fn write_status(
    api: &Api<SmtpRelay>,
    name: &str,
    stored: &SmtpRelayStatus,
    status: &SmtpRelayStatus,
) -> Result<()> {
    let strip = |s: &SmtpRelayStatus| SmtpRelayStatus {
        conditions: Vec::new(),
        ..s.clone()
    };
    if strip(stored) == strip(status)
        && conditions_equivalent(&stored.conditions, &status.conditions)
    {
        return Ok(());
    }
    apply_status(api, name, status).await
}
