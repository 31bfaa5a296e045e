//! The feedback loop: what comes back after delivery.
//!
//! ```text
//! delivery: MAIL FROM:<b+<token>@<returnPathDomain>>  (token: queue id + HMAC)
//! feedback listener (role: feedback) -> report (DSN | ARF | mailto unsubscribe)
//!     -> attribute (VERP token, else tokens in the returned headers)
//!     -> apply: suppression entry + event, atomically, then 250
//! HTTP: POST /u/<token> -> apply::unsubscribe
//! ```
//! - [`key`]: the feedback key file and the keys derived from it.
//! - [`token`]: VERP and unsubscribe tokens.
//! - [`apply`]: suppression and events for unsubscribes, bounces and
//!   complaints.

pub mod apply;
pub mod key;
pub mod token;

pub use apply::Via;
pub use key::{Feedback, FeedbackKeys};
pub use token::{UnsubscribeClaims, VerpClaims};
