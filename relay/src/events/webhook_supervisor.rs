//! Keeps one dispatcher task per configured webhook: starts new ones,
//! stops removed ones and hands changed settings to running ones as the
//! config is reloaded, and refreshes the backlog gauges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::webhook_dispatch::{self, Dispatch, group_name, stopped};
use crate::config::{RelayConfig, Webhook};
use crate::queue::now_millis;
use crate::reload::Reloading;

/// How often `petrel_webhook_backlog_events` and
/// `petrel_webhook_oldest_pending_seconds` are refreshed.
pub const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// How long stopping waits for dispatchers to notice before aborting them.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Running {
    hook: watch::Sender<Arc<Webhook>>,
    task: JoinHandle<()>,
}

/// Runs the webhooks of `config` (as it changes) until `stop` turns true.
pub async fn run(
    config: Reloading<RelayConfig>,
    dispatch: Arc<Dispatch>,
    stop: watch::Receiver<bool>,
) {
    let mut changes = config.clone();
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut backlog = tokio::time::interval(BACKLOG_EVERY);
    backlog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        reconcile(
            &mut running,
            &config.get().events.webhooks,
            &dispatch,
            &stop,
        );
        tokio::select! {
            _ = changes.changed() => {}
            _ = backlog.tick() => refresh_backlog(&dispatch, running.keys()).await,
            _ = stopped(stop.clone()) => break,
        }
    }
    for (_, r) in running {
        let abort = r.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, r.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Makes the running set match `wanted`.
fn reconcile(
    running: &mut BTreeMap<String, Running>,
    wanted: &[Webhook],
    dispatch: &Arc<Dispatch>,
    stop: &watch::Receiver<bool>,
) {
    running.retain(|name, r| {
        let keep = wanted.iter().any(|w| &w.name == name) && !r.task.is_finished();
        if !keep {
            r.task.abort();
            dispatch.metrics.forget(name);
            tracing::info!(webhook = %name, "webhook stopped");
        }
        keep
    });
    for hook in wanted {
        match running.get(&hook.name) {
            Some(r) => {
                if **r.hook.borrow() != *hook {
                    tracing::info!(webhook = %hook.name, "webhook settings changed");
                    r.hook.send_replace(Arc::new(hook.clone()));
                }
            }
            None => {
                let (tx, rx) = watch::channel(Arc::new(hook.clone()));
                let task = tokio::spawn(webhook_dispatch::run(dispatch.clone(), rx, stop.clone()));
                running.insert(hook.name.clone(), Running { hook: tx, task });
            }
        }
    }
}

/// Sets the backlog gauges of every running webhook from the event log.
async fn refresh_backlog<'a>(dispatch: &Dispatch, names: impl Iterator<Item = &'a String>) {
    let names: Vec<String> = names.cloned().collect();
    for name in names {
        match dispatch.log.backlog(&group_name(&name)).await {
            Ok(b) => {
                dispatch
                    .metrics
                    .backlog
                    .with_label_values(&[&name])
                    .set(b.pending as i64);
                let age = b
                    .oldest_at
                    .map(|t| now_millis().saturating_sub(t) / 1000)
                    .unwrap_or(0);
                dispatch
                    .metrics
                    .oldest_pending
                    .with_label_values(&[&name])
                    .set(age as i64);
            }
            Err(error) => {
                tracing::warn!(webhook = %name, %error, "cannot read the webhook backlog")
            }
        }
    }
}
