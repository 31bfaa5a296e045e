//! Outbound transport security settings: the default TLS mode, extra trust
//! anchors, per-destination overrides, MTA-STS.
//!
//! Precedence per destination (design: DANE before MTA-STS before
//! configured policy before opportunistic): an MTA-STS `enforce` policy
//! wins over `delivery.tls.policies`, which wins over
//! `delivery.outboundTls`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Outbound TLS mode towards recipient servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboundTls {
    /// STARTTLS when the server offers it, plain text otherwise; the
    /// certificate is not checked (Postfix `may`).
    #[default]
    Opportunistic,
    /// TLS mandatory, any certificate: defers rather than send in plain
    /// text, but an active attacker can still intercept (Postfix `encrypt`).
    Encrypted,
    /// TLS mandatory and the certificate verified: it must chain to a
    /// Mozilla root or a `delivery.tls.caFile` anchor and name the MX host
    /// (RFC 6125 as in RFC 7672 and 8461; Postfix `secure`). `required`,
    /// the name before 0.2, is accepted as an alias of `verified`.
    #[serde(alias = "required")]
    Verified,
}

impl OutboundTls {
    /// The mode as written in config and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboundTls::Opportunistic => "opportunistic",
            OutboundTls::Encrypted => "encrypted",
            OutboundTls::Verified => "verified",
        }
    }
}

/// `delivery.tls`: trust anchors and per-destination modes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTlsConfig {
    /// PEM file of extra trust anchors for verified outbound TLS (MX
    /// certificates and MTA-STS policy hosts), added to the Mozilla roots:
    /// a private PKI, or a test CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Per-destination modes overriding `delivery.outboundTls` for the
    /// recipient domain named (compared case-insensitively, exact match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<TlsPolicyOverride>,
}

impl OutboundTlsConfig {
    /// True when nothing is set (so it is left out of rendered YAML).
    pub fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.policies.is_empty()
    }

    /// The mode configured for `domain`, falling back to `default`.
    pub fn mode_for(&self, domain: &str, default: OutboundTls) -> OutboundTls {
        self.policies
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain.trim_end_matches('.')))
            .map(|p| p.mode)
            .unwrap_or(default)
    }
}

/// One per-destination TLS mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsPolicyOverride {
    /// Recipient domain (`gmail.com`).
    pub domain: String,
    /// Mode for mail to that domain.
    pub mode: OutboundTls,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_is_an_alias_of_verified() {
        let m: OutboundTls = serde_yaml::from_str("required").unwrap();
        assert_eq!(m, OutboundTls::Verified);
        assert_eq!(serde_yaml::to_string(&m).unwrap().trim(), "verified");
        let m: OutboundTls = serde_yaml::from_str("encrypted").unwrap();
        assert_eq!(m, OutboundTls::Encrypted);
        assert!(serde_yaml::from_str::<OutboundTls>("sometimes").is_err());
    }

    #[test]
    fn per_domain_override() {
        let c: OutboundTlsConfig = serde_yaml::from_str(
            "policies: [{domain: Bank.Example, mode: verified}, {domain: old.example, mode: opportunistic}]",
        )
        .unwrap();
        let d = OutboundTls::Encrypted;
        assert_eq!(c.mode_for("bank.example", d), OutboundTls::Verified);
        assert_eq!(c.mode_for("old.example.", d), OutboundTls::Opportunistic);
        assert_eq!(c.mode_for("sub.bank.example", d), OutboundTls::Encrypted);
    }
}
