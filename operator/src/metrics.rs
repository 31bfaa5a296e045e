//! Operator metrics (prefix `petrel_operator_`), registered in one place:
//! reconciles by kind and result, reconcile duration, DNS record states per
//! domain, the age of each domain's active DKIM key, and whether the relay's
//! reputation guard pauses a domain.

use std::time::Instant;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by kind and result (`ok` or an error category).
    pub reconciles: IntCounterVec,
    /// Reconcile duration by kind.
    pub reconcile_duration: HistogramVec,
    /// DNS records of each sending domain by verification state.
    pub dns_records: IntGaugeVec,
    /// Age in seconds of each domain's active DKIM key.
    pub dkim_key_age: IntGaugeVec,
    /// 1 while the relay's reputation guard pauses a domain (its Paused condition), else 0.
    pub domain_paused: IntGaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "petrel_operator_reconciles_total",
                "Reconciles by kind and result",
            ),
            &["kind", "result"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "petrel_operator_reconcile_duration_seconds",
                "Reconcile duration by kind",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["kind"],
        )?;
        let dns_records = IntGaugeVec::new(
            Opts::new(
                "petrel_operator_dns_records",
                "DNS records of a sending domain by verification state",
            ),
            &["namespace", "domain", "state"],
        )?;
        let dkim_key_age = IntGaugeVec::new(
            Opts::new(
                "petrel_operator_dkim_key_age_seconds",
                "Age of the active DKIM key of a domain",
            ),
            &["namespace", "domain"],
        )?;
        let domain_paused = IntGaugeVec::new(
            Opts::new(
                "petrel_operator_sending_domain_paused",
                "1 while the relay's reputation guard pauses the sending domain (condition Paused=True)",
            ),
            &["namespace", "domain"],
        )?;
        registry.register(Box::new(domain_paused.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(dns_records.clone()))?;
        registry.register(Box::new(dkim_key_age.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_duration,
            dns_records,
            dkim_key_age,
            domain_paused,
        })
    }

    /// Starts timing a reconcile of `kind`; the guard records duration on drop.
    pub fn start(&self, kind: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            kind,
            started: Instant::now(),
        }
    }

    /// Counts a finished reconcile.
    pub fn count(&self, kind: &str, result: &str) {
        self.reconciles.with_label_values(&[kind, result]).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    started: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .with_label_values(&[self.kind])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics() {
        let m = Metrics::new().expect("registers");
        {
            let _t = m.start("DkimKey");
            m.count("DkimKey", "ok");
        }
        m.dns_records
            .with_label_values(&["mail", "example.com", "verified"])
            .set(3);
        let text = m.render();
        assert!(
            text.contains("petrel_operator_reconciles_total{kind=\"DkimKey\",result=\"ok\"} 1")
        );
        assert!(
            text.contains("petrel_operator_reconcile_duration_seconds_count{kind=\"DkimKey\"} 1")
        );
        assert!(text.contains("petrel_operator_dns_records{domain=\"example.com\",namespace=\"mail\",state=\"verified\"} 3"));
    }
}
