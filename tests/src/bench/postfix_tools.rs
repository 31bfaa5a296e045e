//! Postfix's own load tools as an injector and a counter that owe nothing
//! to Petrel: `smtp-source` sends, `smtp-sink` counts what arrives. Both
//! ship with the `postfix` package (`.ci/install-postfix.sh`).
//!
//! `smtp-sink -c` prints a running counter (`\rsess=N quit=N mesg=N`) on
//! stdout, one update per event; [`PostfixSink`] follows it, so the bench
//! measures delivery where it ends, at the destination.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::Notify;

use crate::ports;

/// Errors from running the Postfix tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed.
    #[error("{0} not found in /usr/sbin or PATH: run .ci/install-postfix.sh")]
    Missing(&'static str),
    /// Spawning or talking to it failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It exited unsuccessfully.
    #[error("{tool} exited with {status}: {stderr}")]
    Failed {
        /// Which tool.
        tool: &'static str,
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
}

/// Full path of `name` (Postfix puts its tools in /usr/sbin, often not on
/// a user's PATH).
fn tool(name: &'static str) -> Result<PathBuf, ToolError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(ToolError::Missing(name))
}

/// Whether `smtp-source` and `smtp-sink` are installed.
pub fn available() -> bool {
    tool("smtp-source").is_ok() && tool("smtp-sink").is_ok()
}

/// The last `mesg=N` in `smtp-sink -c` output, if any.
pub fn last_message_count(output: &str) -> Option<u64> {
    let at = output.rfind("mesg=")?;
    let digits: String = output[at + 5..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A running `smtp-sink -c` on a free loopback port; killed on drop.
pub struct PostfixSink {
    addr: SocketAddr,
    child: Child,
    count: Arc<AtomicU64>,
    changed: Arc<Notify>,
}

impl PostfixSink {
    /// Starts `smtp-sink -c [-u nobody] 127.0.0.1:PORT 1000` and waits until
    /// it listens.
    pub async fn start() -> Result<PostfixSink, ToolError> {
        let bin = tool("smtp-sink")?;
        let port = ports::try_free_port().map_err(|e| ToolError::Io {
            what: "finding a free port".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(&bin);
        cmd.arg("-c");
        // As root it insists on dropping privileges to a named user.
        if running_as_root() {
            cmd.args(["-u", "nobody"]);
        }
        let mut child = cmd
            .arg(addr.to_string())
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ToolError::Io {
                what: format!("spawning {}", bin.display()),
                source,
            })?;
        let count = Arc::new(AtomicU64::new(0));
        let changed = Arc::new(Notify::new());
        if let Some(mut out) = child.stdout.take() {
            let (count, changed) = (count.clone(), changed.clone());
            tokio::spawn(async move {
                // Only the tail matters: keep the last few updates.
                let mut buf = vec![0u8; 64 * 1024];
                let mut tail = String::new();
                while let Ok(n) = out.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tail.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if let Some(c) = last_message_count(&tail) {
                        count.store(c, Ordering::SeqCst);
                        changed.notify_waiters();
                    }
                    if let Some(cut) = tail.rfind('\r') {
                        tail.drain(..cut);
                    }
                }
            });
        }
        ports::wait_for_port(addr, Duration::from_secs(10))
            .await
            .map_err(|e| ToolError::Io {
                what: format!("waiting for smtp-sink on {addr}"),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(PostfixSink {
            addr,
            child,
            count,
            changed,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages received (completed DATA) so far. Connections the bench
    /// makes to see whether it listens do not count: they send no DATA.
    pub fn messages(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` messages arrived; false on timeout.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.changed.notified();
                if self.messages() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok()
    }

    /// The sink's pid (for CPU accounting).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// What `smtp-source` should send.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// The server to send to.
    pub target: SocketAddr,
    /// Messages in total (`-m`).
    pub messages: u64,
    /// Parallel sessions (`-s`).
    pub sessions: usize,
    /// Payload bytes per message, headers excluded (`-l`).
    pub size: usize,
    /// Recipients per message (`-r`).
    pub recipients: usize,
    /// Keep sessions open between messages (`-d`); else a new connection
    /// per message.
    pub kept_sessions: bool,
    /// Envelope sender (`-f`).
    pub from: String,
    /// Recipient (`-t`; with several, smtp-source prefixes a number).
    pub to: String,
}

/// What `smtp-source` did.
#[derive(Debug, Clone)]
pub struct SourceReport {
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// Messages it sent and had accepted: all of them when it exits 0
    /// (without `-A` it aborts on any unexpected reply).
    pub accepted: u64,
}

impl SourceReport {
    /// Accepted messages per second.
    pub fn accept_rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The `smtp-source` arguments for `plan`.
pub fn source_args(plan: &SourcePlan) -> Vec<String> {
    let mut args = vec![
        "-s".to_string(),
        plan.sessions.max(1).to_string(),
        "-m".to_string(),
        plan.messages.to_string(),
        "-l".to_string(),
        plan.size.to_string(),
        "-M".to_string(),
        "client.test".to_string(),
        "-f".to_string(),
        plan.from.clone(),
        "-t".to_string(),
        plan.to.clone(),
    ];
    if plan.recipients > 1 {
        args.extend(["-r".to_string(), plan.recipients.to_string()]);
    }
    if plan.kept_sessions {
        args.push("-d".to_string());
    }
    args.push(plan.target.to_string());
    args
}

/// Runs `smtp-source` to completion, bounded by `timeout`.
pub async fn run_source(plan: &SourcePlan, timeout: Duration) -> Result<SourceReport, ToolError> {
    let bin = tool("smtp-source")?;
    let start = Instant::now();
    let child = Command::new(&bin)
        .args(source_args(plan))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ToolError::Io {
            what: format!("spawning {}", bin.display()),
            source,
        })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|source| ToolError::Io {
            what: "waiting for smtp-source".into(),
            source,
        })?,
        Err(_) => {
            return Err(ToolError::Failed {
                tool: "smtp-source",
                status: format!("no exit after {timeout:?} (killed)"),
                stderr: String::new(),
            });
        }
    };
    let elapsed = start.elapsed();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(ToolError::Failed {
            tool: "smtp-source",
            status: out.status.to_string(),
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(SourceReport {
        elapsed,
        accepted: plan.messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_counter_update() {
        let out = "\rsess=1 quit=0 mesg=0\rsess=1 quit=1 mesg=1\rsess=2 quit=1 mesg=12";
        assert_eq!(last_message_count(out), Some(12));
        assert_eq!(last_message_count("\rsess=2 quit=1 mesg="), None);
        assert_eq!(last_message_count(""), None);
    }

    #[test]
    fn source_arguments_follow_the_plan() {
        let mut plan = SourcePlan {
            target: ([127, 0, 0, 1], 2525).into(),
            messages: 100,
            sessions: 20,
            size: 1024,
            recipients: 1,
            kept_sessions: false,
            from: "sender@example.test".into(),
            to: "rcpt@example.net".into(),
        };
        assert_eq!(
            source_args(&plan).join(" "),
            "-s 20 -m 100 -l 1024 -M client.test -f sender@example.test -t rcpt@example.net 127.0.0.1:2525"
        );
        plan.recipients = 10;
        plan.kept_sessions = true;
        let args = source_args(&plan).join(" ");
        assert!(args.contains("-r 10") && args.contains(" -d "), "{args}");
    }

    /// smtp-source straight into smtp-sink: every message counted once.
    #[tokio::test]
    async fn source_into_sink_counts_every_message() {
        if !available() {
            eprintln!("smtp-source/smtp-sink not installed: skipped");
            return;
        }
        let sink = PostfixSink::start().await.unwrap();
        let plan = SourcePlan {
            target: sink.addr(),
            messages: 50,
            sessions: 5,
            size: 2048,
            recipients: 1,
            kept_sessions: false,
            from: "sender@example.test".into(),
            to: "rcpt@example.net".into(),
        };
        let report = run_source(&plan, Duration::from_secs(30)).await.unwrap();
        assert_eq!(report.accepted, 50);
        assert!(sink.wait_for(50, Duration::from_secs(10)).await);
        assert_eq!(sink.messages(), 50);
    }
}
