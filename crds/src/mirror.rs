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

#[cfg(test)]
mod tests {
    use super::*;

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
