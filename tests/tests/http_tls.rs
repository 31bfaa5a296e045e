//! `http.tls: true`: the relay's HTTP listener (send API, probes, metrics)
//! over TLS with the relay's certificate, checked with a real TLS client
//! (rustls trusting the test CA, hyper speaking HTTP/1.1). Over TLS Basic
//! credentials are accepted from an untrusted client without
//! `http.allowInsecureAuth`; plain HTTP gets no answer on that port; a
//! renewed certificate is served without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use petrel_tests::ports::{free_port, wait_for_port};
use petrel_tests::tls::TestCa;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(60);

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One HTTPS request to `addr`, verifying the server as `name` against `ca`.
async fn https(
    addr: SocketAddr,
    ca: &TestCa,
    name: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> Result<(u16, String), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(ca.client_config().unwrap());
    let server = ServerName::try_from(name.to_string()).unwrap();
    let tls = connector
        .connect(server, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", name)
        .header("content-type", "application/json");
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn http_over_tls_serves_probes_and_takes_basic_credentials() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new().unwrap();
        let files = ca
            .issue_server_cert(&["localhost", "relay.test"])
            .unwrap()
            .write_to_dir(dir.path())
            .unwrap();
        let hash = petrel_relay::inbound::auth::hash_password("s3cret").unwrap();
        let users = dir.path().join("users");
        std::fs::write(&users, format!("app:{hash}\n")).unwrap();
        let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let d = dir.path().display();
        // No trusted networks: the test client is an outsider, so only
        // TLS makes its credentials acceptable.
        let yaml = format!(
            r#"
hostname: relay.test
listeners: [{{name: smtp, address: "{smtp}"}}]
authUsersFile: {users}
tls: {{certFile: {cert}, keyFile: {key}}}
domains:
  - domain: example.test
    dkim: {{selector: example, algorithm: ed25519, keyFile: {dkim}}}
queue: {{embedded: {{path: {d}/queue.redb}}}}
delivery: {{transport: maildir, maildir: {{path: {d}/Maildir}}}}
http: {{address: "{http}", tls: true}}
"#,
            users = users.display(),
            cert = files.cert.display(),
            key = files.key.display(),
            dkim = repo()
                .join("examples/local/dkim-example.test.key")
                .display(),
        );
        let path = dir.path().join("relay.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            petrel_relay::server::run_until(&path, async {
                let _ = stopped.await;
            })
            .await
        });
        wait_for_port(http, Duration::from_secs(30)).await.unwrap();

        for probe in ["/healthz", "/readyz", "/metrics"] {
            let (status, _) = https(http, &ca, "localhost", "GET", probe, None, "")
                .await
                .unwrap();
            assert_eq!(status, 200, "{probe} over TLS");
        }

        let send = r#"{"from":"app@example.test","to":["someone@example.org"],"subject":"Hi","text":"over TLS"}"#;
        let good = format!("Basic {}", B64.encode("app:s3cret"));
        let (status, body) = https(http, &ca, "localhost", "POST", "/v1/send", Some(&good), send)
            .await
            .unwrap();
        assert_eq!(status, 202, "Basic over TLS from an untrusted client: {body}");
        let bad = format!("Basic {}", B64.encode("app:wrong"));
        let (status, _) = https(http, &ca, "localhost", "POST", "/v1/send", Some(&bad), send)
            .await
            .unwrap();
        assert_eq!(status, 401, "wrong password still refused");
        let (status, _) = https(http, &ca, "localhost", "POST", "/v1/send", None, send)
            .await
            .unwrap();
        assert!(
            status == 401 || status == 403,
            "no credentials from outside the trusted networks: {status}"
        );

        // Plain HTTP on the TLS port gets no HTTP answer.
        let mut plain = TcpStream::connect(http).await.unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut raw)).await;
        assert!(
            !raw.starts_with(b"HTTP/"),
            "plain HTTP answered: {}",
            String::from_utf8_lossy(&raw)
        );

        // A renewed certificate (cert-manager writes the files in place)
        // is served without a restart: the new one names renewed.test.
        let renewed = ca
            .issue_server_cert(&["localhost", "renewed.test"])
            .unwrap();
        let tmp = dir.path().join("renew");
        std::fs::create_dir(&tmp).unwrap();
        let new = renewed.write_to_dir(&tmp).unwrap();
        std::fs::rename(&new.key, &files.key).unwrap();
        std::fs::rename(&new.cert, &files.cert).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) =
                https(http, &ca, "renewed.test", "GET", "/healthz", None, "").await
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the renewed certificate was never served"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let _ = stop.send(());
        task.await.unwrap().unwrap();
    })
    .await
    .expect("test timed out");
}
