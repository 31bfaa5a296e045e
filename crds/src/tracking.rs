//! Engagement tracking in the CRDs: a SendingDomain's opt-in
//! (`spec.tracking`) and the SmtpRelay's public tracking host and key
//! (`spec.tracking`). The operator renders both into the RelayConfig
//! (`domains[].tracking`, `tracking.keyFile`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Open and click tracking of a domain's HTML mail. Off unless `opens` or `clicks` is true.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrackingSpec {
    /// Add a 1x1 image to HTML parts; its fetch records an `opened` event.
    #[serde(default)]
    pub opens: bool,
    /// Rewrite http(s) links of HTML parts through the tracking domain; following one records a
    /// `clicked` event and redirects to the original URL.
    #[serde(default)]
    pub clicks: bool,
    /// Host of tracked links and pixels, for example `track.example.com`. It needs a CNAME to
    /// the relay's `spec.tracking.hostname` (listed in `status.dnsRecords`).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub domain: String,
    /// Write tracked URLs with `https://` (default). The Ingress in front of the relay must
    /// then serve a certificate for `domain`.
    #[serde(default = "default_https")]
    pub https: bool,
}

fn default_https() -> bool {
    true
}

/// The relay's public side for tracked links and pixels.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayTrackingSpec {
    /// Public host name of the Ingress (or LoadBalancer) in front of the relay's HTTP port, for
    /// example `track.petrel.example.net`. Each tracking domain is a CNAME to it.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)+[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub hostname: String,
    /// Secret (same namespace) whose key `key` holds the secret tracking tokens are signed with
    /// (at least 32 bytes, for example `openssl rand -base64 48`). Shared by all relay pods.
    #[schemars(length(min = 1, max = 253))]
    pub key_secret_name: String,
}
