//! The outbound SMTP client: one connection to one server, any number of
//! transactions over it.
//!
//! [`SmtpClient`] is generic over the stream so tests drive it over an
//! in-memory duplex; [`connect`] does TCP, the greeting, EHLO, STARTTLS
//! (per the TLS policy) and AUTH, and hands back a ready client. Replies
//! are parsed with smtp-proto; every read and write runs under the RFC 5321
//! timeout of its stage, and every buffer is bounded.
//!
//! - [`wire`]: reply framing and parsing, command writes, dot-stuffing.
//! - [`transaction`]: EHLO/AUTH/MAIL/RCPT/DATA/RSET/QUIT and per-recipient
//!   results.
//! - [`connect`](mod@connect): TCP, STARTTLS or implicit TLS, AUTH.

pub mod connect;
pub mod transaction;
pub mod wire;

pub use connect::{ConnectSettings, Connection, Stream, TlsPolicy, connect};
pub use transaction::{Capabilities, Envelope, RcptResult, Transaction};
pub use wire::{SmtpClient, Timeouts, dot_stuff, parse_reply};
