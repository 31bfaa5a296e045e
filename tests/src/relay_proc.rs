//! The `petrel-relay` binary as a child process, for tests that run the
//! real executable (`cargo build -p petrel-relay` first; `.ci/test` does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::ports::{free_port, wait_for_port};

/// Longest wait for a started relay's ports.
const START: Duration = Duration::from_secs(30);

/// The `petrel-relay` binary next to the running test executable
/// (`target/debug/petrel-relay`).
pub fn relay_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("petrel-relay"))
        .expect("test executable has a target dir");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p petrel-relay` first",
        bin.display()
    );
    bin
}

/// A running `petrel-relay run`; SIGKILLed when dropped so a failing test
/// leaks no process.
pub struct RelayProc {
    child: Child,
    log: PathBuf,
    /// The SMTP listener it was started for.
    pub smtp: SocketAddr,
    /// The HTTP listener it was started for.
    pub http: SocketAddr,
}

impl RelayProc {
    /// Starts the binary in `dir` on `config` and waits for both ports;
    /// its log (stderr) goes to a file in `dir`.
    pub async fn start(dir: &Path, config: &Path, smtp: SocketAddr, http: SocketAddr) -> RelayProc {
        let log = dir.join(format!("relay-{}.log", free_port()));
        let log_file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(relay_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn petrel-relay");
        let mut relay = RelayProc {
            child,
            log,
            smtp,
            http,
        };
        for addr in [smtp, http] {
            if let Err(e) = wait_for_port(addr, START).await {
                let _ = relay.child.start_kill();
                panic!("relay not listening on {addr}: {e}; log:\n{}", relay.log());
            }
        }
        relay
    }

    /// What the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as Kubernetes stops a pod, then waits up to `grace`;
    /// returns whether it exited 0 (printing the log when not).
    pub async fn terminate(mut self, grace: Duration) -> bool {
        let pid = self.child.id().expect("relay still running");
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(grace, self.child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "relay still running {grace:?} after SIGTERM:\n{}",
                    self.log()
                )
            })
            .expect("wait for relay");
        if !exit.success() {
            eprintln!("relay exit {exit:?}; log:\n{}", self.log());
        }
        exit.success()
    }

    /// SIGKILL: a crash, nothing flushed on the way out.
    pub async fn crash(mut self) {
        self.child.kill().await.expect("kill -9 relay");
    }
}
