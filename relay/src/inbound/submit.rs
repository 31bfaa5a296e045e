//! The HTTP send API's way in: the same checks and accept path as an SMTP
//! session (AUTH with the same users and throttle, relay policy, address
//! tricks, quota, suppression, DKIM, durable enqueue), so a message cannot
//! get through HTTP that SMTP would refuse.

use std::sync::Arc;

use async_trait::async_trait;

use super::InboundContext;
use super::accept::{self, Origin};
use super::credentials;
use super::envelope::{add_recipient, address_reject, check_paused, check_quota};
use super::session::Envelope;
use crate::config::AuthMode;
use crate::http::{Authorized, HttpClient, SendLimits, Submission, Submit};
use crate::policy::{self, Client};
use crate::queue::MessageFlags;
use crate::refusal::Refusal;

/// [`Submit`] over an [`InboundContext`].
#[derive(Clone)]
pub struct InboundSubmit {
    ctx: Arc<InboundContext>,
}

impl InboundSubmit {
    /// The accept path of `ctx`, for [`crate::http::HttpState::with_send_api`].
    pub fn new(ctx: Arc<InboundContext>) -> InboundSubmit {
        InboundSubmit { ctx }
    }

    /// Who may submit: Basic credentials (checked like SMTP AUTH, with the
    /// same throttle), never in clear from outside the trusted networks
    /// unless `http.allowInsecureAuth`; without credentials only trusted
    /// networks. HTTP behaves like an `auth: optional` listener.
    async fn authorize_inner(&self, client: HttpClient) -> Result<Authorized, Refusal> {
        let config = self.ctx.config.get();
        let trusted = policy::is_trusted(client.peer, &config.trusted_networks);
        let user = match client.credentials {
            Some(c) => {
                if !client.tls && !trusted && !config.http.allow_insecure_auth {
                    return Err(Refusal::PlaintextCredentials);
                }
                credentials::check(&self.ctx, client.peer, &c.username, c.password, "http").await?;
                Some(c.username)
            }
            None => None,
        };
        let who = Client {
            ip: client.peer,
            user: user.as_deref(),
        };
        policy::may_relay(&who, AuthMode::Optional, &config.trusted_networks)
            .map_err(Refusal::Denied)?;
        Ok(Authorized {
            peer: client.peer,
            user,
        })
    }

    async fn submit_inner(&self, who: Authorized, s: Submission) -> Result<String, Refusal> {
        let config = self.ctx.config.get();
        let user = who.user;
        let client = Client {
            ip: who.peer,
            user: user.as_deref(),
        };
        policy::may_relay(&client, AuthMode::Optional, &config.trusted_networks)
            .map_err(Refusal::Denied)?;
        let from = policy::check_path(&s.mail_from).map_err(|p| address_reject(p, true))?;
        let sending = policy::check_sender(&client, from, &config).map_err(Refusal::Denied)?;
        if s.data.len() as u64 > config.limits.max_message_size {
            return Err(Refusal::TooBig);
        }
        if s.recipients.len() > config.limits.max_recipients as usize {
            return Err(Refusal::TooManyRecipients);
        }
        check_paused(&self.ctx, &config, sending).await?;
        check_quota(&self.ctx, &config, sending).await?;
        let mut envelope = Envelope {
            mail_from: from.to_string(),
            sending_domain: sending.domain.to_ascii_lowercase(),
            flags: MessageFlags {
                smtputf8: !from.is_ascii() || s.recipients.iter().any(|r| !r.is_ascii()),
                eight_bit: !s.data.is_ascii(),
                is_dsn: false,
                per_recipient: false,
                ..MessageFlags::default()
            },
            tags: s.tags,
            ..Envelope::default()
        };
        for rcpt in &s.recipients {
            let address = policy::check_recipient(rcpt).map_err(|p| address_reject(p, false))?;
            if envelope
                .recipients
                .iter()
                .chain(&envelope.dropped)
                .any(|r| r == address)
            {
                continue;
            }
            add_recipient(&self.ctx, &config, &mut envelope, address.to_string()).await?;
        }
        if envelope.accepted() == 0 {
            return Err(Refusal::NoRecipients);
        }
        let origin = Origin {
            helo: "http",
            ip: who.peer,
            protocol: if user.is_some() { "HTTPA" } else { "HTTP" },
            tls: None,
            user: user.as_deref(),
        };
        let id = accept::accept(&self.ctx, &config, envelope, s.data, &origin).await?;
        // Every recipient suppressed and dropped: accepted, nothing queued.
        Ok(id.unwrap_or_else(|| "dropped".to_string()))
    }
}

impl InboundSubmit {
    /// The one place a send API refusal is recorded: metrics and the
    /// `rejected` event (module `rejected`) of the message it names, if any
    /// (`authorize` names none yet).
    fn refused(&self, refusal: Refusal, message: Option<(&str, &[String])>) -> Refusal {
        if let Some((mail_from, recipients)) = message {
            let domain = crate::queue::recipient_domain(mail_from);
            super::rejected::record(
                &self.ctx,
                &refusal,
                Some(mail_from),
                domain.as_deref(),
                recipients,
            );
        }
        self.ctx
            .metrics
            .rejected
            .with_label_values(&[refusal.label()])
            .inc();
        refusal
    }
}

#[async_trait]
impl Submit for InboundSubmit {
    async fn authorize(&self, client: HttpClient) -> Result<Authorized, Refusal> {
        self.authorize_inner(client)
            .await
            .map_err(|r| self.refused(r, None))
    }

    /// Returns the queue id, or `dropped` when every recipient was on the
    /// suppression list of a domain with `onSuppressed: drop`.
    async fn submit(&self, client: Authorized, submission: Submission) -> Result<String, Refusal> {
        let mail_from = submission.mail_from.clone();
        let recipients = submission.recipients.clone();
        self.submit_inner(client, submission)
            .await
            .map_err(|r| self.refused(r, Some((&mail_from, &recipients))))
    }

    fn limits(&self) -> SendLimits {
        SendLimits::of(&self.ctx.config.get())
    }
}
