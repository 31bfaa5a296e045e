//! The daily run: after a UTC day ends, one pod builds each policy
//! domain's report for it and sends it to the domain's `rua`.
//!
//! Every pod ticks; [`tick`] does the work only when the day is not done
//! yet and this pod holds the shared `tlsrpt:run` slot, so one pod reports
//! while another taking over after a crash only sends what is not marked
//! sent. Time is an argument: tests run a day's report by passing the next
//! day, without waiting for it.

use std::sync::Arc;
use std::time::Duration;

use petrel_crds::config::RelayConfig;
use tokio::sync::watch;

use super::report::{self, Submitter};
use super::rua::{self, Rua};
use super::{send, store};
use crate::delivery::DeliveryContext;
use crate::dkim::DkimKeys;
use crate::http_client::{ClientOptions, HttpClient};
use crate::queue::{Millis, QueueError, now_millis};

/// How often a pod checks whether yesterday's reports are due.
pub const TICK: Duration = Duration::from_secs(600);

/// How long the run slot is held at most (a dead pod's comes back).
const RUN_SLOT_TTL: Duration = Duration::from_secs(900);

/// What one run did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// The day reported.
    pub day: String,
    /// Reports queued as mail (one per address).
    pub mailed: usize,
    /// Reports POSTed.
    pub posted: usize,
    /// Domains with counts but no (usable) `_smtp._tls` record.
    pub without_rua: usize,
    /// Addresses a report could not be sent to.
    pub failed: usize,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The shared state could not be read or written.
    #[error("TLS-RPT state: {0}")]
    State(#[from] QueueError),
    /// The DNS resolver could not be built.
    #[error("TLS-RPT resolver: {0}")]
    Resolver(String),
}

/// Who the reports are from, per config (`delivery.tlsReport`).
pub fn submitter(cfg: &RelayConfig) -> Submitter {
    let report = &cfg.delivery.tls_report;
    Submitter {
        organization: report
            .organization_name
            .clone()
            .unwrap_or_else(|| cfg.hostname.clone()),
        contact: report
            .contact_info
            .clone()
            .unwrap_or_else(|| format!("postmaster@{}", cfg.hostname)),
        hostname: cfg.hostname.clone(),
    }
}

/// The address report mail comes from: `contactInfo` when it is an
/// address, else `postmaster@<hostname>`.
pub fn from_address(cfg: &RelayConfig) -> String {
    match &cfg.delivery.tls_report.contact_info {
        Some(c) if c.contains('@') && !c.contains(':') && !c.contains(char::is_whitespace) => {
            c.clone()
        }
        _ => format!("postmaster@{}", cfg.hostname),
    }
}

/// The UTC day that ended last before `now`.
pub fn previous_day(now: Millis) -> String {
    super::record::day_of(now.saturating_sub(86_400_000))
}

/// Reports the previous day if it is due and no other pod is at it.
/// `None` when there was nothing to do here.
pub async fn tick(
    ctx: &DeliveryContext,
    dkim: &DkimKeys,
    now: Millis,
) -> Result<Option<RunSummary>, RunError> {
    let cfg = ctx.config.get();
    if !cfg.delivery.tls_rpt {
        return Ok(None);
    }
    let day = previous_day(now);
    let done_key = format!("tlsrpt:done:{day}");
    if ctx.state.get_value(&done_key).await?.is_some() {
        return Ok(None);
    }
    let Some(token) = ctx
        .state
        .acquire_slot("tlsrpt:run", 1, RUN_SLOT_TTL)
        .await?
    else {
        return Ok(None);
    };
    let result = run_day(ctx, &cfg, dkim, &day, now).await;
    if result.is_ok() {
        ctx.state.set_value(&done_key, "1", store::RETAIN).await?;
    }
    let _ = ctx.state.release_slot("tlsrpt:run", &token).await;
    result.map(Some)
}

/// Builds and sends every report of `day` not yet sent.
pub async fn run_day(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    dkim: &DkimKeys,
    day: &str,
    now: Millis,
) -> Result<RunSummary, RunError> {
    let counts = store::load(ctx.state.as_ref(), day).await?;
    let mut summary = RunSummary {
        day: day.to_string(),
        ..RunSummary::default()
    };
    if counts.is_empty() {
        return Ok(summary);
    }
    let resolver = ctx
        .resolver(&cfg.delivery.mx.nameservers)
        .map_err(|e| RunError::Resolver(e.to_string()))?;
    let submitter = submitter(cfg);
    let mut http: Option<HttpClient> = None;
    for domain in report::domains(&counts) {
        if store::was_sent(ctx.state.as_ref(), day, &domain).await? {
            continue;
        }
        let Some(report) = report::build(&submitter, day, &domain, &counts) else {
            continue;
        };
        let addresses = match rua::lookup(&resolver, &domain).await {
            Ok(a) => a,
            Err(reason) => {
                // Not marked sent: the next tick tries again.
                tracing::warn!(%domain, reason, "cannot look up _smtp._tls; report postponed");
                summary.failed += 1;
                continue;
            }
        };
        if addresses.is_empty() {
            summary.without_rua += 1;
        }
        for (index, address) in addresses.iter().enumerate() {
            let sent = match address {
                Rua::Mailto(to) => {
                    mail(
                        ctx, cfg, dkim, &submitter, to, day, &domain, index, &report, now,
                    )
                    .await
                }
                Rua::Https(url) => {
                    if http.is_none() {
                        http = Some(https_client(cfg)?);
                    }
                    match http.as_ref() {
                        Some(client) => send::post(client, url, &report).await,
                        None => continue,
                    }
                }
            };
            match (sent, address) {
                (Ok(()), Rua::Mailto(_)) => summary.mailed += 1,
                (Ok(()), Rua::Https(_)) => summary.posted += 1,
                (Err(error), _) => {
                    tracing::warn!(%error, %domain, day, "TLS-RPT report not delivered");
                    summary.failed += 1;
                }
            }
        }
        tracing::info!(event = "tls_report_sent", %domain, day, addresses = addresses.len(), "TLS-RPT report done");
        store::mark_sent(ctx.state.as_ref(), day, &domain).await?;
    }
    Ok(summary)
}

fn https_client(cfg: &RelayConfig) -> Result<HttpClient, RunError> {
    HttpClient::new(ClientOptions {
        ca_file: cfg.delivery.tls.ca_file.clone(),
        ..ClientOptions::default()
    })
    .map_err(|e| RunError::Resolver(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn mail(
    ctx: &DeliveryContext,
    cfg: &RelayConfig,
    dkim: &DkimKeys,
    submitter: &Submitter,
    to: &str,
    day: &str,
    domain: &str,
    index: usize,
    report: &report::Report,
    now: Millis,
) -> Result<(), send::SendError> {
    let from = from_address(cfg);
    let mut data = send::message(submitter, &from, to, day, domain, report, now);
    // Signed when the From domain is one of ours (section 5.3 asks for
    // DKIM); a relay without such a domain sends it unsigned.
    if let Some(sending) = crate::queue::recipient_domain(&from).and_then(|d| cfg.domain(&d)) {
        match dkim.sign(&sending.domain, &sending.dkim, &data) {
            Ok(header) => {
                let mut signed = header.into_bytes();
                signed.extend_from_slice(&data);
                data = signed;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot DKIM-sign the TLS-RPT report; sending it unsigned")
            }
        }
    }
    let message = send::queued(&from, to, day, domain, index, data, now_millis());
    ctx.queue
        .enqueue(message, Vec::new())
        .await
        .map_err(|e| send::SendError::Queue {
            to: to.to_string(),
            reason: e.to_string(),
        })
}

/// Ticks every [`TICK`] until `stop` turns true.
pub async fn run(ctx: Arc<DeliveryContext>, mut stop: watch::Receiver<bool>) {
    let dkim = DkimKeys::new();
    loop {
        match tick(&ctx, &dkim, now_millis()).await {
            Ok(Some(summary)) => tracing::info!(?summary, "TLS-RPT reports of the day sent"),
            Ok(None) => {}
            Err(error) => tracing::warn!(%error, "TLS-RPT run failed; retrying later"),
        }
        tokio::select! {
            _ = crate::inbound::stopping(&mut stop) => return,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_day_and_who_sends() {
        // 2026-12-02T00:00:00Z: the day before has just ended.
        assert_eq!(previous_day(1_796_169_600_000), "2026-12-01");
        assert_eq!(previous_day(1_796_169_600_000 - 1), "2026-11-30");
        let mut cfg = RelayConfig::from_yaml(
            "hostname: relay.test\nlisteners: [{name: smtp, address: \"127.0.0.1:2525\"}]\n\
             queue: {embedded: {path: /nonexistent/q.redb}}\ndomains: []\n",
        )
        .unwrap();
        assert_eq!(from_address(&cfg), "postmaster@relay.test");
        assert_eq!(submitter(&cfg).organization, "relay.test");
        cfg.delivery.tls_report.contact_info = Some("tls@example.test".into());
        cfg.delivery.tls_report.organization_name = Some("Example".into());
        assert_eq!(from_address(&cfg), "tls@example.test");
        assert_eq!(submitter(&cfg).contact, "tls@example.test");
        cfg.delivery.tls_report.contact_info = Some("https://example.test/tls".into());
        assert_eq!(from_address(&cfg), "postmaster@relay.test");
    }
}
