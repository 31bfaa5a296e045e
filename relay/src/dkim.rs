//! DKIM signing, once, before enqueue, so every retry carries the same
//! signature.
//!
//! Keys come from the files named in the config. The operator rotates keys
//! in place (same path, new content) and the config itself can change, so
//! keys are cached by domain and re-read whenever the key file's metadata
//! (mtime, length, inode) or the configured selector/algorithm changes. The
//! metadata is looked at (one `stat`) at most once per [`RECHECK`] per
//! domain rather than per message: a rotated key is used within a second
//! (a Secret update takes far longer to reach the pod), and no watcher has
//! to be kept in step with config reloads.
//! A domain whose key is missing or unreadable is an error: the caller
//! refuses the message (451 4.3.0) rather than sending it unsigned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};

use crate::config::{DkimAlgorithm, DkimConfig};
use crate::reload::{FileFingerprint as Fingerprint, file_fingerprint as fingerprint};

/// Headers signed when present (RFC 6376 5.4.1 recommendations plus the
/// list headers mailbox providers look at).
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

/// Why a message could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// The key file cannot be read.
    #[error("DKIM key {path} for {domain} cannot be read: {reason}")]
    Unreadable {
        /// The sending domain.
        domain: String,
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key file does not hold a key of the configured algorithm.
    #[error("DKIM key {path} for {domain} is not a valid {algorithm:?} key: {reason}")]
    BadKey {
        /// The sending domain.
        domain: String,
        /// The key file.
        path: PathBuf,
        /// The configured algorithm.
        algorithm: DkimAlgorithm,
        /// Why.
        reason: String,
    },
    /// Signing itself failed (no signable headers, crypto error).
    #[error("DKIM signing for {domain} failed: {reason}")]
    Sign {
        /// The sending domain.
        domain: String,
        /// Why.
        reason: String,
    },
}

enum Signer {
    Ed25519(DkimSigner<Ed25519Key, Done>),
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
}

/// How long a key file's metadata is trusted before it is looked at again.
pub const RECHECK: Duration = Duration::from_secs(1);

struct Entry {
    config: DkimConfig,
    fingerprint: Fingerprint,
    signer: Arc<Signer>,
    /// When the file's metadata was last seen to match `fingerprint`.
    checked: Instant,
}

/// The signing keys of all sending domains, loaded on first use and
/// re-read when their files change.
pub struct DkimKeys {
    cache: Mutex<HashMap<String, Arc<Entry>>>,
    recheck: Duration,
}

impl Default for DkimKeys {
    fn default() -> DkimKeys {
        DkimKeys::with_recheck(RECHECK)
    }
}

/// Reads a PEM private key file.
fn read_key(path: &Path) -> std::io::Result<rustls::pki_types::PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no private key in PEM file",
        )
    })
}

fn load(domain: &str, config: &DkimConfig) -> Result<Signer, DkimError> {
    let unreadable = |reason: String| DkimError::Unreadable {
        domain: domain.to_string(),
        path: config.key_file.clone(),
        reason,
    };
    let bad = |reason: String| DkimError::BadKey {
        domain: domain.to_string(),
        path: config.key_file.clone(),
        algorithm: config.algorithm,
        reason,
    };
    let der = read_key(&config.key_file).map_err(|e| unreadable(e.to_string()))?;
    Ok(match config.algorithm {
        DkimAlgorithm::Ed25519 => {
            let rustls::pki_types::PrivateKeyDer::Pkcs8(pkcs8) = &der else {
                return Err(bad("ed25519 keys must be PKCS#8".into()));
            };
            let key = Ed25519Key::from_pkcs8_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| bad(e.to_string()))?;
            Signer::Ed25519(builder(key, domain, config))
        }
        DkimAlgorithm::Rsa2048 => {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| bad(e.to_string()))?;
            Signer::Rsa(builder(key, domain, config))
        }
    })
}

fn builder<T: mail_auth::common::crypto::SigningKey>(
    key: T,
    domain: &str,
    config: &DkimConfig,
) -> DkimSigner<T, Done> {
    DkimSigner::from_key(key)
        .domain(domain.to_ascii_lowercase())
        .selector(config.selector.clone())
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

impl DkimKeys {
    /// An empty cache.
    pub fn new() -> DkimKeys {
        DkimKeys::default()
    }

    /// An empty cache that looks at key files again after `recheck`
    /// (zero: before every signature).
    pub fn with_recheck(recheck: Duration) -> DkimKeys {
        DkimKeys {
            cache: Mutex::new(HashMap::new()),
            recheck,
        }
    }

    /// Loads (or re-validates) the key of `domain` now, so a broken key is
    /// found at start-up or config reload rather than on the first message.
    pub fn preload(&self, domain: &str, config: &DkimConfig) -> Result<(), DkimError> {
        self.signer(domain, config).map(|_| ())
    }

    fn signer(&self, domain: &str, config: &DkimConfig) -> Result<Arc<Signer>, DkimError> {
        let key = domain.to_ascii_lowercase();
        let cached = self
            .lock()
            .get(&key)
            .filter(|e| e.config == *config)
            .cloned();
        if let Some(entry) = &cached
            && entry.checked.elapsed() < self.recheck
        {
            return Ok(entry.signer.clone());
        }
        let fp = fingerprint(&config.key_file).map_err(|e| DkimError::Unreadable {
            domain: domain.to_string(),
            path: config.key_file.clone(),
            reason: e.to_string(),
        })?;
        if let Some(entry) = cached
            && entry.fingerprint == fp
        {
            self.lock().insert(
                key,
                Arc::new(Entry {
                    config: entry.config.clone(),
                    fingerprint: fp,
                    signer: entry.signer.clone(),
                    checked: Instant::now(),
                }),
            );
            return Ok(entry.signer.clone());
        }
        // Loading happens outside the lock: a slow disk must not stall
        // other domains.
        let signer = Arc::new(load(domain, config)?);
        tracing::info!(%domain, selector = %config.selector, path = %config.key_file.display(), "DKIM key loaded");
        self.lock().insert(
            key,
            Arc::new(Entry {
                config: config.clone(),
                fingerprint: fp,
                signer: signer.clone(),
                checked: Instant::now(),
            }),
        );
        Ok(signer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (single insert), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signs `message` (CRLF headers and body) for `domain` and returns the
    /// `DKIM-Signature: ...\r\n` header to prepend. CPU-bound: RSA takes
    /// milliseconds (call it from a blocking task), ed25519 some 25 us plus
    /// hashing the body (see [`signs_inline`]).
    pub fn sign(
        &self,
        domain: &str,
        config: &DkimConfig,
        message: &[u8],
    ) -> Result<String, DkimError> {
        let signer = self.signer(domain, config)?;
        let sig = match &*signer {
            Signer::Ed25519(s) => s.sign(message),
            Signer::Rsa(s) => s.sign(message),
        }
        .map_err(|e| DkimError::Sign {
            domain: domain.to_string(),
            reason: e.to_string(),
        })?;
        let mut header = sig.to_header();
        if !header.ends_with("\r\n") {
            header.push_str("\r\n");
        }
        Ok(header)
    }
}

/// Largest message signed on the calling (async) thread with ed25519:
/// hashing 64 KiB takes about 100 us, about what a task may hold a runtime
/// thread; beyond that, and for RSA, the hand-off to the blocking pool (two
/// thread wake-ups, some 20-50 us) is the smaller cost.
pub const INLINE_SIGN_MAX: usize = 64 * 1024;

/// Whether a message of `len` bytes is signed inline rather than on the
/// blocking pool.
pub fn signs_inline(algorithm: DkimAlgorithm, len: usize) -> bool {
    match algorithm {
        DkimAlgorithm::Ed25519 => len <= INLINE_SIGN_MAX,
        DkimAlgorithm::Rsa2048 => false,
    }
}

/// Algorithm label for metrics.
pub fn algorithm_label(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::Ed25519 => "ed25519-sha256",
        DkimAlgorithm::Rsa2048 => "rsa-sha256",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed25519_pem() -> String {
        let der = Ed25519Key::generate_pkcs8().unwrap();
        pem("PRIVATE KEY", &der)
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    const MSG: &[u8] = b"From: a@example.test\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n";

    #[test]
    fn signs_and_reloads_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, ed25519_pem()).unwrap();
        let cfg = DkimConfig {
            selector: "s1".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: path.clone(),
        };
        let keys = DkimKeys::with_recheck(Duration::ZERO);
        let h1 = keys.sign("Example.test", &cfg, MSG).unwrap();
        assert!(
            h1.starts_with(
                "DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.test; c=relaxed/relaxed"
            ),
            "{h1}"
        );
        assert!(h1.ends_with("\r\n"));
        // Present headers are signed; absent ones are listed too (null
        // signed), so nobody can add a Cc or Reply-To afterwards.
        let h = h1
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .replace(['\r', '\n', '\t'], "");
        for name in ["From", "To", "Subject", "Cc", "Reply-To"] {
            assert!(h.split(':').any(|n| n == name), "{name} in {h}");
        }
        // Rotation in place: a new key gives a different signature.
        std::fs::write(&path, format!("{}\n", ed25519_pem())).unwrap();
        let h2 = keys.sign("example.test", &cfg, MSG).unwrap();
        let b = |h: &str| h.split("b=").last().unwrap().to_string();
        assert_ne!(b(&h1), b(&h2));
    }

    #[test]
    fn key_files_are_looked_at_again_only_after_the_recheck_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        let cfg = DkimConfig {
            selector: "s1".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: path.clone(),
        };
        let cached = DkimKeys::with_recheck(Duration::from_secs(3600));
        let every_time = DkimKeys::with_recheck(Duration::ZERO);
        std::fs::write(&path, ed25519_pem()).unwrap();
        cached.sign("example.test", &cfg, MSG).unwrap();
        every_time.sign("example.test", &cfg, MSG).unwrap();
        // Gone from disk: the cached key signs on inside its interval, the
        // other cache notices at once.
        std::fs::remove_file(&path).unwrap();
        assert!(cached.sign("example.test", &cfg, MSG).is_ok());
        assert!(matches!(
            every_time.sign("example.test", &cfg, MSG),
            Err(DkimError::Unreadable { .. })
        ));
        // A changed config is never served from the cache.
        let moved = DkimConfig {
            key_file: dir.path().join("elsewhere.pem"),
            ..cfg
        };
        assert!(cached.sign("example.test", &moved, MSG).is_err());
    }

    #[test]
    fn only_small_ed25519_messages_sign_inline() {
        let cases = [
            (DkimAlgorithm::Ed25519, 1024, true),
            (DkimAlgorithm::Ed25519, INLINE_SIGN_MAX, true),
            (DkimAlgorithm::Ed25519, INLINE_SIGN_MAX + 1, false),
            (DkimAlgorithm::Rsa2048, 1024, false),
        ];
        for (algorithm, len, inline) in cases {
            assert_eq!(signs_inline(algorithm, len), inline, "{algorithm:?} {len}");
        }
    }

    #[test]
    fn missing_or_wrong_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let keys = DkimKeys::new();
        let mut cfg = DkimConfig {
            selector: "s1".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: dir.path().join("absent.pem"),
        };
        assert!(matches!(
            keys.sign("example.test", &cfg, MSG),
            Err(DkimError::Unreadable { .. })
        ));
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        cfg.key_file = garbage;
        assert!(matches!(
            keys.sign("example.test", &cfg, MSG),
            Err(DkimError::Unreadable { .. })
        ));
        let ed = dir.path().join("ed.pem");
        std::fs::write(&ed, ed25519_pem()).unwrap();
        cfg.key_file = ed;
        cfg.algorithm = DkimAlgorithm::Rsa2048;
        assert!(matches!(
            keys.sign("example.test", &cfg, MSG),
            Err(DkimError::BadKey { .. })
        ));
    }

    /// The quick start's committed example key must load and sign.
    #[test]
    fn quick_start_example_key_signs() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/local/dkim-example.test.key");
        if !path.exists() {
            return;
        }
        let cfg = DkimConfig {
            selector: "example".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: path,
        };
        let header = DkimKeys::new().sign("example.test", &cfg, MSG).unwrap();
        assert!(header.contains("s=example; d=example.test"), "{header}");
    }
}
