//! `spec.dnsPublish.externalDns: true`: an external-dns `DNSEndpoint`
//! (externaldns.k8s.io/v1alpha1) carrying every record of `status.dnsRecords`,
//! owned by the SendingDomain, so external-dns (with `--source=crd`)
//! publishes them. Verification is unchanged: it keeps reporting what DNS
//! serves, whoever published it.
//!
//! Typed as a `DynamicObject`; the shape is checked against external-dns's own
//! CRD schema in `tests/tests/operator_children.rs`.

use std::collections::BTreeMap;

use kube::api::ApiResource;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::status::{DnsRecord, DnsRecordType};
use serde_json::{Value, json};

use crate::apply::apply_optional;
use crate::context::Context;
use crate::error::Result;
use crate::names::FIELD_MANAGER;

/// external-dns's DNSEndpoint resource.
pub fn resource() -> ApiResource {
    ApiResource {
        group: "externaldns.k8s.io".into(),
        version: "v1alpha1".into(),
        api_version: "externaldns.k8s.io/v1alpha1".into(),
        kind: "DNSEndpoint".into(),
        plural: "dnsendpoints".into(),
    }
}

/// The DNSEndpoint's name: the SendingDomain's (one endpoint object per domain).
pub fn name(sd: &SendingDomain) -> String {
    sd.name_any()
}

fn record_type(t: DnsRecordType) -> &'static str {
    match t {
        DnsRecordType::TXT => "TXT",
        DnsRecordType::MX => "MX",
        DnsRecordType::CNAME => "CNAME",
    }
}

/// external-dns endpoints for `records` (pure): one per (name, type), in the
/// order first listed, with every value of that name and type as a target.
/// Values are passed exactly as `status.dnsRecords` lists them, so a long
/// DKIM key stays one target of several quoted strings, the form DNS serves.
pub fn endpoints(records: &[DnsRecord]) -> Vec<Value> {
    let mut order: Vec<(String, &'static str)> = Vec::new();
    let mut targets: BTreeMap<(String, &'static str), Vec<String>> = BTreeMap::new();
    // A record without a target yet (an MX before the relay names its
    // feedback host) has nothing to publish.
    for record in records.iter().filter(|r| !r.value.is_empty()) {
        let key = (record.name.to_ascii_lowercase(), record_type(record.type_));
        let values = targets.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            Vec::new()
        });
        if !values.contains(&record.value) {
            values.push(record.value.clone());
        }
    }
    order
        .into_iter()
        .map(|key| {
            let values = targets.remove(&key).unwrap_or_default();
            json!({"dnsName": key.0, "recordType": key.1, "targets": values})
        })
        .collect()
}

/// The DNSEndpoint for `sd` with `records`, or `None` unless asked for (pure).
pub fn dns_endpoint(sd: &SendingDomain, records: &[DnsRecord]) -> Option<Value> {
    if !sd.spec.dns_publish.external_dns {
        return None;
    }
    Some(json!({
        "apiVersion": "externaldns.k8s.io/v1alpha1",
        "kind": "DNSEndpoint",
        "metadata": {
            "name": name(sd),
            "namespace": sd.namespace(),
            "labels": {
                "app.kubernetes.io/managed-by": FIELD_MANAGER,
                "petrel.dev/sending-domain": sd.name_any(),
            },
            "ownerReferences": sd.controller_owner_ref(&()).map(|r| vec![r]),
        },
        "spec": {"endpoints": endpoints(records)},
    }))
}

/// Applies the DNSEndpoint, or deletes it when publishing is off. Without the
/// operator's external-dns support (`--external-dns`, chart value
/// `externalDns.enabled`: the RBAC and the watch) nothing is touched, and
/// asking for it is a Warning Event.
pub async fn reconcile(
    sd: &SendingDomain,
    ctx: &Context,
    ns: &str,
    records: &[DnsRecord],
) -> Result<()> {
    let wanted = dns_endpoint(sd, records);
    if !ctx.settings.external_dns {
        if wanted.is_some() {
            ctx.event(
                sd,
                EventType::Warning,
                "ExternalDnsDisabled",
                "PublishDns",
                "spec.dnsPublish.externalDns is true but the operator runs without external-dns support; set the chart value externalDns.enabled=true (operator flag --external-dns)".into(),
            )
            .await;
        }
        return Ok(());
    }
    let known = apply_optional(&ctx.client, ns, &resource(), &name(sd), wanted.as_ref()).await?;
    if !known {
        ctx.event(
            sd,
            EventType::Warning,
            "ExternalDnsUnavailable",
            "PublishDns",
            "spec.dnsPublish.externalDns is true but the DNSEndpoint CRD (externaldns.k8s.io) is not installed".into(),
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use petrel_crds::status::{DnsRecordPurpose, DnsRecordState};

    fn record(name: &str, type_: DnsRecordType, value: &str) -> DnsRecord {
        DnsRecord {
            name: name.into(),
            type_,
            value: value.into(),
            purpose: DnsRecordPurpose::Spf,
            state: DnsRecordState::Missing,
            observed: None,
            last_checked: None,
            message: None,
        }
    }

    fn domain(external_dns: bool) -> SendingDomain {
        serde_yaml::from_str(&format!(
            "apiVersion: petrel.dev/v1alpha1\nkind: SendingDomain\nmetadata: {{name: example, namespace: mail, uid: u1}}\nspec: {{domain: example.com, relayRef: {{name: main}}, dnsPublish: {{externalDns: {external_dns}}}}}"
        ))
        .expect("fixture")
    }

    #[test]
    fn endpoints_group_by_name_and_type_keeping_values_verbatim() {
        let dkim = "\"v=DKIM1; k=rsa; p=AAAA\" \"BBBB\"";
        let records = [
            record(
                "example.com",
                DnsRecordType::TXT,
                "v=spf1 ip4:203.0.113.7 -all",
            ),
            record("a._domainkey.example.com", DnsRecordType::TXT, dkim),
            record(
                "b._domainkey.Example.com",
                DnsRecordType::TXT,
                "v=DKIM1; k=ed25519; p=x",
            ),
            record(
                "b._domainkey.example.com",
                DnsRecordType::TXT,
                "v=DKIM1; k=ed25519; p=y",
            ),
            record(
                "bounces.example.com",
                DnsRecordType::MX,
                "10 feedback.example.net.",
            ),
            record(
                "bounces.example.com",
                DnsRecordType::MX,
                "10 feedback.example.net.",
            ),
            record("bounces2.example.com", DnsRecordType::MX, ""),
        ];
        let got = endpoints(&records);
        assert_eq!(
            got,
            vec![
                json!({"dnsName": "example.com", "recordType": "TXT", "targets": ["v=spf1 ip4:203.0.113.7 -all"]}),
                json!({"dnsName": "a._domainkey.example.com", "recordType": "TXT", "targets": [dkim]}),
                json!({"dnsName": "b._domainkey.example.com", "recordType": "TXT", "targets": ["v=DKIM1; k=ed25519; p=x", "v=DKIM1; k=ed25519; p=y"]}),
                json!({"dnsName": "bounces.example.com", "recordType": "MX", "targets": ["10 feedback.example.net."]}),
            ]
        );
    }

    #[test]
    fn endpoint_only_when_asked_and_owned_by_the_domain() {
        let records = [record("example.com", DnsRecordType::TXT, "v=spf1 -all")];
        assert!(dns_endpoint(&domain(false), &records).is_none());
        let ep = dns_endpoint(&domain(true), &records).expect("asked for");
        assert_eq!(ep["metadata"]["name"], "example");
        assert_eq!(
            ep["metadata"]["ownerReferences"][0]["kind"],
            "SendingDomain"
        );
        assert_eq!(ep["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(ep["spec"]["endpoints"][0]["targets"][0], "v=spf1 -all");
    }
}
