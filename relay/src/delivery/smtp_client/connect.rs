//! Connecting the outbound SMTP client: TCP connect, greeting, EHLO,
//! STARTTLS or implicit TLS (with the rustls config that decides whether
//! certificates are verified), the opportunistic plain-text fallback, and
//! AUTH.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::super::classify::{Failure, Fault, Reply, Severity};
use super::super::tls_result::TlsResult;
use super::wire::{SmtpClient, Timeouts};

/// A TCP stream, upgraded to TLS or not.
pub enum Stream {
    /// Plain text.
    Plain(TcpStream),
    /// After STARTTLS or implicit TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    // Forwarded so the DATA body and its pieces go out in one writev on
    // plain TCP (tokio-rustls gathers them into its own records).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How to use TLS on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS when offered, plain text otherwise.
    Opportunistic,
    /// STARTTLS must be offered and succeed.
    Required,
    /// TLS from the first byte (smarthost on 465).
    Implicit,
    /// Never (smarthost `tls: none`).
    Disabled,
}

/// Everything [`connect`] needs.
#[derive(Clone)]
pub struct ConnectSettings {
    /// Our name for EHLO.
    pub ehlo_name: String,
    /// Stage timeouts.
    pub timeouts: Timeouts,
    /// TLS policy.
    pub tls: TlsPolicy,
    /// rustls config for the handshake (whether certificates are verified).
    pub tls_config: Arc<rustls::ClientConfig>,
    /// The TLS policy in force, for logs, metrics and the connection pool
    /// key (`opportunistic`, `encrypted`, `verified`, `mta-sts`, `none`).
    pub tls_label: &'static str,
    /// AUTH user and password (smarthost).
    pub auth: Option<(String, String)>,
    /// The message was sent with REQUIRETLS (RFC 8689): after STARTTLS the
    /// server must offer REQUIRETLS too, else this host is unusable.
    pub require_tls: bool,
    /// Sessions are counted for TLS-RPT under this policy (MTA-STS).
    pub tls_report: Option<super::super::tls_rpt::TlsReport>,
}

/// A ready connection.
pub struct Connection {
    /// The client, after EHLO (and STARTTLS, AUTH).
    pub client: SmtpClient<Stream>,
    /// TLS is in use.
    pub tls: bool,
    /// The server's host name (for logs and DSNs).
    pub host: String,
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    addr: SocketAddr,
    settings: &ConnectSettings,
) -> Result<TlsStream<TcpStream>, Fault> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| rustls::pki_types::ServerName::IpAddress(addr.ip().into()));
    let connector = TlsConnector::from(settings.tls_config.clone());
    tokio::time::timeout(settings.timeouts.connect, connector.connect(name, tcp))
        .await
        .map_err(|_| Fault::Timeout("TLS handshake"))?
        .map_err(|e| {
            let detail = format!("{e} (TLS policy {})", settings.tls_label);
            match TlsResult::of_io(&e) {
                Some(result) => Fault::Certificate {
                    result: result.as_str(),
                    detail,
                },
                None => Fault::Tls(detail),
            }
        })
}

/// A greeting or EHLO refusal: about the server, never the recipients.
fn refused(reply: Reply) -> Failure {
    Failure::Session(reply)
}

/// Connects to `addr` (server `host`), reads the greeting, says EHLO, does
/// STARTTLS and AUTH per `settings`. Any failure is about this host: the
/// caller tries the next one.
///
/// With `opportunistic` TLS, a server that offers STARTTLS but then refuses
/// it or fails the handshake (often an old stack speaking only TLS 1.0,
/// which rustls refuses) gets the mail in plain text on a new connection,
/// as Postfix's `may` level does: otherwise it would be deferred until the
/// mail expires. This gives an attacker nothing that stripping STARTTLS
/// from the EHLO reply does not already; `required` never falls back.
pub async fn connect(
    addr: SocketAddr,
    host: &str,
    settings: &ConnectSettings,
) -> Result<Connection, Failure> {
    match connect_once(addr, host, settings).await {
        Err(Failure::Fault(Fault::Tls(_) | Fault::Timeout("TLS handshake")))
            if settings.tls == TlsPolicy::Opportunistic =>
        {
            let plain = ConnectSettings {
                tls: TlsPolicy::Disabled,
                ..settings.clone()
            };
            connect_once(addr, host, &plain).await
        }
        other => other,
    }
}

async fn connect_once(
    addr: SocketAddr,
    host: &str,
    settings: &ConnectSettings,
) -> Result<Connection, Failure> {
    let t = settings.timeouts;
    let tcp = tokio::time::timeout(t.connect, TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Fault(Fault::Timeout("connect")))?
        .map_err(|e| Failure::Fault(Fault::Connect(format!("{addr}: {e}"))))?;
    let _ = tcp.set_nodelay(true);

    if settings.tls == TlsPolicy::Implicit {
        let tls = handshake(tcp, host, addr, settings)
            .await
            .map_err(Failure::Fault)?;
        let mut client = SmtpClient::new(Stream::Tls(Box::new(tls)), t);
        return finish(&mut client, settings, true)
            .await
            .map(|()| Connection {
                client,
                tls: true,
                host: host.to_string(),
            });
    }

    let mut plain = SmtpClient::new(tcp, t);
    let greeting = plain.greeting().await.map_err(Failure::Fault)?;
    if greeting.severity() != Severity::Positive {
        return Err(refused(greeting));
    }
    let caps = match plain
        .ehlo(&settings.ehlo_name)
        .await
        .map_err(Failure::Fault)?
    {
        Ok(caps) => caps,
        Err(reply) => return Err(refused(reply)),
    };
    let want_tls = matches!(settings.tls, TlsPolicy::Opportunistic | TlsPolicy::Required);
    if want_tls && caps.starttls {
        let reply = plain
            .command("STARTTLS", "STARTTLS")
            .await
            .map_err(Failure::Fault)?;
        if reply.code != 220 {
            // Offered but refused: a broken server; for `required` that is
            // a failure, for opportunistic the host is tried later.
            return Err(Failure::Fault(Fault::Tls(format!(
                "STARTTLS refused: {reply}"
            ))));
        }
        // Bytes sent before the handshake must be dropped (RFC 3207 5,
        // CVE-2011-0411 style injection), so `_early` is discarded.
        let (tcp, _early) = plain.into_parts();
        let tls = handshake(tcp, host, addr, settings)
            .await
            .map_err(Failure::Fault)?;
        let mut client = SmtpClient::new(Stream::Tls(Box::new(tls)), t);
        match client
            .ehlo(&settings.ehlo_name)
            .await
            .map_err(Failure::Fault)?
        {
            Ok(caps) if settings.require_tls && !caps.require_tls => {
                // RFC 8689 section 4.2.1 step 5: another MX may offer it.
                client.quit().await;
                return Err(Failure::Fault(Fault::Unsendable {
                    status: "5.7.30",
                    reason: format!(
                        "REQUIRETLS support required: {host} does not offer REQUIRETLS after STARTTLS"
                    ),
                }));
            }
            Ok(_) => {}
            Err(reply) => return Err(refused(reply)),
        }
        return auth(&mut client, settings).await.map(|()| Connection {
            client,
            tls: true,
            host: host.to_string(),
        });
    }
    if settings.tls == TlsPolicy::Required {
        return Err(Failure::Fault(Fault::TlsNotOffered));
    }
    let (tcp, early) = plain.into_parts();
    let mut client = SmtpClient::new(Stream::Plain(tcp), t);
    client.buf = early;
    client.caps = caps;
    auth(&mut client, settings).await.map(|()| Connection {
        client,
        tls: false,
        host: host.to_string(),
    })
}

/// Greeting and EHLO on an implicit-TLS connection, then AUTH.
async fn finish(
    client: &mut SmtpClient<Stream>,
    settings: &ConnectSettings,
    _tls: bool,
) -> Result<(), Failure> {
    let greeting = client.greeting().await.map_err(Failure::Fault)?;
    if greeting.severity() != Severity::Positive {
        return Err(refused(greeting));
    }
    match client
        .ehlo(&settings.ehlo_name)
        .await
        .map_err(Failure::Fault)?
    {
        Ok(_) => {}
        Err(reply) => return Err(refused(reply)),
    }
    auth(client, settings).await
}

async fn auth(client: &mut SmtpClient<Stream>, settings: &ConnectSettings) -> Result<(), Failure> {
    let Some((user, password)) = &settings.auth else {
        return Ok(());
    };
    match client.auth(user, password).await.map_err(Failure::Fault)? {
        Ok(()) => Ok(()),
        // Refused credentials are our misconfiguration, not the
        // recipients' fault: defer, never bounce.
        Err(reply) => Err(Failure::Fault(Fault::Protocol(format!(
            "AUTH refused: {reply}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            greeting: Duration::from_secs(5),
            command: Duration::from_secs(5),
            data: Duration::from_secs(5),
        }
    }

    /// A TCP server offering STARTTLS that accepts it and then sends
    /// garbage instead of a TLS handshake; it counts connections and
    /// records whether a message arrived in plain text.
    async fn broken_tls_server() -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            // At most two connections: the TLS attempt and a plain one.
            for _ in 0..2 {
                let Ok((tcp, _)) = listener.accept().await else {
                    break;
                };
                let (r, mut w) = tcp.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 hi\r\n").await.unwrap();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end().to_string();
                    seen.push(line.clone());
                    if line == "STARTTLS" {
                        // Wait for the ClientHello, then answer with junk.
                        w.write_all(b"220 go ahead\r\n").await.unwrap();
                        let mut hello = [0u8; 512];
                        let _ = r.read(&mut hello).await;
                        let _ = w.write_all(b"this is not TLS\r\n").await;
                        break;
                    }
                    let reply: &[u8] = if line.starts_with("EHLO") {
                        b"250-mx\r\n250 STARTTLS\r\n"
                    } else if line == "QUIT" {
                        b"221 bye\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() || line == "QUIT" {
                        break;
                    }
                }
            }
            seen
        });
        (addr, task)
    }

    fn settings(tls: TlsPolicy) -> ConnectSettings {
        ConnectSettings {
            ehlo_name: "relay.test".into(),
            timeouts: timeouts(),
            tls,
            tls_config: crate::delivery::tls::unverified().unwrap(),
            tls_label: "opportunistic",
            auth: None,
            require_tls: false,
            tls_report: None,
        }
    }

    #[tokio::test]
    async fn opportunistic_tls_falls_back_to_plain_text_after_a_failed_handshake() {
        tokio::time::timeout(Duration::from_secs(30), async {
            let (addr, srv) = broken_tls_server().await;
            let conn = connect(addr, "mx.test", &settings(TlsPolicy::Opportunistic))
                .await
                .expect("plain text after the failed handshake");
            assert!(!conn.tls);
            conn.client.quit().await;
            let seen = srv.await.unwrap();
            assert_eq!(
                seen.iter().filter(|l| *l == "STARTTLS").count(),
                1,
                "{seen:?}"
            );

            let (addr, srv) = broken_tls_server().await;
            let err = connect(addr, "mx.test", &settings(TlsPolicy::Required))
                .await
                .err()
                .expect("required TLS never falls back");
            assert!(matches!(err, Failure::Fault(Fault::Tls(_))), "{err:?}");
            srv.abort();
        })
        .await
        .expect("test timed out");
    }
}
