//! The enums that exist twice, once in the CRD types (what users write)
//! and once in [`crate::config::RelayConfig`] (what the relay reads),
//! converted here and nowhere else. Every match is exhaustive, so a
//! variant added on one side does not compile until it is mapped.

use crate::config as rc;
use crate::sending_domain as sd;
use crate::smtp_relay as sr;
use crate::status;

impl From<sr::TlsMode> for rc::TlsMode {
    fn from(mode: sr::TlsMode) -> Self {
        match mode {
            sr::TlsMode::None => rc::TlsMode::None,
            sr::TlsMode::Starttls => rc::TlsMode::Starttls,
            sr::TlsMode::Implicit => rc::TlsMode::Implicit,
        }
    }
}

impl From<sr::AuthMode> for rc::AuthMode {
    fn from(mode: sr::AuthMode) -> Self {
        match mode {
            sr::AuthMode::None => rc::AuthMode::None,
            sr::AuthMode::Optional => rc::AuthMode::Optional,
            sr::AuthMode::Required => rc::AuthMode::Required,
        }
    }
}

impl From<sr::Transport> for rc::Transport {
    fn from(transport: sr::Transport) -> Self {
        match transport {
            sr::Transport::Mx => rc::Transport::Mx,
            sr::Transport::Smarthost => rc::Transport::Smarthost,
        }
    }
}

impl From<sr::OutboundTls> for rc::OutboundTls {
    fn from(policy: sr::OutboundTls) -> Self {
        match policy {
            sr::OutboundTls::Opportunistic => rc::OutboundTls::Opportunistic,
            sr::OutboundTls::Encrypted => rc::OutboundTls::Encrypted,
            // `required` is the pre-0.2 name of `verified`.
            sr::OutboundTls::Verified | sr::OutboundTls::Required => rc::OutboundTls::Verified,
        }
    }
}

impl From<status::DkimAlgorithm> for rc::DkimAlgorithm {
    fn from(algorithm: status::DkimAlgorithm) -> Self {
        match algorithm {
            status::DkimAlgorithm::Ed25519 => rc::DkimAlgorithm::Ed25519,
            status::DkimAlgorithm::Rsa2048 => rc::DkimAlgorithm::Rsa2048,
        }
    }
}

impl From<sd::OnSuppressed> for rc::SuppressedAction {
    fn from(action: sd::OnSuppressed) -> Self {
        match action {
            sd::OnSuppressed::Refuse => rc::SuppressedAction::Refuse,
            sd::OnSuppressed::Drop => rc::SuppressedAction::Drop,
        }
    }
}

impl From<sd::FromHeaderPolicy> for rc::FromHeaderPolicy {
    fn from(policy: sd::FromHeaderPolicy) -> Self {
        match policy {
            sd::FromHeaderPolicy::Enforce => rc::FromHeaderPolicy::Enforce,
            sd::FromHeaderPolicy::Off => rc::FromHeaderPolicy::Off,
        }
    }
}

/// A SendingDomain's `spec.reputation` as the relay's `domains[].reputation`:
/// unset fields take the relay's defaults, and each value is checked the way
/// the relay checks it, so an error names the CRD field (`spec.reputation.window`)
/// rather than the rendered config's.
impl TryFrom<&sd::ReputationSpec> for rc::Reputation {
    type Error = rc::FieldError;

    fn try_from(spec: &sd::ReputationSpec) -> Result<Self, Self::Error> {
        let at = |f: &str| format!("spec.reputation.{f}");
        let percent = |field: &str, value: &Option<String>, default: rc::Percent| match value {
            None => Ok(default),
            Some(text) => match text.parse::<rc::Percent>() {
                Ok(p) if p.percent() > 0.0 => Ok(p),
                Ok(_) => Err(rc::FieldError::new(at(field), "must be above 0%")),
                Err(why) => Err(rc::FieldError::new(at(field), why)),
            },
        };
        let duration = |field: &str, value: &str| {
            value
                .parse::<rc::Duration>()
                .map_err(|e| rc::FieldError::new(at(field), e.to_string()))
        };
        let defaults = rc::Reputation::default();
        let window = match &spec.window {
            None => defaults.window,
            Some(text) => duration("window", text)?,
        };
        if std::time::Duration::from(window) < std::time::Duration::from_secs(60) {
            return Err(rc::FieldError::new(at("window"), "must be at least 1m"));
        }
        let min_volume = match spec.min_volume {
            None => defaults.min_volume,
            Some(n) => u64::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| rc::FieldError::new(at("minVolume"), "must be at least 1"))?,
        };
        Ok(rc::Reputation {
            enabled: spec.enabled,
            max_bounce_rate: percent(
                "maxBounceRate",
                &spec.max_bounce_rate,
                defaults.max_bounce_rate,
            )?,
            max_complaint_rate: percent(
                "maxComplaintRate",
                &spec.max_complaint_rate,
                defaults.max_complaint_rate,
            )?,
            min_volume,
            window,
            auto_resume_after: spec
                .auto_resume_after
                .as_deref()
                .map(|t| duration("autoResumeAfter", t))
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reputation_spec_fills_defaults_and_names_crd_fields() {
        let empty = sd::ReputationSpec::default();
        assert_eq!(
            rc::Reputation::try_from(&empty).unwrap(),
            rc::Reputation::default()
        );
        let spec: sd::ReputationSpec = serde_yaml::from_str(
            "{enabled: false, maxBounceRate: 2.5%, maxComplaintRate: 0.05%, minVolume: 100, window: 6h, autoResumeAfter: 1d}",
        )
        .unwrap();
        let r = rc::Reputation::try_from(&spec).unwrap();
        assert!(!r.enabled);
        assert_eq!(r.max_bounce_rate.percent(), 2.5);
        assert_eq!(r.max_complaint_rate.fraction(), 0.0005);
        assert_eq!(r.min_volume, 100);
        assert_eq!(r.window.as_secs(), 6 * 3600);
        assert_eq!(r.auto_resume_after.map(|d| d.as_secs()), Some(86_400));
        for (yaml, field) in [
            ("{maxBounceRate: 0%}", "spec.reputation.maxBounceRate"),
            (
                "{maxComplaintRate: 101%}",
                "spec.reputation.maxComplaintRate",
            ),
            ("{window: 30s}", "spec.reputation.window"),
            ("{window: soon}", "spec.reputation.window"),
            ("{minVolume: 0}", "spec.reputation.minVolume"),
            ("{autoResumeAfter: 5}", "spec.reputation.autoResumeAfter"),
        ] {
            let spec: sd::ReputationSpec = serde_yaml::from_str(yaml).unwrap();
            let err = rc::Reputation::try_from(&spec).expect_err(yaml);
            assert_eq!(err.path, field, "{yaml}");
        }
    }

    /// Each pair spells its variants the same way on the wire, so a value
    /// written in a CRD means the same in the rendered config.
    #[test]
    fn mirrored_variants_keep_their_spelling() {
        fn same<A: serde::Serialize + Copy, B: serde::Serialize + From<A>>(values: &[A]) {
            for &a in values {
                let theirs = serde_json::to_value(a).unwrap();
                let ours = serde_json::to_value(B::from(a)).unwrap();
                assert_eq!(theirs, ours);
            }
        }
        same::<sr::TlsMode, rc::TlsMode>(&[
            sr::TlsMode::None,
            sr::TlsMode::Starttls,
            sr::TlsMode::Implicit,
        ]);
        same::<sr::AuthMode, rc::AuthMode>(&[
            sr::AuthMode::None,
            sr::AuthMode::Optional,
            sr::AuthMode::Required,
        ]);
        same::<sr::Transport, rc::Transport>(&[sr::Transport::Mx, sr::Transport::Smarthost]);
        same::<sr::OutboundTls, rc::OutboundTls>(&[
            sr::OutboundTls::Opportunistic,
            sr::OutboundTls::Encrypted,
            sr::OutboundTls::Verified,
        ]);
        assert_eq!(
            rc::OutboundTls::from(sr::OutboundTls::Required),
            rc::OutboundTls::Verified
        );
        same::<status::DkimAlgorithm, rc::DkimAlgorithm>(&[
            status::DkimAlgorithm::Ed25519,
            status::DkimAlgorithm::Rsa2048,
        ]);
        same::<sd::OnSuppressed, rc::SuppressedAction>(&[
            sd::OnSuppressed::Refuse,
            sd::OnSuppressed::Drop,
        ]);
        same::<sd::FromHeaderPolicy, rc::FromHeaderPolicy>(&[
            sd::FromHeaderPolicy::Enforce,
            sd::FromHeaderPolicy::Off,
        ]);
    }
}
