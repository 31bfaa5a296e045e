//! The feedback loop: what comes back after delivery.
//!
//! ```text
//! delivery: MAIL FROM:<b+<token>@<returnPathDomain>>  (token: queue id + HMAC)
//! feedback listener (role: feedback) -> report (DSN | ARF | mailto unsubscribe)
//!     -> attribute (VERP token, else tokens in the returned headers,
//!        else the stored record of the returned Message-ID/queue id)
//!     -> apply: suppression entry + event, atomically, then 250
//! HTTP: POST /u/<token> -> apply::unsubscribe
//! ```
//! - [`key`]: the feedback key file and the keys derived from it.
//! - [`token`]: VERP and unsubscribe tokens.
//! - [`report`]: RFC 3464 DSN and RFC 5965 ARF parsing (mail-parser for
//!   MIME); [`attribute`]: which message and recipient a report is about.
//! - [`receive`]: one mail, planned (pure) then recorded (atomic).
//! - [`sent`]: what is remembered of each sent message for attribution.
//! - [`apply`]: the unsubscribe shared with the HTTP endpoints.

pub mod apply;
pub mod attribute;
pub mod key;
pub mod receive;
pub mod report;
pub mod sent;
pub mod token;

pub use apply::Via;
pub use key::{Feedback, FeedbackKeys};
pub use token::{UnsubscribeClaims, VerpClaims};
