//! SendingDomain controller: validate -> DkimKey -> DNS records -> verify -> status (-> DNSEndpoint).

pub mod dns_endpoint;
pub mod reconcile;
pub mod records;
pub mod reputation;
pub mod validate;
