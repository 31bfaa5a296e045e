//! Petrel's Kubernetes operator: SmtpRelay, SendingDomain and DkimKey
//! controllers. Each controller is a pipeline: validate (pure) -> build
//! (pure: CR in, objects out) -> apply (server-side apply) -> status.
//!
//! Layers: the controllers (`smtp_relay`, `sending_domain`, `dkim_key`) never
//! import each other. What they share sits below them: [`names`] (every object
//! name and label), [`apply`] (server-side apply, status, delete), [`claims`]
//! (which SendingDomain owns a domain), [`dns_record`] (comparing a record with
//! DNS), [`kubelet`] (mount timing), [`reputation`] (the relay's admin API), [`context`]
//! and [`error`]. Only
//! [`controllers`] (the wiring) sees all three. [`plugin`] is the kubectl
//! plugin's library, a reader of the API beside them.

pub mod apply;
pub mod claims;
pub mod clock;
pub mod context;
pub mod controllers;
pub mod dkim_key;
pub mod dns;
pub mod dns_record;
pub mod domain_feedback;
pub mod error;
pub mod http;
pub mod kubelet;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod plugin;
pub mod reputation;
pub mod sending_domain;
pub mod smtp_relay;
pub mod stores;

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod reconcile_tests;
