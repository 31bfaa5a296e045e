//! A private `redis-server` per test, on a free port with its own data dir.
//!
//! Tests must never share the machine's Redis on 6379: they would see each
//! other's keys and could not kill it. [`RedisServer`] spawns one, waits until
//! it answers `PING`, and kills it on drop. With [`Persistence::Aof`] the data
//! survives [`RedisServer::kill`] + [`RedisServer::restart`] (same port, same
//! dir), which is how crash-durability tests are written.
//!
//! ```no_run
//! # async fn f() -> Result<(), petrel_tests::redis::RedisError> {
//! use petrel_tests::redis::{Persistence, RedisServer};
//! let mut redis = RedisServer::builder().persistence(Persistence::Aof).start().await?;
//! let url = redis.url(); // "redis://127.0.0.1:PORT"
//! redis.kill().await?;    // SIGKILL, like a crashed pod
//! redis.restart().await?; // same port and dir: AOF is replayed
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::ports;

/// How long [`RedisServer::start`] and [`RedisServer::restart`] wait for `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors from starting or controlling a spawned `redis-server`.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The temp data dir could not be created.
    #[error("creating redis data dir: {0}")]
    TempDir(#[source] std::io::Error),
    /// No free port could be found.
    #[error(transparent)]
    Port(#[from] ports::PortError),
    /// `redis-server` could not be executed (not on PATH?).
    #[error("spawning redis-server (is it on PATH?): {0}")]
    Spawn(#[source] std::io::Error),
    /// The process exited before it answered `PING`.
    #[error("redis-server on port {port} exited early ({status}); log:\n{log}")]
    Exited {
        /// Port it was told to use.
        port: u16,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Tail of its log file.
        log: String,
    },
    /// It did not answer `PING` with `PONG` in time.
    #[error("redis-server on port {port} not ready after {timeout:?}; log:\n{log}")]
    NotReady {
        /// Port it was told to use.
        port: u16,
        /// How long we waited.
        timeout: Duration,
        /// Tail of its log file.
        log: String,
    },
    /// Waiting for, or signalling, the process failed.
    #[error("controlling redis-server: {0}")]
    Process(#[source] std::io::Error),
    /// The server is not running (after `kill`/`stop`, before `restart`).
    #[error("redis-server is not running")]
    NotRunning,
}

/// Whether the spawned server writes data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Nothing on disk (`--save "" --appendonly no`): fastest, data dies with the process.
    #[default]
    None,
    /// Append-only file, fsync every second (`--appendfsync everysec`), as in
    /// production. The AOF is normally written before each reply, so a
    /// SIGKILL of redis-server alone usually loses nothing (the OS still has
    /// the pages); but while a background fsync is slow Redis postpones that
    /// write for up to two seconds, so the last writes can be lost. Tests that
    /// assert an acknowledged write survives a SIGKILL use [`Persistence::AofAlways`].
    Aof,
    /// Append-only file, fsync on every write: data acknowledged before a
    /// SIGKILL is always on disk. Use this for "250 means durable" tests.
    AofAlways,
}

/// Options for [`RedisServer`]; get one from [`RedisServer::builder`].
#[derive(Debug, Clone, Default)]
pub struct RedisBuilder {
    persistence: Persistence,
    port: Option<u16>,
    extra_args: Vec<String>,
}

impl RedisBuilder {
    /// Choose persistence (default [`Persistence::None`]).
    pub fn persistence(mut self, p: Persistence) -> Self {
        self.persistence = p;
        self
    }

    /// Use this port instead of a fresh [`ports::free_port`].
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Pass extra command-line arguments, e.g. `["--replicaof", "127.0.0.1", "6390"]`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Spawn the server and wait until it answers `PING`.
    pub async fn start(self) -> Result<RedisServer, RedisError> {
        let dir = tempfile::Builder::new()
            .prefix("petrel-redis-")
            .tempdir()
            .map_err(RedisError::TempDir)?;
        let mut server = RedisServer {
            port: self.port.unwrap_or_default(),
            dir,
            persistence: self.persistence,
            extra_args: self.extra_args,
            child: None,
        };
        if self.port.is_some() {
            server.spawn().await?;
            return Ok(server);
        }
        // Another process may grab a "free" port before redis binds it; a
        // fresh port fixes that, so retry a few times on an early exit.
        let mut attempts = 0;
        loop {
            server.port = ports::try_free_port()?;
            match server.spawn().await {
                Err(RedisError::Exited { .. }) if attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
                Ok(()) => return Ok(server),
            }
        }
    }
}

/// A running (or killed, restartable) `redis-server` owned by one test.
///
/// Killed with SIGKILL when dropped; its temp dir is removed too.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    persistence: Persistence,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start a server without persistence on a free port.
    pub async fn start() -> Result<Self, RedisError> {
        Self::builder().start().await
    }

    /// Options: persistence, fixed port, extra args.
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    /// `redis://127.0.0.1:PORT`, for `redis::Client::open` or a RelayConfig.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port it listens on (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its data directory (AOF/RDB files and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is currently running (not killed/stopped/exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL the process and wait for it to exit: a crash, no AOF flush.
    /// A no-op when it is not running.
    pub async fn kill(&mut self) -> Result<(), RedisError> {
        if let Some(mut child) = self.child.take() {
            // kill() sends SIGKILL and reaps; an already-exited child is fine.
            match child.kill().await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(RedisError::Process(e)),
            }
        }
        Ok(())
    }

    /// Graceful stop: `SHUTDOWN` (flushes the AOF), then wait for exit. Falls
    /// back to SIGKILL if it has not exited after 10 s.
    pub async fn stop(&mut self) -> Result<(), RedisError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        // The connection is closed by the server on success: ignore the reply.
        let _ = command(self.port, &["SHUTDOWN"]).await;
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(Ok(_)) => {
                self.child = None;
                Ok(())
            }
            Ok(Err(e)) => Err(RedisError::Process(e)),
            Err(_) => self.kill().await,
        }
    }

    /// Start again on the same port and dir (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop); if still running, it is killed first), and wait
    /// until it has loaded its data and answers `PING`.
    pub async fn restart(&mut self) -> Result<(), RedisError> {
        self.kill().await?;
        self.spawn().await
    }

    /// Run one command over a fresh connection and return the raw RESP reply
    /// (e.g. `"+PONG\r\n"`). Handy for `DEBUG SLEEP`, `CLIENT PAUSE`, `CONFIG SET`
    /// in fault tests without a redis client.
    pub async fn raw_command(&self, args: &[&str]) -> Result<String, RedisError> {
        if self.child.is_none() {
            return Err(RedisError::NotRunning);
        }
        command(self.port, args).await.map_err(RedisError::Process)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            &self.dir.path().to_string_lossy(),
            "--logfile",
            "redis.log",
            "--save",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let aof: &[&str] = match self.persistence {
            Persistence::None => &["--appendonly", "no"],
            Persistence::Aof => &["--appendonly", "yes", "--appendfsync", "everysec"],
            Persistence::AofAlways => &["--appendonly", "yes", "--appendfsync", "always"],
        };
        args.extend(aof.iter().map(|s| s.to_string()));
        args.extend(self.extra_args.iter().cloned());
        args
    }

    async fn spawn(&mut self) -> Result<(), RedisError> {
        let child = Command::new("redis-server")
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(RedisError::Spawn)?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// Poll `PING` every 10 ms: a child process has no readiness event to await.
    async fn wait_ready(&mut self) -> Result<(), RedisError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(RedisError::Exited {
                    port: self.port,
                    status,
                    log: self.log_tail(),
                });
            }
            let pid = self.child.as_ref().and_then(Child::id);
            if let Some(pid) = pid
                && let Ok(true) =
                    tokio::time::timeout(Duration::from_secs(1), is_ready(self.port, pid)).await
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let log = self.log_tail();
                self.kill().await?;
                return Err(RedisError::NotReady {
                    port: self.port,
                    timeout: READY_TIMEOUT,
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // start_kill sends SIGKILL now; tokio reaps the child in the background.
            let _ = child.start_kill();
        }
    }
}

/// True when the server on `port` answers `PING` (so its data is loaded) and
/// is our child `pid`, not another process's redis that took the port first.
async fn is_ready(port: u16, pid: u32) -> bool {
    match command(port, &["PING"]).await {
        Ok(reply) if reply.starts_with("+PONG") => {}
        _ => return false,
    }
    let Ok(info) = command(port, &["INFO", "server"]).await else {
        return false;
    };
    info.lines()
        .any(|l| l.trim_end() == format!("process_id:{pid}"))
}

/// Encode `args` as a RESP array of bulk strings.
fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Send one command and read one reply chunk (enough for simple replies:
/// status, error, integer, short bulk strings). Bounded to 64 KiB.
async fn command(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(&encode(args)).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = stream.read(&mut buf).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_resp_array() {
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
    }
}
