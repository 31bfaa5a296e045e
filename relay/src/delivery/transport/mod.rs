//! Transports: what carries one unit's message to its recipients, behind
//! one trait, so the group does not care whether it is SMTP ([`smtp`]) or
//! the local Maildir tree ([`maildir`]). [`pool`] keeps idle SMTP
//! connections for the next units.

pub mod maildir;
pub(crate) mod pool;
pub(crate) mod smtp;

use super::classify::{Failure, Fault};
use super::settle::RcptOutcome;
use crate::queue::DeliveryUnit;

/// Carries a unit's message to its recipients.
pub(crate) trait Transport {
    /// Delivers `data` to `unit`'s recipients: one outcome per recipient,
    /// in the unit's order.
    async fn deliver(&mut self, unit: &DeliveryUnit, data: &[u8]) -> Vec<RcptOutcome>;
}

/// No way to the destination (routing failed): every recipient gets the
/// fault.
pub(crate) struct Unroutable<'a>(pub &'a Fault);

impl Transport for Unroutable<'_> {
    async fn deliver(&mut self, unit: &DeliveryUnit, _data: &[u8]) -> Vec<RcptOutcome> {
        unit.recipients
            .iter()
            .map(|_| RcptOutcome {
                result: Err(Failure::Fault(self.0.clone())),
                remote: None,
                tls: false,
                tls_policy: None,
            })
            .collect()
    }
}
