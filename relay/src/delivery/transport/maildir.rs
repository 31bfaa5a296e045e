//! The Maildir transport: each recipient's copy becomes one file in
//! `<root>/new/`, for the local quick start and for tests.
//!
//! Maildir's own delivery protocol makes it safe without locks: write the
//! file under `tmp/`, fsync it, then rename it into `new/` (atomic on one
//! file system), so a reader never sees half a message.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use petrel_crds::config::RelayConfig;

use super::super::classify::{Failure, Fault, Reply};
use super::super::settle::RcptOutcome;

/// Distinguishes files written in the same microsecond by this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `tmp`, `new` and `cur` under `root` when missing.
pub fn ensure(root: &Path) -> std::io::Result<()> {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(root.join(sub))?;
    }
    Ok(())
}

/// A unique file name: `time.M<micros>P<pid>Q<n>.<hostname>`, the usual
/// Maildir recipe. `/` and `:` in the hostname are replaced (RFC-less but
/// what every Maildir writer does).
pub fn unique_name(hostname: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let host: String = hostname
        .chars()
        .map(|c| match c {
            '/' => '\\',
            ':' => '_',
            c => c,
        })
        .collect();
    format!(
        "{}.M{}P{}Q{}.{}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        n,
        host
    )
}

/// Removes CR and LF, so an address cannot add header lines.
fn header_safe(value: &str) -> String {
    value.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

/// Writes one copy of `data` for `recipient` and returns its path in
/// `new/`. Adds `Return-Path` and `Delivered-To` on top, as a final
/// delivery agent does (RFC 5321 4.4).
pub fn deliver(
    root: &Path,
    hostname: &str,
    mail_from: &str,
    recipient: &str,
    data: &[u8],
) -> std::io::Result<PathBuf> {
    ensure(root)?;
    let name = unique_name(hostname);
    let tmp = root.join("tmp").join(&name);
    let new = root.join("new").join(&name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(format!("Return-Path: <{}>\r\n", header_safe(mail_from)).as_bytes())?;
        file.write_all(format!("Delivered-To: {}\r\n", header_safe(recipient)).as_bytes())?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &new)?;
        // The rename is durable only once the directory is synced.
        std::fs::File::open(root.join("new"))?.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(new)
}

/// Delivery into the Maildir tree at `root`, one file per recipient.
pub(crate) struct Maildir<'a> {
    /// The config (the hostname in file names and headers).
    pub cfg: &'a RelayConfig,
    /// The tree.
    pub root: &'a Path,
}

impl super::Transport for Maildir<'_> {
    async fn deliver(
        &mut self,
        unit: &crate::queue::DeliveryUnit,
        data: &[u8],
    ) -> Vec<RcptOutcome> {
        deliver_maildir(self.cfg, self.root, unit, data).await
    }
}

async fn deliver_maildir(
    cfg: &RelayConfig,
    root: &std::path::Path,
    unit: &crate::queue::DeliveryUnit,
    data: &[u8],
) -> Vec<RcptOutcome> {
    let root = root.to_path_buf();
    let hostname = cfg.hostname.clone();
    let mail_from = unit.mail_from.clone();
    let recipients = unit.recipients.clone();
    let data = data.to_vec();
    let joined = tokio::task::spawn_blocking(move || {
        recipients
            .iter()
            .map(|rcpt| deliver(&root, &hostname, &mail_from, rcpt, &data))
            .collect::<Vec<_>>()
    })
    .await;
    match joined {
        Ok(results) => results
            .into_iter()
            .map(|r| RcptOutcome {
                result: match r {
                    Ok(path) => Ok(Reply::new(
                        250,
                        Some([2, 0, 0]),
                        format!("delivered to {}", path.display()),
                    )),
                    Err(e) => Err(Failure::Fault(Fault::Local(e.to_string()))),
                },
                remote: None,
                tls: false,
                tls_policy: None,
            })
            .collect(),
        Err(e) => unit
            .recipients
            .iter()
            .map(|_| RcptOutcome {
                result: Err(Failure::Fault(Fault::Local(e.to_string()))),
                remote: None,
                tls: false,
                tls_policy: None,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_into_new_with_envelope_headers() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        let data = b"Subject: hi\r\n\r\nbody\r\n";
        let a = deliver(&root, "relay.test", "s@example.test", "a@x.test", data).unwrap();
        let b = deliver(
            &root,
            "relay.test",
            "s@example.test",
            "b@x.test\r\nX: y",
            data,
        )
        .unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(root.join("new")));
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert!(root.join("cur").is_dir());
        let text = std::fs::read_to_string(&a).unwrap();
        assert_eq!(
            text,
            "Return-Path: <s@example.test>\r\nDelivered-To: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
        );
        let text = std::fs::read_to_string(&b).unwrap();
        assert!(text.contains("Delivered-To: b@x.testX: y\r\n"));
    }

    #[test]
    fn names_are_unique_and_safe() {
        let a = unique_name("host:with/slash");
        let b = unique_name("host:with/slash");
        assert_ne!(a, b);
        assert!(!a.contains('/') && !a.contains(':'), "{a}");
    }
}
