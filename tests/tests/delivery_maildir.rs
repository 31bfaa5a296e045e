//! The Maildir transport end to end over the embedded queue: the local
//! quick start's delivery path.

mod delivery_support;

use std::time::Duration;

use petrel_crds::config::RelayConfig;
use petrel_relay::queue::now_millis;

use delivery_support::{LIMIT, Relay, message, until};

#[tokio::test]
async fn maildir_gets_one_file_per_recipient_with_envelope_headers() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("Maildir");
        let yaml = format!(
            r#"
hostname: relay.test
listeners:
  - name: smtp
    address: 127.0.0.1:2525
queue:
  embedded:
    path: "{}"
delivery:
  transport: maildir
  maildir:
    path: "{}"
"#,
            dir.path().join("queue.redb").display(),
            maildir.display()
        );
        let relay = Relay::start(RelayConfig::from_yaml(&yaml).expect("config")).await;
        relay
            .ctx
            .queue
            .enqueue(
                message(
                    "m-maildir",
                    "sender@example.test",
                    &["a@x.test", "b@y.test"],
                    "local",
                ),
                Vec::new(),
            )
            .await
            .unwrap();
        let new = maildir.join("new");
        let q = relay.ctx.queue.clone();
        assert!(
            until(Duration::from_secs(20), || {
                let q = q.clone();
                let new = new.clone();
                async move {
                    let files = std::fs::read_dir(&new).map(|d| d.count()).unwrap_or(0);
                    let empty = q
                        .stats(now_millis())
                        .await
                        .map(|s| s.messages == 0)
                        .unwrap_or(false);
                    files == 2 && empty
                }
            })
            .await,
            "two files in new/ and an empty queue"
        );
        let mut texts: Vec<String> = std::fs::read_dir(&new)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        texts.sort();
        assert!(
            texts[0]
                .starts_with("Return-Path: <sender@example.test>\r\nDelivered-To: a@x.test\r\n"),
            "{}",
            texts[0]
        );
        assert!(
            texts[1]
                .starts_with("Return-Path: <sender@example.test>\r\nDelivered-To: b@y.test\r\n"),
            "{}",
            texts[1]
        );
        assert!(texts[0].contains("Subject: local\r\n"));
        assert_eq!(std::fs::read_dir(maildir.join("tmp")).unwrap().count(), 0);
        relay.stop().await;
    })
    .await
    .expect("test timed out");
}
