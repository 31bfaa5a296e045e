//! TLS-RPT (RFC 8460): what outbound TLS looked like to each policy
//! domain, counted by every pod and reported once a day.
//!
//! ```text
//! delivery attempt --record--> shared counters (SharedState, per UTC day)
//! daily (one pod, after the day ends)
//!   -> store::load -> report::build (pure JSON) -> rua (_smtp._tls TXT)
//!   -> send: gzip; mailto: through our own queue, https: POST
//! ```
//! `record`, `report` and `rua` are pure; `store`, `send` and `daily` are
//! the thin I/O around them.

pub mod daily;
pub mod probe;
pub mod record;
pub mod report;
pub mod rua;
pub mod send;
pub mod store;

pub use record::{Entry, FailureDetail, Outcome, PolicyDesc, PolicyType};

use std::sync::Arc;

/// What a connection reports to TLS-RPT: the policy it runs under and,
/// when its certificate is not enforced (MTA-STS `testing`), the probe
/// that says whether it would have passed.
#[derive(Clone, Debug)]
pub struct TlsReport {
    /// The policy.
    pub policy: Arc<PolicyDesc>,
    /// Set in `testing` mode.
    pub probe: Option<Arc<probe::Probe>>,
}
