//! The operator's children of other projects' kinds, checked against those
//! projects' own CRD schemas (copied into tests/testdata/crds/): KEDA's
//! ScaledObject and external-dns's DNSEndpoint. The structural check is the
//! one the chart and examples tests use (types, required, unknown fields,
//! enums, bounds, patterns); the CRDs' CEL rules that can apply to what the
//! operator renders are checked by hand below.

mod k8s_yaml;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_yaml::{documents, parse_strict, validate_schema, workspace};
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;
use petrel_crds::status::{DnsRecord, DnsRecordPurpose, DnsRecordState, DnsRecordType};
use petrel_operator::sending_domain::dns_endpoint;
use petrel_operator::sending_domain::records::{desired_records, return_path_mx, split_txt};
use petrel_operator::smtp_relay::keda;
use serde_json::Value;

/// The `openAPIV3Schema` of `version` in the CRD file `file`.
fn crd_schema(file: &str, version: &str) -> JSONSchemaProps {
    let path = workspace().join("tests/testdata/crds").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = documents(&text, file)
        .into_iter()
        .find(|d| d["kind"] == "CustomResourceDefinition")
        .unwrap_or_else(|| panic!("{file}: no CRD"));
    let crd: CustomResourceDefinition = parse_strict(&doc).unwrap_or_else(|e| panic!("{e}"));
    crd.spec
        .versions
        .into_iter()
        .find(|v| v.name == version)
        .and_then(|v| v.schema)
        .and_then(|s| s.open_api_v3_schema)
        .unwrap_or_else(|| panic!("{file}: no schema for {version}"))
}

/// Checks `object` the way the API server does: `metadata` as an ObjectMeta
/// (a CRD's schema cannot constrain it beyond name), everything else against
/// the CRD's schema.
fn validate(object: &Value, schema: &JSONSchemaProps, kind: &str) -> Vec<String> {
    let mut rest = object.clone();
    let meta = rest
        .as_object_mut()
        .and_then(|o| o.remove("metadata"))
        .unwrap_or(Value::Null);
    let mut errors = validate_schema(&rest, schema, kind);
    if let Err(e) = parse_strict::<ObjectMeta>(&meta) {
        errors.push(format!("{kind}.metadata: {e}"));
    }
    errors
}

fn relay(autoscaling: &str) -> SmtpRelay {
    serde_yaml::from_str(&format!(
        "apiVersion: petrel.dev/v1alpha1\nkind: SmtpRelay\nmetadata: {{name: main, namespace: mail, uid: u-1}}\n\
         spec: {{redis: {{urlSecretRef: {{name: r, key: url}}}}, autoscaling: {autoscaling}}}"
    ))
    .expect("relay fixture")
}

#[test]
fn scaled_object_satisfies_kedas_crd() {
    let schema = crd_schema("scaledobjects.keda.sh.yaml", "v1alpha1");
    for autoscaling in [
        "{maxReplicas: 10, engine: keda, prometheus: {serverAddress: 'http://prometheus-operated.monitoring.svc:9090'}}",
        "{minReplicas: 1, maxReplicas: 1, engine: keda, targetDuePerPod: 1, \
          prometheus: {serverAddress: 'https://prom:9090', query: 'sum(petrel_queue_units{state=\"due\"})'}}",
    ] {
        let so = keda::scaled_object(&relay(autoscaling)).expect("engine keda");
        let errors = validate(&so, &schema, "ScaledObject");
        assert!(errors.is_empty(), "{autoscaling}: {errors:#?}");
        // CEL: minReplicaCount <= maxReplicaCount.
        assert!(so["spec"]["minReplicaCount"].as_i64() <= so["spec"]["maxReplicaCount"].as_i64());
        assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
        assert_eq!(so["kind"], "ScaledObject");
    }
    // The check is not vacuous: KEDA wants string trigger metadata.
    let mut bad = keda::scaled_object(&relay(
        "{maxReplicas: 3, engine: keda, prometheus: {serverAddress: 'http://p:9090'}}",
    ))
    .expect("keda");
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = Value::from(5);
    bad["spec"]["minReplicas"] = Value::from(1);
    let errors = validate(&bad, &schema, "ScaledObject");
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

fn record(name: &str, type_: DnsRecordType, value: String) -> DnsRecord {
    DnsRecord {
        name: name.into(),
        type_,
        value,
        purpose: DnsRecordPurpose::Dkim,
        state: DnsRecordState::Pending,
        observed: None,
        last_checked: None,
        message: None,
    }
}

#[test]
fn dns_endpoint_satisfies_external_dns_crd() {
    let schema = crd_schema("dnsendpoints.externaldns.k8s.io.yaml", "v1alpha1");
    let sd: SendingDomain = serde_yaml::from_str(
        "apiVersion: petrel.dev/v1alpha1\nkind: SendingDomain\nmetadata: {name: example, namespace: mail, uid: u-2}\n\
         spec: {domain: example.com, relayRef: {name: main}, returnPathDomain: bounces.example.com, dnsPublish: {externalDns: true}}",
    )
    .expect("domain fixture");
    // The records the operator computes (SPF on the return path, DMARC, the
    // return path's MX to the relay's feedback host) and a split RSA-sized DKIM value.
    let mut records: Vec<DnsRecord> = desired_records(&sd.spec, &["203.0.113.7".into()], None)
        .iter()
        .map(|d| record(&d.name, d.type_, d.presentation()))
        .collect();
    records.push(record(
        "petrel-2026a._domainkey.example.com",
        DnsRecordType::TXT,
        split_txt(&format!("v=DKIM1; k=rsa; p={}", "A".repeat(392))),
    ));
    let feedback: petrel_crds::smtp_relay::RelayFeedbackSpec =
        serde_yaml::from_str("{hostname: feedback.example.net}").expect("feedback fixture");
    let mx = return_path_mx(&sd.spec, Some(&feedback)).expect("return-path MX");
    records.push(record(&mx.name, mx.type_, mx.presentation()));
    let endpoint = dns_endpoint::dns_endpoint(&sd, &records).expect("asked for");
    let errors = validate(&endpoint, &schema, "DNSEndpoint");
    assert!(errors.is_empty(), "{errors:#?}");
    let endpoints = endpoint["spec"]["endpoints"].as_array().expect("endpoints");
    for e in endpoints {
        // CEL: dnsName at most 253 characters without a trailing dot.
        assert!(e["dnsName"].as_str().is_some_and(|n| n.len() <= 253));
        // The SRV/NAPTR/PTR rules do not apply to what Petrel publishes.
        assert!(matches!(e["recordType"].as_str(), Some("TXT" | "MX")));
    }
    let targets: Vec<&str> = endpoints
        .iter()
        .flat_map(|e| e["targets"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    let values: Vec<&str> = records.iter().map(|r| r.value.as_str()).collect();
    assert_eq!(targets, values, "every record, value for value");
    assert!(
        targets
            .iter()
            .any(|t| t.starts_with("\"v=DKIM1") && t.contains("\" \""))
    );
    assert!(
        endpoints
            .iter()
            .any(|e| e["dnsName"] == "bounces.example.com"
                && e["recordType"] == "MX"
                && e["targets"][0] == "10 feedback.example.net")
    );
    // The check is not vacuous: an unknown record type fails it.
    let mut bad = endpoint.clone();
    bad["spec"]["endpoints"][0]["recordType"] = Value::from("SPF");
    assert_eq!(validate(&bad, &schema, "DNSEndpoint").len(), 1);
}
