//! Petrel's SMTP relay, one module per stage of a message's journey:
//!
//! ```text
//! inbound (SMTP session) -> policy -> dkim -> queue -> delivery -> (mx | smarthost | maildir)
//!                                                       \-> retry | DSN + suppression
//! ```
//! `metrics` and `http` observe every stage; `config` loads and reloads the
//! [`petrel_crds::config::RelayConfig`] file.

pub mod admin;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod events;
pub mod feedback;
pub mod http;
pub mod http_client;
pub mod inbound;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod queue_ctl;
pub mod queue_gauges;
pub mod refusal;
pub mod reload;
pub mod reputation;
pub mod runtime;
pub mod server;
pub mod tracking;
pub mod unsubscribe;
