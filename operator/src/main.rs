//! `petrel-operator`: parse flags, connect to Kubernetes, serve metrics and
//! health, wait for the Lease, run the controllers until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use petrel_operator::clock::SystemClock;
use petrel_operator::context::{Context, Settings};
use petrel_operator::dns::HickoryTxtLookup;
use petrel_operator::http::{HttpState, serve};
use petrel_operator::leader::LeaseLock;
use petrel_operator::metrics::Metrics;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Petrel's Kubernetes operator: turns SmtpRelay, SendingDomain and DkimKey
/// resources into relay Deployments, DNS records and rotated DKIM keys.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "PETREL_NAMESPACE")]
    namespace: Option<String>,
    /// DNS server (ip:port) for record verification; repeat for several.
    /// Default: the nameservers in /etc/resolv.conf.
    #[arg(long = "dns-server", env = "PETREL_DNS_SERVERS", value_delimiter = ',')]
    dns_servers: Vec<SocketAddr>,
    /// Address of the metrics and health HTTP server.
    #[arg(long, env = "PETREL_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "PETREL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Relay image for SmtpRelays that do not set one.
    #[arg(long, env = "PETREL_RELAY_IMAGE")]
    relay_image: Option<String>,
    /// Manage KEDA ScaledObjects for SmtpRelays with `autoscaling.engine: keda`
    /// (needs KEDA's CRD and RBAC on scaledobjects.keda.sh).
    #[arg(long, env = "PETREL_KEDA")]
    keda: bool,
    /// Manage external-dns DNSEndpoints for SendingDomains with
    /// `dnsPublish.externalDns: true` (needs external-dns's CRD and RBAC on
    /// dnsendpoints.externaldns.k8s.io).
    #[arg(long, env = "PETREL_EXTERNAL_DNS")]
    external_dns: bool,
    /// Disable leader election (only for a single replica, e.g. local runs).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "petrel-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "petrel-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = ctrl_c => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.log_format);

    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::new().context("registering metrics")?);
    let dns = HickoryTxtLookup::new(&args.dns_servers, Duration::from_secs(5))
        .context("building the DNS resolver")?;
    let mut settings = Settings {
        keda: args.keda,
        external_dns: args.external_dns,
        ..Settings::default()
    };
    if let Some(image) = args.relay_image.clone() {
        settings.relay_image = image;
    }
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Arc::new(SystemClock),
        settings,
        Arc::new(dns),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = move || {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>
    };

    let ready = Arc::new(AtomicBool::new(false));
    let http = tokio::spawn(serve(
        args.metrics_addr,
        HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown(),
    ));

    let (leader_tx, mut leader_rx) = watch::channel(args.no_leader_election);
    // Completed once the controllers have stopped: the lease task then releases the Lease.
    let (release_tx, mut release_rx) = watch::channel(false);
    let mut lease_task = None;
    if !args.no_leader_election {
        let identity = args
            .identity
            .clone()
            .unwrap_or_else(|| format!("petrel-operator-{}", std::process::id()));
        let lock = LeaseLock {
            api: kube::Api::namespaced(client.clone(), &args.lease_namespace),
            name: args.lease_name.clone(),
            identity,
            lease_duration: Duration::from_secs(15),
        };
        let released = async move {
            let _ = release_rx.wait_for(|release| *release).await;
        };
        lease_task = Some(tokio::spawn(lock.run(
            leader_tx,
            Duration::from_secs(5),
            released,
        )));
    }
    ready.store(true, Ordering::Relaxed);

    tracing::info!(namespace = ?args.namespace, "waiting for leadership");
    tokio::select! {
        _ = termination() => {
            tracing::info!("terminated before leading");
            let _ = stop_tx.send(true);
            let _ = release_tx.send(true);
            if let Some(task) = lease_task {
                let _ = task.await;
            }
            let _ = http.await;
            return Ok(());
        }
        led = leader_rx.wait_for(|leading| *leading) => { led.context("leader election stopped")?; }
    }
    tracing::info!("leading: starting controllers");

    let controllers = tokio::spawn(petrel_operator::controllers::run(
        ctx,
        args.namespace.clone(),
        shutdown.clone(),
    ));
    let lost = async {
        // Losing the Lease means another replica may act: stop at once.
        let _ = leader_rx.wait_for(|leading| !*leading).await;
    };
    let outcome = tokio::select! {
        _ = termination() => Ok(()),
        _ = lost => Err(anyhow::anyhow!("lost the leader lease")),
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let mut controllers = controllers;
    if tokio::time::timeout(Duration::from_secs(20), &mut controllers)
        .await
        .is_err()
    {
        controllers.abort();
        let _ = controllers.await;
    }
    // Only now may another replica lead: hand the Lease over instead of letting it expire.
    let _ = release_tx.send(true);
    if let Some(task) = lease_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let _ = http.await;
    outcome
}
