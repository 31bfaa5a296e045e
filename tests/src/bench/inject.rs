//! The injector: M messages from C concurrent SMTP clients, the same for
//! Petrel, Postfix and the bare sink, so their figures compare.
//!
//! Every message gets a unique id (`<run>-<seq>`) and its send time in
//! headers (see [`message`](super::message)); the report lists which ids got
//! 250 and which a 4xx/5xx, so fault tests can check every accepted message
//! against what the sink received.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::client::{Client, ClientError, Reply};
use super::message;

/// What to send, where, how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Relays (or sinks) to send to; client `i` uses `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Messages in total.
    pub messages: u64,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Message size in bytes, headers included.
    pub size: usize,
    /// Recipients per message, all in `rcpt_domain`.
    pub recipients: usize,
    /// Keep one session per client (true) or connect per message (false).
    pub kept_sessions: bool,
    /// Prefix of every message id, unique per run.
    pub run_id: String,
    /// Envelope sender.
    pub from: String,
    /// Domain of the recipients.
    pub rcpt_domain: String,
    /// Each client waits this long between messages (steady traffic in fault
    /// tests); zero sends as fast as the server allows.
    pub interval: Duration,
    /// Offered load in messages per second over all clients: message `n`
    /// starts no earlier than `n / rate` after the start (latency at a
    /// given load rather than at saturation, where a closed loop of C
    /// clients makes it C / throughput by Little's law). `None`: as fast
    /// as the server answers.
    pub rate: Option<f64>,
    /// Stop starting new messages after this long.
    pub deadline: Duration,
    /// Timeout of each SMTP read/write.
    pub io_timeout: Duration,
}

impl Plan {
    /// A plan with bench defaults for `targets`: 1 KB, 1 recipient,
    /// connection per message, sender at `example.test`, recipients at
    /// `example.net`.
    pub fn new(targets: Vec<SocketAddr>, messages: u64, concurrency: usize) -> Plan {
        Plan {
            targets,
            messages,
            concurrency,
            size: 1024,
            recipients: 1,
            kept_sessions: false,
            run_id: format!("run{}", message::now_micros()),
            from: "sender@example.test".to_string(),
            rcpt_domain: "example.net".to_string(),
            interval: Duration::ZERO,
            rate: None,
            deadline: Duration::from_secs(600),
            io_timeout: Duration::from_secs(30),
        }
    }

    /// The id of message number `seq`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.run_id)
    }

    fn recipients_for(&self, seq: u64) -> Vec<String> {
        (0..self.recipients.max(1))
            .map(|r| format!("u{seq}r{r}@{}", self.rcpt_domain))
            .collect()
    }
}

/// How one message fared.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// 250 after DATA, with the time from the start of the transaction.
    Accepted(Duration),
    /// Refused with this reply (4xx or 5xx) at some step.
    Refused(Reply),
    /// The connection failed before a final reply.
    Failed(String),
}

/// Everything the injector saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Ids that got 250 after DATA, with their accept latency.
    pub accepted: Vec<(String, Duration)>,
    /// Ids refused with 4xx, and the reply.
    pub transient: Vec<(String, Reply)>,
    /// Ids refused with 5xx, and the reply.
    pub permanent: Vec<(String, Reply)>,
    /// Ids whose connection failed before a final reply (fate unknown:
    /// possibly queued, so never counted as lost nor as accepted).
    pub failed: Vec<(String, String)>,
    /// Wall time from the first connect to the last reply.
    pub elapsed: Duration,
}

impl Report {
    /// Accepted messages per second.
    pub fn accept_rate(&self) -> f64 {
        self.accepted.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Accept latencies, for percentiles.
    pub fn latencies(&self) -> Vec<Duration> {
        self.accepted.iter().map(|(_, d)| *d).collect()
    }

    fn merge(&mut self, other: Report) {
        self.accepted.extend(other.accepted);
        self.transient.extend(other.transient);
        self.permanent.extend(other.permanent);
        self.failed.extend(other.failed);
    }
}

/// Runs the plan to completion (or its deadline) and reports per message.
pub async fn run(plan: Plan) -> Report {
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(plan.concurrency);
    for i in 0..plan.concurrency.max(1) {
        let plan = plan.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            client_loop(i, &plan, &next, start).await
        }));
    }
    let mut report = Report::default();
    for t in tasks {
        if let Ok(r) = t.await {
            report.merge(r);
        }
    }
    report.elapsed = start.elapsed();
    report
}

async fn client_loop(index: usize, plan: &Plan, next: &AtomicU64, start: Instant) -> Report {
    let mut report = Report::default();
    if plan.targets.is_empty() {
        return report;
    }
    let target = plan.targets[index % plan.targets.len()];
    let mut session: Option<Client> = None;
    loop {
        if start.elapsed() >= plan.deadline {
            break;
        }
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= plan.messages {
            break;
        }
        if let Some(rate) = plan.rate.filter(|r| *r > 0.0) {
            let due = start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let id = plan.id(seq);
        let t0 = Instant::now();
        let outcome = match send_one(plan, target, seq, &id, &mut session).await {
            Ok(reply) if reply.is_positive() => Outcome::Accepted(t0.elapsed()),
            Ok(reply) => Outcome::Refused(reply),
            Err(e) => {
                session = None;
                Outcome::Failed(e.to_string())
            }
        };
        match outcome {
            Outcome::Accepted(d) => report.accepted.push((id, d)),
            Outcome::Refused(r) if r.is_permanent() => report.permanent.push((id, r)),
            Outcome::Refused(r) => {
                // A 421 closes the session; so may any refusal from a
                // struggling server: start afresh.
                session = None;
                report.transient.push((id, r));
            }
            Outcome::Failed(e) => report.failed.push((id, e)),
        }
        if !plan.interval.is_zero() {
            tokio::time::sleep(plan.interval).await;
        }
    }
    if let Some(c) = session {
        c.quit().await;
    }
    report
}

async fn send_one(
    plan: &Plan,
    target: SocketAddr,
    seq: u64,
    id: &str,
    session: &mut Option<Client>,
) -> Result<Reply, ClientError> {
    let mut client = match session.take() {
        Some(c) => c,
        None => {
            let (mut c, greeting) = Client::connect(target, plan.io_timeout).await?;
            if !greeting.is_positive() {
                return Ok(greeting);
            }
            let ehlo = c.command("EHLO client.test").await?;
            if !ehlo.is_positive() {
                return Ok(ehlo);
            }
            c
        }
    };
    let to = plan.recipients_for(seq);
    let body = message::build(id, &plan.from, &to, plan.size, message::now_micros());
    let reply = client.send_mail(&plan.from, &to, &body).await?;
    if plan.kept_sessions && reply.code != 421 {
        *session = Some(client);
    } else {
        client.quit().await;
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::super::sink::Sink;
    use super::*;

    #[tokio::test]
    async fn injects_into_sink_both_ways() {
        tokio::time::timeout(Duration::from_secs(30), async {
            for kept in [false, true] {
                let sink = Sink::start().await.unwrap();
                let mut plan = Plan::new(vec![sink.addr()], 200, 8);
                plan.kept_sessions = kept;
                plan.recipients = 3;
                let report = run(plan).await;
                assert_eq!(
                    report.accepted.len(),
                    200,
                    "kept={kept}: {:?}",
                    report.failed.first()
                );
                assert!(sink.wait_for(200, 600, Duration::from_secs(5)).await);
                assert!(
                    sink.arrivals()
                        .values()
                        .all(|a| a.deliveries == 1 && a.recipients == 3)
                );
            }
        })
        .await
        .unwrap();
    }
}
