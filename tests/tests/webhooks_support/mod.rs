//! Shared pieces of the webhook end-to-end tests: a webhook config with a
//! short backoff, and the check that every expected event arrived.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use petrel_crds::config::{EmbeddedQueue, RelayConfig, Webhook};
use petrel_tests::webhook_receiver::WebhookReceiver;

/// The signing secret every test shares with its receiver.
pub const SECRET: &[u8] = b"whsec_petrel_e2e_secret";

/// Writes [`SECRET`] (with a trailing newline, as `kubectl create secret
/// --from-file` would) into `dir`.
pub fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("webhook-secret");
    let mut text = SECRET.to_vec();
    text.push(b'\n');
    std::fs::write(&path, text).expect("writing the webhook secret");
    path
}

/// A webhook named `name` to `receiver`, retrying fast (100 ms doubling to
/// 500 ms) so tests wait for events, not for backoff.
pub fn webhook(name: &str, receiver: &WebhookReceiver, secret: &Path) -> Webhook {
    let mut w = Webhook::new(name, &receiver.url(), secret);
    w.request_timeout = Duration::from_secs(2).into();
    w.retry_initial_backoff = Duration::from_millis(100).into();
    w.retry_max_backoff = Duration::from_millis(500).into();
    w.batch_max_events = 50;
    w
}

/// Switches a generated relay config to the embedded queue at `path`.
pub fn embedded(config: &mut RelayConfig, path: &Path) {
    config.queue.redis = None;
    config.queue.embedded = Some(EmbeddedQueue {
        path: path.to_path_buf(),
    });
}

/// The bench id of an event: its `headerMessageId` is `<id@bench.test>`.
pub fn bench_id(event: &serde_json::Value) -> Option<String> {
    let mid = event["headerMessageId"].as_str()?;
    let mid = mid.trim_start_matches('<').trim_end_matches('>');
    Some(mid.split('@').next()?.to_string())
}

/// `"<type> <id>"` for every (accepted message, type) the receiver has no
/// event of.
pub fn missing(receiver: &WebhookReceiver, accepted: &[String], types: &[&str]) -> Vec<String> {
    let have: BTreeSet<(String, String)> = receiver
        .events()
        .values()
        .filter_map(|r| Some((r.event["type"].as_str()?.to_string(), bench_id(&r.event)?)))
        .collect();
    let mut missing = Vec::new();
    for id in accepted {
        for t in types {
            if !have.contains(&(t.to_string(), id.clone())) {
                missing.push(format!("{t} {id}"));
            }
        }
    }
    missing
}

/// Waits until every accepted message has an event of each of `types`;
/// returns what is still missing.
pub async fn wait_for_events(
    receiver: &WebhookReceiver,
    accepted: &[String],
    types: &[&str],
    timeout: Duration,
) -> Vec<String> {
    receiver
        .wait_until(timeout, |r| missing(r, accepted, types).is_empty())
        .await;
    missing(receiver, accepted, types)
}

/// `delivered` events per bench id: a message is delivered once, so each
/// must have exactly one (at-least-once sending may repeat the event, never
/// make a second one).
pub fn delivered_per_message(
    receiver: &WebhookReceiver,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for r in receiver.events().values() {
        if r.event["type"] == "delivered"
            && let Some(id) = bench_id(&r.event)
        {
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// `GET /metrics` of a relay, as text.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of the first sample of `metric` whose labels include every one
/// of `labels` (`name="value"` strings).
pub fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
