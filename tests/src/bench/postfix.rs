//! Postfix as the baseline relay, configured by `.ci/install-postfix.sh`
//! (see shared/bench/postfix-relay.md): a loopback relay whose `relayhost`
//! we point at the bench's sink before starting it.
//!
//! This changes the machine's Postfix configuration (`relayhost`) and empties
//! its queue: only for benchmark machines, never run from tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use crate::ports;

/// Errors from driving Postfix.
#[derive(Debug, thiserror::Error)]
pub enum PostfixError {
    /// A Postfix command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// `postconf -M` shows no smtpd listening on an address we can use.
    #[error("no `inet ... smtpd` service in master.cf; run .ci/install-postfix.sh")]
    NoListener,
    /// It did not accept connections in time.
    #[error("postfix not listening on {0} after start")]
    NotReady(SocketAddr),
}

/// Whether Postfix and its tools are installed.
pub fn available() -> bool {
    ["postfix", "postconf", "postsuper"]
        .iter()
        .all(|t| tool(t).is_some())
}

/// Full path of a Postfix tool (they live in /usr/sbin, often not on a
/// user's PATH).
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn run(name: &str, args: &[&str]) -> Result<String, PostfixError> {
    let command = format!("{name} {}", args.join(" "));
    let fail = |detail: String| PostfixError::Command {
        command: command.clone(),
        detail,
    };
    let bin = tool(name).ok_or_else(|| fail("not installed".into()))?;
    let out = Command::new(bin)
        .args(args)
        .output()
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Postfix running as a relay to a sink.
pub struct Postfix {
    listen: SocketAddr,
}

impl Postfix {
    /// Stops any running Postfix, empties its queue, points `relayhost` at
    /// `sink`, starts it and waits for its smtpd listener.
    pub async fn start(sink: SocketAddr) -> Result<Postfix, PostfixError> {
        let _ = run("postfix", &["stop"]).await;
        let _ = run("postsuper", &["-d", "ALL"]).await;
        run(
            "postconf",
            &[
                "-e",
                &format!("relayhost = [{}]:{}", sink.ip(), sink.port()),
            ],
        )
        .await?;
        let listen = listener(&run("postconf", &["-M"]).await?).ok_or(PostfixError::NoListener)?;
        run("postfix", &["start"]).await?;
        ports::wait_for_port(listen, Duration::from_secs(30))
            .await
            .map_err(|_| PostfixError::NotReady(listen))?;
        Ok(Postfix { listen })
    }

    /// Where its smtpd listens.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The master process's pid (root of every Postfix process).
    pub async fn master_pid(&self) -> Option<u32> {
        let queue = run("postconf", &["-h", "queue_directory"]).await.ok()?;
        let text =
            std::fs::read_to_string(PathBuf::from(queue.trim()).join("pid/master.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// Stops Postfix and empties its queue.
    pub async fn stop(self) {
        let _ = run("postfix", &["stop"]).await;
        let _ = run("postsuper", &["-d", "ALL"]).await;
    }
}

/// The address of the first `inet` smtpd service in `postconf -M` output
/// (`127.0.0.1:2525 inet n - n - - smtpd`).
pub fn listener(master_cf: &str) -> Option<SocketAddr> {
    master_cf.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"inet") && fields.get(7) == Some(&"smtpd") {
            fields[0].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_smtpd_listener() {
        let text = "pickup     unix  n       -       n       60      1       pickup\n\
                    127.0.0.1:2525 inet n    -       n       -       -       smtpd\n";
        assert_eq!(listener(text), Some(([127, 0, 0, 1], 2525).into()));
        assert_eq!(listener("smtp inet n - n - - smtpd\n"), None);
    }
}
