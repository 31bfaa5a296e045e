//! SmtpRelay controller: bound domains -> RelayConfig + key Secret ->
//! Deployment, Service, PDB, HPA -> status.

pub mod build;
pub mod mounted;
pub mod reconcile;
pub mod rollout;
pub mod secrets;
