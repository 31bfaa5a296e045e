//! The envelope sender a unit goes out with: the message's own, or for a
//! domain with a `returnPathDomain` the VERP address
//! `b+<token>@<returnPathDomain>` naming the message and its one
//! recipient, so a bounce that comes back later can be attributed.

use crate::config::RelayConfig;
use crate::feedback::Feedback;
use crate::queue::DeliveryUnit;

/// The VERP sender of `unit`, or `None` to send with its own
/// `mail_from`: for the null sender (a DSN), a unit of several recipients
/// (stored before the domain had a return path), a domain without
/// `returnPathDomain`, or when the feedback key is unusable (logged; the
/// mail still goes, only its bounces cannot be traced).
pub fn verp_sender(
    config: &RelayConfig,
    feedback: Option<&Feedback>,
    unit: &DeliveryUnit,
) -> Option<String> {
    if unit.mail_from.is_empty() || unit.flags.is_dsn {
        return None;
    }
    let [recipient] = unit.recipients.as_slice() else {
        return None;
    };
    let return_path = config
        .domain(&unit.sending_domain)?
        .return_path_domain
        .as_deref()?;
    let keys = match feedback?.keys() {
        Ok(keys) => keys,
        Err(error) => {
            tracing::warn!(%error, domain = %unit.sending_domain, "feedback key unusable; sending without a VERP return path");
            return None;
        }
    };
    match keys.verp_sender(
        &unit.message_id,
        &unit.sending_domain,
        recipient,
        return_path,
    ) {
        Ok(sender) => Some(sender),
        Err(error) => {
            tracing::warn!(%error, unit = %unit.id, "no VERP return path for this unit");
            None
        }
    }
}
