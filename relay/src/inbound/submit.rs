//! The HTTP send API's way in: the same checks and accept path as an SMTP
//! session (AUTH with the same users and throttle, relay policy, address
//! tricks, quota, suppression, DKIM, durable enqueue), so a message cannot
//! get through HTTP that SMTP would refuse.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::InboundContext;
use super::accept::{self, Origin};
use super::auth;
use super::envelope::{add_recipient, address_reject, bounded, check_quota, denied_reject};
use super::login::throttle_key;
use super::reply::Reject;
use super::session::Envelope;
use crate::config::AuthMode;
use crate::http::{Credentials, Refusal, Submission, Submit};
use crate::policy::{self, Client};
use crate::queue::MessageFlags;

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

    /// Checks Basic-auth credentials like SMTP AUTH, with the same per-IP
    /// failure counter.
    async fn authenticate(&self, ip: IpAddr, credentials: Credentials) -> Result<String, Reject> {
        let config = self.ctx.config.get();
        let limits = &config.limits;
        let timeout = config.queue.timeout.into();
        let key = throttle_key(ip);
        let blocked = || {
            Reject::new(
                421,
                "4.7.0",
                "auth_blocked",
                "Too many failed AUTH attempts from your address, try again later",
            )
        };
        let _turn = self.ctx.auth_permit(timeout).await?;
        if bounded(timeout, self.ctx.state.counter(&key)).await?
            >= u64::from(limits.max_auth_failures)
        {
            return Err(blocked());
        }
        let users = self.ctx.users.as_ref().map(|u| u.get());
        let Credentials { username, password } = credentials;
        let user = username.clone();
        let ok = tokio::task::spawn_blocking(move || {
            users.is_some_and(|u| auth::verify(&u, &user, &password))
        })
        .await
        .unwrap_or(false);
        if ok {
            return Ok(username);
        }
        self.ctx
            .metrics
            .auth_failures
            .with_label_values(&["http"])
            .inc();
        let total = bounded(
            timeout,
            self.ctx
                .state
                .incr_counter(&key, 1, limits.auth_block_for.into()),
        )
        .await?;
        if total >= u64::from(limits.max_auth_failures) {
            return Err(blocked());
        }
        Err(Reject::new(
            535,
            "5.7.8",
            "auth_failed",
            "Authentication credentials invalid",
        ))
    }

    async fn submit_inner(&self, s: Submission) -> Result<String, Reject> {
        let config = self.ctx.config.get();
        let user = match s.credentials {
            Some(c) => Some(self.authenticate(s.peer, c).await?),
            None => None,
        };
        let client = Client {
            ip: s.peer,
            user: user.as_deref(),
        };
        // HTTP behaves like an `auth: optional` listener: trusted networks
        // or authenticated users.
        policy::may_relay(&client, AuthMode::Optional, &config.trusted_networks)
            .map_err(denied_reject)?;
        let from = policy::check_path(&s.mail_from).map_err(|p| address_reject(p, true))?;
        let sending = policy::check_sender(&client, from, &config).map_err(denied_reject)?;
        if s.data.len() as u64 > config.limits.max_message_size {
            return Err(Reject::new(
                552,
                "5.3.4",
                "too_big",
                "Message size exceeds fixed maximum message size",
            ));
        }
        if s.recipients.len() > config.limits.max_recipients as usize {
            return Err(Reject::new(
                452,
                "4.5.3",
                "too_many_recipients",
                "Too many recipients",
            ));
        }
        check_quota(&self.ctx, &config, sending).await?;
        let mut envelope = Envelope {
            mail_from: from.to_string(),
            sending_domain: sending.domain.to_ascii_lowercase(),
            flags: MessageFlags {
                smtputf8: !from.is_ascii() || s.recipients.iter().any(|r| !r.is_ascii()),
                eight_bit: !s.data.is_ascii(),
                is_dsn: false,
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
            return Err(Reject::new(
                554,
                "5.5.1",
                "no_recipients",
                "No valid recipients",
            ));
        }
        let origin = Origin {
            helo: "http",
            ip: s.peer,
            protocol: if user.is_some() { "HTTPA" } else { "HTTP" },
            tls: None,
            user: user.as_deref(),
        };
        let id = accept::accept(&self.ctx, &config, envelope, s.data, &origin).await?;
        // Every recipient suppressed and dropped: accepted, nothing queued.
        Ok(id.unwrap_or_else(|| "dropped".to_string()))
    }
}

#[async_trait]
impl Submit for InboundSubmit {
    /// Returns the queue id, or `dropped` when every recipient was on the
    /// suppression list of a domain with `onSuppressed: drop`.
    async fn submit(&self, submission: Submission) -> Result<String, Refusal> {
        let mail_from = submission.mail_from.clone();
        let recipients = submission.recipients.clone();
        self.submit_inner(submission).await.map_err(|r| {
            let domain = crate::queue::recipient_domain(&mail_from);
            super::rejected::record(
                &self.ctx,
                &r,
                Some(&mail_from),
                domain.as_deref(),
                &recipients,
            );
            self.ctx
                .metrics
                .rejected
                .with_label_values(&[r.reason])
                .inc();
            Refusal {
                code: r.code,
                enhanced: r.esc.to_string(),
                message: r.message,
            }
        })
    }
}
