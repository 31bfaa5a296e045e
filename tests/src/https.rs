//! A tiny HTTPS server answering every request with one scripted response:
//! an MTA-STS policy host (`mta-sts.<domain>`) for delivery tests.
//!
//! HTTP/1.1 written by hand (one request per connection, `Connection:
//! close`), over real TLS with a certificate from a [`TestCa`]. It records
//! each request's path and Host header.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use petrel_tests::{https::HttpsServer, tls::TestCa};
//! let ca = TestCa::new()?;
//! let cert = ca.issue_server_cert(&["mta-sts.dest.test"])?;
//! let server = HttpsServer::start(&cert).await?;
//! server.respond(200, "text/plain", "version: STSv1\nmode: enforce\nmx: mx.dest.test\nmax_age: 86400\n");
//! // point mta-sts.dest.test at 127.0.0.1 and the relay at server.port()
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::tls::{ServerCert, TlsError};

/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request read.
const MAX_REQUEST: usize = 64 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// Binding 127.0.0.1 failed.
    #[error("binding the HTTPS server: {0}")]
    Bind(std::io::Error),
    /// The certificate could not be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The scripted response.
#[derive(Clone, Debug)]
struct Response {
    status: u16,
    content_type: String,
    body: Vec<u8>,
    extra_headers: Vec<(String, String)>,
}

#[derive(Default)]
struct Shared {
    response: Mutex<Option<Response>>,
    requests: Mutex<Vec<(String, String)>>,
    posts: Mutex<Vec<Posted>>,
}

/// A request that carried a body (POST): a TLS-RPT report, say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Posted {
    /// Request path.
    pub path: String,
    /// Its Content-Type header.
    pub content_type: String,
    /// The body (as long as Content-Length said, within the request limit).
    pub body: Vec<u8>,
}

/// A running HTTPS server; stops when dropped.
pub struct HttpsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    /// Binds 127.0.0.1 on a free port, presenting `cert`. Answers 404
    /// until [`HttpsServer::respond`] is called.
    pub async fn start(cert: &ServerCert) -> Result<Self, HttpsError> {
        Self::start_on(cert, 0).await
    }

    /// As [`HttpsServer::start`] on 127.0.0.1:`port` (443 for a policy
    /// host the relay reaches on its default `mtaStsPort`; needs root).
    pub async fn start_on(cert: &ServerCert, port: u16) -> Result<Self, HttpsError> {
        let mut config = (*cert.server_config()?).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(HttpsError::Bind)?;
        let addr = listener.local_addr().map_err(HttpsError::Bind)?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        Ok(HttpsServer { addr, shared, task })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Answer every later request with `status`, `content_type` and `body`.
    pub fn respond(&self, status: u16, content_type: &str, body: &str) {
        self.respond_with(status, content_type, body.as_bytes(), &[]);
    }

    /// As [`HttpsServer::respond`], with extra headers (`Location`).
    pub fn respond_with(
        &self,
        status: u16,
        content_type: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) {
        *self
            .shared
            .response
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Response {
            status,
            content_type: content_type.to_string(),
            body: body.to_vec(),
            extra_headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
    }

    /// Every request with a body received so far.
    pub fn posts(&self) -> Vec<Posted> {
        self.shared
            .posts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `(path, host)` of every request received so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        sessions.spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, serve(tcp, acceptor, shared)).await;
        });
        while sessions.try_join_next().is_some() {}
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(tcp).await?;
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).await?;
        if n == 0 || request.len() > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let header_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |p| p + 4);
    let text = String::from_utf8_lossy(&request[..header_end]).into_owned();
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST);
    let mut body = request[header_end..].to_vec();
    while body.len() < length {
        let n = tls.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_string();
    let host = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("host").then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.clone(), host));
    if length > 0 {
        body.truncate(length);
        shared
            .posts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Posted {
                path,
                content_type: header("content-type").unwrap_or_default(),
                body,
            });
    }
    let response = shared
        .response
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or(Response {
            status: 404,
            content_type: "text/plain".into(),
            body: b"not found\n".to_vec(),
            extra_headers: Vec::new(),
        });
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    for (k, v) in &response.extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(&response.body).await?;
    tls.flush().await?;
    let _ = tls.shutdown().await;
    Ok(())
}
