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
use crate::queue::{MessageFlags, NewMessage, now_millis};
use crate::refusal::Refusal;

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
    let event = |kind, rcpt: &str, header_message_id: &Option<String>| {
        let mut e = Event::new(kind, &ctx.relay, now_millis()).with_recipient(rcpt);
        e.queue_id = Some(id.clone());
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
                    let mut e = event(EventType::Suppressed, r, &hmid);
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
    // Tracking rewrites the body, so it comes before the signature.
    let data = ctx.tracking.prepare(
        data,
        sending,
        &id,
        &envelope.recipients,
        &ctx.metrics.tracking,
    );

    // Feedback-ID and the unsubscribe headers come before the signature
    // too, so its h= covers them.
    let data = crate::unsubscribe::add_feedback_id(data, sending, &message_tags);
    let data = crate::unsubscribe::add_list_unsubscribe(
        data,
        sending,
        &id,
        &envelope.recipients,
        &ctx.feedback,
        &ctx.metrics.unsubscribe,
    );

    // Sign on the blocking pool: RSA takes milliseconds of CPU.
    let signer = ctx.clone();
    let dkim = sending.dkim.clone();
    let sign_domain = domain.clone();
    let signed = tokio::task::spawn_blocking(move || {
        signer.dkim.sign(&sign_domain, &dkim, &data).map(|header| {
            let mut out = Vec::with_capacity(header.len() + data.len());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&data);
            out
        })
    })
    .await;
    let data = match signed {
        Ok(Ok(d)) => d,
        Ok(Err(error)) => {
            tracing::error!(%error, %domain, "cannot DKIM-sign; refusing rather than sending unsigned");
            return Err(Refusal::DkimUnavailable(Some(domain)));
        }
        Err(error) => {
            tracing::error!(%error, "DKIM signing task failed");
            return Err(Refusal::DkimUnavailable(None));
        }
    };
    ctx.metrics
        .dkim_signed
        .with_label_values(&[&domain, algorithm_label(sending.dkim.algorithm)])
        .inc();

    let events: Vec<Event> = envelope
        .recipients
        .iter()
        .map(|r| event(EventType::Accepted, r, &header_message_id))
        .chain(
            envelope
                .dropped
                .iter()
                .map(|r| event(EventType::Suppressed, r, &header_message_id)),
        )
        .collect();
    let message = NewMessage {
        id: id.clone(),
        mail_from: envelope.mail_from.clone(),
        recipients: envelope.recipients.clone(),
        data,
        sending_domain: domain.clone(),
        received_at: now_millis(),
        flags: MessageFlags {
            // A VERP return path names one recipient, so each gets a unit.
            per_recipient: sending.return_path_domain.is_some() && !envelope.flags.is_dsn,
            ..envelope.flags
        },
        tags: message_tags.clone(),
        header_message_id: header_message_id.clone(),
    };
    let timer = ctx.metrics.enqueue_duration.start_timer();
    let timeout: Duration = config.queue.timeout.into();
    let counted = events.clone();
    match tokio::time::timeout(timeout, ctx.queue.enqueue(message, events)).await {
        Ok(Ok(())) => {
            timer.observe_duration();
            emit::count(&ctx.metrics, &counted);
        }
        Ok(Err(e)) => {
            timer.stop_and_discard();
            return Err(backend_reject(Some(e)));
        }
        Err(_) => {
            timer.stop_and_discard();
            return Err(backend_reject(None));
        }
    }
    if sending.rate_limits.daily_quota.is_some() {
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
    tracing::info!(event = "message_accepted", %id, %domain, peer = %origin.ip, user = ?origin.user, "message queued");
    Ok(Some(id))
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
