//! Every manifest under `examples/` parses into its type (the petrel-crds
//! CRD types or k8s-openapi) without losing a field, and the examples agree
//! with each other: the SendingDomain names the SmtpRelay, the relay names
//! the AUTH users Secret, and the app's password verifies against the hash
//! in that Secret.
//!
//! `examples/local/relay.yaml` (the quick-start config) is loaded by the
//! lead's quick-start test, not here.

mod k8s_yaml;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_yaml::{describe, documents, parse_strict, spec_schema, validate_schema, workspace};
use petrel_crds::dkim_key::DkimKey;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::{AuthMode, SmtpRelay, TlsMode};
use serde_json::Value;

/// Every example object, parsed.
#[derive(Default)]
struct Examples {
    relays: Vec<SmtpRelay>,
    domains: Vec<SendingDomain>,
    keys: Vec<DkimKey>,
    deployments: Vec<Deployment>,
    secrets: Vec<Secret>,
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// The top-level `examples/*.yaml`: what `kubectl apply -f examples/` applies.
fn load() -> Examples {
    let mut examples = Examples::default();
    let mut errors = Vec::new();
    let files = yaml_files(&workspace().join("examples"));
    assert!(!files.is_empty(), "no examples/*.yaml");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let origin = file.display().to_string();
        for doc in documents(&text, &origin) {
            if doc["metadata"]["namespace"].as_str().is_none() {
                errors.push(format!("{origin}: {} has no namespace", describe(&doc)));
            }
            if doc["apiVersion"] == "petrel.dev/v1alpha1" {
                let kind = doc["kind"].as_str().unwrap_or_default();
                let schema = spec_schema(kind);
                for e in validate_schema(&doc["spec"], &schema, &format!("{kind}.spec")) {
                    errors.push(format!("{origin}: {e}"));
                }
            }
            let parsed = match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
                (Some("petrel.dev/v1alpha1"), Some("SmtpRelay")) => {
                    parse_strict(&doc).map(|o| examples.relays.push(o))
                }
                (Some("petrel.dev/v1alpha1"), Some("SendingDomain")) => {
                    parse_strict(&doc).map(|o| examples.domains.push(o))
                }
                (Some("petrel.dev/v1alpha1"), Some("DkimKey")) => {
                    parse_strict(&doc).map(|o| examples.keys.push(o))
                }
                (Some("apps/v1"), Some("Deployment")) => {
                    parse_strict(&doc).map(|o| examples.deployments.push(o))
                }
                (Some("v1"), Some("Secret")) => {
                    parse_strict(&doc).map(|o| examples.secrets.push(o))
                }
                _ => Err(format!("unexpected object {}", describe(&doc))),
            };
            if let Err(e) = parsed {
                errors.push(format!("{origin}: {e}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    examples
}

/// A Secret's value by key, from `data` or `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn secret<'a>(examples: &'a Examples, name: &str) -> &'a Secret {
    examples
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("examples lack Secret {name}"))
}

#[test]
fn every_example_parses_into_its_type() {
    let examples = load();
    assert!(!examples.relays.is_empty(), "an SmtpRelay example");
    assert!(!examples.domains.is_empty(), "a SendingDomain example");
    assert!(!examples.keys.is_empty(), "a DkimKey example");
    assert!(
        !examples.deployments.is_empty(),
        "an app Deployment example"
    );
    assert!(!examples.secrets.is_empty(), "an AUTH users Secret example");
}

#[test]
fn examples_reference_each_other() {
    let examples = load();
    let relay = &examples.relays[0];
    let relay_name = relay.metadata.name.as_deref().expect("relay name");
    for domain in &examples.domains {
        assert_eq!(
            domain.spec.relay_ref.name, relay_name,
            "SendingDomain binds to the example relay"
        );
        assert_eq!(
            domain.metadata.namespace, relay.metadata.namespace,
            "same namespace"
        );
        if let Some(key_ref) = &domain.spec.dkim.key_ref {
            let key = examples
                .keys
                .iter()
                .find(|k| k.metadata.name.as_deref() == Some(key_ref))
                .unwrap_or_else(|| panic!("dkim.keyRef {key_ref} names no example DkimKey"));
            assert_eq!(
                key.spec.domain, domain.spec.domain,
                "DkimKey signs for the domain"
            );
        }
    }

    // AUTH listener: the CRD's CEL rules, checked here too.
    let auth_listener = relay
        .spec
        .listeners
        .iter()
        .find(|l| l.auth != AuthMode::None)
        .expect("a listener with AUTH");
    assert_ne!(
        auth_listener.tls,
        TlsMode::None,
        "AUTH only over TLS in the examples"
    );
    assert!(relay.spec.tls_secret_name.is_some());
    let users_name = relay
        .spec
        .auth_users_secret_name
        .as_deref()
        .expect("authUsersSecretName");
    let users = secret_value(secret(&examples, users_name), "users").expect("key `users`");
    let hashes: BTreeMap<&str, &str> = users
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_once(':').expect("`username:hash` lines"))
        .collect();

    // The app logs in with credentials from a Secret; they verify.
    let app = &examples.deployments[0];
    let container = &app
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod")
        .containers[0];
    let env: BTreeMap<&str, &k8s_openapi::api::core::v1::EnvVar> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let host = env["SMTP_HOST"].value.as_deref().expect("SMTP_HOST");
    assert!(
        host.starts_with(&format!("petrel-{relay_name}.")),
        "app sends to the relay Service: {host}"
    );
    let port: i32 = env["SMTP_PORT"]
        .value
        .as_deref()
        .expect("SMTP_PORT")
        .parse()
        .expect("port");
    assert_eq!(port, auth_listener.port, "app uses the AUTH listener");
    let from_secret = |var: &str| {
        let key_ref = env[var]
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .unwrap_or_else(|| panic!("{var} from a Secret"));
        secret_value(secret(&examples, &key_ref.name), &key_ref.key).expect("Secret key present")
    };
    let username = from_secret("SMTP_USERNAME");
    let password = from_secret("SMTP_PASSWORD");
    let hash = hashes
        .get(username.as_str())
        .unwrap_or_else(|| panic!("user {username} in {users_name}"));
    let parsed = PasswordHash::new(hash).expect("PHC argon2 hash");
    assert_eq!(parsed.algorithm.as_str(), "argon2id");
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .expect("the app's password matches the users Secret");
    for domain in &examples.domains {
        assert!(
            domain.spec.allowed_users.is_empty() || domain.spec.allowed_users.contains(&username),
            "the app's user may send as {}",
            domain.spec.domain
        );
    }
}

#[test]
fn optional_examples_are_well_formed_yaml() {
    // examples/cert-manager/ needs cert-manager's CRDs, so it is not applied
    // with the rest; check its structure only.
    let dir = workspace().join("examples/cert-manager");
    for file in yaml_files(&dir) {
        let text = std::fs::read_to_string(&file).expect("readable");
        for doc in documents(&text, &file.display().to_string()) {
            let doc: &Value = &doc;
            assert_eq!(doc["apiVersion"], "cert-manager.io/v1", "{}", describe(doc));
            assert!(doc["spec"].is_object(), "{}", describe(doc));
        }
    }
}

#[test]
fn strict_parsing_catches_misspelt_fields() {
    let relay = documents(
        "apiVersion: petrel.dev/v1alpha1\nkind: SmtpRelay\nmetadata: {name: x, namespace: y}\n\
         spec: {replica: 2, redis: {urlSecretRef: {name: r, key: url}}}\n",
        "inline",
    );
    let err = parse_strict::<SmtpRelay>(&relay[0]).expect_err("typo must fail");
    assert!(err.contains(".spec.replica"), "{err}");
    let deployment = documents(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x, namespace: y}\n\
         spec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      \
         containers: [{name: c, image: i, securityContext: {readOnlyRootFileSystem: true}}]\n",
        "inline",
    );
    let err = parse_strict::<Deployment>(&deployment[0]).expect_err("typo must fail");
    assert!(err.contains("readOnlyRootFileSystem"), "{err}");
}

#[test]
fn schema_validation_catches_what_the_api_server_refuses() {
    let schema = spec_schema("SmtpRelay");
    let bad = serde_json::json!({
        "redis": {"urlSecretRef": {"name": "r"}},
        "egressIps": ["not an ip"],
        "listeners": [{"name": "SMTP", "port": 70000, "tls": "sometimes"}],
        "replicaz": 1
    });
    let errors = validate_schema(&bad, &schema, "spec").join("\n");
    for needle in [
        "spec.redis.urlSecretRef.key: required",
        "spec.egressIps[0]",
        "spec.listeners[0].name",
        "spec.listeners[0].port",
        "spec.listeners[0].tls",
        "spec.replicaz: unknown field",
    ] {
        assert!(errors.contains(needle), "expected {needle} in:\n{errors}");
    }
}
