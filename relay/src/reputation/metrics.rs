//! Metrics of the reputation guard, labelled by configured sending domain.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::state::DomainState;

/// The guard's gauges and counters.
#[derive(Clone)]
pub struct ReputationMetrics {
    /// `petrel_reputation_state{domain}`: 0 ok, 1 warning, 2 paused.
    pub state: IntGaugeVec,
    /// `petrel_reputation_bounce_rate{domain}`: a fraction (0.072).
    pub bounce_rate: GaugeVec,
    /// `petrel_reputation_complaint_rate{domain}`: a fraction.
    pub complaint_rate: GaugeVec,
    /// `petrel_reputation_volume{domain}`: delivered + hard bounces in the window.
    pub volume: IntGaugeVec,
    /// `petrel_reputation_held_total{domain}`: queued units put back
    /// because their domain is paused (one per unit and look).
    pub held: IntCounterVec,
}

impl ReputationMetrics {
    /// Creates and registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<ReputationMetrics, prometheus::Error> {
        let int_gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["domain"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let gauge = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["domain"])?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        Ok(ReputationMetrics {
            state: int_gauge(
                "petrel_reputation_state",
                "Reputation state of a sending domain: 0 ok, 1 warning, 2 paused.",
            )?,
            bounce_rate: gauge(
                "petrel_reputation_bounce_rate",
                "Hard bounces / (delivered + hard bounces) over the domain's window.",
            )?,
            complaint_rate: gauge(
                "petrel_reputation_complaint_rate",
                "Complaints / delivered over the domain's window.",
            )?,
            volume: int_gauge(
                "petrel_reputation_volume",
                "Delivered + hard-bounced recipients in the domain's window.",
            )?,
            held: counter(
                "petrel_reputation_held_total",
                "Queued delivery units held back because their sending domain is paused.",
                "domain",
            )?,
        })
    }

    /// Shows `record` for `domain`.
    pub fn show(&self, domain: &str, record: &DomainState) {
        self.state
            .with_label_values(&[domain])
            .set(record.level.gauge());
        self.bounce_rate
            .with_label_values(&[domain])
            .set(record.counts.bounce_rate());
        self.complaint_rate
            .with_label_values(&[domain])
            .set(record.counts.complaint_rate());
        self.volume
            .with_label_values(&[domain])
            .set(i64::try_from(record.counts.volume()).unwrap_or(i64::MAX));
    }
}
