//! The accept loop: connection limits, implicit TLS, the STARTTLS
//! handover, and graceful shutdown.
//!
//! Shutdown (the `shutdown` watch turning true): the loop keeps accepting
//! for the grace period but answers new connections with 421 4.3.2, so
//! clients retry elsewhere instead of hanging; idle sessions get 421 4.3.2
//! at once; a session in a transaction may finish it (its message is
//! queued or refused as usual, then 421). When `limits.shutdownGrace` is
//! over, remaining sessions are dropped: they never got a 250, so nothing
//! they sent is lost, the client keeps it and retries.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::session::{Finished, Session, SessionState};
use super::{InboundContext, InboundError, tls};
use crate::config::{Listener, RelayConfig, TlsMode};
use crate::refusal::Refusal;

/// Open connections, in total and per client IP.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

impl ConnectionLimits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Each update is a couple of integer writes; a poisoned lock still
        // holds consistent counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a connection slot for `ip`, or says why not.
    pub fn try_acquire(&self, ip: IpAddr, max_total: u32, max_per_ip: u32) -> Result<(), Refusal> {
        let mut c = self.lock();
        if c.total >= max_total {
            return Err(Refusal::TooManyConnections);
        }
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(Refusal::TooManyConnectionsFromClient);
        }
        *n += 1;
        c.total += 1;
        Ok(())
    }

    /// Returns a slot taken by [`ConnectionLimits::try_acquire`].
    pub fn release(&self, ip: IpAddr) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

/// Releases the connection slot and the active-session gauge on drop, so
/// every exit path (including a panic or abort) gives them back.
struct ConnectionGuard {
    ctx: Arc<InboundContext>,
    ip: IpAddr,
    listener: String,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.ctx.connections.release(self.ip);
        self.ctx
            .metrics
            .active_sessions
            .with_label_values(&[&self.listener])
            .dec();
    }
}

/// Serves an already bound socket (tests bind port 0 and read the port).
pub async fn serve_on(
    socket: TcpListener,
    listener: Listener,
    ctx: Arc<InboundContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), InboundError> {
    if listener.tls != TlsMode::None && ctx.tls.is_none() {
        return Err(InboundError::NoTlsFiles(listener.name.clone()));
    }
    let listener = Arc::new(listener);
    tracing::info!(name = %listener.name, address = ?socket.local_addr().ok(), tls = %listener.tls, "SMTP listener started");
    let mut sessions = JoinSet::new();
    let session_shutdown = shutdown.clone();
    loop {
        tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok((tcp, peer)) => {
                    sessions.spawn(connection(tcp, peer, listener.clone(), ctx.clone(), session_shutdown.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: back off a
                    // little instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            true = super::stopping(&mut shutdown) => break,
        }
    }

    let grace: Duration = ctx.config.get().limits.shutdown_grace.into();
    tracing::info!(name = %listener.name, sessions = sessions.len(), ?grace, "SMTP listener draining");
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    while !sessions.is_empty() {
        tokio::select! {
            _ = &mut deadline => {
                tracing::warn!(name = %listener.name, sessions = sessions.len(), "grace period over; dropping sessions");
                sessions.abort_all();
                break;
            }
            _ = sessions.join_next() => {}
            accepted = socket.accept() => if let Ok((mut tcp, _)) = accepted {
                ctx.metrics.rejected.with_label_values(&["shutdown"]).inc();
                tokio::spawn(async move {
                    let reply = Refusal::ShuttingDown.render();
                    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(reply.as_bytes())).await;
                });
            },
        }
    }
    while sessions.join_next().await.is_some() {}
    tracing::info!(name = %listener.name, "SMTP listener stopped");
    Ok(())
}

/// The listener as the current config has it. Its socket and TLS mode are
/// fixed at start (see [`crate::config::StartupConfig`]); the rest, AUTH
/// policy included, follows reloads. A listener renamed or removed by a
/// reload keeps the settings it started with until the restart.
pub fn live_listener(config: &RelayConfig, started: Arc<Listener>) -> Arc<Listener> {
    match config.listeners.iter().find(|l| l.name == started.name) {
        Some(live) if *live != *started => Arc::new(Listener {
            address: started.address,
            tls: started.tls,
            ..live.clone()
        }),
        _ => started,
    }
}

/// One client connection, from limits to the last byte.
async fn connection(
    mut tcp: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    ctx: Arc<InboundContext>,
    shutdown: watch::Receiver<bool>,
) {
    let config = ctx.config.get();
    let limits = &config.limits;
    let ip = peer.ip();
    if let Err(reject) = ctx.connections.try_acquire(
        ip,
        limits.max_connections,
        limits.max_connections_per_client,
    ) {
        ctx.metrics
            .rejected
            .with_label_values(&[reject.label()])
            .inc();
        tracing::info!(%peer, reason = reject.label(), "connection refused");
        let timeout: Duration = limits.command_timeout.into();
        let _ = tokio::time::timeout(timeout, tcp.write_all(reject.render().as_bytes())).await;
        return;
    }
    ctx.metrics
        .active_sessions
        .with_label_values(&[&listener.name])
        .inc();
    let _guard = ConnectionGuard {
        ctx: ctx.clone(),
        ip,
        listener: listener.name.clone(),
    };
    let _ = tcp.set_nodelay(true);
    let handshake_timeout: Duration = limits.tls_handshake_timeout.into();
    // AUTH and TLS policy are live: a reloaded `auth` or
    // `allowInsecureAuth` applies from the next connection on.
    let listener = live_listener(&config, listener);
    let Some(acceptor) = ctx.tls.clone().filter(|_| listener.tls != TlsMode::None) else {
        Session::new(
            tcp,
            SessionState::new(peer),
            ctx.clone(),
            listener,
            shutdown,
        )
        .run()
        .await;
        return;
    };
    match listener.tls {
        TlsMode::Implicit => {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let mut state = SessionState::new(peer);
            state.tls = Some(tls::info(&stream));
            Session::new(stream, state, ctx.clone(), listener, shutdown)
                .run()
                .await;
        }
        TlsMode::Starttls | TlsMode::None => {
            let plain = Session::new(
                tcp,
                SessionState::new(peer),
                ctx.clone(),
                listener.clone(),
                shutdown.clone(),
            );
            if let Finished::StartTls { io, state } = plain.run().await {
                let stream =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "STARTTLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let state = SessionState::after_tls(peer, tls::info(&stream), state.errors);
                Session::new(stream, state, ctx.clone(), listener, shutdown)
                    .run()
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits() {
        let limits = ConnectionLimits::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limits.try_acquire(a, 3, 2).is_ok());
        assert!(limits.try_acquire(a, 3, 2).is_ok());
        let per_ip = limits.try_acquire(a, 3, 2).unwrap_err();
        assert_eq!((per_ip.code(), per_ip.esc()), (421, "4.7.0"));
        assert!(per_ip.text().contains("from your address"));
        assert!(limits.try_acquire(b, 3, 2).is_ok());
        assert_eq!(
            limits.try_acquire(b, 3, 2).unwrap_err(),
            Refusal::TooManyConnections
        );
        limits.release(a);
        assert!(limits.try_acquire(b, 3, 2).is_ok());
        // Three open again: the total is full.
        assert_eq!(
            limits.try_acquire("10.0.0.3".parse().unwrap(), 3, 2),
            Err(Refusal::TooManyConnections)
        );
    }
}
