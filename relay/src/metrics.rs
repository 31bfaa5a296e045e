//! Prometheus metrics of the relay, registered in one place.
//!
//! Labels are bounded: `domain` is a configured sending domain, `destination`
//! a destination group from [`destination_group`] (a few big providers or
//! `other`), `class` an enhanced-status class (`5.1`), never an address, a
//! message id or a raw remote reply.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every relay metric. Cheap to clone (the handles are reference counted).
#[derive(Clone)]
pub struct RelayMetrics {
    /// Messages accepted (250 after DATA), by sending domain.
    pub received: IntCounterVec,
    /// Inbound refusals, by reason (`relay_denied`, `auth_required`, ...).
    pub rejected: IntCounterVec,
    /// Recipients delivered, by sending domain and destination group.
    pub delivered: IntCounterVec,
    /// Recipients deferred (temporary failure), by domain and destination.
    pub deferred: IntCounterVec,
    /// Recipients bounced, by domain, destination and enhanced-status class.
    pub bounced: IntCounterVec,
    /// Recipients refused or dropped because they are suppressed.
    pub suppressed: IntCounterVec,
    /// Messages DKIM-signed, by domain and algorithm.
    pub dkim_signed: IntCounterVec,
    /// Outbound SMTP sessions, by destination and `tls`/`plaintext`.
    pub outbound_sessions: IntCounterVec,
    /// Outbound connection attempts by TLS policy (`mta-sts`, `verified`,
    /// `encrypted`, `opportunistic`, `none`) and result (`tls`,
    /// `plaintext`, or a TLS-RPT failure type).
    pub outbound_tls: IntCounterVec,
    /// Failed AUTH attempts, by listener.
    pub auth_failures: IntCounterVec,
    /// Queue units by state (`due`, `deferred`, `leased`, `held`).
    pub queue_units: IntGaugeVec,
    /// Destinations held by `petrel-relay queue hold`.
    pub held_destinations: IntGauge,
    /// Age of the oldest queued message.
    pub oldest_message_age: IntGauge,
    /// Open SMTP sessions, by listener.
    pub active_sessions: IntGaugeVec,
    /// One delivery attempt (connect to final reply), by destination.
    pub attempt_duration: HistogramVec,
    /// From 250 to delivered, by sending domain.
    pub delivery_latency: HistogramVec,
    /// Time to make a message durable in the queue after DATA.
    pub enqueue_duration: Histogram,
    /// Engagement tracking: rewrites, opens, clicks.
    pub tracking: crate::tracking::TrackingMetrics,
    /// The reputation guard: state and rates per sending domain.
    pub reputation: crate::reputation::ReputationMetrics,
    /// One-click unsubscribe: headers added, endpoint requests.
    pub unsubscribe: crate::unsubscribe::UnsubscribeMetrics,
    /// Mail and requests the feedback loop handled, by kind (`bounce`,
    /// `delayed`, `complaint`, `unsubscribe`, `unattributed`, `unparsed`,
    /// `other`): `petrel_feedback_total`.
    pub feedback: IntCounterVec,
    /// Events recorded in the outbox, by type.
    pub events: IntCounterVec,
    /// Events that could not be recorded (a `rejected` event while the
    /// backend was away), by type: the refusal was still sent.
    pub events_lost: IntCounterVec,
}

/// Why metrics could not be registered (a name registered twice).
#[derive(Debug, thiserror::Error)]
#[error("cannot register metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl RelayMetrics {
    /// Creates and registers every metric in `registry`.
    pub fn register(registry: &Registry) -> Result<RelayMetrics, MetricsError> {
        let queue_units = IntGaugeVec::new(
            Opts::new(
                "petrel_queue_units",
                "Delivery units in the queue, by state.",
            ),
            &["state"],
        )?;
        registry.register(Box::new(queue_units.clone()))?;
        let oldest_message_age = IntGauge::new(
            "petrel_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue.",
        )?;
        registry.register(Box::new(oldest_message_age.clone()))?;
        let held_destinations = IntGauge::new(
            "petrel_queue_held_destinations",
            "Destinations held by `petrel-relay queue hold` (their units are not attempted).",
        )?;
        registry.register(Box::new(held_destinations.clone()))?;
        let active_sessions = IntGaugeVec::new(
            Opts::new("petrel_smtp_sessions_active", "Open inbound SMTP sessions."),
            &["listener"],
        )?;
        registry.register(Box::new(active_sessions.clone()))?;
        let attempt_duration = HistogramVec::new(
            HistogramOpts::new(
                "petrel_delivery_attempt_duration_seconds",
                "Duration of one outbound delivery attempt, connect to final reply.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["destination"],
        )?;
        registry.register(Box::new(attempt_duration.clone()))?;
        let delivery_latency = HistogramVec::new(
            HistogramOpts::new(
                "petrel_delivery_latency_seconds",
                "Time from accepting a message (250) to its delivery.",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                14400.0, 86400.0,
            ]),
            &["domain"],
        )?;
        registry.register(Box::new(delivery_latency.clone()))?;
        let enqueue_duration = Histogram::with_opts(
            HistogramOpts::new(
                "petrel_queue_enqueue_duration_seconds",
                "Time to make an accepted message durable in the queue.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )?;
        registry.register(Box::new(enqueue_duration.clone()))?;

        let tracking = crate::tracking::TrackingMetrics::register(registry)?;
        let reputation = crate::reputation::ReputationMetrics::register(registry)?;
        let unsubscribe = crate::unsubscribe::UnsubscribeMetrics::register(registry)?;
        Ok(RelayMetrics {
            tracking,
            reputation,
            unsubscribe,
            feedback: counter(
                registry,
                "petrel_feedback_total",
                "Feedback handled (bounce, delayed, complaint, unsubscribe, unattributed, unparsed, other).",
                &["kind"],
            )?,
            received: counter(
                registry,
                "petrel_messages_received_total",
                "Messages accepted for delivery.",
                &["domain"],
            )?,
            rejected: counter(
                registry,
                "petrel_smtp_rejections_total",
                "Inbound SMTP refusals, by reason.",
                &["reason"],
            )?,
            delivered: counter(
                registry,
                "petrel_recipients_delivered_total",
                "Recipients delivered.",
                &["domain", "destination"],
            )?,
            deferred: counter(
                registry,
                "petrel_recipients_deferred_total",
                "Recipients deferred after a temporary failure.",
                &["domain", "destination"],
            )?,
            bounced: counter(
                registry,
                "petrel_recipients_bounced_total",
                "Recipients bounced, by enhanced status class.",
                &["domain", "destination", "class"],
            )?,
            suppressed: counter(
                registry,
                "petrel_recipients_suppressed_total",
                "Recipients refused or dropped as suppressed.",
                &["domain"],
            )?,
            dkim_signed: counter(
                registry,
                "petrel_dkim_signed_total",
                "Messages DKIM-signed.",
                &["domain", "algorithm"],
            )?,
            outbound_sessions: counter(
                registry,
                "petrel_outbound_sessions_total",
                "Outbound SMTP sessions, by TLS use.",
                &["destination", "tls"],
            )?,
            outbound_tls: counter(
                registry,
                "petrel_outbound_tls_total",
                "Outbound connection attempts, by TLS policy and result.",
                &["policy", "result"],
            )?,
            auth_failures: counter(
                registry,
                "petrel_auth_failures_total",
                "Failed SMTP AUTH attempts.",
                &["listener"],
            )?,
            events: counter(
                registry,
                "petrel_events_total",
                "Events recorded in the outbox, by type.",
                &["type"],
            )?,
            events_lost: counter(
                registry,
                "petrel_events_lost_total",
                "Events that could not be recorded (backend unavailable), by type.",
                &["type"],
            )?,
            queue_units,
            held_destinations,
            oldest_message_age,
            active_sessions,
            attempt_duration,
            delivery_latency,
            enqueue_duration,
        })
    }

    /// A registry of its own, for tests and tools.
    pub fn standalone() -> (Registry, RelayMetrics) {
        let registry = Registry::new();
        // A fresh registry has no names yet, so registration cannot clash.
        let metrics = RelayMetrics::register(&registry).expect("fresh registry");
        (registry, metrics)
    }
}

/// Webhook dispatch metrics, labelled by the configured webhook name.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// Requests by outcome (`success`, `http_error`, `timeout`,
    /// `connect_error`) and batches given up (`dropped`).
    pub requests: IntCounterVec,
    /// Events of dropped batches, so a drop's size is visible too.
    pub dropped_events: IntCounterVec,
    /// Events not yet acknowledged by the webhook (claimed or unread).
    pub backlog: IntGaugeVec,
    /// Age of the oldest of those events.
    pub oldest_pending: IntGaugeVec,
    /// Events removed by retention before every webhook acknowledged them.
    pub trimmed_unacked: prometheus::IntCounter,
}

impl WebhookMetrics {
    /// Creates and registers the webhook metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<WebhookMetrics, MetricsError> {
        let gauge = |name: &str, help: &str| -> Result<IntGaugeVec, MetricsError> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["webhook"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let trimmed_unacked = prometheus::IntCounter::new(
            "petrel_events_trimmed_unacked_total",
            "Events removed by retention before every webhook acknowledged them.",
        )?;
        registry.register(Box::new(trimmed_unacked.clone()))?;
        Ok(WebhookMetrics {
            requests: counter(
                registry,
                "petrel_webhook_requests_total",
                "Webhook requests by result; dropped counts batches given up after retrying.",
                &["webhook", "result"],
            )?,
            dropped_events: counter(
                registry,
                "petrel_webhook_dropped_events_total",
                "Events in webhook batches given up after retrying.",
                &["webhook"],
            )?,
            backlog: gauge(
                "petrel_webhook_backlog_events",
                "Events a webhook has not acknowledged yet.",
            )?,
            oldest_pending: gauge(
                "petrel_webhook_oldest_pending_seconds",
                "Age of the oldest event a webhook has not acknowledged yet.",
            )?,
            trimmed_unacked,
        })
    }

    /// Forgets a removed webhook's gauges, so no stale backlog alerts.
    pub fn forget(&self, webhook: &str) {
        let _ = self.backlog.remove_label_values(&[webhook]);
        let _ = self.oldest_pending.remove_label_values(&[webhook]);
    }
}

/// The destination group of a domain or MX host, to bound label cardinality:
/// the big mailbox providers by name, everything else `other`.
pub fn destination_group(host: &str) -> &'static str {
    let host = host.trim_end_matches('.');
    const GROUPS: &[(&str, &[&str])] = &[
        ("gmail", &["gmail.com", "googlemail.com", "google.com"]),
        (
            "microsoft",
            &[
                "outlook.com",
                "hotmail.com",
                "live.com",
                "msn.com",
                "protection.outlook.com",
            ],
        ),
        ("yahoo", &["yahoo.com", "yahoodns.net", "aol.com"]),
        ("apple", &["icloud.com", "me.com", "mac.com"]),
        ("proton", &["proton.me", "protonmail.com", "protonmail.ch"]),
        ("gmx", &["gmx.net", "gmx.de", "web.de", "gmx.com"]),
        ("yandex", &["yandex.ru", "yandex.net"]),
        ("zoho", &["zoho.com", "zohomail.com"]),
    ];
    for (group, suffixes) in GROUPS {
        if suffixes.iter().any(|s| is_within(host, s)) {
            return group;
        }
    }
    "other"
}

/// Whether `host` is `domain` or a name under it, ignoring ASCII case;
/// without allocating, as it runs for every delivery.
fn is_within(host: &str, domain: &str) -> bool {
    let (h, d) = (host.as_bytes(), domain.as_bytes());
    let Some(start) = h.len().checked_sub(d.len()) else {
        return false;
    };
    h[start..].eq_ignore_ascii_case(d) && (start == 0 || h[start - 1] == b'.')
}

/// The class of an enhanced status code (`5.1.1` -> `5.1`), or the reply
/// code's first digit with `.x` when there is none.
pub fn status_class(enhanced: Option<&str>, code: u16) -> String {
    match enhanced.and_then(|e| {
        let mut parts = e.split('.');
        Some((parts.next()?, parts.next()?))
    }) {
        Some((a, b)) if a.len() == 1 && b.chars().all(|c| c.is_ascii_digit()) && !b.is_empty() => {
            format!("{a}.{b}")
        }
        _ => format!("{}.x", code / 100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_group_into_providers_or_other() {
        for (host, group) in [
            ("gmail.com", "gmail"),
            ("gmail-smtp-in.l.google.com.", "gmail"),
            ("example-com.mail.protection.outlook.com", "microsoft"),
            ("mta5.am0.yahoodns.net", "yahoo"),
            ("notgmail.com", "other"),
            ("example.org", "other"),
            ("MX.Hotmail.COM", "microsoft"),
            ("com", "other"),
            ("", "other"),
        ] {
            assert_eq!(destination_group(host), group, "{host}");
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some("5.1.1"), 550), "5.1");
        assert_eq!(status_class(Some("4.7.0"), 421), "4.7");
        assert_eq!(status_class(None, 554), "5.x");
        assert_eq!(status_class(Some("junk"), 550), "5.x");
    }

    #[test]
    fn registers_every_metric_once() {
        let (registry, m) = RelayMetrics::standalone();
        m.received.with_label_values(&["example.test"]).inc();
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(
            names.contains(&"petrel_messages_received_total".to_string()),
            "{names:?}"
        );
        assert!(
            RelayMetrics::register(&registry).is_err(),
            "double registration must fail"
        );
    }

    #[test]
    fn webhook_metrics_register_beside_the_relay_metrics() {
        let (registry, _) = RelayMetrics::standalone();
        let w = WebhookMetrics::register(&registry).unwrap();
        w.requests.with_label_values(&["app", "success"]).inc();
        w.backlog.with_label_values(&["app"]).set(3);
        w.forget("app");
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert!(names.contains(&"petrel_webhook_requests_total".to_string()));
        assert!(!names.contains(&"petrel_webhook_backlog_events".to_string()));
    }
}
