//! `DkimKey`: the signing keys of one domain and their rotation. The operator
//! generates each key into its own Secret and walks it through the phases in
//! [`crate::status::DkimKeyPhase`]; the relay only ever signs with `active`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::status::{Condition, DkimAlgorithm, DkimKeyEntry};

/// Annotation that starts a rotation at once when set to `now`.
pub const ROTATE_ANNOTATION: &str = "petrel.dev/rotate";

/// Condition type: a key is active and its record is served (or verification is off).
pub const CONDITION_READY: &str = "Ready";
/// Condition type: a rotation is under way (a next key exists).
pub const CONDITION_ROTATING: &str = "Rotating";

/// The DKIM keys of one domain.
// Several printcolumns share `type_ = "string"`, which this lint misreads as a repeat.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "petrel.dev",
    version = "v1alpha1",
    kind = "DkimKey",
    namespaced,
    status = "DkimKeyStatus",
    derive = "PartialEq",
    shortname = "dkimkey",
    category = "petrel",
    doc = "The DKIM signing keys of one domain, rotated without a signing gap. Annotate with petrel.dev/rotate=now to rotate at once.",
    printcolumn(
        name = "DOMAIN",
        type_ = "string",
        json_path = ".spec.domain",
        description = "Domain the keys sign for"
    ),
    printcolumn(
        name = "ACTIVE",
        type_ = "string",
        json_path = ".status.active.selector",
        description = "Selector signing now"
    ),
    printcolumn(
        name = "NEXT",
        type_ = "string",
        json_path = ".status.next.selector",
        description = "Selector of the next key, while a rotation is under way"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeySpec {
    /// Domain the keys sign for (the DKIM `d=` tag). Immutable.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("domain is immutable; create a new DkimKey instead"))]
    pub domain: String,

    /// First part of each key's selector; the operator appends a date and a counter
    /// (`petrel-20260301-1`), so every key has its own DNS record.
    #[serde(default = "default_selector_prefix")]
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub selector_prefix: String,

    /// Key algorithm: rsa2048 (default) or ed25519. A change applies from the next rotation.
    #[serde(default)]
    pub algorithm: DkimAlgorithm,

    /// When keys rotate and how long old and new records overlap.
    #[serde(default)]
    pub rotation: RotationSpec,

    /// Wait until DNS serves a new key's record before signing with it. When false, the
    /// operator waits `rotation.publishAhead` alone (for DNS it cannot query).
    #[serde(default = "default_true")]
    pub verify_dns: bool,
}

fn default_selector_prefix() -> String {
    "petrel".into()
}

fn default_true() -> bool {
    true
}

/// Rotation timing. Durations like `90d`, `7d`, `12h`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Age at which the active key is replaced.
    #[serde(default = "default_every")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub every: String,
    /// How long before `every` the next key is generated and its record listed for
    /// publication, leaving time for DNS to serve it.
    #[serde(default = "default_publish_ahead")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub publish_ahead: String,
    /// How long a replaced key's record stays published so mail signed before the switch
    /// (still queued or in transit) verifies.
    #[serde(default = "default_retire_after")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(s|m|h|d|w))+$"))]
    pub retire_after: String,
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self {
            every: default_every(),
            publish_ahead: default_publish_ahead(),
            retire_after: default_retire_after(),
        }
    }
}

fn default_every() -> String {
    "90d".into()
}

fn default_publish_ahead() -> String {
    "7d".into()
}

fn default_retire_after() -> String {
    "7d".into()
}

/// Observed state of a DkimKey: its keys by phase.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyStatus {
    /// The key the relay signs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<DkimKeyEntry>,
    /// The key that signs after the next switch, while its record is being published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<DkimKeyEntry>,
    /// Keys that no longer sign but whose records stay published until `retireAfter` has passed.
    #[serde(default)]
    pub retiring: Vec<DkimKeyEntry>,
    /// When a rotation was requested with the `petrel.dev/rotate=now` annotation; cleared
    /// once the new key signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_requested_at: Option<Time>,
    /// Ready and Rotating, with reasons.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl DkimKeyStatus {
    /// Every key whose record must be published now: active, next and retiring.
    pub fn published_keys(&self) -> impl Iterator<Item = &DkimKeyEntry> {
        self.active
            .iter()
            .chain(self.next.iter())
            .chain(self.retiring.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn defaults_applied() {
        let spec: DkimKeySpec = serde_yaml::from_str("domain: example.com").expect("parses");
        assert_eq!(spec.selector_prefix, "petrel");
        assert_eq!(spec.algorithm, DkimAlgorithm::Rsa2048);
        assert_eq!(spec.rotation, RotationSpec::default());
        assert!(spec.verify_dns);
    }

    #[test]
    fn round_trip() {
        let key: DkimKey = serde_yaml::from_str(
            r#"
apiVersion: petrel.dev/v1alpha1
kind: DkimKey
metadata: {name: example-com}
spec:
  domain: example.com
  algorithm: ed25519
  rotation: {every: 30d, publishAhead: 2d, retireAfter: 3d}
  verifyDns: false
"#,
        )
        .expect("parses");
        assert_eq!(key.spec.rotation.retire_after, "3d");
        assert!(!key.spec.verify_dns);
        let back: DkimKey = serde_json::from_str(&serde_json::to_string(&key).expect("serializes"))
            .expect("parses");
        assert_eq!(back, key);
    }

    #[test]
    fn schema_has_defaults_and_immutability() {
        let crd = serde_json::to_string(&DkimKey::crd()).expect("serializes");
        for needle in [
            "self == oldSelf",
            r#""default":"90d""#,
            r#""default":true"#,
            r#""shortNames":["dkimkey"]"#,
            r#""name":"NEXT""#,
        ] {
            assert!(crd.contains(needle), "CRD lacks {needle}");
        }
    }
}
