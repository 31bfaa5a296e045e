//! Load and fault tooling shared by `petrel-bench` and the fault suite
//! (`tests/tests/faults_*.rs`): everything needed to drive real relay
//! processes with real SMTP traffic and see where every message ended up.
//!
//! - [`relay`] - generate a [`RelayConfig`](petrel_crds::config::RelayConfig),
//!   spawn `petrel-relay run --config FILE`, kill it.
//! - [`sink`] - a fast counting SMTP sink that records every message id it
//!   receives (to prove none lost, none duplicated more than allowed) and can
//!   be switched to misbehave (421, drop mid-DATA, stall).
//! - [`client`] - a small SMTP client; [`inject`]: many of them at once.
//! - [`procstat`] - peak RSS and CPU time of a process from `/proc`.
//! - [`postfix`] - Postfix as the baseline relay, for comparison.
//! - [`postfix_tools`] - Postfix's `smtp-source` and `smtp-sink`, an
//!   injector and a counter independent of this project.
//! - [`backlog`] - a deep queue of postponed messages, filled before a run.
//! - [`stats`] - percentiles of latency samples.
//! - [`scenario`] - redis + sink + N relays in one call.
//! - [`verify`] - none lost, none delivered too often, none refused yet sent.

pub mod backlog;
pub mod client;
pub mod inject;
pub mod message;
pub mod postfix;
pub mod postfix_tools;
pub mod procstat;
pub mod relay;
pub mod scenario;
pub mod sink;
pub mod stats;
pub mod verify;
