//! The relay's reputation guard on the SendingDomain: `Paused`,
//! `ReputationWarning` and `ReputationSynced` conditions with Events on
//! transitions (pure: [`observe`]), and the `petrel.dev/resume` annotation
//! (I/O: [`sync`]).
//!
//! The relay decides (it counts bounces and complaints over its window);
//! the operator mirrors what the relay reports, so `kubectl get sd` and
//! `kubectl wait --for=condition=Paused=false` show it. When the relay
//! cannot be asked, Paused and ReputationWarning keep their last known
//! state (a relay restart must not look like a resume and a pause again)
//! and only ReputationSynced says why.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use petrel_crds::sending_domain::{
    CONDITION_PAUSED, CONDITION_REPUTATION_SYNCED, CONDITION_REPUTATION_WARNING,
    REASON_BOUNCE_RATE_EXCEEDED, REASON_COMPLAINT_RATE_EXCEEDED, RESUME_ANNOTATION, SendingDomain,
};
use petrel_crds::smtp_relay::SmtpRelay;
use petrel_crds::status::{Condition, ConditionStatus, condition_is_true, find_condition};
use serde_json::json;

use crate::context::Context;
use crate::error::Result;
use crate::reputation::{
    DomainReputation, ReputationError, ReputationReason, ReputationState, relay_endpoint,
};

/// What the relay said about a domain.
#[derive(Clone, Copy, Debug)]
pub enum Observation<'a> {
    /// The relay lists the domain with this state.
    Known(&'a DomainReputation),
    /// The relay answered but does not list the domain (not configured there yet).
    NotListed,
    /// The relay could not be asked.
    Failed(&'a ReputationError),
}

/// One Event to record on the SendingDomain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Normal or Warning.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For a person.
    pub message: String,
}

/// Conditions to merge into the status, Events to record, and whether to
/// look again soon.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Desired conditions (only those this step knows about).
    pub conditions: Vec<Condition>,
    /// Events for the transitions.
    pub events: Vec<Note>,
    /// Warning, paused or unknown: re-check at the fast interval.
    pub watch_closely: bool,
}

fn paused_reason(reason: Option<ReputationReason>) -> &'static str {
    match reason {
        Some(ReputationReason::BounceRateExceeded) => REASON_BOUNCE_RATE_EXCEEDED,
        Some(ReputationReason::ComplaintRateExceeded) => REASON_COMPLAINT_RATE_EXCEEDED,
        Some(ReputationReason::Other) | None => "ReputationPaused",
    }
}

fn warning_reason(reason: Option<ReputationReason>) -> &'static str {
    match reason {
        Some(ReputationReason::BounceRateExceeded) => "BounceRateHigh",
        Some(ReputationReason::ComplaintRateExceeded) => "ComplaintRateHigh",
        Some(ReputationReason::Other) | None => "RateHigh",
    }
}

/// The conditions and transition Events for what the relay reported,
/// against the stored conditions (pure).
pub fn observe(
    domain: &str,
    relay_url: &str,
    observation: Observation<'_>,
    stored: &[Condition],
    generation: Option<i64>,
    now: Time,
) -> Outcome {
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        Condition::new(
            type_,
            ConditionStatus::from_bool(status),
            reason,
            message,
            generation,
            now.clone(),
        )
    };
    let was_synced =
        find_condition(stored, CONDITION_REPUTATION_SYNCED).is_none_or(Condition::is_true);
    let rep = match observation {
        Observation::Known(rep) => rep,
        Observation::NotListed => {
            return Outcome {
                conditions: vec![condition(
                    CONDITION_REPUTATION_SYNCED,
                    false,
                    "DomainNotOnRelay",
                    format!(
                        "the relay does not list {domain} yet (a domain is configured there once its DKIM key is active); Paused and ReputationWarning keep their last known state"
                    ),
                )],
                events: Vec::new(),
                watch_closely: false,
            };
        }
        Observation::Failed(err) => {
            let reason = match err {
                ReputationError::Unreachable(_) => "RelayUnreachable",
                ReputationError::Status { .. } | ReputationError::Malformed(_) => {
                    "ReputationUnavailable"
                }
            };
            let message = format!(
                "cannot read the reputation guard at {relay_url}/admin/v1/reputation ({err}); Paused and ReputationWarning keep their last known state"
            );
            let events = if was_synced {
                vec![Note {
                    warning: true,
                    reason,
                    message: message.clone(),
                }]
            } else {
                Vec::new()
            };
            return Outcome {
                conditions: vec![condition(
                    CONDITION_REPUTATION_SYNCED,
                    false,
                    reason,
                    message,
                )],
                events,
                watch_closely: true,
            };
        }
    };
    let paused = rep.state == ReputationState::Paused;
    let warning = rep.state != ReputationState::Ok;
    let said = rep.message.clone().filter(|m| !m.is_empty());
    let paused_condition = if paused {
        condition(
            CONDITION_PAUSED,
            true,
            paused_reason(rep.reason),
            said.clone()
                .unwrap_or_else(|| format!("sending for {domain} is paused")),
        )
    } else {
        condition(
            CONDITION_PAUSED,
            false,
            "NotPaused",
            format!("sending for {domain} is not paused"),
        )
    };
    let warning_condition = if warning {
        condition(
            CONDITION_REPUTATION_WARNING,
            true,
            warning_reason(rep.reason),
            said.clone().unwrap_or_else(|| {
                format!("a bounce or complaint rate of {domain} is above half its threshold")
            }),
        )
    } else {
        condition(
            CONDITION_REPUTATION_WARNING,
            false,
            "RatesNormal",
            "bounce and complaint rates are below half of their thresholds".to_string(),
        )
    };
    let mut events = Vec::new();
    let was_paused = condition_is_true(stored, CONDITION_PAUSED);
    let was_warning = condition_is_true(stored, CONDITION_REPUTATION_WARNING);
    match (was_paused, paused) {
        (false, true) => events.push(Note {
            warning: true,
            reason: paused_reason(rep.reason),
            message: format!("paused: {}", paused_condition.message),
        }),
        (true, false) => events.push(Note {
            warning: false,
            reason: "Resumed",
            message: format!("sending for {domain} resumed"),
        }),
        _ => {}
    }
    // A pause says more than the warning that comes with it.
    match (was_warning, warning) {
        (false, true) if events.is_empty() => events.push(Note {
            warning: true,
            reason: "ReputationWarning",
            message: warning_condition.message.clone(),
        }),
        (true, false) if !was_paused => events.push(Note {
            warning: false,
            reason: "ReputationRecovered",
            message: format!(
                "bounce and complaint rates of {domain} are below half of their thresholds again"
            ),
        }),
        _ => {}
    }
    Outcome {
        conditions: vec![
            paused_condition,
            warning_condition,
            condition(
                CONDITION_REPUTATION_SYNCED,
                true,
                "RelayReported",
                format!("read from the relay's reputation guard ({relay_url})"),
            ),
        ],
        events,
        watch_closely: warning,
    }
}

/// Resumes the domain when the `petrel.dev/resume` annotation asks for it,
/// then reads its state from the relay and returns the conditions to merge.
/// Events are recorded here. Never fails the reconcile on the relay's
/// account: an unreachable relay is a condition, and the annotation stays
/// until a resume succeeds.
pub async fn sync(
    sd: &SendingDomain,
    relay: &SmtpRelay,
    ctx: &Context,
    ns: &str,
    stored: &[Condition],
    now: Time,
) -> Result<Outcome> {
    let domain = sd.spec.domain.as_str();
    let endpoint = relay_endpoint(relay, &ctx.stores, ns);
    if sd.annotations().contains_key(RESUME_ANNOTATION) {
        let result = ctx.reputation.resume(&endpoint, domain).await;
        let remove = match &result {
            Ok(()) => {
                ctx.event(
                    sd,
                    EventType::Normal,
                    "ResumeRequested",
                    "Resume",
                    format!("{RESUME_ANNOTATION}: the relay resumed {domain} and reset its reputation window"),
                )
                .await;
                true
            }
            // The relay does not know the domain: nothing to resume, and retrying will not help.
            Err(ReputationError::Status {
                status: 404,
                message,
            }) => {
                ctx.event(
                    sd,
                    EventType::Warning,
                    "ResumeFailed",
                    "Resume",
                    format!("{RESUME_ANNOTATION}: the relay does not know {domain} ({message}); annotation removed"),
                )
                .await;
                true
            }
            Err(err) => {
                ctx.event(
                    sd,
                    EventType::Warning,
                    "ResumeFailed",
                    "Resume",
                    format!("{RESUME_ANNOTATION}: resuming {domain} failed ({err}); retrying"),
                )
                .await;
                false
            }
        };
        if remove {
            let api: Api<SendingDomain> = Api::namespaced(ctx.client.clone(), ns);
            let patch = json!({"metadata": {"annotations": {RESUME_ANNOTATION: null}}});
            api.patch(
                &sd.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        }
    }
    let answer = ctx.reputation.domains(&endpoint).await;
    let observation = match &answer {
        Ok(domains) => domains
            .iter()
            .find(|d| d.domain.eq_ignore_ascii_case(domain))
            .map_or(Observation::NotListed, Observation::Known),
        Err(err) => Observation::Failed(err),
    };
    if let Err(err) = &answer {
        tracing::warn!(%domain, relay = %endpoint.base_url, error = %err, "reading the reputation guard failed");
    }
    let outcome = observe(
        domain,
        &endpoint.base_url,
        observation,
        stored,
        sd.metadata.generation,
        now,
    );
    for note in &outcome.events {
        let type_ = if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.event(sd, type_, note.reason, "Reputation", note.message.clone())
            .await;
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use petrel_crds::status::merge_conditions;

    fn now() -> Time {
        Time(Timestamp::from_second(1_790_000_000).unwrap())
    }

    fn rep(
        state: ReputationState,
        reason: Option<ReputationReason>,
        message: &str,
    ) -> DomainReputation {
        DomainReputation {
            domain: "example.com".into(),
            state,
            reason,
            message: Some(message.into()).filter(|m: &String| !m.is_empty()),
            bounce_rate: 0.072,
            complaint_rate: 0.0,
            volume: 1234,
            since: None,
        }
    }

    fn step(stored: &[Condition], observation: Observation<'_>) -> (Vec<Condition>, Outcome) {
        let out = observe(
            "example.com",
            "http://petrel-main.mail.svc:9090",
            observation,
            stored,
            Some(1),
            now(),
        );
        (merge_conditions(stored, out.conditions.clone()), out)
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        find_condition(c, t).unwrap_or_else(|| panic!("no {t} in {c:?}"))
    }

    #[test]
    fn pause_warning_and_resume_become_conditions_and_events_once() {
        let ok = rep(ReputationState::Ok, None, "");
        let (c, out) = step(&[], Observation::Known(&ok));
        assert!(!get(&c, "Paused").is_true());
        assert!(!get(&c, "ReputationWarning").is_true());
        assert!(get(&c, "ReputationSynced").is_true());
        assert!(out.events.is_empty());
        assert!(!out.watch_closely);

        let warn = rep(
            ReputationState::Warning,
            Some(ReputationReason::BounceRateExceeded),
            "bounce rate 3.1% over 24h exceeds half of 5%",
        );
        let (c, out) = step(&c, Observation::Known(&warn));
        assert_eq!(get(&c, "ReputationWarning").reason, "BounceRateHigh");
        assert_eq!(
            get(&c, "ReputationWarning").message,
            "bounce rate 3.1% over 24h exceeds half of 5%"
        );
        assert!(!get(&c, "Paused").is_true());
        assert_eq!(
            out.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["ReputationWarning"]
        );
        assert!(out.watch_closely);

        let paused = rep(
            ReputationState::Paused,
            Some(ReputationReason::ComplaintRateExceeded),
            "complaint rate 0.4% over 24h exceeds 0.1%",
        );
        let (c, out) = step(&c, Observation::Known(&paused));
        let p = get(&c, "Paused");
        assert!(p.is_true());
        assert_eq!(p.reason, "ComplaintRateExceeded");
        assert_eq!(p.message, "complaint rate 0.4% over 24h exceeds 0.1%");
        assert_eq!(out.events.len(), 1);
        assert!(out.events[0].warning);
        assert_eq!(out.events[0].reason, "ComplaintRateExceeded");
        // The same report again: nothing new to say.
        let (c2, out) = step(&c, Observation::Known(&paused));
        assert!(out.events.is_empty());
        assert_eq!(
            get(&c2, "Paused").last_transition_time,
            get(&c, "Paused").last_transition_time
        );

        let (c, out) = step(&c2, Observation::Known(&ok));
        assert!(!get(&c, "Paused").is_true());
        assert!(!get(&c, "ReputationWarning").is_true());
        assert_eq!(
            out.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["Resumed"]
        );
    }

    #[test]
    fn an_unknown_reason_and_a_missing_message_still_pause_with_words() {
        let paused = rep(ReputationState::Paused, Some(ReputationReason::Other), "");
        let (c, _) = step(&[], Observation::Known(&paused));
        assert_eq!(get(&c, "Paused").reason, "ReputationPaused");
        assert_eq!(
            get(&c, "Paused").message,
            "sending for example.com is paused"
        );
        let paused = rep(
            ReputationState::Paused,
            Some(ReputationReason::BounceRateExceeded),
            "bounce rate 7.2% over 24h exceeds 5%",
        );
        let (c, _) = step(&[], Observation::Known(&paused));
        assert_eq!(get(&c, "Paused").reason, "BounceRateExceeded");
    }

    #[test]
    fn an_unreachable_relay_keeps_the_last_known_state_and_warns_once() {
        let paused = rep(
            ReputationState::Paused,
            Some(ReputationReason::BounceRateExceeded),
            "bounce rate 7.2% over 24h exceeds 5%",
        );
        let (known, _) = step(&[], Observation::Known(&paused));
        let err = ReputationError::Unreachable(
            "http://petrel-main.mail.svc:9090/admin/v1/reputation: connection refused".into(),
        );
        let (c, out) = step(&known, Observation::Failed(&err));
        assert_eq!(get(&c, "Paused"), get(&known, "Paused"), "unchanged");
        assert_eq!(
            get(&c, "ReputationWarning"),
            get(&known, "ReputationWarning")
        );
        let synced = get(&c, "ReputationSynced");
        assert!(!synced.is_true());
        assert_eq!(synced.reason, "RelayUnreachable");
        assert!(
            synced.message.contains("connection refused"),
            "{}",
            synced.message
        );
        assert!(synced.message.contains("keep their last known state"));
        assert_eq!(
            out.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["RelayUnreachable"]
        );
        assert!(out.watch_closely);
        // Still unreachable: no new Event, no flapping.
        let (c2, out) = step(&c, Observation::Failed(&err));
        assert!(out.events.is_empty());
        assert_eq!(get(&c2, "Paused"), get(&known, "Paused"));
        // Back: no Resumed or Paused event, the pause was never lost.
        let (_, out) = step(&c2, Observation::Known(&paused));
        assert!(out.events.is_empty(), "{:?}", out.events);
        // Not listed: say so, keep the rest.
        let (c3, _) = step(&known, Observation::NotListed);
        assert_eq!(get(&c3, "ReputationSynced").reason, "DomainNotOnRelay");
        assert!(get(&c3, "Paused").is_true());
    }
}
