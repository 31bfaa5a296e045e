//! SmtpRelay controller: bound domains -> RelayConfig + key Secret ->
//! Deployment, Service, PDB, HPA or KEDA ScaledObject -> status.

pub mod build;
pub mod feedback;
pub mod keda;
pub mod mounted;
pub mod reconcile;
pub mod rollout;
pub mod secrets;
