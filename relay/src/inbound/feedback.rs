//! The `role: feedback` listener: the return path's MX. It takes mail
//! from anyone (DSNs come from `<>`, reports from providers), only for
//! addresses at the configured return-path domains, never relays, needs
//! no AUTH, and answers 250 to whatever arrives (a bounce of a bounce
//! would be backscatter), once what it means is stored.
//!
//! Every local part at a return-path domain is accepted, not only
//! `b+<token>` and `u+<token>`: feedback loops send ARF reports to the
//! address the sender registered (`fbl@`, `abuse@`), and RFC 5321 4.5.1
//! wants `postmaster@` to work; such mail is attributed by the tokens in
//! its returned headers, else by the stored record of the message their
//! `Message-ID` (or Petrel's `Received` queue id) names, for a recipient
//! of that message only, or counted as unattributed or unparsed.

use tokio::io::{AsyncRead, AsyncWrite};

use super::session::{Envelope, Session, State};
use crate::feedback::receive::{self, Incoming};
use crate::feedback::sent;
use crate::policy::Denied;
use crate::queue::{MessageFlags, now_millis};
use crate::refusal::Refusal;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// MAIL FROM on a feedback listener: any sender, the null one included.
    pub(super) fn feedback_mail(&mut self, address: &str, smtputf8: bool) {
        self.state.envelope = Some(Envelope {
            mail_from: address.to_string(),
            flags: MessageFlags {
                smtputf8,
                ..MessageFlags::default()
            },
            ..Envelope::default()
        });
        self.state.state = State::Mail;
        self.queue_reply(250, "2.1.0", "Sender OK");
    }

    /// RCPT TO on a feedback listener: only addresses at a return-path
    /// domain; 550 5.7.1 for anything else.
    pub(super) fn feedback_rcpt(&mut self, address: &str) -> Result<(), Refusal> {
        let domain = crate::queue::recipient_domain(address).unwrap_or_default();
        let ours = self.config.domains.iter().any(|d| {
            d.return_path_domain
                .as_deref()
                .is_some_and(|rp| rp.eq_ignore_ascii_case(&domain))
        });
        if !ours {
            return Err(Refusal::Denied(Denied::NotReturnPath(address.to_string())));
        }
        let Some(envelope) = self.state.envelope.as_mut() else {
            return Err(Refusal::BadSequence("Need MAIL before RCPT"));
        };
        if !envelope.recipients.iter().any(|r| r == address) {
            envelope.recipients.push(address.to_string());
        }
        self.state.state = State::Rcpt;
        self.queue_reply(250, "2.1.5", "Recipient OK");
        Ok(())
    }

    /// The end of DATA on a feedback listener: plan, store, then 250.
    /// 451 only when the outcome cannot be stored (the sender retries).
    pub(super) async fn feedback_data(
        &mut self,
        envelope: Envelope,
        raw: Vec<u8>,
    ) -> Result<(), Refusal> {
        let config = self.config.clone();
        let now = now_millis();
        let keys = match self.ctx.feedback.keys() {
            Ok(keys) => keys,
            Err(error) => {
                tracing::error!(%error, "feedback key unusable; feedback mail cannot be attributed");
                self.ctx
                    .metrics
                    .feedback
                    .with_label_values(&["unattributed"])
                    .inc();
                self.queue_reply(250, "2.0.0", "Ok: received");
                return Ok(());
            }
        };
        let incoming = Incoming {
            mail_from: &envelope.mail_from,
            recipients: &envelope.recipients,
            raw: &raw,
        };
        let mut plan = receive::plan(&keys, &config, incoming, &self.ctx.relay, now);
        if receive::needs_records(&plan) {
            let lookup = receive::lookup_keys(&raw, &config.hostname);
            if !lookup.is_empty() {
                // Unreadable records could attribute the report later: the
                // sender retries on the 451, as for a failed write.
                let load = sent::load(self.ctx.state.as_ref(), &lookup);
                let records = super::envelope::bounded(config.queue.timeout.into(), load).await?;
                if !records.is_empty() {
                    plan = receive::plan_with(
                        &keys,
                        &config,
                        incoming,
                        &records,
                        &self.ctx.relay,
                        now,
                    );
                }
            }
        }
        let Some(events) = self.ctx.events.clone() else {
            tracing::error!("no event log: feedback cannot be recorded");
            return Err(Refusal::QueueUnavailable);
        };
        let write = receive::record(
            self.ctx.state.as_ref(),
            events.as_ref(),
            &plan,
            &self.ctx.relay,
            now,
        );
        super::envelope::bounded(config.queue.timeout.into(), write).await?;
        for kind in &plan.kinds {
            self.ctx
                .metrics
                .feedback
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        crate::events::emit::count(&self.ctx.metrics, &plan.events);
        tracing::info!(
            event = "feedback",
            peer = %self.state.peer,
            from = %envelope.mail_from,
            rcpt = %envelope.recipients.first().map_or("", String::as_str),
            kinds = ?plan.kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            notes = ?plan.notes,
            "feedback mail handled"
        );
        self.queue_reply(250, "2.0.0", "Ok: received");
        Ok(())
    }
}
