//! The SMTP transport: one unit over a pooled or new connection, trying
//! the destination's hosts (MX or smarthost) in order after host failures.

use std::net::SocketAddr;

use super::super::DeliveryContext;
use super::super::classify::{Failure, Fault, Outcome};
use super::super::dane::{self, DanePlan};
use super::super::mx::MxHost;
use super::super::settle::RcptOutcome;
use super::super::smtp_client::{self, ConnectSettings, Envelope};
use super::super::tls_policy;
use super::super::tls_result::TlsResult;
use super::super::tls_rpt::{FailureDetail, Outcome as ReportOutcome, TlsReport};
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
    /// DANE per host (overrides `settings` where TLSA records apply).
    pub dane: &'a DanePlan,
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
            self.dane,
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
    dane: &DanePlan,
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
    // The policy of the last host tried, for outcomes without a session.
    let mut last_policy = settings.tls_label;
    while !pending.is_empty() {
        // Reuse the open connection (its client sends RSET first when the
        // last transaction may have left state behind or it sat in the
        // pool), or open a new one.
        if session.is_none() {
            while session.is_none() && next_host < hosts.len() {
                let host = &hosts[next_host];
                next_host += 1;
                let settings = match dane::settings_for(
                    dane,
                    &host.name,
                    settings,
                    &ctx.unverified_tls,
                ) {
                    Ok(s) => s,
                    Err(fault) => {
                        // Bogus or failed TLSA lookup: not this host.
                        let failure = Failure::Fault(fault);
                        if let Some(result) = tls_policy::failure_result(&failure) {
                            ctx.metrics
                                .outbound_tls
                                .with_label_values(&[dane::LABEL, result])
                                .inc();
                        }
                        tracing::debug!(host = %host.name, %failure, tls_policy = dane::LABEL, "host unusable; trying the next");
                        last_policy = dane::LABEL;
                        last_failure = failure;
                        continue;
                    }
                };
                let settings = settings.as_ref();
                last_policy = settings.tls_label;
                for ip in &host.addrs {
                    if let Some(probe) = settings.tls_report.as_ref().and_then(|r| r.probe.as_ref())
                    {
                        probe.take();
                    }
                    match smtp_client::connect(SocketAddr::new(*ip, port), &host.name, settings)
                        .await
                    {
                        Ok(conn) => {
                            if let Some(report) = &settings.tls_report {
                                let outcome = session_outcome(report, conn.tls, &host.name, *ip);
                                tls_policy::count(ctx, domain, &report.policy, outcome).await;
                            }
                            let tls = if conn.tls { "tls" } else { "plaintext" };
                            ctx.metrics
                                .outbound_sessions
                                .with_label_values(&[destination_group(domain), tls])
                                .inc();
                            ctx.metrics
                                .outbound_tls
                                .with_label_values(&[settings.tls_label, tls])
                                .inc();
                            *session = Some(Session {
                                conn,
                                tls_policy: settings.tls_label,
                            });
                            break;
                        }
                        Err(failure) => {
                            if let Some(result) = tls_policy::failure_result(&failure) {
                                ctx.metrics
                                    .outbound_tls
                                    .with_label_values(&[settings.tls_label, result])
                                    .inc();
                                if let Some(report) = &settings.tls_report {
                                    let outcome = failed(result, &host.name, *ip);
                                    tls_policy::count(ctx, domain, &report.policy, outcome).await;
                                }
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
            require_tls: settings.require_tls,
        };
        // Back to back over one connection: after a transaction that ended
        // cleanly the next MAIL goes without an RSET.
        let t = s.conn.client.send(&env, data).await;
        let host = s.conn.host.clone();
        let tls = s.conn.tls;
        let tls_policy = s.tls_policy;
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
                        tls_policy: Some(tls_policy),
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
    if settings.require_tls && tls_policy::failure_result(&last_failure).is_some() {
        // RFC 8689 section 4.2.1: no MX host gave verified TLS; the
        // message is returned rather than retried (section 4.2.2).
        last_failure = Failure::Fault(Fault::Unsendable {
            status: "5.7.30",
            reason: format!(
                "REQUIRETLS support required: no MX host of {domain} met it ({last_failure})"
            ),
        });
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| RcptOutcome {
                result: Err(last_failure.clone()),
                remote: None,
                tls: false,
                tls_policy: Some(last_policy),
            })
        })
        .collect()
}

/// A TLS-RPT failure of `result` at `host` (`ip`).
fn failed(result: &str, host: &str, ip: std::net::IpAddr) -> ReportOutcome {
    ReportOutcome::Failure(FailureDetail {
        result_type: result.to_string(),
        receiving_mx_hostname: Some(host.to_string()),
        receiving_ip: Some(ip.to_string()),
        sending_mta_ip: None,
    })
}

/// How an established session counts for TLS-RPT: plain text is
/// `starttls-not-supported`; under a probe (MTA-STS `testing`) the
/// certificate's verdict decides; otherwise TLS was as the policy asks.
fn session_outcome(
    report: &TlsReport,
    tls: bool,
    host: &str,
    ip: std::net::IpAddr,
) -> ReportOutcome {
    if !tls {
        return failed(TlsResult::StarttlsNotSupported.as_str(), host, ip);
    }
    match report.probe.as_ref().and_then(|p| p.take()) {
        Some(Err(result)) => failed(result.as_str(), host, ip),
        Some(Ok(())) | None => ReportOutcome::Success,
    }
}
