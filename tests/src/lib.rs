//! Test harness for Petrel's end-to-end tests: real peers on 127.0.0.1.
//!
//! - [`ports`]: free ports, waiting for a listener.
//! - [`redis`]: a private `redis-server` per test (kill, restart, AOF).
//! - [`tls`]: a throwaway CA, server certificates, rustls configs.
//! - [`dns`]: an in-process DNS server with records set at runtime.
//! - [`smtp_sink`]: an SMTP server that records what it receives and
//!   answers as scripted.
//! - [`webhook_receiver`]: an HTTP server that verifies webhook signatures
//!   and counts distinct events.
//! - [`relay_proc`]: the real `petrel-relay` binary as a child process.
//! - [`https`]: an HTTPS server with one scripted answer (MTA-STS policy hosts).
//! - [`postfix`]: a private Postfix instance as a recipient's MX (STARTTLS,
//!   Maildir, its own log).
//!
//! Every helper binds 127.0.0.1 only, owns its resources (temp dirs, child
//! processes, tasks) and releases them on drop, so a failing test leaks
//! nothing. A typical end-to-end test:
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::net::Ipv4Addr;
//! use std::time::Duration;
//! use petrel_tests::{dns::DnsServer, redis::RedisServer, smtp_sink::SmtpSink};
//!
//! let redis = RedisServer::start().await?;      // queue: redis.url()
//! let sink = SmtpSink::start().await?;          // the recipient's MX
//! let dns = DnsServer::start().await?;          // resolver: dns.addr()
//! dns.add_mx("example.org", 10, "mx.example.org");
//! dns.add_a("mx.example.org", Ipv4Addr::LOCALHOST);
//! // ... start the relay with redis.url(), dns.addr(), MX port sink.port(),
//! // and trust sink.ca() for STARTTLS; send a message to it ...
//! let got = tokio::time::timeout(Duration::from_secs(30), sink.wait_for(1, Duration::from_secs(20))).await?;
//! assert_eq!(got[0].rcpt_to, vec!["user@example.org"]);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod dns;
pub mod dnssec;
pub mod https;
pub mod ports;
pub mod postfix;
pub mod redis;
pub mod relay_proc;
pub mod smtp_sink;
pub mod tls;
pub mod webhook_receiver;
