//! The feedback loop's part of an SmtpRelay (pure): the `role: feedback`
//! listener and its Service, each bound domain's unsubscribe / Feedback-ID /
//! reputation settings, and the operator-generated Secret holding the
//! feedback token key and the admin API's bearer token.
//!
//! The Secret's values are random and created once: every relay pod must
//! open tokens sealed by any other pod (and by pods before a restart), so a
//! new key would break every unsubscribe link and VERP address in flight.
//! [`missing_values`] is therefore the only thing that fills it, and only
//! for keys it lacks.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use petrel_crds::config as rc;
use petrel_crds::smtp_relay::{SmtpRelay, TlsMode};

use crate::names::{ADMIN_TOKEN, FEEDBACK_KEY, feedback_secret_name, feedback_service_name};

/// Name of the feedback listener, its container port and Service port.
pub const LISTENER_NAME: &str = "feedback";
/// Where the generated Secret is mounted.
pub const FEEDBACK_DIR: &str = "/etc/petrel/feedback";

/// `feedback.keyFile` as rendered.
pub fn key_file() -> std::path::PathBuf {
    format!("{FEEDBACK_DIR}/{FEEDBACK_KEY}").into()
}

/// `http.adminTokenFile` as rendered.
pub fn admin_token_file() -> std::path::PathBuf {
    format!("{FEEDBACK_DIR}/{ADMIN_TOKEN}").into()
}

/// The `role: feedback` listener, when `spec.feedback` is set. It offers
/// STARTTLS when the relay has a certificate: mail servers use it when offered.
pub fn listener(relay: &SmtpRelay) -> Option<rc::Listener> {
    let feedback = relay.spec.feedback.as_ref()?;
    let tls = if relay.spec.tls_secret_name.is_some() {
        TlsMode::Starttls
    } else {
        TlsMode::None
    };
    Some(rc::Listener {
        name: LISTENER_NAME.into(),
        address: std::net::SocketAddr::from((
            [0, 0, 0, 0],
            u16::try_from(feedback.effective_target_port()).unwrap_or(0),
        )),
        tls: tls.into(),
        auth: rc::AuthMode::None,
        allow_insecure_auth: false,
        role: rc::ListenerRole::Feedback,
    })
}

pub use crate::domain_feedback::domain_settings;

/// The generated Secret with `values` (see [`missing_values`]).
pub fn secret(relay: &SmtpRelay, values: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: super::build::child_meta(relay, feedback_secret_name(relay)),
        type_: Some("Opaque".into()),
        data: Some(
            values
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Fresh random values for the keys `stored` lacks (or holds empty), and
/// nothing for the keys it has: each is 32 random bytes as URL-safe base64
/// text (the relay reads raw or base64 text of at least 32 bytes; a token
/// must be printable for an `Authorization` header).
pub fn missing_values(stored: Option<&Secret>) -> BTreeMap<String, String> {
    let has = |key: &str| {
        stored
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .is_some_and(|v| !v.0.iter().all(u8::is_ascii_whitespace))
    };
    [FEEDBACK_KEY, ADMIN_TOKEN]
        .into_iter()
        .filter(|k| !has(k))
        .map(|k| {
            let bytes: [u8; 32] = rand::random();
            (k.to_string(), URL_SAFE_NO_PAD.encode(bytes))
        })
        .collect()
}

/// The Service exposing the feedback listener, when `spec.feedback` is set:
/// separate from the apps' Service, so only the feedback port faces the
/// internet and both may use port 25.
pub fn service(relay: &SmtpRelay) -> Option<Service> {
    let feedback = relay.spec.feedback.as_ref()?;
    let mut metadata = super::build::child_meta(relay, feedback_service_name(relay));
    metadata.annotations = feedback.service_annotations.clone();
    let service_type = feedback.service_type;
    let external = service_type != petrel_crds::smtp_relay::FeedbackServiceType::ClusterIP;
    Some(Service {
        metadata,
        spec: Some(ServiceSpec {
            selector: Some(super::build::selector_labels(relay)),
            ports: Some(vec![ServicePort {
                name: Some(LISTENER_NAME.into()),
                port: feedback.port,
                target_port: Some(IntOrString::String(LISTENER_NAME.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            type_: Some(service_type.as_str().into()),
            // Keep the sender's address: the relay logs the peer of every report.
            external_traffic_policy: external.then(|| "Local".into()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp_relay::build::fixtures::relay;

    #[test]
    fn missing_values_fill_only_what_is_absent() {
        let fresh = missing_values(None);
        assert_eq!(
            fresh.keys().collect::<Vec<_>>(),
            [ADMIN_TOKEN, FEEDBACK_KEY]
        );
        for v in fresh.values() {
            let raw = URL_SAFE_NO_PAD.decode(v).expect("base64");
            assert_eq!(raw.len(), 32);
        }
        assert_ne!(fresh[FEEDBACK_KEY], missing_values(None)[FEEDBACK_KEY]);
        let stored = secret(
            &relay("{redis: {urlSecretRef: {name: r, key: url}}}"),
            BTreeMap::from([(FEEDBACK_KEY.to_string(), "kept".to_string())]),
        );
        let more = missing_values(Some(&stored));
        assert_eq!(more.keys().collect::<Vec<_>>(), [ADMIN_TOKEN]);
        let full = secret(
            &relay("{redis: {urlSecretRef: {name: r, key: url}}}"),
            fresh.clone(),
        );
        assert!(missing_values(Some(&full)).is_empty());
        assert_eq!(
            crate::reputation::admin_token(&full).as_deref(),
            Some(fresh[ADMIN_TOKEN].as_str())
        );
    }
}
