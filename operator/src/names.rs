//! Names and labels of every object the operator creates or follows, in one
//! place: the controllers find each other's objects by these (the SmtpRelay
//! reads the key Secrets a DkimKey writes; the SendingDomain names its DkimKey),
//! so they must agree.

use kube::ResourceExt;
use petrel_crds::sending_domain::SendingDomain;
use petrel_crds::smtp_relay::SmtpRelay;

/// The field manager of every server-side apply and the value of [`MANAGED_BY`].
pub const FIELD_MANAGER: &str = "petrel-operator";
/// Label key on every object the operator creates.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Label selector of the objects the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=petrel-operator";
/// Label on operator-created DkimKeys naming the relay their domain uses.
pub const RELAY_LABEL: &str = "petrel.dev/relay";
/// Label on key Secrets naming their DkimKey.
pub const KEY_LABEL: &str = "petrel.dev/dkim-key";
/// Label on key Secrets naming their selector.
pub const SELECTOR_LABEL: &str = "petrel.dev/selector";
/// Key of the private key in each key's Secret.
pub const PRIVATE_KEY: &str = "private.pem";

/// Prefix of an SmtpRelay's child objects (Deployment, Service, PDB, HPA).
pub fn base_name(relay: &SmtpRelay) -> String {
    format!("petrel-{}", relay.name_any())
}

/// The relay's ConfigMap (rendered RelayConfig).
pub fn config_map_name(relay: &SmtpRelay) -> String {
    format!("{}-config", base_name(relay))
}

/// The relay's aggregated DKIM key Secret.
pub fn dkim_secret_name(relay: &SmtpRelay) -> String {
    format!("{}-dkim", base_name(relay))
}

/// The relay's operator-generated Secret: the feedback token key and the
/// admin API's bearer token (created once, never overwritten).
pub fn feedback_secret_name(relay: &SmtpRelay) -> String {
    format!("{}-feedback", base_name(relay))
}

/// The Service of the relay's feedback listener (the return-path MX target).
pub fn feedback_service_name(relay: &SmtpRelay) -> String {
    format!("{}-feedback", base_name(relay))
}

/// Port of the relay's HTTP server (metrics, /healthz, /readyz, the admin
/// API the operator reads reputation from), in the pod and on the Service.
pub const HTTP_PORT: i32 = 9090;

/// Key of the feedback token key in [`feedback_secret_name`].
pub const FEEDBACK_KEY: &str = "feedback.key";
/// Key of the admin API's bearer token in [`feedback_secret_name`].
pub const ADMIN_TOKEN: &str = "admin-token";

/// File name of a key in the aggregated Secret and its mount.
pub fn key_file_name(domain: &str, selector: &str) -> String {
    format!("{domain}.{selector}.pem")
}

/// The DkimKey a SendingDomain signs with: its `keyRef`, or one named like it.
pub fn dkim_key_name(sd: &SendingDomain) -> String {
    sd.spec
        .dkim
        .key_ref
        .clone()
        .unwrap_or_else(|| sd.name_any())
}

/// The Secret holding one key: `<dkimkey>-<selector>`, shortened to fit a name.
pub fn key_secret_name(dkim_key_name: &str, selector: &str) -> String {
    let room = 253usize.saturating_sub(selector.len() + 1);
    let owner: String = dkim_key_name.chars().take(room).collect();
    format!("{}-{selector}", owner.trim_end_matches(['-', '.']))
}

/// The DNS name of a key's record.
pub fn record_name(domain: &str, selector: &str) -> String {
    format!("{selector}._domainkey.{}", domain.trim_end_matches('.'))
}

/// How the API spells a value of a spec or status enum (`rsa2048`, `TXT`,
/// `missing`): its serde name, never the Rust Debug name (`Rsa2048`), so
/// Events and condition messages use the words a manifest uses.
pub fn api_spelling(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}
