//! DkimKey reconcile: validate the rotation policy, check DNS for a pending
//! key, run the rotation state machine to rest (generating keys into owned
//! Secrets and deleting retired ones), then write status, Events and metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use petrel_crds::dkim_key::{
    CONDITION_READY, CONDITION_ROTATING, DkimKey, DkimKeyStatus, ROTATE_ANNOTATION,
};
use petrel_crds::status::{
    Condition, ConditionStatus, DkimKeyEntry, DkimKeyPhase, DnsRecordPurpose, DnsRecordState,
    DnsRecordType, conditions_equivalent, merge_conditions,
};
use serde_json::json;

use super::keygen;
use super::rotation::{self, Policy, Transition, Wait};
use crate::apply::{FIELD_MANAGER, apply, apply_status, delete};
use crate::context::Context;
use crate::dns_record::{DesiredRecord, evaluate};
use crate::error::{Error, Result};
pub use crate::names::{KEY_LABEL, PRIVATE_KEY, record_name};
use crate::names::{MANAGED_BY, SELECTOR_LABEL, api_spelling};

/// Most transitions one reconcile performs (a full bootstrap takes three).
const MAX_STEPS: usize = 6;

/// Reconciles one DkimKey.
pub async fn reconcile(key: Arc<DkimKey>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("DkimKey");
    let result = reconcile_inner(&key, &ctx).await;
    ctx.metrics.count(
        "DkimKey",
        result.as_ref().map_or_else(|e| e.category(), |_| "ok"),
    );
    result
}

async fn reconcile_inner(key: &DkimKey, ctx: &Context) -> Result<Action> {
    let ns = key.namespace().ok_or(Error::Malformed("namespace"))?;
    let name = key.name_any();
    let keys: Api<DkimKey> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.clock.now();
    let generation = key.metadata.generation;
    let stored = key.status.clone().unwrap_or_default();
    let mut status = stored.clone();

    let policy = match Policy::from_spec(&key.spec) {
        Ok(policy) => policy,
        Err(invalid) => {
            let conditions = vec![Condition::new(
                CONDITION_READY,
                if status.active.is_some() {
                    ConditionStatus::True
                } else {
                    ConditionStatus::False
                },
                invalid.reason,
                format!("{}; the current key keeps signing", invalid.message),
                generation,
                ctx.clock.now_time(),
            )];
            status.conditions = merge_conditions(&status.conditions, conditions);
            status.observed_generation = generation;
            write_status(&keys, &name, &stored, &status).await?;
            return Ok(Action::await_change());
        }
    };

    let rotate_requested = key
        .annotations()
        .get(ROTATE_ANNOTATION)
        .is_some_and(|v| v == "now");
    let mut events: Vec<(String, String)> = Vec::new();
    if rotate_requested && status.rotation_requested_at.is_none() {
        status.rotation_requested_at = Some(Time(now));
        events.push((
            "RotationRequested".into(),
            format!(
                "{ROTATE_ANNOTATION}=now: rotating the key of {}",
                key.spec.domain
            ),
        ));
    }

    let served = served_selectors(key, &status, &policy, ctx).await;
    let mut wait = None;
    for _ in 0..MAX_STEPS {
        let decision = rotation::decide(&status, &policy, now, &|k: &DkimKeyEntry| {
            served.contains(&k.selector)
        });
        let transition = match decision {
            Ok(t) => t,
            Err(w) => {
                wait = Some(w);
                break;
            }
        };
        let generated = match &transition {
            Transition::Generate => Some(generate_key(key, &status, &secrets, now).await?),
            Transition::Remove { secret_name, .. } => {
                delete(&secrets, secret_name).await?;
                None
            }
            _ => None,
        };
        let note = describe(&transition, key, generated.as_ref());
        rotation::apply(&mut status, &transition, now, generated);
        events.push((transition.reason().into(), note));
    }

    status.conditions = merge_conditions(
        &status.conditions,
        conditions(key, &status, generation, ctx.clock.now_time()),
    );
    status.observed_generation = generation;
    write_status(&keys, &name, &stored, &status).await?;

    remove_orphans(key, &status, ctx, &secrets).await?;

    if rotate_requested {
        // Recorded in status: drop the annotation so the rotation happens once.
        let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: null}}});
        keys.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for (reason, note) in events {
        ctx.event(key, EventType::Normal, &reason, "Rotate", note)
            .await;
    }
    if let Some(active) = &status.active {
        let since = active.activated_at.as_ref().unwrap_or(&active.created_at);
        let age = now.duration_since(since.0).as_secs();
        ctx.metrics
            .dkim_key_age
            .with_label_values(&[ns.as_str(), key.spec.domain.as_str()])
            .set(age);
    }
    Ok(requeue(wait, now, ctx))
}

/// Selectors of keys DNS serves exactly; only a pending next key needs asking.
async fn served_selectors(
    key: &DkimKey,
    status: &DkimKeyStatus,
    policy: &Policy,
    ctx: &Context,
) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    if !policy.verify_dns {
        return served;
    }
    for entry in status
        .next
        .iter()
        .filter(|n| n.phase == DkimKeyPhase::Pending)
    {
        let name = record_name(&key.spec.domain, &entry.selector);
        let desired = DesiredRecord {
            name: name.clone(),
            type_: DnsRecordType::TXT,
            value: entry.dns_value.clone(),
            purpose: DnsRecordPurpose::Dkim,
            note: None,
        };
        let answer = ctx.dns.lookup_txt(&name).await;
        if evaluate(&desired, &answer).0 == DnsRecordState::Verified {
            served.insert(entry.selector.clone());
        }
    }
    served
}

/// Generates a key and stores it in its own Secret owned by the DkimKey.
async fn generate_key(
    key: &DkimKey,
    status: &DkimKeyStatus,
    secrets: &Api<Secret>,
    now: k8s_openapi::jiff::Timestamp,
) -> Result<DkimKeyEntry> {
    let taken: Vec<&str> = status
        .published_keys()
        .map(|k| k.selector.as_str())
        .collect();
    let selector = rotation::new_selector(&key.spec.selector_prefix, now, taken.iter().copied());
    let secret_name = rotation::secret_name(&key.name_any(), &selector);
    let algorithm = key.spec.algorithm;
    // RSA generation is CPU-bound for a moment: keep it off the async workers.
    let material = tokio::task::spawn_blocking(move || keygen::generate(algorithm))
        .await
        .map_err(|e| Error::Keygen(e.to_string()))?
        .map_err(|e| Error::Keygen(e.to_string()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.clone()),
            namespace: key.namespace(),
            labels: Some(BTreeMap::from([
                (KEY_LABEL.to_string(), key.name_any()),
                (SELECTOR_LABEL.to_string(), selector.clone()),
                (MANAGED_BY.to_string(), FIELD_MANAGER.to_string()),
            ])),
            owner_references: key.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            PRIVATE_KEY.to_string(),
            ByteString(material.private_pem.into_bytes()),
        )])),
        ..Default::default()
    };
    apply(secrets, &secret_name, &secret).await?;
    Ok(rotation::new_entry(
        selector,
        secret_name,
        algorithm,
        material.dns_value,
        now,
    ))
}

/// Deletes key Secrets this DkimKey owns but its status no longer lists: a key
/// generated by a reconcile that failed before writing status, or one removed
/// while the operator was down.
async fn remove_orphans(
    key: &DkimKey,
    status: &DkimKeyStatus,
    ctx: &Context,
    secrets: &Api<Secret>,
) -> Result<()> {
    let name = key.name_any();
    let uid = key.uid();
    let listed: BTreeSet<&str> = status
        .published_keys()
        .map(|k| k.secret_name.as_str())
        .collect();
    let ns = key.namespace().unwrap_or_default();
    for secret in ctx.stores.owned_secrets_labelled(&ns, KEY_LABEL, &name) {
        let ours = secret.labels().get(KEY_LABEL) == Some(&name)
            && secret
                .owner_references()
                .iter()
                .any(|r| r.controller == Some(true) && Some(&r.uid) == uid.as_ref());
        if ours && !listed.contains(secret.name_any().as_str()) {
            tracing::info!(secret = %secret.name_any(), dkim_key = %name, "deleting orphaned key Secret");
            delete(secrets, &secret.name_any()).await?;
        }
    }
    Ok(())
}

fn describe(transition: &Transition, key: &DkimKey, generated: Option<&DkimKeyEntry>) -> String {
    let domain = &key.spec.domain;
    match transition {
        Transition::Generate => {
            let selector = generated.map(|g| g.selector.as_str()).unwrap_or("?");
            format!(
                "generated {} key {selector}; publish TXT {}",
                api_spelling(&key.spec.algorithm),
                record_name(domain, selector)
            )
        }
        Transition::Publish { selector } => {
            if key.spec.verify_dns {
                format!("DNS serves {}", record_name(domain, selector))
            } else {
                format!("publish delay passed for key {selector} (verifyDns: false)")
            }
        }
        Transition::Activate { selector } => format!("key {selector} now signs mail for {domain}"),
        Transition::Remove {
            selector,
            secret_name,
        } => format!(
            "retired key {selector} removed with its Secret {secret_name}; its DNS record may be deleted"
        ),
    }
}

/// Ready and Rotating from the status.
pub fn conditions(
    key: &DkimKey,
    status: &DkimKeyStatus,
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let domain = &key.spec.domain;
    let ready = match (&status.active, &status.next) {
        (Some(active), _) => Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "KeyActive",
            format!("key {} signs mail for {domain}", active.selector),
            generation,
            now.clone(),
        ),
        (None, Some(next)) => Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            "WaitingForDns",
            format!(
                "publish TXT {} with value {:?}; the key signs once DNS serves it",
                record_name(domain, &next.selector),
                next.dns_value
            ),
            generation,
            now.clone(),
        ),
        (None, None) => Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            "NoKey",
            "no key generated yet",
            generation,
            now.clone(),
        ),
    };
    let rotating = match (&status.active, &status.next) {
        (Some(_), Some(next)) => Condition::new(
            CONDITION_ROTATING,
            ConditionStatus::True,
            match next.phase {
                DkimKeyPhase::Pending => "NextKeyPending",
                _ => "NextKeyPublished",
            },
            format!(
                "next key {}: publish TXT {} before it signs",
                next.selector,
                record_name(domain, &next.selector)
            ),
            generation,
            now,
        ),
        _ => Condition::new(
            CONDITION_ROTATING,
            ConditionStatus::False,
            "Idle",
            "",
            generation,
            now,
        ),
    };
    vec![ready, rotating]
}

async fn write_status(
    api: &Api<DkimKey>,
    name: &str,
    stored: &DkimKeyStatus,
    status: &DkimKeyStatus,
) -> Result<()> {
    let unchanged = DkimKeyStatus {
        conditions: Vec::new(),
        ..stored.clone()
    } == DkimKeyStatus {
        conditions: Vec::new(),
        ..status.clone()
    } && conditions_equivalent(&stored.conditions, &status.conditions);
    if unchanged {
        return Ok(());
    }
    apply_status(api, name, status).await
}

fn requeue(wait: Option<Wait>, now: k8s_openapi::jiff::Timestamp, ctx: &Context) -> Action {
    let mut after = ctx.settings.resync;
    if let Some(wait) = wait {
        if wait.polling_dns {
            after = after.min(ctx.settings.dns_recheck_fast);
        }
        if let Some(until) = wait.until {
            let secs = until.duration_since(now).as_secs().max(1);
            after = after.min(Duration::from_secs(u64::try_from(secs).unwrap_or(1)));
        }
    }
    Action::requeue(after)
}
