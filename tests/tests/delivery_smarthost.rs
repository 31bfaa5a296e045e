//! The smarthost transport: every message to one upstream server, over
//! STARTTLS with a verified certificate.

mod delivery_support;

use std::time::Duration;

use petrel_crds::config::{Smarthost, TlsMode, Transport};
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;

use delivery_support::{LIMIT, Relay, message, mx_config};

#[tokio::test]
async fn every_domain_goes_to_the_smarthost_over_verified_tls() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let sink = SmtpSink::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = sink
            .ca()
            .expect("sink has a CA")
            .write_ca(dir.path())
            .unwrap();
        // Smarthost certificates are verified against the system roots;
        // SSL_CERT_FILE points them at the sink's CA. This binary has one
        // test, so the process-wide variable affects nothing else.
        unsafe { std::env::set_var("SSL_CERT_FILE", &ca) };

        // DNS is not used: the nameserver below does not exist.
        let mut config = mx_config(&redis.url(), "127.0.0.1:9".parse().unwrap(), 25);
        config.delivery.transport = Transport::Smarthost;
        config.delivery.smarthost = Some(Smarthost {
            host: "localhost".into(),
            port: sink.port(),
            tls: TlsMode::Starttls,
            username: None,
            password_file: None,
        });
        let relay = Relay::start(config).await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-sh",
                    "sender@example.test",
                    &["a@one.test", "b@two.test"],
                    "smarthost",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let got = sink.wait_for(2, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 2, "one transaction per destination unit");
        assert!(
            got.iter().all(|r| r.tls),
            "STARTTLS with a verified certificate"
        );
        let mut rcpts: Vec<String> = got.iter().flat_map(|r| r.rcpt_to.clone()).collect();
        rcpts.sort();
        assert_eq!(rcpts, vec!["a@one.test", "b@two.test"]);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
