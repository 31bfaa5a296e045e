//! A SendingDomain's feedback-loop settings (unsubscribe, Feedback-ID,
//! reputation thresholds) as the relay reads them (pure), shared by the
//! SendingDomain controller (which reports a bad value as its condition) and
//! the SmtpRelay controller (which renders them).

use petrel_crds::config as rc;
use petrel_crds::sending_domain::SendingDomainSpec;

use crate::error::InvalidSpec;

/// A domain's unsubscribe, Feedback-ID and reputation settings as the relay
/// reads them. Errors name the SendingDomain's field.
pub fn domain_settings(
    spec: &SendingDomainSpec,
) -> Result<
    (
        Option<rc::DomainUnsubscribe>,
        Option<String>,
        rc::Reputation,
    ),
    InvalidSpec,
> {
    if let Some(template) = &spec.feedback_id {
        rc::parse_feedback_id(template).map_err(|why| {
            InvalidSpec::new("InvalidFeedbackId", format!("spec.feedbackId: {why}"))
        })?;
    }
    if let Some(u) = &spec.unsubscribe
        && !u.base_url.starts_with("https://")
    {
        return Err(InvalidSpec::new(
            "InvalidUnsubscribe",
            "spec.unsubscribe.baseUrl: must be an https:// URL",
        ));
    }
    let reputation = match &spec.reputation {
        None => rc::Reputation::default(),
        Some(r) => rc::Reputation::try_from(r)
            .map_err(|e| InvalidSpec::new("InvalidReputation", e.to_string()))?,
    };
    Ok((
        spec.unsubscribe.clone(),
        spec.feedback_id.clone(),
        reputation,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_settings_name_the_crd_field() {
        let spec: SendingDomainSpec = serde_yaml::from_str(
            "{domain: example.com, relayRef: {name: main}, feedbackId: '{tag:campaign}:{domain}:petrel', unsubscribe: {enabled: true, baseUrl: 'https://u.example.com', mode: replace}, reputation: {maxBounceRate: 2%}}",
        )
        .unwrap();
        let (unsubscribe, feedback_id, reputation) = domain_settings(&spec).unwrap();
        let unsubscribe = unsubscribe.expect("unsubscribe");
        assert!(unsubscribe.enabled);
        assert_eq!(unsubscribe.mode, rc::UnsubscribeMode::Replace);
        assert_eq!(
            feedback_id.as_deref(),
            Some("{tag:campaign}:{domain}:petrel")
        );
        assert_eq!(reputation.max_bounce_rate.percent(), 2.0);
        assert_eq!(reputation.min_volume, 500);
        let bad: SendingDomainSpec = serde_yaml::from_str(
            "{domain: example.com, relayRef: {name: main}, feedbackId: '{nope}'}",
        )
        .unwrap();
        let err = domain_settings(&bad).expect_err("invalid");
        assert_eq!(err.reason, "InvalidFeedbackId");
        assert!(
            err.message.starts_with("spec.feedbackId:"),
            "{}",
            err.message
        );
        let bad: SendingDomainSpec = serde_yaml::from_str(
            "{domain: example.com, relayRef: {name: main}, reputation: {window: 10s}}",
        )
        .unwrap();
        let err = domain_settings(&bad).expect_err("invalid");
        assert_eq!(err.message, "spec.reputation.window: must be at least 1m");
    }
}
