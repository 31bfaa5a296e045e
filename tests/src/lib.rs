//! Test harness for Petrel's end-to-end tests: real peers on 127.0.0.1.
//!
//! - [`ports`]: free ports, waiting for a listener.
//! - [`redis`]: a private `redis-server` per test (kill, restart, AOF).
//! - [`tls`]: a throwaway CA, server certificates, rustls configs.
//! - [`dns`]: an in-process DNS server with records set at runtime.
//! - [`smtp_sink`]: an SMTP server that records what it receives and
//!   answers as scripted.

pub mod ports;
pub mod redis;
pub mod tls;
