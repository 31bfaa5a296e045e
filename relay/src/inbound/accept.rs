//! The accept path shared by SMTP DATA/BDAT and the HTTP send API:
//! Received/Message-ID/Date, DKIM signature, durable enqueue, quota count.
//! The caller says 250 (or 200) only when this returns `Ok`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::InboundContext;
use super::envelope::{backend_reject, quota_key};
use super::headers::{self, TraceInfo};
use super::session::Envelope;
use crate::config::RelayConfig;
use crate::dkim::algorithm_label;
use crate::events::{Event, EventType, emit, tags};
use crate::feedback::sent::{self, SentMessage};
use crate::queue::{MessageFlags, NewMessage, now_millis};
use crate::refusal::Refusal;
use crate::tracking::context::{self, EventContext};

/// Where a message came from, for its Received header and logs.
#[derive(Clone, Debug)]
pub struct Origin<'a> {
    /// EHLO name (or a fixed name for HTTP).
    pub helo: &'a str,
    /// Client address.
    pub ip: IpAddr,
    /// `with` keyword of the Received header.
    pub protocol: &'static str,
    /// TLS version and cipher, when used.
    pub tls: Option<(&'a str, &'a str)>,
    /// The AUTH user, when authenticated.
    pub user: Option<&'a str>,
}

/// Signs and enqueues `raw` for `envelope`. Returns the queue id, or `None`
/// when every recipient was suppressed with `onSuppressed: drop` (nothing
/// to send, the client is still told the message was accepted).
pub async fn accept(
    ctx: &Arc<InboundContext>,
    config: &RelayConfig,
    envelope: Envelope,
    raw: Vec<u8>,
    origin: &Origin<'_>,
) -> Result<Option<String>, Refusal> {
    let domain = envelope.sending_domain.clone();
    // Tags leave the message here, before it is signed: the header is for
    // the relay, not for the recipient.
    let (raw, message_tags) = message_tags(&envelope, &raw)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let event = |kind, queue_id: &str, rcpt: &str, header_message_id: &Option<String>| {
        let mut e = Event::new(kind, &ctx.relay, now_millis()).with_recipient(rcpt);
        e.queue_id = Some(queue_id.to_string());
        e.header_message_id = header_message_id.clone();
        e.sending_domain = Some(domain.clone());
        e.from = Some(envelope.mail_from.clone());
        e.tags = message_tags.clone();
        e
    };
    if envelope.recipients.is_empty() {
        tracing::info!(
            event = "message_dropped",
            %domain,
            dropped = envelope.dropped.len(),
            "all recipients suppressed; message dropped"
        );
        if let Some(log) = &ctx.events {
            let hmid = tags::header_message_id(&raw);
            let dropped = envelope
                .dropped
                .iter()
                .map(|r| {
                    let mut e = event(EventType::Suppressed, &id, r, &hmid);
                    // Nothing was queued under this id.
                    e.queue_id = None;
                    e
                })
                .collect();
            emit::publish_in_background(
                log.clone(),
                ctx.metrics.clone(),
                dropped,
                config.queue.timeout.into(),
            );
        }
        return Ok(None);
    }
    let Some(sending) = config.domain(&domain) else {
        return Err(Refusal::DomainRemoved);
    };
    let client = crate::policy::Client {
        ip: origin.ip,
        user: origin.user,
    };
    super::from_header::check(config, &client, &domain, &raw)?;
    let date = chrono::Utc::now().to_rfc2822();
    let trace = TraceInfo {
        helo: origin.helo,
        ip: origin.ip,
        hostname: &config.hostname,
        protocol: origin.protocol,
        tls: origin.tls,
        id: &id,
        date: &date,
    };
    let data = headers::prepare(raw, &trace);
    let header_message_id = tags::header_message_id(&data);
    // RFC 8689 section 5: the header is ignored on a REQUIRETLS message.
    let tls_optional = !envelope.flags.require_tls
        && headers::tls_required_no(&data[..headers::header_len(&data)]);
    let copies = tracked_copies(ctx, sending, &id, &envelope.recipients, data);
    if copies.tracked() {
        let record = EventContext {
            tags: message_tags.clone(),
            header_message_id: header_message_id.clone(),
        };
        // Before the enqueue, so no open can come before it. Missing, the
        // events only lack tags and Message-ID: not worth refusing mail.
        let timeout: Duration = config.queue.timeout.into();
        match tokio::time::timeout(timeout, context::store(ctx.state.as_ref(), &id, &record)).await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, %id, "cannot store tracking event context; opens and clicks will lack tags")
            }
            Err(_) => tracing::warn!(%id, "storing tracking event context timed out"),
        }
    }
    if sending.return_path_domain.is_some() {
        remember_sent(
            ctx,
            config,
            &id,
            &domain,
            &envelope.recipients,
            &header_message_id,
        )
        .await;
    }

    let enqueue = async |index: usize, queue_id: String, recipients: Vec<String>, data| {
        // Feedback-ID and the unsubscribe headers come before the
        // signature too, so its h= covers them.
        let data = crate::unsubscribe::add_feedback_id(data, sending, &message_tags);
        let data = crate::unsubscribe::add_list_unsubscribe(
            data,
            sending,
            &queue_id,
            &recipients,
            &ctx.feedback,
            &ctx.metrics.unsubscribe,
        );
        let data = sign(ctx, sending, &domain, data).await?;
        let mut events: Vec<Event> = recipients
            .iter()
            .map(|r| event(EventType::Accepted, &queue_id, r, &header_message_id))
            .collect();
        if index == 0 {
            // Queued in no copy: written with the first, under the client's id.
            events.extend(
                envelope
                    .dropped
                    .iter()
                    .map(|r| event(EventType::Suppressed, &id, r, &header_message_id)),
            );
        }
        let message = NewMessage {
            id: queue_id,
            mail_from: envelope.mail_from.clone(),
            recipients,
            data,
            sending_domain: domain.clone(),
            received_at: now_millis(),
            flags: MessageFlags {
                // A VERP return path names one recipient, so each gets a unit.
                per_recipient: sending.return_path_domain.is_some() && !envelope.flags.is_dsn,
                tls_optional,
                ..envelope.flags
            },
            tags: message_tags.clone(),
            header_message_id: header_message_id.clone(),
        };
        enqueue_message(ctx, config, message, events).await
    };
    let total = match copies {
        Copies::Shared { data, .. } => {
            enqueue(0, id.clone(), envelope.recipients.clone(), data).await?;
            1
        }
        Copies::PerRecipient {
            first, original, ..
        } => {
            let mut first = Some(first);
            for (index, rcpt) in envelope.recipients.iter().enumerate() {
                let queue_id = context::copy_id(&id, index);
                // Rewritten (and held) one at a time.
                let data = match first.take() {
                    Some(data) => data,
                    None => {
                        let again = ctx.tracking.prepare(
                            original.clone(),
                            sending,
                            &queue_id,
                            rcpt,
                            &ctx.metrics.tracking,
                        );
                        again.data
                    }
                };
                if let Err(refusal) = enqueue(index, queue_id, vec![rcpt.clone()], data).await {
                    if index > 0 {
                        // The client resends the whole message (SMTP is
                        // at-least-once): these recipients get it twice.
                        tracing::warn!(%id, queued = index, of = envelope.recipients.len(), "enqueue failed after some per-recipient copies were queued; they will be delivered");
                    }
                    return Err(refusal);
                }
            }
            envelope.recipients.len()
        }
    };
    if sending.rate_limits.daily_quota.is_some() {
        let timeout: Duration = config.queue.timeout.into();
        let key = quota_key(&domain);
        let count = ctx
            .state
            .incr_counter(&key, 1, Duration::from_secs(24 * 3600));
        match tokio::time::timeout(timeout, count).await {
            Ok(Ok(_)) => {}
            // The message is queued; a missed count only loosens the quota.
            Ok(Err(error)) => {
                tracing::warn!(%error, %domain, "could not count message against the daily quota")
            }
            Err(_) => tracing::warn!(%domain, "daily quota count timed out"),
        }
    }
    ctx.metrics.received.with_label_values(&[&domain]).inc();
    tracing::info!(event = "message_accepted", %id, copies = total, %domain, peer = %origin.ip, user = ?origin.user, "message queued");
    Ok(Some(id))
}

/// Stores what feedback attribution falls back on when a report carries
/// no token (see [`crate::feedback::sent`]). Missing, such a report is
/// only counted unattributed: not worth refusing the message for, so a
/// failure is logged and the message accepted.
async fn remember_sent(
    ctx: &Arc<InboundContext>,
    config: &RelayConfig,
    id: &str,
    domain: &str,
    recipients: &[String],
    header_message_id: &Option<String>,
) {
    let record = SentMessage {
        queue_id: id.to_string(),
        sending_domain: domain.to_ascii_lowercase(),
        recipients: recipients.iter().map(|r| r.to_lowercase()).collect(),
    };
    let timeout: Duration = config.queue.timeout.into();
    let store = sent::store(ctx.state.as_ref(), &record, header_message_id.as_deref());
    match tokio::time::timeout(timeout, store).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, %id, "cannot store the sent-message record; reports about this message without a token will be unattributed")
        }
        Err(_) => tracing::warn!(%id, "storing the sent-message record timed out"),
    }
}

/// The message's tags: the envelope's (HTTP `tags`) and those of its
/// `X-Petrel-Tags` header, which is removed. A bad header refuses the
/// message (550 5.6.0 naming the tag) rather than losing the tags.
fn message_tags(
    envelope: &Envelope,
    raw: &[u8],
) -> Result<(Vec<u8>, std::collections::BTreeMap<String, String>), Refusal> {
    let bad = |e: tags::TagError| Refusal::BadTags(e.to_string());
    let (raw, from_header) = tags::take_header(raw).map_err(bad)?;
    let mut all = envelope.tags.clone();
    if let Some(from_header) = from_header {
        for (k, v) in from_header {
            // The API's own field wins over a header in the message it built.
            all.entry(k).or_insert(v);
        }
        tags::validate(&all).map_err(bad)?;
    }
    Ok((raw, all))
}

/// How a message is queued: one message for all recipients, or, when its
/// HTML is tracked and it has several recipients, one copy per recipient
/// (`X.1`, `X.2`, ...; see [`crate::tracking::context`]) so each copy's
/// tokens name its recipient.
enum Copies {
    /// One message, ready to sign.
    Shared {
        /// The body.
        data: Vec<u8>,
        /// It carries tracking tokens (then for its only recipient).
        tracked: bool,
    },
    /// One per recipient.
    PerRecipient {
        /// The first recipient's body, rewritten.
        first: Vec<u8>,
        /// The body before rewriting, for the others.
        original: Vec<u8>,
        /// The copies carry tracking tokens (else they are split only for
        /// their unsubscribe links).
        tracked: bool,
    },
}

impl Copies {
    fn tracked(&self) -> bool {
        match self {
            Copies::Shared { tracked, .. } => *tracked,
            Copies::PerRecipient { tracked, .. } => *tracked,
        }
    }
}

fn tracked_copies(
    ctx: &InboundContext,
    sending: &crate::config::SendingDomain,
    id: &str,
    recipients: &[String],
    data: Vec<u8>,
) -> Copies {
    let may_track = sending.tracking.as_ref().is_some_and(|t| t.enabled());
    // An unsubscribe link names one recipient too.
    let unsubscribes = sending.unsubscribe.as_ref().is_some_and(|u| u.enabled);
    // Only a message that may be split keeps its unrewritten body.
    let original = ((may_track || unsubscribes) && recipients.len() > 1).then(|| data.clone());
    let first_id = match original {
        Some(_) => context::copy_id(id, 0),
        None => id.to_string(),
    };
    let first = ctx.tracking.prepare(
        data,
        sending,
        &first_id,
        recipients.first().map_or("", String::as_str),
        &ctx.metrics.tracking,
    );
    match original.filter(|_| first.tracked || unsubscribes) {
        Some(original) => Copies::PerRecipient {
            first: first.data,
            original,
            tracked: first.tracked,
        },
        None => Copies::Shared {
            data: first.data,
            tracked: first.tracked,
        },
    }
}

/// Stores one message durably, bounded by `queue.timeout`.
async fn enqueue_message(
    ctx: &InboundContext,
    config: &RelayConfig,
    message: NewMessage,
    events: Vec<Event>,
) -> Result<(), Refusal> {
    let timer = ctx.metrics.enqueue_duration.start_timer();
    let timeout: Duration = config.queue.timeout.into();
    let counted = events.clone();
    match tokio::time::timeout(timeout, ctx.queue.enqueue(message, events)).await {
        Ok(Ok(())) => {
            timer.observe_duration();
            emit::count(&ctx.metrics, &counted);
            Ok(())
        }
        Ok(Err(e)) => {
            timer.stop_and_discard();
            Err(backend_reject(Some(e)))
        }
        Err(_) => {
            timer.stop_and_discard();
            Err(backend_reject(None))
        }
    }
}

/// Signs `data` for `domain` on the blocking pool (RSA takes milliseconds
/// of CPU) and counts it.
async fn sign(
    ctx: &Arc<InboundContext>,
    sending: &crate::config::SendingDomain,
    domain: &str,
    data: Vec<u8>,
) -> Result<Vec<u8>, Refusal> {
    let signer = ctx.clone();
    let dkim = sending.dkim.clone();
    let sign_domain = domain.to_string();
    let signed = tokio::task::spawn_blocking(move || {
        signer.dkim.sign(&sign_domain, &dkim, &data).map(|header| {
            let mut out = Vec::with_capacity(header.len() + data.len());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&data);
            out
        })
    })
    .await;
    match signed {
        Ok(Ok(d)) => {
            ctx.metrics
                .dkim_signed
                .with_label_values(&[domain, algorithm_label(sending.dkim.algorithm)])
                .inc();
            Ok(d)
        }
        Ok(Err(error)) => {
            tracing::error!(%error, %domain, "cannot DKIM-sign; refusing rather than sending unsigned");
            Err(Refusal::DkimUnavailable(Some(domain.to_string())))
        }
        Err(error) => {
            tracing::error!(%error, "DKIM signing task failed");
            Err(Refusal::DkimUnavailable(None))
        }
    }
}
