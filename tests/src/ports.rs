//! Free TCP/UDP ports on 127.0.0.1 for test servers.
//!
//! Tests run in parallel threads of one process, so two harness servers could
//! otherwise be handed the same ephemeral port between "bind :0, read, close"
//! and the real bind. [`free_port`] remembers every port it handed out and
//! never returns one twice in a process.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Error from [`wait_for_port`].
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Nothing accepted connections on the address before the deadline.
    #[error("nothing listening on {addr} after {timeout:?}")]
    Timeout {
        /// The address that was polled.
        addr: SocketAddr,
        /// How long we waited.
        timeout: Duration,
    },
    /// The OS refused to give us any port.
    #[error("no free port: {0}")]
    Bind(#[from] std::io::Error),
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port on 127.0.0.1 that is free for both TCP and UDP right now and was not
/// returned before by this process.
///
/// Panics only if the OS has no free port at all (a broken test machine).
pub fn free_port() -> u16 {
    try_free_port().expect("no free port on 127.0.0.1")
}

/// Like [`free_port`], but returns the error instead of panicking.
pub fn try_free_port() -> Result<u16, PortError> {
    let mut last_err = None;
    for _ in 0..64 {
        let tcp = match TcpListener::bind(("127.0.0.1", 0)) {
            Ok(l) => l,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let port = tcp.local_addr()?.port();
        // DNS needs the same number on UDP too; skip ports where UDP is taken.
        if UdpSocket::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut seen = handed_out().lock().unwrap_or_else(|p| p.into_inner());
        if seen.insert(port) {
            return Ok(port);
        }
    }
    Err(PortError::Bind(last_err.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no unused port after 64 tries",
        )
    })))
}

/// Wait until something accepts TCP connections on `addr`, polling every 10 ms.
///
/// Use it for servers spawned as child processes, which cannot signal
/// readiness any other way; in-process servers are ready once bound.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<(), PortError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PortError::Timeout { addr, timeout });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_repeated() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }

    #[tokio::test]
    async fn wait_for_port_sees_listener_and_times_out_without() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        wait_for_port(addr, Duration::from_secs(5)).await.unwrap();
        drop(listener);
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let err = wait_for_port(addr, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Timeout { .. }));
    }
}
