//! `petrel-bench`: Petrel's throughput and latency, side by side with
//! Postfix and the loopback ceiling, in one run on this machine.
//!
//! For every injector x size x recipients combination it runs, each from a
//! fresh state: the injector straight into the sink (the loopback ceiling),
//! Petrel with N relays sharing one spawned `redis-server` (AOF everysec),
//! and with `--postfix` Postfix relaying to the same sink. It prints one
//! table and the Petrel/Postfix ratios. Figures, never assertions: this is
//! not a test.
//!
//! Two injectors: `petrel` (in-process clients and a counting sink that also
//! measures end-to-end latency) and `smtp-source` (Postfix's own
//! `smtp-source` injecting and `smtp-sink` counting: a harness that owes
//! nothing to this project). Delivered rates are measured at the sink (the
//! time its count reached what was accepted), accept rates at the injector.
//!
//! `--backlog N` first fills the queue with N postponed 1 KB messages for
//! another destination and reports Redis memory per queued message; compare
//! its rows with a run without it.
//!
//! `--offered-rate R` paces the in-process injector at R msg/s in all, so
//! accept latency is measured at a load, not at saturation (where C
//! clients in a closed loop wait C / throughput on average, whatever the
//! server does).
//!
//! ```text
//! cargo build --release -p petrel-relay -p petrel-tests --bin petrel-bench
//! target/release/petrel-bench --messages 20000 --postfix --injector petrel,smtp-source
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow_lite::{Context, Result};
use clap::{Parser, ValueEnum};
use petrel_crds::config::Webhook;
use petrel_tests::bench::backlog::{self, Backlog};
use petrel_tests::bench::inject::{self, Plan};
use petrel_tests::bench::postfix::{self, Postfix};
use petrel_tests::bench::postfix_tools::{self, PostfixSink, SourcePlan};
use petrel_tests::bench::procstat;
use petrel_tests::bench::relay::{Destination, RelayBuilder, RelayProcess};
use petrel_tests::bench::sink::Sink;
use petrel_tests::bench::stats::{fmt_ms, percentile};
use petrel_tests::dns::DnsServer;
use petrel_tests::redis::{Persistence, RedisServer};
use petrel_tests::webhook_receiver::WebhookReceiver;

/// Benchmark Petrel (and Postfix) relaying to a local counting sink.
#[derive(Parser, Debug, Clone)]
#[command(name = "petrel-bench", version, about)]
struct Args {
    /// Messages per run (M).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Concurrent SMTP clients of the in-process injector (C).
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Parallel sessions of `smtp-source` (`-s`).
    #[arg(long, default_value_t = 20)]
    source_sessions: usize,
    /// Injectors, comma-separated: `petrel` (in-process clients, counting
    /// sink with end-to-end latency) and/or `smtp-source` (Postfix's
    /// smtp-source into smtp-sink).
    #[arg(long, value_delimiter = ',', default_value = "petrel")]
    injector: Vec<InjectorArg>,
    /// Message sizes, comma-separated, with optional k/m suffix (S).
    #[arg(long, value_delimiter = ',', default_value = "1k,20k,100k", value_parser = parse_size)]
    size: Vec<usize>,
    /// Recipients per message, comma-separated (R).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    recipients: Vec<usize>,
    /// Relay process counts to try, comma-separated (N).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    relays: Vec<usize>,
    /// Session modes: `new` connection per message, `kept` sessions, or both.
    #[arg(long, value_delimiter = ',', default_value = "new")]
    sessions: Vec<Sessions>,
    /// Also run Postfix (installed by .ci/install-postfix.sh) on the same load.
    #[arg(long)]
    postfix: bool,
    /// Skip the direct client-to-sink ceiling runs.
    #[arg(long)]
    no_ceiling: bool,
    /// How Petrel delivers: smarthost to the sink, or MX lookups against an
    /// in-process DNS server whose MX points at the sink.
    #[arg(long, value_enum, default_value = "smarthost")]
    transport: TransportArg,
    /// Delivery workers per relay (`delivery.workers`); relay default when absent.
    #[arg(long)]
    workers: Option<u32>,
    /// Upper bound of one run (injection plus delivery), in seconds.
    #[arg(long, default_value_t = 300)]
    run_timeout: u64,
    /// Offered load of the in-process injector, msg/s over all clients
    /// (each message waits for its start time, n / rate); without it the
    /// clients send as fast as they are answered. For accept latency at a
    /// load below saturation.
    #[arg(long)]
    offered_rate: Option<f64>,
    /// RUST_LOG of the relays.
    #[arg(long, default_value = "warn")]
    relay_log: String,
    /// Also run Petrel with one webhook configured (to a counting receiver
    /// in this process), to compare delivered msg/s with and without it.
    #[arg(long)]
    webhook: bool,
    /// Before each Petrel run, fill the queue with this many 1 KB messages
    /// for a postponed destination (due in a day), written through the
    /// queue API, and report Redis memory per queued message. Adds a
    /// `petrel xN +backlog` row next to the empty-queue one.
    #[arg(long)]
    backlog: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Sessions {
    New,
    Kept,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Smarthost,
    Mx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InjectorArg {
    /// The in-process injector and counting sink.
    Petrel,
    /// Postfix's `smtp-source` into Postfix's `smtp-sink`.
    SmtpSource,
}

impl InjectorArg {
    fn label(self) -> &'static str {
        match self {
            InjectorArg::Petrel => "petrel",
            InjectorArg::SmtpSource => "smtp-source",
        }
    }
}

fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k') => (&s[..s.len() - 1], 1024),
        Some(b'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (&s[..], 1),
    };
    digits
        .parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a size like 1024, 1k or 20k"))
}

/// A tiny anyhow stand-in: the bench reports errors as text and moves on.
mod anyhow_lite {
    pub type Result<T> = std::result::Result<T, String>;
    pub trait Context<T> {
        fn context(self, what: &str) -> Result<T>;
    }
    impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
        fn context(self, what: &str) -> Result<T> {
            self.map_err(|e| format!("{what}: {e}"))
        }
    }
}

/// One workload.
#[derive(Debug, Clone, Copy)]
struct Load {
    injector: InjectorArg,
    size: usize,
    recipients: usize,
    sessions: Sessions,
}

/// What one system did with one workload.
#[derive(Debug, Clone, Default)]
struct Row {
    system: String,
    accepted: u64,
    refused: u64,
    failed: u64,
    delivered: u64,
    accept_rate: f64,
    delivered_rate: Option<f64>,
    accept_p50: Option<Duration>,
    accept_p99: Option<Duration>,
    e2e_p50: Option<Duration>,
    e2e_p99: Option<Duration>,
    rss_mb: Option<f64>,
    cpu_ms_per_msg: Option<f64>,
    redis_cpu_ms_per_msg: Option<f64>,
    note: String,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("petrel-bench: starting runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> std::process::ExitCode {
    let with_postfix = args.postfix && postfix::available();
    if args.postfix && !with_postfix {
        eprintln!(
            "petrel-bench: --postfix given but postfix is not installed: run .ci/install-postfix.sh"
        );
    }
    if args.injector.contains(&InjectorArg::SmtpSource) && !postfix_tools::available() {
        eprintln!(
            "petrel-bench: --injector smtp-source needs smtp-source and smtp-sink: run .ci/install-postfix.sh"
        );
        return std::process::ExitCode::FAILURE;
    }
    println!("{}", machine_header(&args));
    let mut tables = String::new();
    for &injector in &args.injector {
        for &sessions in &args.sessions {
            for &size in &args.size {
                for &recipients in &args.recipients {
                    let load = Load {
                        injector,
                        size,
                        recipients,
                        sessions,
                    };
                    let rows = run_load(&args, load, with_postfix).await;
                    let table = render(&args, load, &rows);
                    println!("{table}");
                    tables.push_str(&table);
                    tables.push('\n');
                }
            }
        }
    }
    println!("==== summary ====\n{tables}");
    std::process::ExitCode::SUCCESS
}

/// Every system on one workload, Petrel and Postfix alternating with the
/// ceiling first.
async fn run_load(args: &Args, load: Load, with_postfix: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    if !args.no_ceiling {
        rows.push(run_or_note("sink (ceiling)", ceiling(args, load).await));
    }
    for &n in &args.relays {
        rows.push(run_or_note(
            &format!("petrel x{n}"),
            petrel(args, load, n, Extra::None).await,
        ));
        if args.webhook {
            rows.push(run_or_note(
                &format!("petrel x{n} +wh"),
                petrel(args, load, n, Extra::Webhook).await,
            ));
        }
        if let Some(backlog) = args.backlog {
            rows.push(run_or_note(
                &format!("petrel x{n} +backlog"),
                petrel(args, load, n, Extra::Backlog(backlog)).await,
            ));
        }
    }
    if with_postfix {
        rows.push(run_or_note("postfix", postfix_run(args, load).await));
    }
    rows
}

fn run_or_note(system: &str, result: Result<Row>) -> Row {
    match result {
        Ok(row) => row,
        Err(e) => {
            eprintln!("petrel-bench: {system}: {e}");
            Row {
                system: system.to_string(),
                note: format!("error: {}", e.lines().next().unwrap_or_default()),
                ..Row::default()
            }
        }
    }
}

fn plan(args: &Args, load: Load, targets: Vec<SocketAddr>, system: &str) -> Plan {
    let mut plan = Plan::new(targets, args.messages, args.concurrency);
    plan.size = load.size;
    plan.recipients = load.recipients;
    plan.kept_sessions = load.sessions == Sessions::Kept;
    plan.rate = args.offered_rate;
    plan.deadline = Duration::from_secs(args.run_timeout);
    plan.run_id = format!(
        "{}-{}",
        system.replace([' ', '(', ')'], ""),
        petrel_tests::bench::message::now_micros()
    );
    plan
}

/// Where a run's messages end up and are counted: the in-process sink
/// (which also times each message end to end) or Postfix's `smtp-sink`.
enum Counter {
    Bench(Sink),
    Postfix(PostfixSink),
}

impl Counter {
    async fn start(injector: InjectorArg) -> Result<Counter> {
        Ok(match injector {
            InjectorArg::Petrel => {
                let sink = Sink::start().await.context("starting sink")?;
                // As Postfix and the large mailbox providers do; smtp-sink
                // does not, so the two injectors' rows cover BDAT and DATA.
                sink.set_chunking(true);
                Counter::Bench(sink)
            }
            InjectorArg::SmtpSource => {
                Counter::Postfix(PostfixSink::start().await.context("starting smtp-sink")?)
            }
        })
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Counter::Bench(s) => s.addr(),
            Counter::Postfix(s) => s.addr(),
        }
    }

    /// Waits up to `step` for `messages` (with `rcpts` recipients in all).
    async fn wait_for(&self, messages: u64, rcpts: u64, step: Duration) -> bool {
        match self {
            Counter::Bench(s) => s.wait_for(messages, rcpts, step).await,
            Counter::Postfix(s) => s.wait_for(messages, step).await,
        }
    }

    fn delivered(&self) -> u64 {
        match self {
            Counter::Bench(s) => s.unique(),
            Counter::Postfix(s) => s.messages(),
        }
    }

    fn take_latencies(&self) -> Vec<Duration> {
        match self {
            Counter::Bench(s) => s.take_latencies(),
            Counter::Postfix(_) => Vec::new(),
        }
    }
}

/// What the injector reports back, whichever it was.
struct Injected {
    accepted: u64,
    refused: u64,
    failed: u64,
    accept_rate: f64,
    latencies: Vec<Duration>,
    note: String,
}

/// Runs the load's injector against `targets` (messages split evenly over
/// them for smtp-source, which speaks to one server).
async fn inject_load(args: &Args, load: Load, targets: Vec<SocketAddr>, system: &str) -> Injected {
    match load.injector {
        InjectorArg::Petrel => {
            let report = inject::run(plan(args, load, targets, system)).await;
            Injected {
                accepted: report.accepted.len() as u64,
                refused: (report.transient.len() + report.permanent.len()) as u64,
                failed: report.failed.len() as u64,
                accept_rate: report.accept_rate(),
                latencies: report.latencies(),
                note: String::new(),
            }
        }
        InjectorArg::SmtpSource => {
            let n = targets.len().max(1) as u64;
            let start = Instant::now();
            let runs = targets.iter().enumerate().map(|(i, &target)| {
                let share = args.messages / n + u64::from((i as u64) < args.messages % n);
                let plan = SourcePlan {
                    target,
                    messages: share,
                    sessions: (args.source_sessions / n as usize).max(1),
                    size: load.size,
                    recipients: load.recipients,
                    kept_sessions: load.sessions == Sessions::Kept,
                    from: "sender@example.test".into(),
                    to: "rcpt@example.net".into(),
                };
                async move {
                    postfix_tools::run_source(&plan, Duration::from_secs(args.run_timeout)).await
                }
            });
            let results = futures::future::join_all(runs).await;
            let elapsed = start.elapsed();
            let mut accepted = 0;
            let mut note = String::new();
            for r in results {
                match r {
                    Ok(r) => accepted += r.accepted,
                    Err(e) => note = format!("smtp-source: {e}"),
                }
            }
            Injected {
                accepted,
                refused: 0,
                failed: 0,
                accept_rate: accepted as f64 / elapsed.as_secs_f64().max(1e-9),
                latencies: Vec::new(),
                note,
            }
        }
    }
}

/// Injects, waits for the sink to have every accepted message, and fills
/// the figures both sides observe. `observe` samples the system under test
/// every 100 ms while it runs (for Postfix's summed RSS).
async fn drive(
    args: &Args,
    load: Load,
    targets: Vec<SocketAddr>,
    counter: &Counter,
    system: &str,
    mut observe: impl FnMut(),
) -> Row {
    let start = Instant::now();
    let bound = Duration::from_secs(args.run_timeout);
    let injector = inject_load(args, load, targets, system);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let injected = {
        tokio::pin!(injector);
        loop {
            tokio::select! {
                r = &mut injector => break r,
                _ = tick.tick() => observe(),
            }
        }
    };
    let accepted = injected.accepted;
    let want_rcpts = accepted * load.recipients as u64;
    let mut complete = false;
    loop {
        let left = bound.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let step = left.min(Duration::from_millis(100));
        if counter.wait_for(accepted, want_rcpts, step).await {
            complete = true;
            break;
        }
        observe();
    }
    let delivered_at = start.elapsed();
    let mut accept_lat = injected.latencies;
    let mut e2e = counter.take_latencies();
    let delivered = counter.delivered();
    let mut note = injected.note;
    if !complete {
        note = format!(
            "{note} timeout: {delivered}/{accepted} delivered after {}s",
            bound.as_secs()
        );
    }
    Row {
        system: system.to_string(),
        accepted,
        refused: injected.refused,
        failed: injected.failed,
        delivered,
        accept_rate: injected.accept_rate,
        delivered_rate: (complete && accepted > 0)
            .then(|| delivered as f64 / delivered_at.as_secs_f64()),
        accept_p50: percentile(&mut accept_lat, 50.0),
        accept_p99: percentile(&mut accept_lat, 99.0),
        e2e_p50: percentile(&mut e2e, 50.0),
        e2e_p99: percentile(&mut e2e, 99.0),
        note: note.trim().to_string(),
        ..Row::default()
    }
}

async fn ceiling(args: &Args, load: Load) -> Result<Row> {
    let counter = Counter::start(load.injector).await?;
    let mut row = drive(
        args,
        load,
        vec![counter.addr()],
        &counter,
        "sink (ceiling)",
        || {},
    )
    .await;
    let how = match load.injector {
        InjectorArg::Petrel => "injector+sink in-process",
        InjectorArg::SmtpSource => "smtp-source straight into smtp-sink",
    };
    row.note = format!("{} {how}", row.note).trim().to_string();
    Ok(row)
}

/// What a Petrel run adds to the plain relay.
#[derive(Debug, Clone, Copy)]
enum Extra {
    None,
    /// One webhook, to a counting receiver.
    Webhook,
    /// A queue pre-filled with this many postponed messages.
    Backlog(u64),
}

async fn petrel(args: &Args, load: Load, n: usize, extra: Extra) -> Result<Row> {
    let counter = Counter::start(load.injector).await?;
    let webhook = matches!(extra, Extra::Webhook);
    // With `--webhook`: a verifying, counting receiver and one webhook to it.
    let secret_dir = tempfile::tempdir().context("creating a temp dir")?;
    let receiver = if webhook {
        Some(
            WebhookReceiver::start(b"petrel-bench-secret")
                .await
                .context("starting the webhook receiver")?,
        )
    } else {
        None
    };
    let hook = receiver.as_ref().map(|r| {
        let path = secret_dir.path().join("webhook-secret");
        let _ = std::fs::write(&path, "petrel-bench-secret");
        Webhook::new("bench", &r.url(), path)
    });
    let redis = RedisServer::builder()
        .persistence(Persistence::Aof)
        .start()
        .await
        .context("starting redis-server")?;
    let redis_pid = redis_pid(&redis).await;
    let filled = match extra {
        Extra::Backlog(count) => Some(
            backlog::fill(
                &redis,
                &Backlog {
                    messages: count,
                    ..Backlog::default()
                },
            )
            .await
            .context("filling the backlog")?,
        ),
        Extra::None | Extra::Webhook => None,
    };
    let (destination, _dns) = match args.transport {
        TransportArg::Smarthost => (Destination::Smarthost(counter.addr()), None),
        TransportArg::Mx => {
            let dns = DnsServer::start().await.context("starting DNS server")?;
            dns.add_mx("example.net", 10, "mx.example.net");
            dns.add_a("mx.example.net", std::net::Ipv4Addr::LOCALHOST);
            let d = Destination::Mx {
                port: counter.addr().port(),
                nameservers: vec![dns.addr()],
            };
            (d, Some(dns))
        }
    };
    let mut relays: Vec<RelayProcess> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut b = RelayBuilder::new(&redis.url(), &destination)
            .context("configuring relay")?
            .log_filter(&args.relay_log);
        if let Some(w) = args.workers {
            b.config_mut().delivery.workers = w;
        }
        if let Some(hook) = &hook {
            b.config_mut().events.webhooks = vec![hook.clone()];
        }
        relays.push(b.start().await.context("starting petrel-relay")?);
    }
    let pids: Vec<u32> = relays.iter().filter_map(RelayProcess::pid).collect();
    let cpu_before: Duration = pids.iter().filter_map(|&p| procstat::cpu_time(p)).sum();
    let redis_before = redis_pid.and_then(procstat::cpu_time);
    let calls_before = redis_calls(&redis).await;
    let targets = relays.iter().map(RelayProcess::smtp_addr).collect();
    let system = match extra {
        Extra::None => format!("petrel x{n}"),
        Extra::Webhook => format!("petrel x{n} +wh"),
        Extra::Backlog(_) => format!("petrel x{n} +backlog"),
    };
    let mut row = drive(args, load, targets, &counter, &system, || {}).await;
    if let Some(r) = &receiver {
        // Events keep arriving after the last delivery; wait a little for
        // the tail (not part of the delivered rate) and say how many came.
        let expected = (row.accepted * 2 * load.recipients as u64) as usize;
        r.wait_until(Duration::from_secs(30), |r| r.unique() >= expected)
            .await;
        row.note = format!(
            "{} webhook: {}/{expected} events, {} requests, {} bad signatures",
            row.note,
            r.unique(),
            r.requests(),
            r.bad_signatures()
        )
        .trim()
        .to_string();
    }
    if let Some(filled) = &filled {
        row.note = format!("{} {}", row.note, filled.describe())
            .trim()
            .to_string();
    }
    if let (Some(before), Some(after)) = (calls_before, redis_calls(&redis).await) {
        // Commands Redis ran (inside scripts too): how much work each
        // message costs the queue.
        let per = after.saturating_sub(before) as f64 / row.delivered.max(1) as f64;
        row.note = format!("{} {per:.1} redis cmds/msg", row.note)
            .trim()
            .to_string();
    }
    let cpu_after: Duration = pids.iter().filter_map(|&p| procstat::cpu_time(p)).sum();
    let per_msg = |d: Duration| d.as_secs_f64() * 1000.0 / row.delivered.max(1) as f64;
    row.cpu_ms_per_msg = Some(per_msg(cpu_after.saturating_sub(cpu_before)));
    if let (Some(pid), Some(before)) = (redis_pid, redis_before) {
        row.redis_cpu_ms_per_msg =
            procstat::cpu_time(pid).map(|a| per_msg(a.saturating_sub(before)));
    }
    let hwm: u64 = pids
        .iter()
        .filter_map(|&p| procstat::status_kb(p, "VmHWM"))
        .sum();
    row.rss_mb = Some(hwm as f64 / 1024.0);
    for (i, r) in relays.iter_mut().enumerate() {
        if !r.is_running() {
            row.note = format!("{} relay {i} died: {}", row.note, r.log_tail(3))
                .trim()
                .to_string();
        }
    }
    Ok(row)
}

/// Commands Redis has executed (`total_commands_processed`: a script call
/// and every command it runs).
async fn redis_calls(redis: &RedisServer) -> Option<u64> {
    let info = redis.raw_command(&["INFO", "stats"]).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn redis_pid(redis: &RedisServer) -> Option<u32> {
    let info = redis.raw_command(&["INFO", "server"]).await.ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

async fn postfix_run(args: &Args, load: Load) -> Result<Row> {
    let counter = Counter::start(load.injector).await?;
    let pf = Postfix::start(counter.addr())
        .await
        .context("starting postfix")?;
    let master = pf.master_pid().await;
    let cpu_before = master.and_then(procstat::tree_cpu_time);
    let mut peak_kb = 0u64;
    let mut row = drive(args, load, vec![pf.addr()], &counter, "postfix", || {
        if let Some(m) = master {
            peak_kb = peak_kb.max(procstat::tree_pss_kb(m));
        }
    })
    .await;
    if let (Some(m), Some(before)) = (master, cpu_before)
        && let Some(after) = procstat::tree_cpu_time(m)
    {
        row.cpu_ms_per_msg =
            Some(after.saturating_sub(before).as_secs_f64() * 1000.0 / row.delivered.max(1) as f64);
    }
    row.rss_mb = (peak_kb > 0).then(|| peak_kb as f64 / 1024.0);
    pf.stop().await;
    Ok(row)
}

fn machine_header(args: &Args) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| procstat::parse_status_kb(&t, "MemTotal"))
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Other work on the machine moves every figure: say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "petrel-bench: {cores} cores ({model}), {} MB RAM, Linux {}, load average {} at start",
        mem_kb / 1024,
        kernel.trim(),
        load.join(" ")
    );
    let _ = writeln!(
        s,
        "M={} messages per run, C={} in-process clients{}, smtp-source -s {}, transport {:?}, Redis AOF everysec, relay log {}",
        args.messages,
        args.concurrency,
        args.offered_rate
            .map(|r| format!(" offering {r:.0} msg/s"))
            .unwrap_or_default(),
        args.source_sessions,
        args.transport,
        args.relay_log
    );
    let _ = write!(
        s,
        "acc msg/s at the injector; dlv msg/s at the sink (all accepted messages counted there, from the first connect); dlv/acc = dlv msg/s / acc msg/s.\n\
         rss: petrel = sum of VmHWM of its relays; postfix = peak of summed PSS (shared pages once) of all its processes.\n\
         cpu: ms of CPU per delivered message (= s per 1000) of the relay processes; postfix: master + all children."
    );
    s
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "-".into())
}

/// Table columns: latencies in ms, rates in messages per second, `refus` =
/// refused or failed at the client, `dlv/acc` = delivered rate over accept
/// rate, cpu in CPU-seconds per 1000 delivered.
const COLUMNS: [&str; 14] = [
    "system",
    "accepted",
    "refus",
    "acc msg/s",
    "dlv msg/s",
    "dlv/acc",
    "acc p50",
    "acc p99",
    "e2e p50",
    "e2e p99",
    "rss MB",
    "cpu s/1k",
    "redis s/1k",
    "note",
];

fn render(args: &Args, load: Load, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## injector {}, size {} B, {} rcpt/msg, {} sessions, {} messages, {} clients",
        load.injector.label(),
        load.size,
        load.recipients,
        match load.sessions {
            Sessions::New => "new-connection",
            Sessions::Kept => "kept",
        },
        args.messages,
        match load.injector {
            InjectorArg::Petrel => args.concurrency,
            InjectorArg::SmtpSource => args.source_sessions,
        }
    );
    let _ = writeln!(
        s,
        "{:<20} {:>8} {:>6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10}  {}",
        COLUMNS[0],
        COLUMNS[1],
        COLUMNS[2],
        COLUMNS[3],
        COLUMNS[4],
        COLUMNS[5],
        COLUMNS[6],
        COLUMNS[7],
        COLUMNS[8],
        COLUMNS[9],
        COLUMNS[10],
        COLUMNS[11],
        COLUMNS[12],
        COLUMNS[13]
    );
    for r in rows {
        let ratio = r
            .delivered_rate
            .filter(|_| r.accept_rate > 0.0)
            .map(|d| format!("{:.0}%", 100.0 * d / r.accept_rate))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<20} {:>8} {:>6} {:>9.0} {:>9} {:>7} {:>8} {:>8} {:>9} {:>9} {:>8} {:>10} {:>10}  {}",
            r.system,
            r.accepted,
            r.refused + r.failed,
            r.accept_rate,
            fmt_opt(r.delivered_rate, 0),
            ratio,
            fmt_ms(r.accept_p50),
            fmt_ms(r.accept_p99),
            fmt_ms(r.e2e_p50),
            fmt_ms(r.e2e_p99),
            fmt_opt(r.rss_mb, 1),
            fmt_opt(r.cpu_ms_per_msg, 2),
            fmt_opt(r.redis_cpu_ms_per_msg, 2),
            r.note
        );
    }
    let postfix = rows.iter().find(|r| r.system == "postfix");
    let ceiling = rows.iter().find(|r| r.system == "sink (ceiling)");
    for r in rows.iter().filter(|r| r.system.starts_with("petrel")) {
        let mut parts = Vec::new();
        for suffix in [" +wh", " +backlog"] {
            if let Some(plain) = r.system.strip_suffix(suffix)
                && let Some(base) = rows.iter().find(|b| b.system == plain)
            {
                if let (Some(a), Some(b)) = (r.delivered_rate, base.delivered_rate) {
                    parts.push(format!("delivered rate {:.0}% of {plain}", 100.0 * a / b));
                }
                if base.accept_rate > 0.0 {
                    parts.push(format!(
                        "accept rate {:.0}% of {plain}",
                        100.0 * r.accept_rate / base.accept_rate
                    ));
                }
            }
        }
        if let Some(p) = postfix {
            if let (Some(a), Some(b)) = (r.delivered_rate, p.delivered_rate) {
                parts.push(format!("delivered rate {:.2}x postfix", a / b));
            }
            if p.accept_rate > 0.0 {
                parts.push(format!("accept rate {:.2}x", r.accept_rate / p.accept_rate));
            }
            if let (Some(a), Some(b)) = (r.cpu_ms_per_msg, p.cpu_ms_per_msg) {
                parts.push(format!("cpu/msg {:.2}x", a / b.max(1e-9)));
            }
            if let (Some(a), Some(b)) = (r.e2e_p50, p.e2e_p50) {
                parts.push(format!(
                    "e2e p50 {:.2}x",
                    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
                ));
            }
        }
        if let Some(d) = r.delivered_rate.filter(|_| r.accept_rate > 0.0) {
            parts.push(format!(
                "delivered/accepted {:.0}%",
                100.0 * d / r.accept_rate
            ));
        }
        if let (Some(c), Some(d)) = (ceiling, r.delivered_rate)
            && c.accept_rate > 0.0
        {
            parts.push(format!(
                "{:.0}% of loopback ceiling",
                100.0 * d / c.accept_rate
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(s, "  {}: {}", r.system, parts.join(", "));
        }
    }
    s
}
