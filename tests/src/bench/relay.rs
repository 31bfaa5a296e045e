//! Real `petrel-relay` processes for benches and fault tests.
//!
//! [`RelayBuilder`] generates a [`RelayConfig`] (a trusted loopback listener,
//! the Redis queue, delivery to a test destination, fresh ports, the example
//! DKIM key) that a test may then adjust in Rust, so a schema change breaks
//! the build rather than a test at run time. [`RelayProcess`] runs
//! `petrel-relay run --config FILE` from the same target directory as the
//! running test or bench, and can SIGKILL it like a crashed pod.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use petrel_crds::config::RelayConfig;
use tokio::process::{Child, Command};

use crate::ports;

/// The example DKIM key (ed25519) from the quick start, for `example.test`.
const DKIM_KEY: &str = include_str!("../../../examples/local/dkim-example.test.key");

/// How long [`RelayProcess::start`] waits for the SMTP listener.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from generating a config or running a relay process.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The binary is not where cargo puts it.
    #[error(
        "petrel-relay binary not found (looked in {looked}): run `cargo build -p petrel-relay` \
         first (with --release for a release bench), or set PETREL_RELAY_BIN"
    )]
    BinaryMissing {
        /// Directories searched.
        looked: String,
    },
    /// Writing the config or key, or spawning, failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The generated config does not validate (the schema changed?).
    #[error("generated relay config is invalid: {0}")]
    Config(String),
    /// The relay exited, or never listened, during start-up.
    #[error("petrel-relay did not start: {why}; log:\n{log}")]
    NotReady {
        /// Exit status or timeout.
        why: String,
        /// Tail of its log.
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RelayError {
    let what = what.into();
    move |source| RelayError::Io { what, source }
}

/// Where the relay delivers.
#[derive(Debug, Clone)]
pub enum Destination {
    /// `transport: smarthost`, plain SMTP (`tls: none`) to this address.
    Smarthost(SocketAddr),
    /// `transport: mx` with `delivery.mx.port` and DNS from these servers.
    Mx {
        /// Port of every MX host.
        port: u16,
        /// DNS servers to ask.
        nameservers: Vec<SocketAddr>,
    },
}

/// Locates the `petrel-relay` binary: `$PETREL_RELAY_BIN`, or next to the
/// running executable (`target/<profile>/`), or one level up (integration
/// tests run from `target/<profile>/deps/`).
pub fn binary() -> Result<PathBuf, RelayError> {
    if let Some(path) = std::env::var_os("PETREL_RELAY_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(io("locating the current executable"))?;
    let mut looked = Vec::new();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("petrel-relay");
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(d.display().to_string());
        dir = d.parent();
    }
    Err(RelayError::BinaryMissing {
        looked: looked.join(", "),
    })
}

/// A relay config being prepared, with its own temp dir (config file, DKIM
/// key, log).
pub struct RelayBuilder {
    dir: tempfile::TempDir,
    config: RelayConfig,
    log_filter: String,
}

impl RelayBuilder {
    /// Config for one relay pod: listener and HTTP on fresh loopback ports,
    /// loopback trusted, sending domain `example.test` (ed25519 DKIM), Redis
    /// queue at `redis_url` (prefix `petrel`, shared by every relay built
    /// with the same URL), lease 10s, retry every second, delivery to
    /// `destination` with 20 connections.
    pub fn new(redis_url: &str, destination: &Destination) -> Result<RelayBuilder, RelayError> {
        let dir = tempfile::Builder::new()
            .prefix("petrel-relay-")
            .tempdir()
            .map_err(io("creating relay temp dir"))?;
        let key = dir.path().join("dkim.key");
        std::fs::write(&key, DKIM_KEY).map_err(io("writing DKIM key"))?;
        let smtp = free_port()?;
        let http = free_port()?;
        let delivery = match destination {
            Destination::Smarthost(addr) => format!(
                "  transport: smarthost\n  smarthost:\n    host: \"{}\"\n    port: {}\n    tls: none\n",
                addr.ip(),
                addr.port()
            ),
            Destination::Mx { port, nameservers } => format!(
                "  transport: mx\n  mx:\n    port: {port}\n    nameservers: [{}]\n",
                nameservers
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let yaml = format!(
            "hostname: relay.bench.test
listeners:
  - name: smtp
    address: 127.0.0.1:{smtp}
trustedNetworks: [127.0.0.0/8]
domains:
  - domain: example.test
    dkim:
      selector: example
      algorithm: ed25519
      keyFile: {key}
queue:
  redis:
    url: \"{redis_url}\"
  lease: 10s
  timeout: 2s
delivery:
{delivery}  retrySchedule: [1s]
  perDestinationConcurrency: 20
  timeouts:
    connect: 5s
    greeting: 5s
    command: 5s
    data: 5s
limits:
  maxConnections: 8192
  maxConnectionsPerClient: 8192
http:
  address: 127.0.0.1:{http}
",
            key = key.display(),
        );
        let config =
            RelayConfig::from_yaml(&yaml).map_err(|e| RelayError::Config(e.to_string()))?;
        Ok(RelayBuilder {
            dir,
            config,
            log_filter: "warn".to_string(),
        })
    }

    /// The config, to adjust before [`start`](Self::start).
    pub fn config_mut(&mut self) -> &mut RelayConfig {
        &mut self.config
    }

    /// Adjusts the config in a chain.
    pub fn with(mut self, f: impl FnOnce(&mut RelayConfig)) -> RelayBuilder {
        f(&mut self.config);
        self
    }

    /// `RUST_LOG` for the process (default `warn`).
    pub fn log_filter(mut self, filter: &str) -> RelayBuilder {
        self.log_filter = filter.to_string();
        self
    }

    /// Writes the config and spawns the relay; returns once its first
    /// listener accepts connections.
    pub async fn start(self) -> Result<RelayProcess, RelayError> {
        self.config
            .validate()
            .map_err(|e| RelayError::Config(e.to_string()))?;
        let yaml = self
            .config
            .to_yaml()
            .map_err(|e| RelayError::Config(e.to_string()))?;
        let config_path = self.dir.path().join("relay.yaml");
        std::fs::write(&config_path, yaml).map_err(io("writing relay config"))?;
        let mut process = RelayProcess {
            binary: binary()?,
            dir: self.dir,
            config_path,
            config: self.config,
            log_filter: self.log_filter,
            child: None,
            starts: 0,
        };
        process.spawn().await?;
        Ok(process)
    }
}

fn free_port() -> Result<u16, RelayError> {
    ports::try_free_port().map_err(|e| RelayError::Io {
        what: "finding a free port".into(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A running (or killed, restartable) relay process. SIGKILLed on drop.
pub struct RelayProcess {
    binary: PathBuf,
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: RelayConfig,
    log_filter: String,
    child: Option<Child>,
    starts: u32,
}

impl RelayProcess {
    /// Its SMTP listener (the first one).
    pub fn smtp_addr(&self) -> SocketAddr {
        self.config.listeners[0].address
    }

    /// Its HTTP address (metrics, health).
    pub fn http_addr(&self) -> SocketAddr {
        self.config.http.address
    }

    /// The config it runs with.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Its working dir (config, key, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// OS pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap: a crashed pod, no graceful shutdown.
    pub async fn kill(&mut self) -> Result<(), RelayError> {
        if let Some(mut child) = self.child.take() {
            match child.kill().await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(io("killing petrel-relay")(e)),
            }
        }
        Ok(())
    }

    /// SIGTERM and wait up to `grace` for a clean exit (then SIGKILL).
    /// Returns the exit code if it exited by itself.
    pub async fn terminate(&mut self, grace: Duration) -> Result<Option<i32>, RelayError> {
        let Some(pid) = self.pid() else {
            return Ok(None);
        };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => {
                self.child = None;
                Ok(status.code())
            }
            Ok(Err(e)) => Err(io("waiting for petrel-relay")(e)),
            Err(_) => self.kill().await.map(|()| None),
        }
    }

    /// Starts it again with the same config and ports (after [`kill`](Self::kill)).
    pub async fn restart(&mut self) -> Result<(), RelayError> {
        self.kill().await?;
        self.spawn().await
    }

    /// The last lines of its log (stderr and stdout of every start).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn spawn(&mut self) -> Result<(), RelayError> {
        self.starts += 1;
        let log_path = self.dir.path().join("relay.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("opening relay log"))?;
        let log2 = log.try_clone().map_err(io("opening relay log"))?;
        let child = Command::new(&self.binary)
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("spawning {}", self.binary.display())))?;
        self.child = Some(child);
        let addr = self.smtp_addr();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(RelayError::NotReady {
                    why: format!("exited with {status}"),
                    log: self.log_tail(30),
                });
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let log = self.log_tail(30);
                self.kill().await?;
                return Err(RelayError::NotReady {
                    why: format!("nothing listening on {addr} after {READY_TIMEOUT:?}"),
                    log,
                });
            }
            // A child process cannot signal readiness otherwise: poll.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_configs_validate_for_both_transports() {
        let sink: SocketAddr = ([127, 0, 0, 1], 2526).into();
        let dests = [
            Destination::Smarthost(sink),
            Destination::Mx {
                port: 2526,
                nameservers: vec![([127, 0, 0, 1], 5353).into()],
            },
        ];
        for d in &dests {
            let b = RelayBuilder::new("redis://127.0.0.1:6390", d)
                .unwrap()
                .with(|c| c.delivery.workers = 8);
            assert!(b.config.validate().is_ok());
            assert_eq!(b.config.delivery.workers, 8);
            let yaml = b.config.to_yaml().unwrap();
            assert_eq!(RelayConfig::from_yaml(&yaml).unwrap(), b.config);
        }
    }
}
