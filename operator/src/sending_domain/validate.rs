//! Checks on a SendingDomain that need more than its schema (pure): SPF's
//! ten-lookup limit, domains claimed twice, the DkimKey it gets.

use std::time::Duration;

use kube::ResourceExt;
use petrel_crds::dkim_key::{DkimKeySpec, RotationSpec};
use petrel_crds::sending_domain::SendingDomain;

pub use crate::claims::conflicting_owner;
use crate::error::{InvalidSpec, parse_duration};

/// RFC 7208 4.6.4: at most ten mechanisms that cause DNS lookups.
pub const SPF_MAX_LOOKUPS: usize = 10;

/// Mechanisms in the computed SPF record that cost a DNS lookup at the receiver.
pub fn spf_lookups(sd: &SendingDomain) -> usize {
    let spf = &sd.spec.spf;
    let extra = spf
        .mechanisms
        .iter()
        .filter(|m| {
            let m = m.trim_start_matches(['+', '-', '~', '?']);
            let name = m.split([':', '/']).next().unwrap_or_default();
            matches!(name, "a" | "mx" | "ptr" | "exists" | "include")
        })
        .count();
    spf.includes.len() + extra
}

/// Spec checks that make the domain unusable until fixed.
pub fn validate(sd: &SendingDomain, all: &[SendingDomain]) -> Result<(), InvalidSpec> {
    if let Some(owner) = conflicting_owner(sd, all) {
        return Err(InvalidSpec::new(
            "DomainConflict",
            format!(
                "domain {} is already claimed by SendingDomain {}; delete one of them",
                sd.spec.domain,
                owner.name_any()
            ),
        ));
    }
    let lookups = spf_lookups(sd);
    if lookups > SPF_MAX_LOOKUPS {
        return Err(InvalidSpec::new(
            "SpfTooManyLookups",
            format!(
                "spec.spf has {lookups} includes and lookup mechanisms; receivers fail SPF beyond {SPF_MAX_LOOKUPS}"
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for include in &sd.spec.spf.includes {
        if !seen.insert(include.to_ascii_lowercase()) {
            return Err(InvalidSpec::new(
                "InvalidSpfInclude",
                format!("spec.spf.includes lists {include} twice"),
            ));
        }
        if include.eq_ignore_ascii_case(&sd.spec.domain) {
            return Err(InvalidSpec::new(
                "InvalidSpfInclude",
                format!("spec.spf.includes: {include} includes the domain's own record (a loop)"),
            ));
        }
    }
    if let Some(interval) = &sd.spec.dkim.rotation_interval {
        parse_duration("spec.dkim.rotationInterval", interval)?;
    }
    crate::domain_feedback::domain_settings(&sd.spec)?;
    Ok(())
}

/// A duration in the CRD's form (`90d`, `12h`, `30m`, `45s`), in the largest exact unit.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// The spec of the DkimKey the operator creates for a domain: rotation every
/// `rotationInterval`, publishing ahead and keeping retired keys for 7 days,
/// or a quarter of the interval when that is shorter.
pub fn owned_dkim_key_spec(sd: &SendingDomain) -> Result<DkimKeySpec, InvalidSpec> {
    let every_text = sd.spec.dkim.effective_rotation_interval().to_string();
    let every = parse_duration("spec.dkim.rotationInterval", &every_text)?;
    let overlap = format_duration(Duration::from_secs(7 * 86400).min(every / 4));
    Ok(DkimKeySpec {
        domain: sd.spec.domain.clone(),
        selector_prefix: sd
            .spec
            .dkim
            .selector_prefix
            .clone()
            .unwrap_or_else(|| "petrel".into()),
        algorithm: sd.spec.dkim.effective_algorithm(),
        rotation: RotationSpec {
            every: every_text,
            publish_ahead: overlap.clone(),
            retire_after: overlap,
        },
        verify_dns: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn sd(name: &str, domain: &str, created: i64, extra: &str) -> SendingDomain {
        let mut sd: SendingDomain = serde_yaml::from_str(&format!(
            "apiVersion: petrel.dev/v1alpha1\nkind: SendingDomain\nmetadata: {{name: {name}, namespace: mail}}\nspec: {{domain: {domain}, relayRef: {{name: main}} {extra}}}"
        ))
        .expect("fixture");
        sd.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).expect("ts")));
        sd
    }

    #[test]
    fn older_claim_wins() {
        let a = sd("a", "example.com", 10, "");
        let b = sd("b", "Example.com", 20, "");
        let c = sd("c", "other.com", 5, "");
        let all = vec![a.clone(), b.clone(), c];
        assert!(validate(&a, &all).is_ok());
        let err = validate(&b, &all).expect_err("conflict");
        assert_eq!(err.reason, "DomainConflict");
        assert!(err.message.contains("SendingDomain a"));
    }

    #[test]
    fn spf_lookup_limit_and_bad_includes() {
        let includes: Vec<String> = (0..9).map(|i| format!("i{i}.example.net")).collect();
        let ok = sd(
            "a",
            "example.com",
            1,
            &format!(
                ", spf: {{includes: [{}], mechanisms: [a]}}",
                includes.join(",")
            ),
        );
        assert_eq!(spf_lookups(&ok), 10);
        assert!(validate(&ok, &[]).is_ok());
        let over = sd(
            "a",
            "example.com",
            1,
            &format!(
                ", spf: {{includes: [{}], mechanisms: [a, 'ip4:192.0.2.0/24', '~mx']}}",
                includes.join(",")
            ),
        );
        assert_eq!(
            validate(&over, &[]).expect_err("too many").reason,
            "SpfTooManyLookups"
        );
        let dup = sd(
            "a",
            "example.com",
            1,
            ", spf: {includes: [x.example.net, X.example.net]}",
        );
        assert_eq!(
            validate(&dup, &[]).expect_err("dup").reason,
            "InvalidSpfInclude"
        );
        let own = sd("a", "example.com", 1, ", spf: {includes: [example.com]}");
        assert_eq!(
            validate(&own, &[]).expect_err("loop").reason,
            "InvalidSpfInclude"
        );
    }

    #[test]
    fn bad_feedback_settings_block_the_domain_naming_the_field() {
        let window = sd("a", "example.com", 1, ", reputation: {window: 30s}");
        let err = validate(&window, &[]).expect_err("window too short");
        assert_eq!(err.reason, "InvalidReputation");
        assert_eq!(err.message, "spec.reputation.window: must be at least 1m");
        let template = sd("a", "example.com", 1, ", feedbackId: '{tag:}'");
        assert_eq!(
            validate(&template, &[]).expect_err("bad template").reason,
            "InvalidFeedbackId"
        );
        let fine = sd(
            "a",
            "example.com",
            1,
            ", reputation: {maxComplaintRate: 0.3%}, feedbackId: '{domain}:petrel'",
        );
        assert!(validate(&fine, &[]).is_ok());
    }

    #[test]
    fn owned_key_spec_scales_overlap_to_interval() {
        let long = sd("a", "example.com", 1, "");
        let spec = owned_dkim_key_spec(&long).expect("spec");
        assert_eq!(
            (
                spec.rotation.every.as_str(),
                spec.rotation.publish_ahead.as_str()
            ),
            ("90d", "7d")
        );
        let short = sd(
            "a",
            "example.com",
            1,
            ", dkim: {rotationInterval: 8d, algorithm: ed25519}",
        );
        let spec = owned_dkim_key_spec(&short).expect("spec");
        assert_eq!(spec.rotation.publish_ahead, "2d");
        assert_eq!(spec.algorithm, petrel_crds::status::DkimAlgorithm::Ed25519);
        assert_eq!(format_duration(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(format_duration(Duration::from_secs(61)), "61s");
    }
}
