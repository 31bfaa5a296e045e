//! Starts every stage of the relay from one config file and stops them in
//! order on SIGTERM/SIGINT: stop accepting (new connections get 421), let
//! sessions and deliveries in progress finish within the grace period, exit.
//! A message that got 250 is in the queue, so a restart never loses it.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use crate::delivery::{self, DeliveryContext, DeliveryError};
use crate::events::webhook_dispatch::{Dispatch, consumer_name};
use crate::events::{retention, webhook_supervisor};
use crate::http::{self, Health, HttpError, HttpState};
use crate::inbound::{self, InboundContext, InboundError, InboundSubmit};
use crate::metrics::{MetricsError, RelayMetrics, WebhookMetrics};
use crate::queue::{self, QueueError};

/// Why the relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The config file is missing or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The queue backend could not be opened.
    #[error("queue: {0}")]
    Queue(#[from] QueueError),
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// An SMTP listener could not start.
    #[error("inbound: {0}")]
    Inbound(#[from] InboundError),
    /// Delivery could not start.
    #[error("delivery: {0}")]
    Delivery(#[from] DeliveryError),
    /// The HTTP server failed.
    #[error("http: {0}")]
    Http(#[from] HttpError),
    /// The HTTP address could not be bound.
    #[error("http: cannot listen on {address}: {source}")]
    HttpBind {
        /// The configured address.
        address: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// `http.tls: true` without `tls.certFile`/`tls.keyFile`.
    #[error(
        "http.tls: serving HTTP over TLS needs certificate files: set tls.certFile and tls.keyFile"
    )]
    HttpTlsWithoutFiles,
    /// Installing signal handlers failed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(config_path: &Path) -> Result<(), ServerError> {
    let signal = shutdown_signal()?;
    run_until(config_path, signal).await
}

/// Runs the relay until `shutdown` completes (tests pass their own future).
pub async fn run_until(
    config_path: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let registry = prometheus::Registry::new();
    let config_metrics =
        crate::config::ConfigMetrics::register(&registry).map_err(MetricsError::from)?;
    let config = crate::config::watch(config_path, config_metrics)?;
    let current = config.get();
    let backend = queue::open(&current.queue).await?;
    let metrics = RelayMetrics::register(&registry)?;
    let webhook_metrics = WebhookMetrics::register(&registry)?;
    let health = Health::new();

    let inbound_ctx = Arc::new(
        InboundContext::new(
            config.clone(),
            backend.queue.clone(),
            backend.state.clone(),
            metrics.clone(),
        )?
        .with_events(backend.events.clone()),
    );
    let delivery_ctx = Arc::new(
        DeliveryContext::new(config.clone(), backend.clone(), metrics.clone())?
            .with_feedback(inbound_ctx.feedback.clone())
            .with_wake(inbound_ctx.enqueued.clone())
            .with_reputation(inbound_ctx.reputation.clone()),
    );

    // Bind everything before reporting ready, so a port clash fails the
    // start instead of a half-working relay.
    let http_listener = tokio::net::TcpListener::bind(current.http.address)
        .await
        .map_err(|source| ServerError::HttpBind {
            address: current.http.address,
            source,
        })?;
    let mut smtp_sockets = Vec::new();
    for listener in &current.listeners {
        let socket = tokio::net::TcpListener::bind(listener.address)
            .await
            .map_err(|source| InboundError::Io {
                name: listener.name.clone(),
                source,
            })?;
        smtp_sockets.push((socket, listener.clone()));
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let http_state = HttpState::new(registry, health.clone(), backend.queue.clone())?
        .with_send_api(Arc::new(InboundSubmit::new(inbound_ctx.clone())))
        .with_admin(http::AdminApi {
            events: backend.events.clone(),
            config: config.clone(),
        });
    // One guard for the process: a pause this pod decides or an admin
    // resume it serves is seen at once by its sessions and deliveries.
    let reputation = inbound_ctx.reputation.clone();
    let http_state = http_state.with_routes(
        crate::tracking::endpoints::router(crate::tracking::endpoints::Endpoints {
            config: config.clone(),
            tracking: inbound_ctx.tracking.clone(),
            state: backend.state.clone(),
            events: backend.events.clone(),
            metrics: metrics.tracking.clone(),
            relay: crate::events::relay_name(&current.hostname),
        })
        .merge(crate::reputation::endpoints::router(
            crate::reputation::endpoints::Endpoints {
                guard: reputation.clone(),
                metrics: metrics.reputation.clone(),
            },
        ))
        .merge(crate::unsubscribe::endpoints::router(
            crate::unsubscribe::endpoints::Endpoints {
                config: config.clone(),
                feedback: inbound_ctx.feedback.clone(),
                state: backend.state.clone(),
                events: backend.events.clone(),
                metrics: metrics.unsubscribe.clone(),
                relay: crate::events::relay_name(&current.hostname),
            },
        ))
        .merge(http::admin_queue::router(http::admin_queue::AdminQueue {
            backend: backend.clone(),
            config: config.clone(),
        })),
    );
    let http_task = match (current.http.tls, &inbound_ctx.tls) {
        (true, Some(tls)) => {
            let handshake = config.clone();
            let listener =
                http::tls_listener::TlsListener::new(http_listener, tls.clone(), move || {
                    handshake.get().limits.tls_handshake_timeout.get()
                })
                .map_err(|source| ServerError::HttpBind {
                    address: current.http.address,
                    source,
                })?;
            tokio::spawn(http::serve_tls(
                listener,
                http_state,
                stopped(stop_rx.clone()),
            ))
        }
        // Validation refuses http.tls without certificate files.
        (true, None) => return Err(ServerError::HttpTlsWithoutFiles),
        (false, _) => tokio::spawn(http::serve(
            http_listener,
            http_state,
            stopped(stop_rx.clone()),
        )),
    };
    let mut smtp_tasks = tokio::task::JoinSet::new();
    for (socket, listener) in smtp_sockets {
        smtp_tasks.spawn(inbound::listener::serve_on(
            socket,
            listener,
            inbound_ctx.clone(),
            stop_rx.clone(),
        ));
    }
    // TLS-RPT's daily reports: every pod ticks, one sends (see tls_rpt::daily).
    let tls_rpt_task = tokio::spawn(delivery::tls_rpt::daily::run(
        delivery_ctx.clone(),
        stop_rx.clone(),
    ));
    let delivery_task = tokio::spawn(delivery::run(delivery_ctx, stopped(stop_rx.clone())));
    // Webhooks and retention run in tasks of their own, sharing nothing
    // with delivery but the backend: a dead endpoint never slows mail.
    let dispatch = Arc::new(Dispatch {
        log: backend.events.clone(),
        metrics: webhook_metrics.clone(),
        consumer: consumer_name(&current.hostname),
    });
    let webhooks_task = tokio::spawn(webhook_supervisor::run(
        config.clone(),
        dispatch,
        stop_rx.clone(),
    ));
    let retention_task = tokio::spawn(retention::run(
        config.clone(),
        backend.events.clone(),
        webhook_metrics,
        stop_rx.clone(),
    ));
    let reputation_task = tokio::spawn(crate::reputation::run(
        reputation,
        backend.events.clone(),
        metrics.reputation.clone(),
        consumer_name(&current.hostname),
        stop_rx.clone(),
    ));
    health.set_config_loaded(true);
    tracing::info!(
        hostname = %current.hostname,
        listeners = current.listeners.len(),
        http = %current.http.address,
        "petrel-relay started"
    );
    drop(current);

    // Run until asked to stop, or until a listener dies on its own.
    let mut failure = None;
    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested; draining"),
        Some(result) = smtp_tasks.join_next() => {
            failure = listener_failure(result);
        }
    }
    health.start_draining();
    let _ = stop_tx.send(true);
    while let Some(result) = smtp_tasks.join_next().await {
        if let Some(error) = listener_failure(result) {
            tracing::error!(%error, "SMTP listener failed while draining");
        }
    }
    if let Err(error) = delivery_task.await {
        tracing::error!(%error, "delivery task failed");
    }
    for (name, task) in [
        ("webhooks", webhooks_task),
        ("retention", retention_task),
        ("reputation", reputation_task),
        ("tls-rpt", tls_rpt_task),
    ] {
        if let Err(error) = task.await {
            tracing::error!(%error, task = name, "events task failed");
        }
    }
    match http_task.await {
        Ok(Err(error)) => tracing::error!(%error, "HTTP server failed"),
        Err(error) => tracing::error!(%error, "HTTP task failed"),
        Ok(Ok(())) => {}
    }
    tracing::info!("petrel-relay stopped");
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn listener_failure(
    result: Result<Result<(), InboundError>, tokio::task::JoinError>,
) -> Option<ServerError> {
    match result {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error.into()),
        Err(join) => Some(ServerError::Inbound(InboundError::Io {
            name: "listener".into(),
            source: std::io::Error::other(join.to_string()),
        })),
    }
}

/// Completes once the stop flag turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone: stop as well.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
