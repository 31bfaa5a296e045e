//! SendingDomain controller: validate -> DkimKey -> DNS records -> verify -> status.

pub mod reconcile;
pub mod records;
pub mod validate;
