//! Delivery: from a due unit in the queue to the recipient's server, or
//! back to the sender as a bounce.
//!
//! ```text
//! scheduler (lease loop) -> dispatch (per destination: up to N groups)
//!   -> group (per connection: slot, rate, route)
//!   -> route + mx (where) -> transport: smtp (smtp_client: connect/TLS,
//!      transaction, wire) | maildir -> classify (what it means)
//!   -> settle::plan (pure) -> record (one queue operation):
//!      complete | retry (when again) | dsn (bounce) + suppression
//! ```
//! `leases` keeps unit leases and connection slots renewed while a
//! delivery runs; `transport::pool` keeps idle connections.
//! The Maildir transport replaces mx + SMTP for the local quick start; a
//! smarthost replaces mx with one fixed server. `limits` paces deliveries through the
//! queue backend's shared state, so all pods together respect them, and
//! `suppression` holds the library side of `petrel-relay suppression`.
//!
//! Start it with [`DeliveryContext::new`] and [`run`].

pub mod classify;
pub mod dane;
mod dispatch;
pub mod dsn;
mod group;
mod leases;
pub mod limits;
pub mod mta_sts;
pub mod mx;
mod pacing;
mod record;
pub mod retry;
pub mod return_path;
mod route;
mod scheduler;
pub(crate) mod settle;
pub mod smtp_client;
pub mod suppression;
pub mod tls;
pub mod tls_policy;
pub mod tls_result;
pub mod tls_rpt;
pub mod transport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hickory_resolver::TokioResolver;
use petrel_crds::config::{OutboundTls, RelayConfig};

use crate::metrics::RelayMetrics;
use crate::queue::{Backend, Millis, Queue, SharedState};
use crate::reload::Reloading;

pub use scheduler::run;

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The outbound TLS config could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
    /// The DNS resolver could not be built.
    #[error(transparent)]
    Resolver(#[from] mx::MxError),
}

/// Verified rustls configs: for SMTP to MX hosts, for HTTPS policy fetches.
type VerifiedTls = (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>);

/// A validating resolver with the nameservers and anchor file it uses.
type DaneResolver = (Vec<SocketAddr>, Option<PathBuf>, TokioResolver);

/// Everything the delivery workers share.
pub struct DeliveryContext {
    /// The relay config, re-read on change.
    pub config: Reloading<RelayConfig>,
    /// The message queue.
    pub queue: Arc<dyn Queue>,
    /// Suppression list, counters, slots.
    pub state: Arc<dyn SharedState>,
    /// Queue inspection (held destinations, for the gauges).
    pub control: Arc<dyn crate::queue::QueueControl>,
    /// Metrics registry handles.
    pub metrics: RelayMetrics,
    /// The name events carry in `relay` (see [`crate::events::relay_name`]).
    pub relay: String,
    /// The reputation guard: units of a paused sending domain are held.
    pub reputation: crate::reputation::Guard,
    /// TLS config for MX delivery (no certificate verification; see [`tls`]).
    unverified_tls: Arc<rustls::ClientConfig>,
    /// The resolver and the nameservers it was built for, rebuilt when the
    /// config names other nameservers.
    resolver: Mutex<Option<(Vec<SocketAddr>, TokioResolver)>>,
    /// DANE's DNSSEC-validating resolver and what it was built from
    /// (nameservers, `delivery.mx.trustAnchorFile`).
    dane_resolver: Mutex<Option<DaneResolver>>,
    /// Whether that resolver's nameservers serve DNSSEC, and when that was
    /// last checked (see [`dane::lookup::dnssec_available`]).
    dnssec_probe: Mutex<Option<(std::time::Instant, bool)>>,
    /// TLS config for a smarthost (verified against the system roots),
    /// built on first use: reading the root bundle per connection is slow.
    verified_tls: Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// TLS config for verified MX delivery (Mozilla roots plus the
    /// `delivery.tls.caFile` it was built from), rebuilt when the file
    /// setting changes.
    mx_verified_tls: Mutex<Option<(Option<PathBuf>, VerifiedTls)>>,
    /// Idle outbound connections, reused by later units.
    pool: transport::pool::Pool,
    /// The feedback keys for VERP return paths (see [`return_path`]).
    pub feedback: Option<Arc<crate::feedback::Feedback>>,
    /// Notified when this pod enqueued a message: the scheduler, idle,
    /// leases at once (see [`DeliveryContext::with_wake`]).
    pub wake: Arc<tokio::sync::Notify>,
}

impl DeliveryContext {
    /// A context over an opened queue backend.
    pub fn new(
        config: Reloading<RelayConfig>,
        backend: Backend,
        metrics: RelayMetrics,
    ) -> Result<DeliveryContext, DeliveryError> {
        let relay = crate::events::relay_name(&config.get().hostname);
        Ok(DeliveryContext {
            relay,
            reputation: crate::reputation::Guard::new(config.clone(), backend.state.clone()),
            config,
            queue: backend.queue,
            state: backend.state,
            control: backend.control,
            metrics,
            unverified_tls: tls::unverified()?,
            resolver: Mutex::new(None),
            dane_resolver: Mutex::new(None),
            dnssec_probe: Mutex::new(None),
            verified_tls: Mutex::new(None),
            mx_verified_tls: Mutex::new(None),
            pool: transport::pool::Pool::default(),
            feedback: None,
            wake: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Sends with VERP return paths sealed by `feedback`'s keys (the same
    /// keys the feedback listener opens them with).
    pub fn with_feedback(mut self, feedback: Arc<crate::feedback::Feedback>) -> DeliveryContext {
        self.feedback = Some(feedback);
        self
    }

    /// Wakes the idle scheduler when `wake` is notified (inbound's
    /// [`crate::inbound::InboundContext::enqueued`]): a message accepted
    /// here starts delivery without waiting out the idle poll. Other pods'
    /// messages are still found by polling.
    pub fn with_wake(mut self, wake: Arc<tokio::sync::Notify>) -> DeliveryContext {
        self.wake = wake;
        self
    }

    /// Shares the process's reputation guard (and so its recent answers,
    /// see [`crate::reputation::Pauses`]) instead of a guard of its own.
    pub fn with_reputation(mut self, guard: crate::reputation::Guard) -> DeliveryContext {
        self.reputation = guard;
        self
    }

    /// The smarthost TLS config (see [`tls::verified`]).
    fn verified_tls(&self) -> Result<Arc<rustls::ClientConfig>, tls::TlsConfigError> {
        let mut guard = self.verified_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(config) = guard.as_ref() {
            return Ok(config.clone());
        }
        let config = tls::verified(None)?;
        *guard = Some(config.clone());
        Ok(config)
    }

    /// The rustls config for MX delivery in `mode`: certificates checked
    /// only in `verified` mode.
    fn mx_tls_config(
        &self,
        mode: OutboundTls,
        ca_file: Option<&Path>,
    ) -> Result<Arc<rustls::ClientConfig>, classify::Fault> {
        match mode {
            OutboundTls::Opportunistic | OutboundTls::Encrypted => Ok(self.unverified_tls.clone()),
            OutboundTls::Verified => Ok(self.verified_configs(ca_file)?.0),
        }
    }

    /// The verified MX and HTTPS (MTA-STS) configs for `ca_file`, built on
    /// first use and when the setting changes.
    fn verified_configs(&self, ca_file: Option<&Path>) -> Result<VerifiedTls, classify::Fault> {
        let mut guard = self
            .mx_verified_tls
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((file, configs)) = guard.as_ref()
            && file.as_deref() == ca_file
        {
            return Ok(configs.clone());
        }
        let bad =
            |e: tls::TlsConfigError| classify::Fault::Tls(format!("delivery.tls.caFile: {e}"));
        let configs = (
            tls::verified_mx(ca_file).map_err(bad)?,
            tls::verified_https(ca_file).map_err(bad)?,
        );
        *guard = Some((ca_file.map(Path::to_path_buf), configs.clone()));
        Ok(configs)
    }

    /// The resolver for `nameservers`, built on first use and after a
    /// config change (resolvers cache answers, so one is kept).
    fn resolver(&self, nameservers: &[SocketAddr]) -> Result<TokioResolver, mx::MxError> {
        let mut guard = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((servers, resolver)) = guard.as_ref()
            && servers.as_slice() == nameservers
        {
            return Ok(resolver.clone());
        }
        let resolver = mx::build_resolver(nameservers)?;
        *guard = Some((nameservers.to_vec(), resolver.clone()));
        Ok(resolver)
    }

    /// DANE's validating resolver, built on first use and when the
    /// nameservers or the trust anchor file change.
    fn dane_resolver(&self, cfg: &RelayConfig) -> Result<TokioResolver, classify::Fault> {
        let mx = &cfg.delivery.mx;
        let anchor_file = mx.trust_anchor_file.as_deref();
        let mut guard = self.dane_resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((servers, file, resolver)) = guard.as_ref()
            && servers.as_slice() == mx.nameservers.as_slice()
            && file.as_deref() == anchor_file
        {
            return Ok(resolver.clone());
        }
        let anchors = dane::anchors::load(anchor_file).map_err(|e| classify::Fault::Dane {
            result: "dnssec-invalid",
            detail: e.to_string(),
        })?;
        let resolver = mx::build_validating_resolver(&mx.nameservers, Arc::new(anchors))
            .map_err(|e| classify::Fault::DnsTemporary(e.to_string()))?;
        *self.dnssec_probe.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *guard = Some((
            mx.nameservers.clone(),
            anchor_file.map(Path::to_path_buf),
            resolver.clone(),
        ));
        Ok(resolver)
    }

    /// Whether DANE's resolver can validate, checked again after an hour
    /// (a minute when it could not, so a DNS hiccup at start does not turn
    /// DANE off for long).
    async fn dnssec_available(&self, resolver: &TokioResolver) -> bool {
        let fresh = |(at, ok): (std::time::Instant, bool)| {
            let ttl = if ok { DNSSEC_RECHECK } else { DNSSEC_RETRY };
            (at.elapsed() < ttl).then_some(ok)
        };
        let cached = *self.dnssec_probe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ok) = cached.and_then(fresh) {
            return ok;
        }
        let ok = dane::lookup::dnssec_available(resolver).await;
        // Once per change, not on every recheck.
        if !ok && cached.map(|(_, was)| was) != Some(false) {
            tracing::warn!(
                "DANE inactive: the nameservers do not serve validatable DNSSEC (the root DNSKEY does not validate)"
            );
        }
        *self.dnssec_probe.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), ok));
        ok
    }
}

/// `d` in queue milliseconds, saturating.
pub(crate) fn millis(d: std::time::Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long a working DNSSEC check holds.
const DNSSEC_RECHECK: std::time::Duration = std::time::Duration::from_secs(3600);
/// How soon a failed DNSSEC check is tried again.
const DNSSEC_RETRY: std::time::Duration = std::time::Duration::from_secs(60);
