//! Tests of the TLS harness: real handshakes over TCP on 127.0.0.1.

use std::sync::Arc;
use std::time::Duration;

use petrel_tests::tls::TestCa;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const LIMIT: Duration = Duration::from_secs(30);

/// Accept one TLS connection, echo 4 bytes, and report whether the handshake worked.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> bool {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server);
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Ok(mut tls) = acceptor.accept(tcp).await {
            let mut buf = [0u8; 4];
            if tls.read_exact(&mut buf).await.is_ok() {
                let _ = tls.write_all(&buf).await;
                let _ = tls.shutdown().await;
            }
        }
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let ok = match TlsConnector::from(client).connect(name, tcp).await {
        Ok(mut tls) => {
            tls.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            true
        }
        Err(_) => false,
    };
    server_task.await.unwrap();
    ok
}

#[tokio::test]
async fn harness_tls_client_trusting_ca_accepts_issued_names() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new().unwrap();
        let cert = ca
            .issue_server_cert(&["localhost", "127.0.0.1", "mx.example.org"])
            .unwrap();
        let server = cert.server_config().unwrap();
        let client = ca.client_config().unwrap();
        for name in ["localhost", "127.0.0.1", "mx.example.org"] {
            assert!(
                handshake(server.clone(), client.clone(), name).await,
                "{name}"
            );
        }
        // A name the certificate does not cover is rejected.
        assert!(!handshake(server.clone(), client.clone(), "other.example.org").await);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn harness_tls_other_ca_is_not_trusted() {
    tokio::time::timeout(LIMIT, async {
        let ca = TestCa::new().unwrap();
        let stranger = TestCa::new().unwrap();
        let cert = ca.issue_server_cert(&["localhost"]).unwrap();
        let ok = handshake(
            cert.server_config().unwrap(),
            stranger.client_config().unwrap(),
            "localhost",
        )
        .await;
        assert!(!ok);
    })
    .await
    .expect("test timed out");
}
