//! RFC 8058 one-click unsubscribe and `Feedback-ID`: the headers added to
//! a sending domain's mail before it is DKIM-signed (`headers`), and the
//! `/u/<token>` endpoints that act on the link (`endpoints`).

pub mod headers;

use std::collections::BTreeMap;

use crate::config::{SendingDomain, parse_feedback_id};

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
