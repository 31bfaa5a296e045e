//! The Secrets an SmtpRelay's pods mount or its config reads, and what is
//! wrong with them (pure).
//!
//! [`referenced_secrets`] is the one list, built from the spec: it decides
//! which Secret events wake the relay's reconcile, which Secrets the reconcile
//! reads, and what the Degraded condition checks. A new Secret reference in
//! the spec is one entry there.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use petrel_crds::smtp_relay::{REASON_SECRET_INVALID, REASON_SECRET_MISSING, SmtpRelay};

/// What a key's value must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFormat {
    /// Any non-empty value.
    Text,
    /// A PEM block (`-----BEGIN ...`): certificates and private keys.
    Pem,
}

/// One Secret the relay depends on, the keys it reads, and the spec field
/// naming it (for the message a person reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferencedSecret {
    /// Name of the Secret, in the relay's namespace.
    pub name: String,
    /// Keys the relay reads, each with the shape its value must have.
    pub keys: Vec<(String, KeyFormat)>,
    /// The spec field that names the Secret, for example `spec.tlsSecretName`.
    pub field: String,
}

impl ReferencedSecret {
    fn new(name: &str, field: impl Into<String>, keys: &[(&str, KeyFormat)]) -> Self {
        Self {
            name: name.to_string(),
            keys: keys.iter().map(|(k, f)| ((*k).to_string(), *f)).collect(),
            field: field.into(),
        }
    }
}

/// Every Secret the relay's pods mount or its config reads, in spec order.
pub fn referenced_secrets(relay: &SmtpRelay) -> Vec<ReferencedSecret> {
    use KeyFormat::{Pem, Text};
    let spec = &relay.spec;
    let mut refs = vec![ReferencedSecret::new(
        &spec.redis.url_secret_ref.name,
        "spec.redis.urlSecretRef",
        &[(spec.redis.url_secret_ref.key.as_str(), Text)],
    )];
    if let Some(tls) = &spec.tls_secret_name {
        refs.push(ReferencedSecret::new(
            tls,
            "spec.tlsSecretName",
            &[("tls.crt", Pem), ("tls.key", Pem)],
        ));
    }
    if let Some(users) = &spec.auth_users_secret_name {
        refs.push(ReferencedSecret::new(
            users,
            "spec.authUsersSecretName",
            &[("users", Text)],
        ));
    }
    if let Some(creds) = spec
        .delivery
        .smarthost
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())
    {
        refs.push(ReferencedSecret::new(
            &creds.name,
            "spec.delivery.smarthost.credentialsSecretRef",
            &[("username", Text), ("password", Text)],
        ));
    }
    refs
}

/// Whether the relay depends on the Secret `name` (in its namespace).
pub fn references(relay: &SmtpRelay, name: &str) -> bool {
    referenced_secrets(relay).iter().any(|r| r.name == name)
}

/// What is wrong with one referenced Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The Secret does not exist.
    Missing,
    /// The Secret lacks the key.
    MissingKey(String),
    /// The key's value is empty.
    EmptyKey(String),
    /// The key's value is not a PEM block.
    NotPem(String),
}

/// A problem with a referenced Secret, with the reference it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretProblem {
    /// The reference.
    pub secret: ReferencedSecret,
    /// What is wrong.
    pub problem: Problem,
}

/// Checks each reference against the Secrets found (`None`: not found).
/// A Secret named twice is reported once per reference, so each message
/// names the spec field to fix.
pub fn check(
    refs: &[ReferencedSecret],
    found: &BTreeMap<String, Option<Secret>>,
) -> Vec<SecretProblem> {
    let mut problems = Vec::new();
    for r in refs {
        let Some(Some(secret)) = found.get(&r.name) else {
            problems.push(SecretProblem {
                secret: r.clone(),
                problem: Problem::Missing,
            });
            continue;
        };
        for (key, format) in &r.keys {
            let value = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| v.0.as_slice())
                .or_else(|| {
                    secret
                        .string_data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .map(|v| v.as_bytes())
                });
            let problem = match value {
                None => Some(Problem::MissingKey(key.clone())),
                Some(v) if v.iter().all(u8::is_ascii_whitespace) => {
                    Some(Problem::EmptyKey(key.clone()))
                }
                Some(v) if *format == KeyFormat::Pem && !is_pem(v) => {
                    Some(Problem::NotPem(key.clone()))
                }
                Some(_) => None,
            };
            if let Some(problem) = problem {
                problems.push(SecretProblem {
                    secret: r.clone(),
                    problem,
                });
            }
        }
    }
    problems
}

fn is_pem(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|s| s.contains("-----BEGIN ") && s.contains("-----END "))
}

/// The Degraded reason and message for `problems` (none: `None`). A missing
/// Secret outranks a malformed one in the reason; the message names each.
pub fn degraded(ns: &str, problems: &[SecretProblem]) -> Option<(&'static str, String)> {
    if problems.is_empty() {
        return None;
    }
    let reason = if problems.iter().any(|p| p.problem == Problem::Missing) {
        REASON_SECRET_MISSING
    } else {
        REASON_SECRET_INVALID
    };
    let parts: Vec<String> = problems
        .iter()
        .map(|p| {
            let secret = format!("Secret {ns}/{}", p.secret.name);
            let field = &p.secret.field;
            match &p.problem {
                Problem::Missing => format!("{secret} does not exist (named by {field})"),
                Problem::MissingKey(key) => {
                    format!("{secret} key {key} is missing (named by {field})")
                }
                Problem::EmptyKey(key) => format!("{secret} key {key} is empty (named by {field})"),
                Problem::NotPem(key) => {
                    format!("{secret} key {key} is not PEM (named by {field})")
                }
            }
        })
        .collect();
    Some((
        reason,
        format!(
            "{}; relay pods cannot start or serve until it is fixed",
            parts.join("; ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp_relay::build::fixtures::relay;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)]) -> Option<Secret> {
        Some(Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        })
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn every_reference_in_the_spec_is_listed() {
        let r = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, tlsSecretName: tls, authUsersSecretName: users, delivery: {transport: smarthost, smarthost: {host: smtp.example, credentialsSecretRef: {name: creds}}}}",
        );
        let refs = referenced_secrets(&r);
        let names: Vec<(&str, &str)> = refs
            .iter()
            .map(|r| (r.name.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("redis", "spec.redis.urlSecretRef"),
                ("tls", "spec.tlsSecretName"),
                ("users", "spec.authUsersSecretName"),
                ("creds", "spec.delivery.smarthost.credentialsSecretRef"),
            ]
        );
        assert!(references(&r, "creds"));
        assert!(!references(&r, "other"));
        let minimal = relay("{redis: {urlSecretRef: {name: redis, key: url}}}");
        assert_eq!(referenced_secrets(&minimal).len(), 1);
    }

    #[test]
    fn missing_and_malformed_secrets_are_named_with_their_key() {
        let r = relay(
            "{redis: {urlSecretRef: {name: redis, key: url}}, tlsSecretName: tls, authUsersSecretName: users}",
        );
        let refs = referenced_secrets(&r);
        let mut found = BTreeMap::from([
            ("redis".to_string(), secret(&[("url", "redis://r:6379")])),
            ("tls".to_string(), None),
            ("users".to_string(), secret(&[("users", "a:$argon2id$x")])),
        ]);
        let problems = check(&refs, &found);
        assert_eq!(problems.len(), 1);
        let (reason, message) = degraded("mail", &problems).expect("degraded");
        assert_eq!(reason, "SecretMissing");
        assert!(
            message.starts_with("Secret mail/tls does not exist (named by spec.tlsSecretName)"),
            "{message}"
        );

        // Present, but the key is not a certificate and the other key is absent.
        found.insert("tls".into(), secret(&[("tls.crt", "not a cert")]));
        found.insert("users".into(), secret(&[("users", " \n")]));
        let problems = check(&refs, &found);
        let (reason, message) = degraded("mail", &problems).expect("degraded");
        assert_eq!(reason, "SecretInvalid");
        assert!(
            message.contains("Secret mail/tls key tls.crt is not PEM"),
            "{message}"
        );
        assert!(
            message.contains("Secret mail/tls key tls.key is missing"),
            "{message}"
        );
        assert!(
            message.contains("Secret mail/users key users is empty"),
            "{message}"
        );

        found.insert("tls".into(), secret(&[("tls.crt", PEM), ("tls.key", PEM)]));
        found.insert("users".into(), secret(&[("users", "a:$argon2id$x")]));
        assert!(check(&refs, &found).is_empty());
        assert_eq!(degraded("mail", &[]), None);
    }
}
