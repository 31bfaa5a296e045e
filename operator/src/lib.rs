//! Petrel's Kubernetes operator: SmtpRelay, SendingDomain and DkimKey
//! controllers. Each controller is a pipeline: validate (pure) -> build
//! (pure: CR in, objects out) -> apply (server-side apply) -> status.

pub mod clock;
pub mod context;
pub mod controllers;
pub mod dkim_key;
pub mod dns;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod sending_domain;
pub mod smtp_relay;

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod reconcile_tests;
