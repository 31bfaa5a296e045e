//! The relay's view of its config file: loaded once at start (refusing to
//! start on any error), then re-read when the file changes. A broken edit is
//! logged and ignored, so a bad ConfigMap never takes a running relay down.

use std::path::{Path, PathBuf};

pub use petrel_crds::config::*;

use crate::reload::Reloading;

/// How often mounted files are checked for changes.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Loads `path` and keeps it current.
pub fn watch(path: &Path) -> Result<Reloading<RelayConfig>, ConfigError> {
    let initial = RelayConfig::load(path)?;
    let file: PathBuf = path.to_path_buf();
    Ok(Reloading::spawn(
        vec![file.clone()],
        RELOAD_INTERVAL,
        initial,
        move |_| match RelayConfig::load(&file) {
            Ok(config) => {
                tracing::info!(path = %file.display(), "config reloaded");
                Some(config)
            }
            Err(error) => {
                tracing::error!(path = %file.display(), %error, "config change refused; keeping the previous config");
                None
            }
        },
    ))
}
