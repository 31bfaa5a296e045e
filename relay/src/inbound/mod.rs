//! Inbound SMTP: from a client's TCP connection to a signed message handed
//! to [`Queue::enqueue`].
//!
//! ```text
//! listener (limits, TLS) -> session (state machine) -> hello | auth | envelope | data
//!                                                        policy ^      dkim + queue ^
//! ```
//! - [`listener`]: accept loop, connection limits, implicit TLS and
//!   STARTTLS handover, graceful shutdown.
//! - [`session`]: the sans-IO state machine; one file per verb group
//!   ([`hello`], [`login`], [`envelope`], [`data`]).
//! - [`auth`]: users file and SASL; [`tls`]: acceptor with reload;
//!   [`headers`]: Received/Message-ID/Date; [`reply`]: refusals as values.
//! - `accept`: headers, DKIM, durable enqueue, shared by SMTP and by
//!   [`submit::InboundSubmit`], the HTTP send API's [`crate::http::Submit`].
//!
//! Wiring (in `petrel-relay run`, inside the Tokio runtime):
//! ```ignore
//! let backend = queue::open(&config.get().queue).await?;
//! let ctx = Arc::new(InboundContext::new(config.clone(), backend.queue, backend.state, metrics)?);
//! let (stop, shutdown) = tokio::sync::watch::channel(false);
//! // Bind every listener first, so a port in use fails the start.
//! let socket = tokio::net::TcpListener::bind(listener.address).await?;
//! let smtp = tokio::spawn(inbound::serve_on(socket, listener, ctx.clone(), shutdown));
//! let http = HttpState::new(registry, health, queue)?.with_send_api(Arc::new(InboundSubmit::new(ctx.clone())), limits);
//! // on SIGTERM: stop.send(true), then `smtp.await` (sessions drain for
//! // limits.shutdownGrace, then it returns).
//! ```

use std::sync::Arc;

use crate::config::RelayConfig;
use crate::dkim::DkimKeys;
use crate::metrics::RelayMetrics;
use crate::queue::{Queue, SharedState};
use crate::refusal::Refusal;
use crate::reload::Reloading;

mod accept;
pub mod auth;
pub mod credentials;
mod data;
pub mod envelope;
mod feedback;
pub mod from_header;
pub mod headers;
mod hello;
pub mod listener;
pub mod login;
pub mod rejected;
pub mod reply;
pub mod session;
pub mod submit;
pub mod tls;

pub use listener::{ConnectionLimits, serve_on};
pub use session::{Finished, Session, SessionState, State};
pub use submit::InboundSubmit;

/// Why the inbound side could not start.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// TLS certificate or key unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Users file unusable.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The tracking key file is unusable.
    #[error(transparent)]
    Tracking(#[from] crate::tracking::TokenError),
    /// The feedback key file is unusable.
    #[error("feedback: {0}")]
    FeedbackKey(crate::tracking::TokenError),
    /// A listener needs TLS but the config has no `tls` files.
    #[error("listener {0} uses TLS but no tls certFile/keyFile is configured")]
    NoTlsFiles(String),
    /// The listener socket failed.
    #[error("listener {name}: {source}")]
    Io {
        /// Listener name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Everything sessions share: config, queue, keys, users, TLS, metrics.
pub struct InboundContext {
    /// The relay config, re-read when its file changes.
    pub config: Reloading<RelayConfig>,
    /// Where accepted messages go.
    pub queue: Arc<dyn Queue>,
    /// Suppression list and shared counters (AUTH throttle, quotas).
    pub state: Arc<dyn SharedState>,
    /// Metrics.
    pub metrics: RelayMetrics,
    /// TLS acceptor, when any listener uses TLS.
    pub tls: Option<tls::Tls>,
    /// DKIM signing keys.
    pub dkim: DkimKeys,
    /// AUTH users, when a users file is configured.
    pub users: Option<Reloading<auth::Users>>,
    /// Open connections, total and per client.
    pub connections: ConnectionLimits,
    /// Engagement tracking: the token key, shared with the HTTP endpoints.
    pub tracking: Arc<crate::tracking::Tracking>,
    /// The feedback keys (VERP and unsubscribe tokens), shared with
    /// delivery and the HTTP unsubscribe endpoints.
    pub feedback: Arc<crate::feedback::Feedback>,
    /// Password checks running at once (see [`InboundContext::auth_permit`]).
    auth_slots: tokio::sync::Semaphore,
    /// Where `rejected` events go (see [`InboundContext::with_events`]);
    /// `accepted` ones are written by the queue with the message.
    pub events: Option<Arc<dyn crate::events::EventLog>>,
    /// The name events carry in `relay`.
    pub relay: String,
    /// The reputation guard: whether a sending domain is paused.
    pub reputation: crate::reputation::Guard,
}

impl InboundContext {
    /// Loads TLS files and the users file named in the config (errors
    /// refuse to start) and checks every DKIM key (errors are logged: such
    /// a domain gets 451 until its key is fixed, the others keep working).
    /// Must run inside a Tokio runtime: the certificate and users file
    /// watchers are tasks. Their paths are taken from the config at start;
    /// changing `tls` or `authUsersFile` paths needs a restart (their
    /// contents are re-read in place).
    pub fn new(
        config: Reloading<RelayConfig>,
        queue: Arc<dyn Queue>,
        state: Arc<dyn SharedState>,
        metrics: RelayMetrics,
    ) -> Result<InboundContext, InboundError> {
        let current = config.get();
        let tls = match (
            &current.tls,
            current
                .listeners
                .iter()
                .find(|l| l.tls != crate::config::TlsMode::None),
        ) {
            (Some(files), _) => Some(tls::Tls::watch(files)?),
            (None, Some(l)) => return Err(InboundError::NoTlsFiles(l.name.clone())),
            (None, None) => None,
        };
        let users = match &current.auth_users_file {
            Some(path) => Some(auth::Users::watch(path)?),
            None => None,
        };
        let dkim = DkimKeys::new();
        for domain in &current.domains {
            if let Err(error) = dkim.preload(&domain.domain, &domain.dkim) {
                tracing::error!(%error, "DKIM key unusable; mail from this domain gets 451 until it is fixed");
            }
        }
        let reputation = crate::reputation::Guard::new(config.clone(), state.clone());
        Ok(InboundContext {
            config,
            queue,
            state,
            metrics,
            tls,
            dkim,
            users,
            connections: ConnectionLimits::default(),
            tracking: Arc::new(crate::tracking::Tracking::new(&current)?),
            feedback: Arc::new(
                crate::feedback::Feedback::new(&current).map_err(InboundError::FeedbackKey)?,
            ),
            auth_slots: tokio::sync::Semaphore::new(auth_slots()),
            events: None,
            relay: crate::events::relay_name(&current.hostname),
            reputation,
        })
    }

    /// Records refusals as `rejected` events in `log` (the backend's
    /// outbox); without it they are only counted and logged.
    pub fn with_events(mut self, log: Arc<dyn crate::events::EventLog>) -> InboundContext {
        self.events = Some(log);
        self
    }

    /// A turn to check a password, waiting at most `wait`. Each argon2
    /// verification holds ~19 MiB and a core for tens of milliseconds, so
    /// without a bound a burst of AUTH attempts (one per allowed
    /// connection) would exhaust memory on the blocking pool. The caller
    /// also reads the failure counter inside its turn, so concurrent
    /// guesses from one client cannot all pass the throttle check before
    /// any failure is counted. Busy past `wait`: 454 4.7.0 (RFC 4954).
    pub(crate) async fn auth_permit(
        &self,
        wait: std::time::Duration,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, Refusal> {
        match tokio::time::timeout(wait, self.auth_slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(Refusal::AuthBusy),
        }
    }
}

/// Concurrent password checks: one per core, at least two.
fn auth_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
}

#[cfg(test)]
mod tests;

/// Resolves to true once `shutdown` turns true, false if its sender is
/// gone (then there is nothing to wait for). The watch guard is dropped
/// here, so callers' futures stay `Send`.
pub(crate) async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    shutdown.wait_for(|v| *v).await.is_ok()
}
