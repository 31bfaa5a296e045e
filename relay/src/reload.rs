//! Files that are re-read when they change: the config, TLS certificates,
//! DKIM keys, the AUTH users file.
//!
//! Kubernetes updates mounted ConfigMaps and Secrets by swapping a symlink,
//! and cert-manager renews certificates in place, so the relay polls file
//! metadata (cheap: a `stat` per file per interval) instead of asking for
//! restarts. Readers get the latest parsed value with [`Reloading::get`],
//! which never touches the disk, so the hot path pays nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

/// What identifies a file's content cheaply: modification time, length
/// and inode (a swapped symlink changes the inode even when mtime does not).
pub(crate) type FileFingerprint = (Option<SystemTime>, u64, u64);

/// The [`FileFingerprint`] of `path` (following symlinks), one `stat`.
pub(crate) fn file_fingerprint(path: &std::path::Path) -> std::io::Result<FileFingerprint> {
    let meta = std::fs::metadata(path)?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let ino = 0;
    Ok((meta.modified().ok(), meta.len(), ino))
}

/// Fingerprints of several files; a missing file is `None`, so its
/// appearance counts as a change too.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint(Vec<Option<FileFingerprint>>);

fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    Fingerprint(paths.iter().map(|p| file_fingerprint(p).ok()).collect())
}

/// A value parsed from files, kept current by a background task.
pub struct Reloading<T> {
    current: watch::Receiver<Arc<T>>,
    /// The sender of a [`Reloading::fixed`] value, kept so `changed()`
    /// waits forever instead of reporting a closed channel.
    _fixed: Option<Arc<watch::Sender<Arc<T>>>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Reloading {
            current: self.current.clone(),
            _fixed: self._fixed.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Parses now, then re-parses whenever one of `paths` changes, checking
    /// every `interval`. `parse` decides what a broken file means (keep the
    /// old value by returning `None`, or store an error value).
    pub fn spawn<F>(paths: Vec<PathBuf>, interval: Duration, initial: T, parse: F) -> Reloading<T>
    where
        F: Fn(Option<&T>) -> Option<T> + Send + Sync + 'static,
    {
        let (tx, rx) = watch::channel(Arc::new(initial));
        // Fingerprint now, not in the task: a change made before the task
        // first runs must still count as a change.
        let mut seen = fingerprint(&paths);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if tx.is_closed() {
                    return;
                }
                let now = fingerprint(&paths);
                if now == seen {
                    continue;
                }
                seen = now;
                let old = tx.borrow().clone();
                if let Some(new) = parse(Some(&old)) {
                    tx.send_replace(Arc::new(new));
                }
            }
        });
        Reloading {
            current: rx,
            _fixed: None,
        }
    }

    /// A value that never changes (tests, and files that are not watched).
    pub fn fixed(value: T) -> Reloading<T> {
        let (tx, rx) = watch::channel(Arc::new(value));
        Reloading {
            current: rx,
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// The latest value.
    pub fn get(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// Waits until the value changes; for tasks that rebuild on reload.
    pub async fn changed(&mut self) -> Arc<T> {
        // An error means the task ended; the value is then final.
        let _ = self.current.changed().await;
        self.current.borrow_and_update().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn picks_up_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value");
        std::fs::write(&path, "one").unwrap();
        let p = path.clone();
        let read = move |_: Option<&String>| std::fs::read_to_string(&p).ok();
        let mut r = Reloading::spawn(
            vec![path.clone()],
            Duration::from_millis(20),
            read(None).unwrap(),
            read,
        );
        assert_eq!(*r.get(), "one");
        // Longer content changes the length even when mtime granularity is coarse.
        std::fs::write(&path, "two, longer").unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), r.changed())
            .await
            .unwrap();
        assert_eq!(*got, "two, longer");
    }
}
