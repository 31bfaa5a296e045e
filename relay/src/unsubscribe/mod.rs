//! RFC 8058 one-click unsubscribe and `Feedback-ID`: the headers added to
//! a sending domain's mail before it is DKIM-signed (`headers`, so the
//! signature's `h=` covers them), and the `/u/<token>` endpoints that act
//! on the link (`endpoints`).
//!
//! The link names one recipient, so a message to several recipients of
//! such a domain is queued as one copy per recipient (`X.1`, `X.2`, ...,
//! as tracking does), each with its own link. A message that still
//! reaches this with several recipients goes out without the headers
//! (counted as `several_recipients`) rather than let one recipient's click
//! unsubscribe another.

pub mod endpoints;
pub mod headers;

use std::collections::BTreeMap;

use prometheus::{IntCounterVec, Opts, Registry};

use crate::config::{SendingDomain, parse_feedback_id};
use crate::feedback::Feedback;

/// Metrics of the unsubscribe headers and endpoints.
#[derive(Clone)]
pub struct UnsubscribeMetrics {
    /// `petrel_unsubscribe_headers_total{result}`: messages of domains with
    /// `unsubscribe.enabled`, by `added`, `replaced`, `kept` (the app's),
    /// `several_recipients` or `no_key`.
    pub headers: IntCounterVec,
    /// `petrel_unsubscribe_requests_total{result}`: `/u/<token>` requests
    /// by `unsubscribed`, `page`, `bad_token`, `bad_body`, `unavailable`.
    pub requests: IntCounterVec,
}

impl UnsubscribeMetrics {
    /// Creates and registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<UnsubscribeMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["result"])?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(UnsubscribeMetrics {
            headers: counter(
                "petrel_unsubscribe_headers_total",
                "Messages of domains with one-click unsubscribe, by what was done to their headers.",
            )?,
            requests: counter(
                "petrel_unsubscribe_requests_total",
                "Requests to the unsubscribe endpoints /u/<token>, by result.",
            )?,
        })
    }
}

/// The message with the domain's `List-Unsubscribe` and
/// `List-Unsubscribe-Post` (when `unsubscribe.enabled`): the one-click URL
/// `<baseUrl>/u/<token>` and, with a `returnPathDomain`, the mailto
/// address `u+<token>@<returnPathDomain>`.
pub fn add_list_unsubscribe(
    data: Vec<u8>,
    sending: &SendingDomain,
    queue_id: &str,
    recipients: &[String],
    feedback: &Feedback,
    metrics: &UnsubscribeMetrics,
) -> Vec<u8> {
    let Some(settings) = sending.unsubscribe.as_ref().filter(|u| u.enabled) else {
        return data;
    };
    let count = |result: &str| metrics.headers.with_label_values(&[result]).inc();
    let [recipient] = recipients else {
        count("several_recipients");
        tracing::debug!(%queue_id, "several recipients: sent without List-Unsubscribe");
        return data;
    };
    let keys = match feedback.keys() {
        Ok(keys) => keys,
        Err(error) => {
            count("no_key");
            tracing::error!(%error, "feedback key unusable; sending without List-Unsubscribe");
            return data;
        }
    };
    let domain = sending.domain.to_ascii_lowercase();
    let token = keys.unsubscribe_url_token(&domain, recipient, queue_id);
    let mailto = sending.return_path_domain.as_ref().map(|rpd| {
        format!(
            "{}@{}",
            keys.unsubscribe_mailto_local(&domain, recipient),
            rpd.to_ascii_lowercase()
        )
    });
    let value = headers::list_unsubscribe_value(&settings.base_url, &token, mailto.as_deref());
    let (data, added) = headers::add_list_unsubscribe(data, settings.mode, &value);
    count(added.label());
    data
}

/// The message with the domain's `Feedback-ID` (when `feedbackId` is set).
/// The template was validated with the config, so a parse failure here
/// only means a config that skipped validation: sent without the header.
pub fn add_feedback_id(
    data: Vec<u8>,
    sending: &SendingDomain,
    tags: &BTreeMap<String, String>,
) -> Vec<u8> {
    let Some(template) = &sending.feedback_id else {
        return data;
    };
    match parse_feedback_id(template) {
        Ok(parts) => {
            let value =
                headers::feedback_id_value(&parts, &sending.domain.to_ascii_lowercase(), tags);
            headers::set_feedback_id(data, &value)
        }
        Err(error) => {
            tracing::error!(%error, domain = %sending.domain, "feedbackId template unusable; sending without Feedback-ID");
            data
        }
    }
}
