//! The SMTP transport: one unit over a pooled or new connection, trying
//! the destination's hosts (MX or smarthost) in order after host failures.

use std::net::SocketAddr;

use super::super::DeliveryContext;
use super::super::classify::{Failure, Fault, Outcome};
use super::super::mx::MxHost;
use super::super::settle::RcptOutcome;
use super::super::smtp_client::{self, ConnectSettings, Envelope};
use super::super::tls_policy;
use super::Transport;
use super::pool::Session;
use crate::metrics::destination_group;

/// SMTP to `hosts` on `port`, reusing and leaving the connection in
/// `session` for the group's next unit.
pub(crate) struct Smtp<'a> {
    /// The delivery context (metrics, config, VERP keys).
    pub ctx: &'a DeliveryContext,
    /// How to connect.
    pub settings: &'a ConnectSettings,
    /// The hosts, in preference order.
    pub hosts: &'a [MxHost],
    /// Their port.
    pub port: u16,
    /// The group's open connection, if any.
    pub session: &'a mut Option<Session>,
    /// The destination domain (metrics, messages).
    pub domain: &'a str,
}

impl Transport for Smtp<'_> {
    async fn deliver(
        &mut self,
        unit: &crate::queue::DeliveryUnit,
        data: &[u8],
    ) -> Vec<RcptOutcome> {
        deliver_smtp(
            self.ctx,
            self.settings,
            self.hosts,
            self.port,
            self.session,
            unit,
            data,
            self.domain,
        )
        .await
    }
}

/// Delivers one unit over SMTP, reusing `session` when it is open and
/// moving on to the next host after a host failure.
#[allow(clippy::too_many_arguments)]
async fn deliver_smtp(
    ctx: &DeliveryContext,
    settings: &ConnectSettings,
    hosts: &[MxHost],
    port: u16,
    session: &mut Option<Session>,
    unit: &crate::queue::DeliveryUnit,
    data: &[u8],
    domain: &str,
) -> Vec<RcptOutcome> {
    let n = unit.recipients.len();
    let verp =
        super::super::return_path::verp_sender(&ctx.config.get(), ctx.feedback.as_deref(), unit);
    let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; n];
    let mut pending: Vec<usize> = (0..n).collect();
    let mut last_failure = Failure::Fault(Fault::Connect(format!("no server for {domain}")));
    let mut next_host = 0usize;
    while !pending.is_empty() {
        // Reuse the open connection after RSET, or open a new one.
        if let Some(s) = session.as_mut()
            && s.used
        {
            match s.conn.client.rset().await {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    if let Some(s) = session.take() {
                        s.conn.client.quit().await;
                    }
                }
            }
        }
        if session.is_none() {
            while session.is_none() && next_host < hosts.len() {
                let host = &hosts[next_host];
                next_host += 1;
                for ip in &host.addrs {
                    match smtp_client::connect(SocketAddr::new(*ip, port), &host.name, settings)
                        .await
                    {
                        Ok(conn) => {
                            let tls = if conn.tls { "tls" } else { "plaintext" };
                            ctx.metrics
                                .outbound_sessions
                                .with_label_values(&[destination_group(domain), tls])
                                .inc();
                            ctx.metrics
                                .outbound_tls
                                .with_label_values(&[settings.tls_label, tls])
                                .inc();
                            *session = Some(Session { conn, used: false });
                            break;
                        }
                        Err(failure) => {
                            if let Some(result) = tls_policy::failure_result(&failure) {
                                ctx.metrics
                                    .outbound_tls
                                    .with_label_values(&[settings.tls_label, result])
                                    .inc();
                            }
                            tracing::debug!(host = %host.name, %ip, %failure, tls_policy = settings.tls_label, "host failed; trying the next");
                            last_failure = failure;
                        }
                    }
                }
            }
            if session.is_none() {
                break;
            }
        }
        let Some(s) = session.as_mut() else { break };
        let recipients: Vec<String> = pending
            .iter()
            .map(|&i| unit.recipients[i].clone())
            .collect();
        let env = Envelope {
            mail_from: verp.as_deref().unwrap_or(&unit.mail_from),
            recipients: &recipients,
            eight_bit: unit.flags.eight_bit,
            smtputf8: unit.flags.smtputf8,
        };
        let t = s.conn.client.send(&env, data).await;
        s.used = true;
        let host = s.conn.host.clone();
        let tls = s.conn.tls;
        let mut still = Vec::new();
        for (&i, result) in pending.iter().zip(t.results) {
            match result {
                Err(f)
                    if t.host_failure
                        && f.outcome() == Outcome::Temporary
                        && next_host < hosts.len() =>
                {
                    last_failure = f;
                    still.push(i);
                }
                result => {
                    outcomes[i] = Some(RcptOutcome {
                        result,
                        remote: Some(host.clone()),
                        tls,
                    })
                }
            }
        }
        pending = still;
        if t.connection_lost {
            *session = None;
        } else if t.host_failure
            && let Some(s) = session.take()
        {
            s.conn.client.quit().await;
        }
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| RcptOutcome {
                result: Err(last_failure.clone()),
                remote: None,
                tls: false,
            })
        })
        .collect()
}
