//! TLS-RPT (RFC 8460) end to end: deliveries under MTA-STS `testing` to a
//! host whose certificate names another host (a failure the probe sees,
//! delivered all the same) and to a host with the right certificate (a
//! success); then the day's run, triggered by passing tomorrow as the
//! time, mails the reports through the relay's own queue to the sink and
//! POSTs one to an HTTPS server. Each report is gunzipped and validated
//! against RFC 8460's schema (tests/testdata/tlsrpt-schema.json) with
//! Python's `jsonschema` (installed by .ci/setup).

mod delivery_support;

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use petrel_relay::delivery::tls_rpt::daily;
use petrel_relay::dkim::DkimKeys;
use petrel_relay::queue::now_millis;
use petrel_tests::dns::DnsServer;
use petrel_tests::https::HttpsServer;
use petrel_tests::redis::RedisServer;
use petrel_tests::smtp_sink::SmtpSink;
use petrel_tests::tls::TestCa;
use serde_json::Value;

use delivery_support::{LIMIT, Relay, message, mx_config};

const DAY: u64 = 86_400_000;

fn gunzip(data: &[u8]) -> Value {
    let mut json = String::new();
    flate2::read::GzDecoder::new(data)
        .read_to_string(&mut json)
        .expect("gzip");
    serde_json::from_str(&json).expect("report JSON")
}

/// Validates `report` against the RFC 8460 schema with Python's
/// jsonschema (a real validator, draft 2020-12, formats checked).
fn validate(report: &Value) {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/tlsrpt-schema.json");
    let script = "import json,sys,jsonschema\n\
        schema=json.load(open(sys.argv[1]))\n\
        v=jsonschema.Draft202012Validator(schema,format_checker=jsonschema.FormatChecker())\n\
        errors=[e.message for e in v.iter_errors(json.load(sys.stdin))]\n\
        print('\\n'.join(errors)); sys.exit(1 if errors else 0)\n";
    let mut child = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&schema)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (with jsonschema, see .ci/setup) must be installed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(report.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "report does not validate against RFC 8460's schema: {}{}\n{report:#}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn policy_of<'a>(report: &'a Value, kind: &str) -> &'a Value {
    report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"]["policy-type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} policy in {report:#}"))
}

#[tokio::test]
async fn a_day_with_a_testing_mode_failure_is_reported_by_mail_and_https() {
    tokio::time::timeout(LIMIT, async {
        let redis = RedisServer::start().await.expect("redis");
        let dns = DnsServer::start().await.expect("dns");
        // good.test's MX has the sink's name; bad.test's does not.
        dns.add_mx("good.test", 10, "mx.good.test");
        dns.add_mx("bad.test", 10, "mx.bad.test");
        dns.add_mx("example.test", 10, "mx.good.test");
        for host in ["mx.good.test", "mx.bad.test", "mta-sts.good.test", "mta-sts.bad.test"] {
            dns.add_a(host, Ipv4Addr::LOCALHOST);
        }
        dns.add_txt("_mta-sts.good.test", "v=STSv1; id=1;");
        dns.add_txt("_mta-sts.bad.test", "v=STSv1; id=1;");
        let sink = SmtpSink::builder()
            .hostname("mx.good.test")
            .start()
            .await
            .expect("sink");
        let ca = TestCa::new().unwrap();
        let https = HttpsServer::start(
            &ca.issue_server_cert(&["mta-sts.good.test", "mta-sts.bad.test", "localhost"])
                .unwrap(),
        )
        .await
        .expect("https");
        // Serves the policy, and answers the report POST with 200 too.
        https.respond(
            200,
            "text/plain",
            "version: STSv1\r\nmode: testing\r\nmx: *.good.test\r\nmx: *.bad.test\r\nmax_age: 86400\r\n",
        );
        dns.add_txt(
            "_smtp._tls.bad.test",
            &format!(
                "v=TLSRPTv1; rua=mailto:tls-reports@good.test,https://localhost:{}/tlsrpt",
                https.port()
            ),
        );
        dns.add_txt("_smtp._tls.good.test", "v=TLSRPTv1; rua=mailto:tls-reports@good.test");

        let dir = tempfile::tempdir().unwrap();
        let anchors = dir.path().join("anchors.pem");
        std::fs::write(
            &anchors,
            format!("{}{}", ca.cert_pem(), sink.ca().unwrap().cert_pem()),
        )
        .unwrap();
        let mut config = mx_config(&redis.url(), dns.addr(), sink.port());
        config.delivery.tls.ca_file = Some(anchors);
        config.delivery.mx.mta_sts_port = https.port();
        config.delivery.tls_report.organization_name = Some("Petrel Test".into());
        config.validate().expect("valid config");
        let relay = Relay::start(config).await;

        for (id, rcpt) in [("t-good", "user@good.test"), ("t-bad", "user@bad.test")] {
            relay
                .ctx
                .queue
                .enqueue(message(id, "sender@example.test", &[rcpt], "tls"), Vec::new())
                .await
                .unwrap();
        }
        // Testing mode delivers both, the bad certificate included.
        assert_eq!(sink.wait_for(2, Duration::from_secs(20)).await.len(), 2);

        let dkim = DkimKeys::new();
        let tomorrow = now_millis() + DAY;
        let summary = daily::tick(&relay.ctx, &dkim, tomorrow)
            .await
            .expect("run")
            .expect("the day is due");
        assert_eq!((summary.mailed, summary.posted, summary.failed), (2, 1, 0), "{summary:?}");
        assert_eq!(
            daily::tick(&relay.ctx, &dkim, tomorrow).await.expect("run"),
            None,
            "a day is reported once"
        );

        // The mailed reports, delivered by the relay to the sink.
        let got = sink.wait_for(4, Duration::from_secs(20)).await;
        let mut reports = std::collections::BTreeMap::new();
        for mail in got.iter().filter(|m| m.rcpt_to == ["tls-reports@good.test"]) {
            let parsed = MessageParser::default().parse(&mail.data).unwrap();
            let domain = parsed
                .header("TLS-Report-Domain")
                .and_then(|h| h.as_text())
                .unwrap()
                .to_string();
            assert_eq!(
                parsed.header("TLS-Report-Submitter").and_then(|h| h.as_text()),
                Some("relay.test")
            );
            let subject = parsed.subject().unwrap();
            assert!(
                subject.starts_with(&format!("Report Domain: {domain} Submitter: relay.test Report-ID: <")),
                "{subject}"
            );
            let attachment = parsed.attachment(0).expect("report attached");
            let ct = attachment.content_type().unwrap();
            assert_eq!((ct.ctype(), ct.subtype()), ("application", Some("tlsrpt+gzip")));
            let report = gunzip(attachment.contents());
            validate(&report);
            reports.insert(domain, report);
        }
        assert_eq!(reports.len(), 2, "{reports:#?}");

        let bad = policy_of(&reports["bad.test"], "sts");
        assert_eq!(reports["bad.test"]["organization-name"], "Petrel Test");
        assert_eq!(bad["policy"]["policy-domain"], "bad.test");
        assert_eq!(bad["summary"]["total-failure-session-count"], 1);
        assert_eq!(bad["summary"]["total-successful-session-count"], 0);
        let detail = &bad["failure-details"][0];
        assert_eq!(detail["result-type"], "certificate-host-mismatch");
        assert_eq!(detail["receiving-mx-hostname"], "mx.bad.test");
        assert_eq!(detail["receiving-ip"], "127.0.0.1");
        assert!(bad["policy"]["policy-string"]
            .as_array()
            .unwrap()
            .contains(&Value::from("mode: testing")));

        let good = policy_of(&reports["good.test"], "sts");
        assert_eq!(good["summary"]["total-successful-session-count"], 1);
        assert_eq!(good["summary"]["total-failure-session-count"], 0);
        assert!(good.get("failure-details").is_none());

        // The POSTed copy of bad.test's report.
        let posts = https.posts();
        assert_eq!(posts.len(), 1, "{posts:?}");
        assert_eq!(posts[0].path, "/tlsrpt");
        assert_eq!(posts[0].content_type, "application/tlsrpt+gzip");
        let posted = gunzip(&posts[0].body);
        validate(&posted);
        assert_eq!(posted, reports["bad.test"]);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
