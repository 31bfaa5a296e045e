//! The relay's view of its config file: loaded once at start (refusing to
//! start on any error), then re-read when the file changes. A broken edit is
//! logged and ignored, so a bad ConfigMap never takes a running relay down.
//!
//! A reload applies to what comes next (new sessions, new deliveries);
//! the [`StartupConfig`] part cannot change in a running process, so a
//! reload that changes it names each such field in the log and sets
//! `petrel_config_restart_required` until the process restarts (or the
//! file goes back).

use std::path::{Path, PathBuf};

pub use petrel_crds::config::*;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::reload::Reloading;

/// How often mounted files are checked for changes.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Metrics of config reloads.
#[derive(Clone)]
pub struct ConfigMetrics {
    /// 1 while the file on disk has startup settings the process does not run with.
    pub restart_required: IntGauge,
    /// Reloads by result: `applied` or `refused` (invalid file kept out).
    pub reloads: IntCounterVec,
}

impl ConfigMetrics {
    /// Creates and registers the config metrics in `registry`.
    pub fn register(registry: &Registry) -> Result<ConfigMetrics, prometheus::Error> {
        let restart_required = IntGauge::new(
            "petrel_config_restart_required",
            "1 when the config file changed a setting that only takes effect after a restart.",
        )?;
        registry.register(Box::new(restart_required.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "petrel_config_reloads_total",
                "Config file reloads, by result (applied, refused).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(ConfigMetrics {
            restart_required,
            reloads,
        })
    }
}

/// Loads `path` and keeps it current.
pub fn watch(path: &Path, metrics: ConfigMetrics) -> Result<Reloading<RelayConfig>, ConfigError> {
    let initial = RelayConfig::load(path)?;
    let running = initial.startup();
    metrics.restart_required.set(0);
    let file: PathBuf = path.to_path_buf();
    Ok(Reloading::spawn(
        vec![file.clone()],
        RELOAD_INTERVAL,
        initial,
        move |_| match RelayConfig::load(&file) {
            Ok(config) => {
                metrics.reloads.with_label_values(&["applied"]).inc();
                let pending = running.changed_fields(&config.startup());
                if pending.is_empty() {
                    metrics.restart_required.set(0);
                    tracing::info!(path = %file.display(), "config reloaded; applies to new sessions and deliveries");
                } else {
                    metrics.restart_required.set(1);
                    tracing::warn!(
                        path = %file.display(),
                        restart_required = %pending.join(", "),
                        "config reloaded; these settings take effect only after a restart: {}",
                        pending.join(", ")
                    );
                }
                Some(config)
            }
            Err(error) => {
                metrics.reloads.with_label_values(&["refused"]).inc();
                tracing::error!(path = %file.display(), %error, "config change refused; keeping the previous config");
                None
            }
        },
    ))
}
