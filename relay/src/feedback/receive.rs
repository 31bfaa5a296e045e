//! One mail on the feedback listener, from bytes to stored outcome:
//! [`plan`] (pure: parse, attribute, decide) then [`record`] (one atomic
//! write). When key-bound evidence attributes nothing, the listener reads
//! the records [`lookup_keys`] names ([`super::sent::load`]) and plans
//! again with them ([`plan_with`]). The listener answers 250 whatever the mail was (no
//! backscatter), and only after [`record`] returned `Ok`.

use std::time::Duration;

use super::apply::{self, Via};
use super::attribute::{Attribution, Attributor, addresses_in};
use super::key::FeedbackKeys;
use super::report::{self, Action, Arf, Dsn, Report, Returned};
use super::sent::{self, SentMessage};
use super::token::{MAILTO_PREFIX, UnsubscribeClaims, VERP_PREFIX};
use crate::config::RelayConfig;
use crate::events::{BounceType, Event, EventLog, EventType};
use crate::queue::{Millis, QueueError, SharedState, SuppressionEntry, SuppressionReason};

/// What one mail (or one recipient of a DSN) turned out to be; the
/// `kind` label of `petrel_feedback_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A 5.x.x DSN: suppressed (reason `bounce`), `bounced` event.
    Bounce,
    /// A 4.x.x or `Action: delayed` DSN: `delayed` event only.
    Delayed,
    /// An ARF report: suppressed (reason `complaint`), `complained` event.
    Complaint,
    /// A mailto unsubscribe.
    Unsubscribe,
    /// A report nothing verifiable attributes (forged, or about mail
    /// this key did not send): nothing recorded.
    Unattributed,
    /// Mail that is no report the relay can read.
    Unparsed,
    /// A report that changes nothing (success DSN, `not-spam`).
    Other,
}

impl Kind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Bounce => "bounce",
            Kind::Delayed => "delayed",
            Kind::Complaint => "complaint",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Unattributed => "unattributed",
            Kind::Unparsed => "unparsed",
            Kind::Other => "other",
        }
    }
}

/// A mail as the feedback listener received it.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// The envelope sender (`""` for `<>`, as DSNs come).
    pub mail_from: &'a str,
    /// The envelope recipients (all at return-path domains).
    pub recipients: &'a [String],
    /// The message.
    pub raw: &'a [u8],
}

/// What a mail changes, decided before anything is written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// One kind per outcome (per DSN recipient, or one for the mail).
    pub kinds: Vec<Kind>,
    /// Events to record.
    pub events: Vec<Event>,
    /// Suppression entries to add with them.
    pub suppress: Vec<SuppressionEntry>,
    /// A mailto unsubscribe to apply.
    pub unsubscribe: Option<UnsubscribeClaims>,
    /// For the log: why, in words.
    pub notes: Vec<String>,
}

/// The address the report was sent to that matters most: a VERP or
/// mailto one when present, else the first.
fn main_recipient(recipients: &[String]) -> &str {
    recipients
        .iter()
        .find(|r| {
            let l = r.to_ascii_lowercase();
            l.starts_with(VERP_PREFIX) || l.starts_with(MAILTO_PREFIX)
        })
        .or(recipients.first())
        .map_or("", String::as_str)
}

fn has_prefix(address: &str, prefix: &str) -> bool {
    address
        .get(..prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
}

fn event(kind: EventType, a: &Attribution, returned: &Returned, relay: &str, now: Millis) -> Event {
    let mut e = Event::new(kind, relay, now).with_recipient(&a.recipient);
    e.queue_id = a.queue_id.clone();
    e.sending_domain = Some(a.sending_domain.clone());
    e.header_message_id = returned.message_id();
    e
}

fn ttl_millis(ttl: Option<Duration>, now: Millis) -> Option<Millis> {
    ttl.map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)))
}

/// Decides what a mail changes from key-bound evidence only. Pure: the
/// keys, the config, the mail and the time in; nothing read or written.
pub fn plan(
    keys: &FeedbackKeys,
    config: &RelayConfig,
    incoming: Incoming<'_>,
    relay: &str,
    now: Millis,
) -> Plan {
    plan_with(keys, config, incoming, &[], relay, now)
}

/// Whether some outcome of `plan` is unattributed, so the stored records
/// of the returned headers are worth reading.
pub fn needs_records(plan: &Plan) -> bool {
    plan.kinds.contains(&Kind::Unattributed) && plan.unsubscribe.is_none()
}

/// The [`SharedState`] keys of the sent-message records a report's
/// returned headers name: its `Message-ID` and the queue id of Petrel's
/// own `Received` header (`by <hostname> (Petrel) ... id <queue id>`).
/// Pure; empty for mail that is no DSN or ARF report.
pub fn lookup_keys(raw: &[u8], hostname: &str) -> Vec<String> {
    let returned = match report::parse(raw) {
        Ok(Report::Dsn(dsn)) => dsn.returned,
        Ok(Report::Arf(arf)) => arf.returned,
        _ => return Vec::new(),
    };
    let mut keys: Vec<String> = returned
        .message_id()
        .and_then(|id| sent::normalise_message_id(&id))
        .map(|id| sent::message_id_key(&id))
        .into_iter()
        .collect();
    for id in sent::petrel_queue_ids(returned.all("received"), hostname) {
        let key = sent::queue_id_key(&id);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// [`plan`], with the `records` of sent messages the returned headers
/// name as the last resort of attribution. Pure.
pub fn plan_with(
    keys: &FeedbackKeys,
    config: &RelayConfig,
    incoming: Incoming<'_>,
    records: &[SentMessage],
    relay: &str,
    now: Millis,
) -> Plan {
    let domains: Vec<(String, String)> = config
        .domains
        .iter()
        .filter_map(|d| {
            let rp = d.return_path_domain.as_deref()?;
            Some((d.domain.to_ascii_lowercase(), rp.to_ascii_lowercase()))
        })
        .collect();
    let attributor = Attributor {
        keys,
        domains: &domains,
        records,
    };
    let rcpt = main_recipient(incoming.recipients);
    let ttl = config.delivery.suppression_ttl.map(|d| d.get());
    let mut plan = Plan::default();
    match report::parse(incoming.raw) {
        Err(error) => {
            plan.kinds.push(Kind::Unparsed);
            plan.notes.push(error.to_string());
        }
        Ok(Report::Dsn(dsn)) => dsn_plan(&mut plan, &attributor, rcpt, &dsn, ttl, relay, now),
        Ok(Report::Arf(arf)) => arf_plan(&mut plan, &attributor, rcpt, &arf, ttl, relay, now),
        Ok(Report::Other(headers)) if has_prefix(rcpt, MAILTO_PREFIX) => {
            let mut senders: Vec<String> = Vec::new();
            if !incoming.mail_from.is_empty() {
                senders.push(incoming.mail_from.to_lowercase());
            }
            senders.extend(headers.all("from").flat_map(addresses_in));
            let senders: Vec<&str> = senders.iter().map(String::as_str).collect();
            let (local, rp) = rcpt.rsplit_once('@').unwrap_or((rcpt, ""));
            let sending: Vec<&str> = domains
                .iter()
                .filter(|(_, d)| d.eq_ignore_ascii_case(rp))
                .map(|(d, _)| d.as_str())
                .collect();
            match keys.open_unsubscribe_mailto(&local[MAILTO_PREFIX.len()..], &senders, &sending) {
                Ok(claims) => {
                    plan.kinds.push(Kind::Unsubscribe);
                    plan.unsubscribe = Some(claims);
                }
                Err(_) => {
                    plan.kinds.push(Kind::Unattributed);
                    plan.notes
                        .push("mailto unsubscribe token does not match its sender".into());
                }
            }
        }
        Ok(Report::Other(_)) => {
            plan.kinds.push(Kind::Unparsed);
            plan.notes.push("not a DSN or ARF report".into());
        }
    }
    plan
}

fn unattributed(plan: &mut Plan, what: &str, returned: &Returned) {
    plan.kinds.push(Kind::Unattributed);
    plan.notes.push(format!(
        "{what} not attributable by token or sent-message record (Message-ID {})",
        returned.message_id().as_deref().unwrap_or("-")
    ));
}

fn dsn_plan(
    plan: &mut Plan,
    attributor: &Attributor<'_>,
    rcpt: &str,
    dsn: &Dsn,
    ttl: Option<Duration>,
    relay: &str,
    now: Millis,
) {
    for r in &dsn.recipients {
        let class = r.class();
        let kind = match (r.action, class) {
            (Action::Failed, Some(5)) => Kind::Bounce,
            (Action::Delayed, _) | (Action::Failed, Some(4)) => Kind::Delayed,
            // A failure without a usable status is still a failure.
            (Action::Failed, None) => Kind::Bounce,
            _ => {
                plan.kinds.push(Kind::Other);
                continue;
            }
        };
        let Some(a) = attributor.attribute(rcpt, &r.addresses(), &dsn.returned) else {
            unattributed(plan, "DSN", &dsn.returned);
            continue;
        };
        let event_type = match kind {
            Kind::Bounce => EventType::Bounced,
            _ => EventType::Delayed,
        };
        let mut e = event(event_type, &a, &dsn.returned, relay, now);
        e.is_async = Some(true);
        e.remote_mta = r.remote_mta.clone().or_else(|| dsn.reporting_mta.clone());
        let why = r
            .diagnostic
            .clone()
            .or_else(|| r.status.as_ref().map(|s| format!("Status: {s}")));
        if let Some(why) = &why {
            e = e.with_response(why);
        }
        if r.status.is_some() {
            e.enhanced_status = r.status.clone();
        }
        if kind == Kind::Bounce {
            e.bounce_type = Some(BounceType::Hard);
            plan.suppress.push(
                SuppressionEntry {
                    address: a.recipient.clone(),
                    reason: SuppressionReason::Bounce,
                    scope: None,
                    remote_reply: why,
                    created_at: now,
                    expires_at: ttl_millis(ttl, now),
                }
                .normalised(),
            );
        }
        plan.events.push(e);
        plan.kinds.push(kind);
    }
}

fn arf_plan(
    plan: &mut Plan,
    attributor: &Attributor<'_>,
    rcpt: &str,
    arf: &Arf,
    ttl: Option<Duration>,
    relay: &str,
    now: Millis,
) {
    // RFC 6650: "not-spam" says the opposite of a complaint.
    if arf.feedback_type == "not-spam" {
        plan.kinds.push(Kind::Other);
        return;
    }
    let Some(a) = attributor.attribute(rcpt, &arf.original_rcpt_to, &arf.returned) else {
        unattributed(plan, "ARF report", &arf.returned);
        return;
    };
    let mut e = event(EventType::Complained, &a, &arf.returned, relay, now);
    e.feedback_type = Some(arf.feedback_type.clone());
    let mut why = format!("feedback-type {}", arf.feedback_type);
    if let Some(agent) = &arf.user_agent {
        why.push_str(&format!(" from {agent}"));
    }
    plan.suppress.push(
        SuppressionEntry {
            address: a.recipient.clone(),
            reason: SuppressionReason::Complaint,
            scope: None,
            remote_reply: Some(why),
            created_at: now,
            expires_at: ttl_millis(ttl, now),
        }
        .normalised(),
    );
    plan.events.push(e);
    plan.kinds.push(Kind::Complaint);
}

/// Stores what `plan` decided, in one atomic step (or the idempotent
/// unsubscribe). Nothing is written for unattributed or unparsed mail.
pub async fn record(
    state: &dyn SharedState,
    events: &dyn EventLog,
    plan: &Plan,
    relay: &str,
    now: Millis,
) -> Result<(), QueueError> {
    if let Some(claims) = &plan.unsubscribe {
        return apply::unsubscribe(state, events, claims, Via::Mailto, now, relay).await;
    }
    match (plan.events.is_empty(), plan.suppress.is_empty()) {
        (true, true) => Ok(()),
        (false, true) => events.publish(&plan.events).await,
        _ => {
            events
                .publish_suppressing(&plan.events, &plan.suppress)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QID: &str = "0123456789abcdef0123456789abcdef";

    fn config() -> RelayConfig {
        RelayConfig::from_yaml(
            "hostname: relay.test\nlisteners: [{name: fb, address: \"127.0.0.1:2525\", tls: none, auth: none, role: feedback}]\ndomains:\n  - domain: example.test\n    returnPathDomain: bounces.example.test\n    dkim: {selector: s, algorithm: ed25519, keyFile: /dev/null}\nqueue: {embedded: {path: /tmp/q.redb}}\n",
        )
        .unwrap()
    }

    fn dsn(action: &str, status: &str) -> String {
        format!(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.dest.test\r\n\r\nFinal-Recipient: rfc822; gone@dest.test\r\nAction: {action}\r\nStatus: {status}\r\nDiagnostic-Code: smtp; 550 5.1.1 unknown user\r\n--B--\r\n"
        )
    }

    #[test]
    fn plans_by_status_and_attribution() {
        let keys = FeedbackKeys::from_secret(&[1u8; 32]);
        let config = config();
        let verp = keys
            .verp_sender(
                QID,
                "example.test",
                "gone@dest.test",
                "bounces.example.test",
            )
            .unwrap();
        let forged = FeedbackKeys::from_secret(&[2u8; 32])
            .verp_sender(
                QID,
                "example.test",
                "gone@dest.test",
                "bounces.example.test",
            )
            .unwrap();
        let table = [
            (verp.as_str(), dsn("failed", "5.1.1"), Kind::Bounce, 1),
            (verp.as_str(), dsn("delayed", "4.4.7"), Kind::Delayed, 0),
            (verp.as_str(), dsn("failed", "4.4.7"), Kind::Delayed, 0),
            (verp.as_str(), dsn("delivered", "2.0.0"), Kind::Other, 0),
            (
                forged.as_str(),
                dsn("failed", "5.1.1"),
                Kind::Unattributed,
                0,
            ),
            (
                verp.as_str(),
                "Subject: hi\r\n\r\nbounced!\r\n".into(),
                Kind::Unparsed,
                0,
            ),
        ];
        for (rcpt, raw, kind, suppressed) in table {
            let recipients = vec![rcpt.to_string()];
            let p = plan(
                &keys,
                &config,
                Incoming {
                    mail_from: "",
                    recipients: &recipients,
                    raw: raw.as_bytes(),
                },
                "relay-0",
                5,
            );
            assert_eq!(p.kinds, vec![kind], "{raw}");
            assert_eq!(p.suppress.len(), suppressed, "{raw}");
            let events = usize::from(matches!(kind, Kind::Bounce | Kind::Delayed));
            assert_eq!(p.events.len(), events, "{raw}");
            for e in &p.events {
                assert_eq!(e.is_async, Some(true));
                assert_eq!(e.queue_id.as_deref(), Some(QID));
            }
        }
    }

    #[test]
    fn a_report_with_only_a_message_id_needs_the_record_and_a_recipient_of_it() {
        let keys = FeedbackKeys::from_secret(&[1u8; 32]);
        let config = config();
        let arf = |rcpt: &str| {
            format!(
                "Content-Type: multipart/report; report-type=feedback-report; boundary=B\r\n\r\n--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nVersion: 1\r\nOriginal-Rcpt-To: {rcpt}\r\n--B\r\nContent-Type: message/rfc822\r\n\r\nReceived: from c ([192.0.2.1])\r\n\tby relay.test (Petrel) with ESMTP\r\n\tid {QID};\r\n\tMon, 23 Nov 2026 13:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\nTo: {rcpt}\r\n\r\nhi\r\n--B--\r\n"
            )
        };
        let raw = arf("fan@dest.test");
        assert_eq!(
            lookup_keys(raw.as_bytes(), "relay.test"),
            vec![
                sent::message_id_key("m1@example.test"),
                sent::queue_id_key(QID)
            ]
        );
        let recipients = vec!["fbl@bounces.example.test".to_string()];
        let run = |raw: &[u8], records: &[SentMessage]| {
            plan_with(
                &keys,
                &config,
                Incoming {
                    mail_from: "fbl@provider.test",
                    recipients: &recipients,
                    raw,
                },
                records,
                "relay-0",
                5,
            )
        };
        let p = run(raw.as_bytes(), &[]);
        assert_eq!(p.kinds, vec![Kind::Unattributed]);
        assert!(needs_records(&p));
        let records = [SentMessage {
            queue_id: QID.into(),
            sending_domain: "example.test".into(),
            recipients: vec!["fan@dest.test".into(), "co@dest.test".into()],
        }];
        let p = run(raw.as_bytes(), &records);
        assert_eq!(p.kinds, vec![Kind::Complaint]);
        assert_eq!(p.suppress[0].address, "fan@dest.test");
        assert_eq!(p.suppress[0].reason, SuppressionReason::Complaint);
        assert_eq!(p.events[0].queue_id.as_deref(), Some(QID));
        assert_eq!(
            p.events[0].header_message_id.as_deref(),
            Some("m1@example.test")
        );
        let p = run(arf("stranger@dest.test").as_bytes(), &records);
        assert_eq!(p.kinds, vec![Kind::Unattributed]);
        assert!(p.suppress.is_empty() && p.events.is_empty());
    }

    /// A DSN a real Postfix 3.7.11 wrote (local delivery to an unknown
    /// user after accepting the message; captured by hand, see the
    /// feedback report), for a VERP sender sealed with the key beside it.
    #[test]
    fn a_real_postfix_dsn_is_a_hard_bounce_of_the_sealed_recipient() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/feedback/testdata");
        let keys = FeedbackKeys::load(&dir.join("postfix-check.key")).unwrap();
        let raw = std::fs::read(dir.join("postfix-3.7-unknown-user.eml")).unwrap();
        let recipients =
            vec!["b+cbgafsi7gsjuqfvafizignqdb62ulchuhr4ki674xocq@bounces.example.test".to_string()];
        let p = plan(
            &keys,
            &config(),
            Incoming {
                mail_from: "",
                recipients: &recipients,
                raw: &raw,
            },
            "relay-0",
            5,
        );
        assert_eq!(p.kinds, vec![Kind::Bounce]);
        let e = &p.events[0];
        assert_eq!(e.kind, EventType::Bounced);
        assert_eq!(e.recipient.as_deref(), Some("zzgone@dest.test"));
        assert_eq!(
            e.queue_id.as_deref(),
            Some("4c02c91f34934816a02a328336030fb5")
        );
        assert_eq!(e.enhanced_status.as_deref(), Some("5.1.1"));
        assert_eq!(e.response.as_deref(), Some("unknown user: \"zzgone\""));
        assert_eq!(e.remote_mta.as_deref(), Some("mx.dest.test"));
        assert_eq!(
            e.header_message_id.as_deref(),
            Some("pfx-check-3@example.test")
        );
        assert_eq!(p.suppress[0].address, "zzgone@dest.test");
        assert_eq!(p.suppress[0].reason, SuppressionReason::Bounce);
    }
}
