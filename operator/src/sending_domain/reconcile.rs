//! SendingDomain reconcile: validate, make sure its DkimKey exists (owned, or
//! the referenced one), compute every record it needs, check each in DNS, and
//! write records and conditions to status. Re-checks fast while something is
//! unverified and slowly once all is verified.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use petrel_crds::dkim_key::{DkimKey, DkimKeyStatus};
use petrel_crds::sending_domain::{
    CONDITION_DKIM_ACTIVE, CONDITION_DNS_VERIFIED, CONDITION_PAUSED, CONDITION_READY,
    SendingDomain, SendingDomainStatus,
};
use petrel_crds::smtp_relay::SmtpRelay;
use petrel_crds::status::{
    Condition, ConditionStatus, DnsRecord, DnsRecordState, DnsRecordType, condition_is_true,
    conditions_equivalent, merge_conditions,
};

use super::records::{
    DesiredRecord, TxtAnswer, desired_records, evaluate, return_path_mx, tracking_record,
};
use super::validate::{owned_dkim_key_spec, validate};
use super::{dns_endpoint, reputation};
use crate::apply::{FIELD_MANAGER, apply, apply_status};
use crate::context::Context;
use crate::error::{Error, InvalidSpec, Result};
use crate::names::{MANAGED_BY, api_spelling};
pub use crate::names::{RELAY_LABEL, dkim_key_name};

/// Reconciles one SendingDomain.
pub async fn reconcile(sd: Arc<SendingDomain>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.start("SendingDomain");
    let result = reconcile_inner(&sd, &ctx).await;
    ctx.metrics.count(
        "SendingDomain",
        result.as_ref().map_or_else(|e| e.category(), |_| "ok"),
    );
    result
}

async fn reconcile_inner(sd: &SendingDomain, ctx: &Context) -> Result<Action> {
    let ns = sd.namespace().ok_or(Error::Malformed("namespace"))?;
    let name = sd.name_any();
    let domains: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), &ns);
    let keys: Api<DkimKey> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = sd.metadata.generation;
    let stored = sd.status.clone().unwrap_or_default();
    let now = ctx.clock.now_time();
    let refresh_before = now
        .0
        .saturating_sub(
            k8s_openapi::jiff::SignedDuration::try_from(ctx.settings.dns_recheck_slow)
                .unwrap_or_default(),
        )
        .unwrap_or(now.0);

    let all = ctx.stores.domains(&ns);
    let relay = ctx.stores.relay(&ns, &sd.spec.relay_ref.name);
    let blocked = validate(sd, &all).err().or_else(|| {
        relay.is_none().then(|| {
            InvalidSpec::new(
                "RelayNotFound",
                format!(
                    "SmtpRelay {} does not exist in namespace {ns}; create it or fix spec.relayRef.name",
                    sd.spec.relay_ref.name
                ),
            )
        })
    });
    if let Some(invalid) = blocked {
        let mut status = stored.clone();
        status.conditions = merge_conditions(
            &stored.conditions,
            vec![Condition::new(
                CONDITION_READY,
                ConditionStatus::False,
                invalid.reason,
                invalid.message,
                generation,
                now,
            )],
        );
        status.observed_generation = generation;
        write_status(&domains, &name, &stored, &status, refresh_before).await?;
        // A missing relay may appear later and a conflict ends when the older
        // claim is deleted (neither changes this object, and nothing maps those
        // events here); other errors wait for a spec change.
        return Ok(if relay.is_none() || invalid.reason == "DomainConflict" {
            Action::requeue(ctx.settings.dns_recheck_fast)
        } else {
            Action::await_change()
        });
    }
    let relay = relay.ok_or(Error::Malformed("relay"))?;

    let key = match ensure_dkim_key(sd, ctx, &keys, &relay).await? {
        Ok(key) => key,
        Err(invalid) => {
            let mut status = stored.clone();
            status.conditions = merge_conditions(
                &stored.conditions,
                vec![Condition::new(
                    CONDITION_READY,
                    ConditionStatus::False,
                    invalid.reason,
                    invalid.message,
                    generation,
                    now,
                )],
            );
            status.observed_generation = generation;
            write_status(&domains, &name, &stored, &status, refresh_before).await?;
            return Ok(Action::requeue(ctx.settings.dns_recheck_fast));
        }
    };
    let key_status = key.status.clone().unwrap_or_default();

    let mut desired = desired_records(&sd.spec, &relay.spec.egress_ips, Some(&key_status));
    desired.extend(return_path_mx(&sd.spec, relay.spec.feedback.as_ref()));
    desired.extend(tracking_record(&sd.spec, relay.spec.tracking.as_ref()));
    let records = verify(&desired, ctx, &now).await;
    let reputation =
        reputation::sync(sd, &relay, ctx, &ns, &stored.conditions, now.clone()).await?;
    let mut conditions = conditions(&records, &key_status, generation, now);
    conditions.extend(reputation.conditions);
    let all_verified = records.iter().all(|r| r.state == DnsRecordState::Verified);

    let status = SendingDomainStatus {
        conditions: merge_conditions(&stored.conditions, conditions),
        dns_records: records,
        active_selector: key_status.active.as_ref().map(|k| k.selector.clone()),
        dkim_key_name: Some(key.name_any()),
        observed_generation: generation,
    };
    write_status(&domains, &name, &stored, &status, refresh_before).await?;
    dns_endpoint::reconcile(sd, ctx, &ns, &status.dns_records).await?;
    record_metrics(ctx, &ns, &sd.spec.domain, &status.dns_records);
    ctx.metrics
        .domain_paused
        .with_label_values(&[ns.as_str(), sd.spec.domain.as_str()])
        .set(i64::from(condition_is_true(
            &status.conditions,
            CONDITION_PAUSED,
        )));
    let dns_recheck = if all_verified {
        ctx.settings.dns_recheck_slow
    } else {
        ctx.settings.dns_recheck_fast
    };
    let reputation_recheck = if reputation.watch_closely {
        ctx.settings.reputation_recheck_fast
    } else {
        ctx.settings.reputation_recheck
    };
    Ok(Action::requeue(dns_recheck.min(reputation_recheck)))
}

/// The operator-owned DkimKey (applied) or the referenced one (checked).
async fn ensure_dkim_key(
    sd: &SendingDomain,
    ctx: &Context,
    keys: &Api<DkimKey>,
    relay: &SmtpRelay,
) -> Result<Result<DkimKey, InvalidSpec>> {
    let name = dkim_key_name(sd);
    if sd.spec.dkim.key_ref.is_some() {
        let ns = sd.namespace().unwrap_or_default();
        return Ok(match ctx.stores.key(&ns, &name) {
            None => Err(InvalidSpec::new(
                "DkimKeyNotFound",
                format!("spec.dkim.keyRef: DkimKey {name} does not exist"),
            )),
            Some(key) if !key.spec.domain.eq_ignore_ascii_case(&sd.spec.domain) => {
                Err(InvalidSpec::new(
                    "DkimKeyDomainMismatch",
                    format!(
                        "spec.dkim.keyRef: DkimKey {name} signs for {}, not {}",
                        key.spec.domain, sd.spec.domain
                    ),
                ))
            }
            Some(key) => Ok(key),
        });
    }
    let spec = match owned_dkim_key_spec(sd) {
        Ok(spec) => spec,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let desired = DkimKey {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: sd.namespace(),
            labels: Some(BTreeMap::from([
                (RELAY_LABEL.to_string(), relay.name_any()),
                (MANAGED_BY.to_string(), FIELD_MANAGER.to_string()),
            ])),
            owner_references: sd.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        spec,
        status: None,
    };
    Ok(Ok(apply(keys, &name, &desired).await?))
}

/// Looks up each distinct name once and evaluates every record against it.
async fn verify(desired: &[DesiredRecord], ctx: &Context, now: &Time) -> Vec<DnsRecord> {
    // By name and type: a return-path domain has both its SPF (TXT) and its MX.
    let mut answers: BTreeMap<(&str, DnsRecordType), TxtAnswer> = BTreeMap::new();
    for record in desired {
        let key = (record.name.as_str(), record.type_);
        if let std::collections::btree_map::Entry::Vacant(slot) = answers.entry(key) {
            slot.insert(match record.type_ {
                DnsRecordType::CNAME => ctx.dns.lookup_cname(&record.name).await,
                DnsRecordType::MX => ctx.dns.lookup_mx(&record.name).await,
                DnsRecordType::TXT => ctx.dns.lookup_txt(&record.name).await,
            });
        }
    }
    desired
        .iter()
        .map(|record| {
            let failed = TxtAnswer::Failed("not looked up".into());
            let answer = answers
                .get(&(record.name.as_str(), record.type_))
                .unwrap_or(&failed);
            let (state, observed) = evaluate(record, answer);
            let message = match answer {
                TxtAnswer::Failed(reason) => Some(format!("lookup failed: {reason}")),
                _ => record.note.clone(),
            };
            DnsRecord {
                name: record.name.clone(),
                type_: record.type_,
                value: record.presentation(),
                purpose: record.purpose,
                state,
                observed,
                last_checked: Some(now.clone()),
                message,
            }
        })
        .collect()
}

/// DnsVerified, DkimActive and Ready, with messages a person can act on.
pub fn conditions(
    records: &[DnsRecord],
    keys: &DkimKeyStatus,
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let not_ok: Vec<&DnsRecord> = records
        .iter()
        .filter(|r| r.state != DnsRecordState::Verified)
        .collect();
    let dns = if not_ok.is_empty() {
        Condition::new(
            CONDITION_DNS_VERIFIED,
            ConditionStatus::True,
            "AllRecordsVerified",
            format!("DNS serves all {} records", records.len()),
            generation,
            now.clone(),
        )
    } else {
        let reason = if not_ok.iter().any(|r| r.state == DnsRecordState::Mismatch) {
            "RecordMismatch"
        } else if not_ok.iter().any(|r| r.state == DnsRecordState::Missing) {
            "RecordMissing"
        } else {
            "LookupFailed"
        };
        let detail: Vec<String> = not_ok
            .iter()
            .map(|r| match &r.message {
                // No value yet: publishing cannot help, the note says what to set.
                Some(note) if r.value.is_empty() => format!(
                    "{} {} has no target yet ({note})",
                    r.name,
                    api_spelling(&r.type_)
                ),
                _ => format!(
                    "{} {} {}",
                    api_spelling(&r.state),
                    r.name,
                    api_spelling(&r.type_)
                ),
            })
            .collect();
        Condition::new(
            CONDITION_DNS_VERIFIED,
            ConditionStatus::False,
            reason,
            format!(
                "publish the records listed in status.dnsRecords: {}",
                detail.join(", ")
            ),
            generation,
            now.clone(),
        )
    };
    let dkim = match (&keys.active, &keys.next) {
        (Some(active), _) => Condition::new(
            CONDITION_DKIM_ACTIVE,
            ConditionStatus::True,
            "KeyActive",
            format!("mail is signed with selector {}", active.selector),
            generation,
            now.clone(),
        ),
        (None, Some(next)) => Condition::new(
            CONDITION_DKIM_ACTIVE,
            ConditionStatus::False,
            "WaitingForDkimRecord",
            format!(
                "publish the DKIM record of selector {}; the relay refuses mail from this domain until DNS serves it",
                next.selector
            ),
            generation,
            now.clone(),
        ),
        (None, None) => Condition::new(
            CONDITION_DKIM_ACTIVE,
            ConditionStatus::False,
            "KeyPending",
            "the DKIM key is being generated",
            generation,
            now.clone(),
        ),
    };
    let ready = if dns.is_true() && dkim.is_true() {
        Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            "Ready",
            "DNS verified and DKIM active",
            generation,
            now,
        )
    } else {
        let blocking = if dkim.is_true() { &dns } else { &dkim };
        Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            blocking.reason.clone(),
            blocking.message.clone(),
            generation,
            now,
        )
    };
    vec![ready, dns, dkim]
}

fn record_metrics(ctx: &Context, ns: &str, domain: &str, records: &[DnsRecord]) {
    for state in ["pending", "verified", "missing", "mismatch", "unknown"] {
        let count = records
            .iter()
            .filter(|r| api_spelling(&r.state) == state)
            .count();
        ctx.metrics
            .dns_records
            .with_label_values(&[ns, domain, state])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

async fn write_status(
    api: &Api<SendingDomain>,
    name: &str,
    stored: &SendingDomainStatus,
    status: &SendingDomainStatus,
    refresh_before: k8s_openapi::jiff::Timestamp,
) -> Result<()> {
    // lastChecked moves on every check; write only when something a reader sees changed.
    let strip = |s: &SendingDomainStatus| {
        let mut s = s.clone();
        s.conditions.clear();
        for r in &mut s.dns_records {
            r.last_checked = None;
        }
        s
    };
    // ...but refresh lastChecked once it is older than the slow re-check interval.
    let stale = stored
        .dns_records
        .iter()
        .any(|r| r.last_checked.as_ref().is_none_or(|t| t.0 < refresh_before));
    if !stale
        && strip(stored) == strip(status)
        && conditions_equivalent(&stored.conditions, &status.conditions)
    {
        return Ok(());
    }
    apply_status(api, name, status).await
}
