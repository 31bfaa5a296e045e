//! A whole test deployment in one call: a private `redis-server`, a counting
//! sink as the destination, and N relay processes sharing the queue. Fault
//! tests start one, break a piece of it, and check the sink against what
//! the clients were told.

use std::net::SocketAddr;
use std::time::Duration;

use petrel_crds::config::RelayConfig;

use super::inject::{self, Plan, Report};
use super::relay::{Destination, RelayBuilder, RelayError, RelayProcess};
use super::sink::Sink;
use crate::redis::{Persistence, RedisError, RedisServer};

/// Why a scenario could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The sink could not bind.
    #[error("starting sink: {0}")]
    Sink(#[from] std::io::Error),
    /// redis-server failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// A relay failed to start (binary missing, bad config, crashed).
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Redis + sink + relays.
pub struct Scenario {
    /// The shared queue.
    pub redis: RedisServer,
    /// The destination every message is delivered to.
    pub sink: Sink,
    /// The relay processes, all on the same queue.
    pub relays: Vec<RelayProcess>,
}

impl Scenario {
    /// Starts `relays` relays delivering by smarthost to a fresh sink, each
    /// config adjusted by `configure` (short timeouts, retry schedule...).
    pub async fn start(
        relays: usize,
        persistence: Persistence,
        configure: impl Fn(&mut RelayConfig),
    ) -> Result<Scenario, ScenarioError> {
        Self::start_with(relays, persistence, Destination::Smarthost, configure).await
    }

    /// Like [`start`](Self::start) with the destination derived from the
    /// sink's address (e.g. MX transport to the sink's port).
    pub async fn start_with(
        relays: usize,
        persistence: Persistence,
        destination: impl FnOnce(SocketAddr) -> Destination,
        configure: impl Fn(&mut RelayConfig),
    ) -> Result<Scenario, ScenarioError> {
        let sink = Sink::start().await?;
        let redis = RedisServer::builder()
            .persistence(persistence)
            .start()
            .await?;
        let destination = destination(sink.addr());
        let mut procs = Vec::with_capacity(relays);
        for _ in 0..relays {
            let builder = RelayBuilder::new(&redis.url(), &destination)?.with(&configure);
            procs.push(builder.start().await?);
        }
        Ok(Scenario {
            redis,
            sink,
            relays: procs,
        })
    }

    /// SMTP addresses of all relays.
    pub fn targets(&self) -> Vec<SocketAddr> {
        self.relays.iter().map(RelayProcess::smtp_addr).collect()
    }

    /// Sends `messages` 1 KB messages with `recipients` each over
    /// `concurrency` clients, spread over every relay.
    pub async fn send(
        &self,
        run_id: &str,
        messages: u64,
        concurrency: usize,
        recipients: usize,
    ) -> Report {
        let mut plan = Plan::new(self.targets(), messages, concurrency);
        plan.run_id = run_id.to_string();
        plan.recipients = recipients;
        plan.io_timeout = Duration::from_secs(10);
        inject::run(plan).await
    }

    /// Log tails of every relay, for assertion messages.
    pub fn logs(&self) -> String {
        self.relays
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- relay {i} ---\n{}", r.log_tail(40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Ids that got 250.
pub fn accepted_ids(report: &Report) -> Vec<String> {
    report.accepted.iter().map(|(id, _)| id.clone()).collect()
}

/// Ids that got a 4xx or 5xx reply.
pub fn refused_ids(report: &Report) -> Vec<String> {
    report
        .transient
        .iter()
        .chain(&report.permanent)
        .map(|(id, _)| id.clone())
        .collect()
}
