//! The HTTP listener over TLS (`http.tls: true`): the relay's certificate
//! (`tls.certFile`/`tls.keyFile`, re-read when they change, like the SMTP
//! listeners), handshakes run off the accept loop so a slow or silent
//! client cannot hold up the others, each within
//! `limits.tlsHandshakeTimeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::server::TlsStream;

use crate::inbound::tls::Tls;

/// Handshakes in progress at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// Accepts TCP connections and hands on those whose TLS handshake
/// finished in time.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Serves TLS on `listener` with `tls`'s current certificate;
    /// `handshake_timeout` is read for every connection (it is live config).
    pub fn new(
        listener: TcpListener,
        tls: Tls,
        handshake_timeout: impl Fn() -> Duration + Send + Sync + 'static,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let task = tokio::spawn(accept_loop(listener, tls, Arc::new(handshake_timeout), tx));
        Ok(TlsListener { ready, local, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Tls,
    handshake_timeout: Arc<dyn Fn() -> Duration + Send + Sync>,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors and the like: pause rather than spin.
                tracing::warn!(%error, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let tls = tls.clone();
        let tx = tx.clone();
        let timeout = handshake_timeout();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, %peer, "HTTP TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "HTTP TLS handshake timed out"),
            }
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The peer of a TLS connection, as axum's connect info. Handlers read
/// `ConnectInfo<SocketAddr>`; [`mark_tls`] puts it there.
#[derive(Clone, Copy, Debug)]
pub struct TlsPeer(pub SocketAddr);

impl Connected<IncomingStream<'_, TlsListener>> for TlsPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        TlsPeer(*stream.remote_addr())
    }
}

/// Gives every request on the TLS listener the peer address handlers
/// expect and the [`super::OverTls`] mark (Basic credentials are then
/// accepted without `http.allowInsecureAuth`).
pub async fn mark_tls(mut request: axum::extract::Request) -> axum::extract::Request {
    if let Some(ConnectInfo(TlsPeer(peer))) =
        request.extensions().get::<ConnectInfo<TlsPeer>>().copied()
    {
        request.extensions_mut().insert(ConnectInfo(peer));
    }
    request.extensions_mut().insert(super::OverTls);
    request
}
